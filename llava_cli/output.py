"""How answers reach stdout, one writer per output format (`text`, `json`, `jsonl`): `ask`,
`ask --each` and piped `chat --json` all write through `WRITERS`, so a new format is one writer.

A writer has three jobs, each given the records of records.py (`answer_record` for one answer,
`make_record` for a batch line):
- `stream(chunks, raw)`: take in one answer as it is generated and return its whole text (text
  shows it at once and ends its line, even when it is stopped midway; JSON shows nothing yet).
- `finish(record, raw)`: write what comes once the answer is saved and its figures are known
  (JSON: the object on one line; text: nothing more).
- `line(record, raw)`: one `ask --each` answer as one whole line of bytes, or None to write nothing
  (text lines carry answers only; errors go to stderr).

Everything goes through terminal.py's choke point: on a terminal escape sequences are stripped
unless `raw`; piped, the bytes are exactly as generated.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Any, Protocol

from llava_cli.terminal import emit, shown

# Tabs, and everything `str.splitlines` or a terminal takes for the end of a line.
LINE_BREAKS = re.compile(r"\s*[\r\n\t\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+\s*")


class Writer(Protocol):
    def stream(self, chunks: Iterator[str], raw: bool) -> str: ...
    def finish(self, record: dict[str, Any], raw: bool) -> None: ...
    def line(self, record: dict[str, Any], raw: bool) -> bytes | None: ...


class TextWriter:
    """The answer as it comes, ended by a newline; `ask --each`: `IMAGE<TAB>ANSWER` lines."""

    def stream(self, chunks: Iterator[str], raw: bool) -> str:
        """Shown as generated, ended by a newline even when it is stopped (Ctrl-C) midway."""
        parts: list[str] = []
        try:
            for chunk in chunks:
                emit(chunk, sys.stdout, raw, end="", flush=True)
                parts.append(chunk)
        except BaseException:
            if parts:
                end_line()
            raise
        end_line()
        return "".join(parts)

    def finish(self, record: dict[str, Any], raw: bool) -> None:
        pass  # the line ended with the answer, before it was saved (a failed save's warning follows it)

    def line(self, record: dict[str, Any], raw: bool) -> bytes | None:
        """`IMAGE<TAB>ANSWER` on one line: line breaks and tabs inside the image's name (a file may be
        named so) and inside the answer become spaces, so neither can forge a field or a line."""
        if record["error"] is not None:
            return None
        image, answer = one_field(record["image"]), one_field(record["answer"])
        return (shown(f"{image}\t{answer}", sys.stdout, raw) + "\n").encode("utf-8", "backslashreplace")


class JsonWriter:
    """One JSON object per answer, on one line (json and jsonl write the same lines)."""

    def stream(self, chunks: Iterator[str], raw: bool) -> str:
        return "".join(chunks)  # the whole answer is written by `finish`

    def finish(self, record: dict[str, Any], raw: bool) -> None:
        emit(json.dumps(record, ensure_ascii=False), sys.stdout, raw, flush=True)

    def line(self, record: dict[str, Any], raw: bool) -> bytes | None:
        return json_line(record)


def one_field(text: str) -> str:
    return LINE_BREAKS.sub(" ", text)


def end_line() -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()


WRITERS: dict[str, Writer] = {"text": TextWriter(), "json": JsonWriter(), "jsonl": JsonWriter()}
OUTPUT_FORMATS = tuple(WRITERS)


def json_line(record: dict[str, Any]) -> bytes:
    """One line of valid UTF-8 JSON. A file name that is not UTF-8 reaches us with surrogate
    escapes; `backslashreplace` writes them as JSON `\\udcXX` escapes, which read back the same."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


class StdoutRecords:
    """`ask --each` records on stdout, each line written whole and flushed, in `format`."""

    def __init__(self, format: str, raw: bool = False) -> None:
        self.writer = WRITERS[format]
        self.raw = raw  # --raw: keep escape sequences even on a terminal

    def answered(self, image: str, prompt: str) -> bool:
        return False

    def write(self, record: dict[str, Any]) -> None:
        line = self.writer.line(record, self.raw)
        if line is None:
            return
        sys.stdout.flush()  # anything written through the text layer goes first
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()

    def close(self) -> None:
        pass
