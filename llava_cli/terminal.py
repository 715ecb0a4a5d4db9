"""Terminal output: consoles that respect pipes and NO_COLOR, and text made safe to show.

Model output and file names are untrusted: on a terminal they are shown with control and escape
sequences removed (`safe_for_terminal`), so an answer cannot recolour, retitle, hyperlink, write to
the clipboard or hide text with carriage returns. Piped output is left byte-for-byte as generated,
and so is terminal output with `--raw` (`shown(text, stream, raw)` applies these rules).
`table(rows, columns)` lays out two columns of plain text (help pages, /help, /stats) for a width.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

TERM_COLUMN = 28  # the widest left column of a `table`; longer terms put their text on the next line
MIN_TEXT_COLUMNS = 40  # narrower than this beside the terms, each text goes below its term
STACKED_INDENT = 6

# ESC-introduced sequences (CSI, OSC, DCS...) first, then any other C0/C1 control except \n and \t.
ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b[\]PX^_].*?(?:\x07|\x1b\\|\x9c|$)"  # OSC/DCS/PM/APC up to their terminator
    r"|\x1b[@-Z\\-_]?"  # other two-byte escapes, or a lone ESC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
    r"|[\u202a-\u202e\u2066-\u2069]",  # bidi overrides/isolates: they can make text read differently
    re.DOTALL,
)


def safe_for_terminal(text: str) -> str:
    return ESCAPE_SEQUENCE.sub("", text)


def shown(text: str, stream: IO[str], raw: bool = False) -> str:
    """`text` as it may be written to `stream`: stripped on a terminal unless `raw`, untouched when piped."""
    return text if raw or not is_terminal(stream) else safe_for_terminal(text)


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def make_console(stream: IO[str] | None = None) -> Console:
    """A Rich console on `stream` (stdout by default) with colour only for a terminal without NO_COLOR."""
    from rich.console import Console

    stream = stream or sys.stdout
    colour = is_terminal(stream) and "NO_COLOR" not in os.environ
    return Console(
        file=stream,
        no_color=not colour,
        color_system="auto" if colour else None,
        highlight=False,
        soft_wrap=True,
        emoji=False,
    )


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
