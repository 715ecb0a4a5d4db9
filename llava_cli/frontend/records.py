"""The JSON records scripts read: one answer (`ask --json`, piped `chat --json`), one `ask --each`
answer or error, and the JSON-lines file (`-o`) that a rerun resumes, or its CSV form
(`-o FILE --output-format csv`, `CsvFile`). How a record is written to stdout in each output format is frontend/output.py's.
Under a schema a record's `answer` is the parsed JSON value (an object for an object schema), not its text.

`answer_record` is the object of one answer, the same keys for `ask` and `chat` (README lists them).

Each answer is one record, written as one whole line and flushed at once (a single `write` to the
file), so a run that is interrupted or killed never loses a finished answer and never leaves a
half-written line behind it - except if it dies inside that very write, and a half line at the
end of the file is cut off when the file is opened again. `RecordFile` reads an existing file
before appending: the images it already answered for the same prompt are skipped by the caller.
The file is opened once, through safeio's `open_output` (never through a symlink, never a FIFO or
device, never another user's file or a hard link to one, at most MAX_OUTPUT_BYTES read back), and
read, cut and appended to through that one descriptor.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from llava_cli.base.errors import UsageError
from llava_cli.base.safeio import open_output, write_all
from llava_cli.frontend.output import CsvWriter, encoded, json_line, unguarded


def answer_record(
    answer: Any, model: str, images: list[str], session: str | None, figures: dict[str, Any]
) -> dict[str, Any]:
    """One answer as `--json` prints it: the answer (parsed JSON under a schema), the model, the turn's images as given, the id of
    the saved conversation (null when not saved), then the figures of `Stats.as_dict()`."""
    return {"answer": answer, "model": model, "images": images, "session": session, **figures}


# The keys of every batch record, in this order, each always present (null when it does not apply).
RECORD_KEYS = (
    "image",
    "prompt",
    "answer",
    "error",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "seconds",
    "finish_reason",
)
RECORD_START = b'{"image":'  # how every line we write begins: recognises our own half-written line
MAX_OUTPUT_BYTES = 256 * 2**20  # read back to resume: a few hundred bytes a record, so about a million images


def make_record(image: str, prompt: str, model: str, **fields: Any) -> dict[str, Any]:
    """A record with every key of `RECORD_KEYS`; `fields` fills in the answer or the error."""
    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record.update(image=image, prompt=prompt, model=model, **fields)
    return record


class RecordFile:
    """An append-only JSON-lines file of records, resumed from what it already holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd, content = open_records(path)
        try:
            self.done = answered_in(content, self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise

    def answered(self, image: str, prompt: str) -> bool:
        """True when the file already holds an answer (not an error) for this image and prompt.
        An image read from stdin is never taken as answered: its name says nothing of its content."""
        return image != "-" and (image, prompt) in self.done

    def write(self, record: dict[str, Any]) -> None:
        write_all(self.fd, json_line(record))  # one line, finished even when os.write writes less (a full disk)

    def close(self) -> None:
        os.close(self.fd)


def open_records(path: Path) -> tuple[int, bytes]:
    """(the append descriptor, the content so far) of `-o`'s file; `UsageError` when it cannot be ours."""
    try:
        return open_output(path, MAX_OUTPUT_BYTES)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}; choose another -o") from None


def answered_in(data: bytes, fd: int, path: Path) -> set[tuple[str, str]]:
    """(image, prompt) of every answered record in `data`, the content of `fd`; cut a half-written last line off it.

    Refuses (UsageError) a file that is not ours, so `-o` cannot damage an unrelated file.
    """
    complete, _, partial = data.rpartition(b"\n")
    done = set()
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            raise UsageError(f"{path} line {number} is not a llava answer record; choose another -o")
        if record.get("error") is None and "answer" in record:  # text, or parsed JSON under a schema
            done.add((record["image"], record["prompt"]))
    if partial:
        if not partial.startswith(RECORD_START):
            raise UsageError(
                f"{path} is not a llava JSON-lines file (its last line is not a record); choose another -o"
            )
        os.ftruncate(fd, len(complete) + 1 if complete else 0)  # a run died mid-line: redo that image
    return done


def parse_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("image"), str) and isinstance(record.get("prompt"), str)
    return record if ok else None


class CsvFile:
    """`-o FILE --output-format csv`: frontend/output.py's CSV rows appended, one write per row, resumed from
    the rows already there. A CSV holds answers only (errors go to stderr, so a rerun retries them)
    and no prompt: a rerun skips the images the file holds whatever the question was, so give a
    new question a new file. A file whose columns are not this run's (another schema) is refused."""

    def __init__(self, path: Path, constraint: str | None) -> None:
        self.path = path
        self.writer = CsvWriter(constraint)
        self.fd, content = open_records(path)
        try:
            self.done = self.resumed(content)
        except BaseException:
            os.close(self.fd)
            raise

    def resumed(self, content: bytes) -> set[str]:
        """The images the file answered; a half-written last row is cut off, a new file gets the header."""
        whole = whole_rows_end(content)
        if whole < len(content):
            os.ftruncate(self.fd, whole)  # a run died mid-row: redo that image
        header = self.writer.header()
        if whole == 0:
            write_all(self.fd, header)
            return set()
        if not content.startswith(header):
            raise UsageError(
                f"{self.path} is not a CSV with this run's columns ({', '.join(self.writer.columns)}); choose another -o"
            )
        rows = csv.reader(io.StringIO(content[len(header) : whole].decode("utf-8", "replace"), newline=""))
        return {unguarded(row[0]) for row in rows if row}

    def answered(self, image: str, prompt: str) -> bool:
        return image != "-" and image in self.done

    def write(self, record: dict[str, Any]) -> None:
        if record["error"] is None:
            write_all(self.fd, encoded(self.writer.record_row(record)))

    def close(self) -> None:
        os.close(self.fd)


def whole_rows_end(data: bytes) -> int:
    """Where the last whole CSV row of `data` ends: after a CRLF outside quotes (a quoted cell may hold
    line breaks; quotes inside a cell are doubled, so an even count of quotes means outside)."""
    end = position = quotes = 0
    for piece in data.split(b"\r\n")[:-1]:
        quotes += piece.count(b'"')
        position += len(piece) + 2
        if quotes % 2 == 0:
            end = position
    return end
