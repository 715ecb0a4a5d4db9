"""How answers reach stdout, one writer per output format (`text`, `json`, `jsonl`, `csv`): `ask`,
`ask --each` and piped `chat --json` all write through `WRITERS`, so a new format is one writer.
`WRITERS[name](constraint)` makes the writer for a run whose answers follow the schema text
`constraint` (None: free text); only csv's columns depend on it.

A writer has four jobs, each given the records of frontend/records.py (`answer_record` for one answer,
`make_record` for a batch line):
- `stream(chunks, raw)`: take in one answer as it is generated and return its whole text (text
  shows it at once and ends its line, even when it is stopped midway; JSON shows nothing yet).
- `finish(record, raw)`: write what comes once the answer is saved and its figures are known
  (JSON: the object on one line; text: nothing more).
- `line(record, raw)`: one `ask --each` answer as one whole line of bytes, or None to write nothing
  (text and csv lines carry answers only; errors go to stderr).
- `header()`: the bytes that come before the first line of a new output (csv's column names), or None.

Everything goes through base/terminal.py's choke point: on a terminal escape sequences are stripped
unless `raw`; piped, the bytes are exactly as generated.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from llava_cli.base.errors import UsageError
from llava_cli.base.terminal import emit, shown

# Tabs, and everything `str.splitlines` or a terminal takes for the end of a line.
LINE_BREAKS = re.compile(r"\s*[\r\n\t\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+\s*")


class Writer(Protocol):
    def stream(self, chunks: Iterator[str], raw: bool) -> str: ...
    def finish(self, record: dict[str, Any], raw: bool) -> None: ...
    def line(self, record: dict[str, Any], raw: bool) -> bytes | None: ...
    def header(self) -> bytes | None: ...


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
        image, answer = one_field(record["image"]), one_field(answer_text(record["answer"]))
        return (shown(f"{image}\t{answer}", sys.stdout, raw) + "\n").encode("utf-8", "backslashreplace")

    def header(self) -> bytes | None:
        return None


class JsonWriter:
    """One JSON object per answer, on one line (json and jsonl write the same lines)."""

    def stream(self, chunks: Iterator[str], raw: bool) -> str:
        return "".join(chunks)  # the whole answer is written by `finish`

    def finish(self, record: dict[str, Any], raw: bool) -> None:
        emit(json.dumps(record, ensure_ascii=False), sys.stdout, raw, flush=True)

    def line(self, record: dict[str, Any], raw: bool) -> bytes | None:
        return json_line(record)

    def header(self) -> bytes | None:
        return None


class CsvWriter:
    """One row per answer (RFC 4180 quoting, CRLF rows): the image, then one column per top-level
    property of the schema in the schema's order; without one (free text, --format json) one
    `answer` column. A string is its cell as is, any other value its compact JSON, a property the
    answer left out an empty cell.

    Formula injection: a spreadsheet runs a cell that begins with = + - @ (or tab, CR) as a formula,
    and the answers and image names are hostile text. Such a string cell is prefixed with ' as
    OWASP suggests (a spreadsheet shows the text, without the quote); so is one that already begins
    with ', so the prefix reads back unambiguously (`unguarded`). Numbers and JSON cells are left
    alone: the grammar writes them, and none can begin a formula that runs."""

    def __init__(self, constraint: str | None) -> None:
        self.properties = top_level_properties(constraint)
        self.columns = [IMAGE_COLUMN, *(self.properties or [ANSWER_COLUMN])]

    def stream(self, chunks: Iterator[str], raw: bool) -> str:
        return "".join(chunks)  # the row is written by `finish`

    def finish(self, record: dict[str, Any], raw: bool) -> None:
        """One answer (`llava ask`): the header and its row; several images share the image cell, space-separated."""
        row = self.row(" ".join(record["images"]), record["answer"])
        sys.stdout.flush()
        sys.stdout.buffer.write(self.header() + encoded(shown(row, sys.stdout, raw)))
        sys.stdout.buffer.flush()

    def line(self, record: dict[str, Any], raw: bool) -> bytes | None:
        """An `ask --each` row, or None for an error record (its line goes to stderr)."""
        return None if record["error"] is not None else encoded(shown(self.record_row(record), sys.stdout, raw))

    def header(self) -> bytes:
        return encoded(csv_line(self.columns))

    def record_row(self, record: dict[str, Any]) -> str:
        return self.row(record["image"], record["answer"])

    def row(self, image: str, answer: Any) -> str:
        if self.properties and isinstance(answer, dict):
            values = [answer.get(name, MISSING) for name in self.properties]
        else:
            values = [answer]
        return csv_line([guarded(image), *(csv_cell(value) for value in values)])


IMAGE_COLUMN, ANSWER_COLUMN = "image", "answer"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")  # OWASP's list, plus ' itself (see CsvWriter)
MISSING = object()  # a property the answer left out: an empty cell


def top_level_properties(constraint: str | None) -> list[str]:
    """The names of the schema's top-level properties, in its order ([] without a schema or properties);
    `UsageError` when one is named like the image column."""
    schema = json.loads(constraint) if constraint else {}
    properties = schema.get("properties")
    names = list(properties) if isinstance(properties, dict) else []
    if IMAGE_COLUMN in names:
        raise UsageError(
            f"--output-format csv: the schema's property {IMAGE_COLUMN!r} would clash with the image column; rename it"
        )
    return names


def csv_cell(value: Any) -> str:
    if value is MISSING:
        return ""
    return guarded(value) if isinstance(value, str) else compact_json(value)


def guarded(text: str) -> str:
    """`text` safe from a spreadsheet's formulas (see CsvWriter)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def unguarded(cell: str) -> str:
    """The text `guarded` wrote as `cell`."""
    return cell.removeprefix("'")


def csv_line(cells: list[str]) -> str:
    """One CSV row, quoted where needed, ending in CRLF."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue()


def encoded(text: str) -> bytes:
    """UTF-8; a file name that is not UTF-8 keeps its bytes as backslash escapes (as json_line)."""
    return text.encode("utf-8", "backslashreplace")


def answer_text(answer: Any) -> str:
    """An answer as one text: itself, or under a schema its compact JSON."""
    return answer if isinstance(answer, str) else compact_json(answer)


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def one_field(text: str) -> str:
    return LINE_BREAKS.sub(" ", text)


def end_line() -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()


WRITERS: dict[str, Callable[[str | None], Writer]] = {
    "text": lambda _: TextWriter(),
    "json": lambda _: JsonWriter(),
    "jsonl": lambda _: JsonWriter(),
    "csv": CsvWriter,
}
OUTPUT_FORMATS = tuple(WRITERS)


def json_line(record: dict[str, Any]) -> bytes:
    """One line of valid UTF-8 JSON. A file name that is not UTF-8 reaches us with surrogate
    escapes; `backslashreplace` writes them as JSON `\\udcXX` escapes, which read back the same."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


class StdoutRecords:
    """`ask --each` records on stdout, each line written whole and flushed, in `format`; the format's
    header (csv) before the first."""

    def __init__(self, format: str, raw: bool = False, constraint: str | None = None) -> None:
        self.writer = WRITERS[format](constraint)
        self.raw = raw  # --raw: keep escape sequences even on a terminal
        self.header = self.writer.header()

    def answered(self, image: str, prompt: str) -> bool:
        return False

    def write(self, record: dict[str, Any]) -> None:
        line = self.writer.line(record, self.raw)
        if line is None:
            return
        if self.header is not None:
            line, self.header = self.header + line, None
        sys.stdout.flush()  # anything written through the text layer goes first
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()

    def close(self) -> None:
        pass
