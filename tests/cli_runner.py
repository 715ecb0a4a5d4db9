"""Run the real `llava` entry point (`cli.main`) in this process: argv, stdin bytes in; exit code,
stdout and stderr out. Much faster than a subprocess for failures that happen before or during a
model load (torch is already imported), and an exception escaping `main` fails the test loudly."""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def first_error_line(self) -> str:
        return self.stderr.splitlines()[0] if self.stderr else ""


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class BytesStdout(io.TextIOWrapper):
    """A stdout with a byte layer (`.buffer`), as `ask --each` writes its JSON lines through, and `getvalue()`."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8")

    def getvalue(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode("utf-8")


def stdin_pipe(data: bytes) -> io.TextIOWrapper:
    """A real pipe holding `data` (select() and fileno() work on it, as on a shell's stdin)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)  # small inputs only: more than the pipe buffer would block
    os.close(write_fd)
    return io.TextIOWrapper(os.fdopen(read_fd, "rb"), encoding="utf-8")


def quiet_progress_bars() -> None:
    """A subprocess reads HF_HUB_DISABLE_PROGRESS_BARS when transformers is imported; here it already is."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def invoke(
    monkeypatch,
    *args: str,
    stdin: bytes = b"",
    stdout: io.StringIO | BytesStdout | None = None,
    stderr: io.StringIO | None = None,
) -> Outcome:
    from llava_cli.cli import main

    out, err = stdout or io.StringIO(), stderr or io.StringIO()
    quiet_progress_bars()
    monkeypatch.setattr(sys, "argv", ["llava", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", stdin_pipe(stdin))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.stdin.close()
    return Outcome(code, out.getvalue(), err.getvalue())
