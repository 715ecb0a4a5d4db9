"""Terminal output: the one way text reaches a terminal, made safe to show, respecting pipes and NO_COLOR.

Model output, file names and everything read from a saved conversation are untrusted: on a
terminal they are shown with control and escape sequences removed (`safe_for_terminal`), so they
cannot recolour, retitle, hyperlink, clear the screen, write to the clipboard (OSC 52) or hide
text with carriage returns. Piped output is left byte-for-byte as generated, and so is an answer
on a terminal with `--raw` (`shown(text, stream, raw)` applies these rules).

The choke point, so that no call site can forget:
- `emit(text, stream)` for plain streams (stdout, stderr): every `print` of llava-cli goes through it;
- `emit_error(message)` / `one_line_text`: an error is one line whatever it names: a newline or
  carriage return in a file name is shown as `\\n` / `\\r`;
- `make_console(stream)` returns a Rich console that strips every string and `Text` it prints when
  its stream is a terminal; only `print_raw` (an answer with `--raw`) writes bytes as they are.

`table(rows, columns)` lays out two columns of plain text (help pages, /help, /stats) for a width.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

TERM_COLUMN = 28  # the widest left column of a `table`; longer terms put their text on the next line
MIN_TEXT_COLUMNS = 40  # narrower than this beside the terms, each text goes below its term
STACKED_INDENT = 6

# Unicode characters that change how the text around them reads without showing themselves: bidi
# marks, embeddings, overrides and isolates (Trojan Source, CVE-2021-42574), the line and paragraph
# separators (a new line the reader of a log or a `splitlines` does not expect), and the invisible
# format characters (zero-width space, word joiner, invisible operators, BOM, interlinear
# annotations, tag characters that smuggle hidden text). ZWNJ and ZWJ (U+200C, U+200D) stay:
# scripts and emoji need them.
SPOOFING_CHARACTERS = (
    "\u061c\u180e\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u206f"
    "\ufeff\ufff9-\ufffb\U000e0000-\U000e007f"
)
LINE_ENDS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# ESC-introduced sequences (CSI, OSC, DCS...) first, then any other C0/C1 control except \n and \t.
ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b[\]PX^_].*?(?:\x07|\x1b\\|\x9c|$)"  # OSC/DCS/PM/APC up to their terminator
    r"|\x1b[@-Z\\-_]?"  # other two-byte escapes, or a lone ESC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
    rf"|[{SPOOFING_CHARACTERS}]",
    re.DOTALL,
)


def safe_for_terminal(text: str) -> str:
    return ESCAPE_SEQUENCE.sub("", text)


def shown(text: str, stream: IO[str], raw: bool = False) -> str:
    """`text` as it may be written to `stream`: stripped on a terminal unless `raw`, untouched when piped."""
    return text if raw or not is_terminal(stream) else safe_for_terminal(text)


def one_line_text(text: str) -> str:
    """`text` on one line: newlines and carriage returns (a file may be named so) shown as \\n and \\r,
    the other characters that end a line for `str.splitlines` (U+2028...) as their escapes."""
    return LINE_ENDS.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def emit(text: str, stream: IO[str] | None = None, raw: bool = False, end: str = "\n", flush: bool = False) -> None:
    """Write `text` to `stream` (stdout by default), stripped of escape sequences if it is a terminal (unless `raw`)."""
    stream = stream or sys.stdout
    stream.write(shown(text, stream, raw) + end)
    if flush:
        stream.flush()


def emit_error(message: str, stream: IO[str] | None = None, prefix: str = "llava: error: ") -> None:
    """A one-line error on stderr (by default): `prefix` and `message`, newlines made visible."""
    emit(prefix + one_line_text(message), stream or sys.stderr)


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def make_console(stream: IO[str] | None = None) -> Console:
    """A Rich console on `stream` (stdout by default) that never lets an escape sequence of a text it
    prints through to a terminal, with colour only for a terminal without NO_COLOR."""
    from rich.console import Console
    from rich.text import Text

    class SafeConsole(Console):
        """Strips the strings and `Text`s it prints (its own colours and redraws are not in them)."""

        def render_str(self, text: str, **options: Any) -> Text:
            return super().render_str(shown(text, self.file), **options)

        def print(self, *objects: Any, **options: Any) -> None:
            super().print(*(safe_text(item, self.file) for item in objects), **options)

        def print_raw(self, text: str) -> None:
            """An answer exactly as generated (`--raw`): the one output that may carry escapes."""
            self.file.write(text)
            self.file.flush()

    stream = stream or sys.stdout
    colour = is_terminal(stream) and "NO_COLOR" not in os.environ
    return SafeConsole(
        file=stream,
        no_color=not colour,
        color_system="auto" if colour else None,
        highlight=False,
        soft_wrap=True,
        emoji=False,
    )


def progress_bar(console: Console, *counts: Any, auto_refresh: bool = True) -> Any:
    """The one shape of progress bar on stderr: what it is doing, the bar, `counts` (columns: items
    or bytes done, a rate), the time left; it disappears when done and never captures stdout or stderr."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *counts,
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        auto_refresh=auto_refresh,
        redirect_stdout=False,  # stdout carries the answers; it must never be captured
        redirect_stderr=False,
        transient=True,
    )


def safe_text(item: Any, stream: IO[str]) -> Any:
    """A Rich `Text` with escape sequences in it rebuilt without them (style kept) on a terminal; anything else as is."""
    from rich.text import Text

    if isinstance(item, Text) and is_terminal(stream) and ESCAPE_SEQUENCE.search(item.plain):
        return Text(safe_for_terminal(item.plain), style=item.style, end=item.end)
    return item


def table(rows: list[tuple[str, str]], columns: int) -> list[str]:
    """Two columns as plain lines: terms on the left, texts wrapped between words on the right
    (below a term too long to share its line); `columns` too narrow, each text goes below its term."""
    column = min(max(len(term) for term, _ in rows) + 4, TERM_COLUMN)
    if columns - column < MIN_TEXT_COLUMNS:
        column = STACKED_INDENT
    lines = []
    for term, text in rows:
        left = f"  {term}"
        help_lines = textwrap.wrap(text, columns - column, break_long_words=False, break_on_hyphens=False) or [""]
        if len(left) + 2 > column:
            lines.append(left)
        else:
            lines.append(left.ljust(column) + help_lines.pop(0))
        lines += [" " * column + line for line in help_lines]
    return [line.rstrip() for line in lines]
