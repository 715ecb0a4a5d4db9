"""A scripted `ChatIO` for driving `ChatLoop` in-process: lines in, everything it was told kept."""

from __future__ import annotations

from collections.abc import Iterator


class FakeIO:
    """Reads `lines` one by one; keeps streamed answers, infos and errors in order."""

    interactive = True
    columns = 80

    def __init__(self, lines: list[str] | None = None) -> None:
        self.lines = list(lines or [])
        self.markdown = False
        self.answers: list[str] = []
        self.infos: list[str] = []
        self.errors: list[str] = []

    def read(self) -> str | None:
        return self.lines.pop(0) if self.lines else None

    def stream(self, chunks: Iterator[str]) -> None:
        for _ in chunks:
            pass

    def answered(self, record: dict) -> None:
        self.answers.append(record["answer"])

    def info(self, message: str) -> None:
        self.infos.append(message)

    def report(self, message: str) -> None:
        self.infos.append(message)

    def error(self, message: str) -> None:
        self.errors.append(message)
