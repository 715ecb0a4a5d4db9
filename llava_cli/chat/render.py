"""Answers at a terminal: streamed live as they are generated, shown as Markdown once complete.

`stream_markdown(console, chunks, clean)` prints each block of the answer (the text up to a blank
line outside a code fence) as Rich Markdown as soon as the block is finished, after a blank line
as in the text: headings, lists, tables, code blocks with syntax highlighting, all wrapped to the terminal's width, links shown
as text rather than terminal hyperlinks. The block still being written is shown live below, as
plain text, and is the only part ever redrawn; only its last screenful is drawn, so a long
answer never asks the terminal to redraw what has scrolled away. When the stream stops early
(Ctrl-C, an error) the unfinished block stays on screen as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

FENCE = re.compile(r" {0,3}(```|~~~)")
CODE_THEME = "monokai"


def block_end(text: str) -> int:
    """Where the finished blocks of `text` end: just past its last blank line outside a code fence."""
    end = offset = 0
    fenced = False
    for line in text.splitlines(keepends=True):
        offset += len(line)
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and not line.strip() and line.endswith("\n"):
            end = offset
    return end


def as_markdown(text: str) -> RenderableType:
    from rich.markdown import Markdown

    return Markdown(text, code_theme=CODE_THEME, hyperlinks=False)


def tail(console: Console, text: str) -> RenderableType:
    """The last screenful of `text`, wrapped to the console's width."""
    from rich.text import Text

    lines = Text(text).wrap(console, console.width)
    return Text("\n").join(lines[-max(console.height - 2, 1) :])


def stream_markdown(console: Console, chunks: Iterator[str], clean: Callable[[str], str]) -> None:
    """Show an answer streamed in `chunks`; `clean` makes each chunk safe to print."""
    from rich.live import Live
    from rich.text import Text

    text, rendered = "", 0
    with Live(console=console, transient=True, auto_refresh=False, vertical_overflow="visible") as live:
        try:
            for chunk in chunks:
                text += clean(chunk)
                end = block_end(text)
                if end > rendered:
                    print_block(console, text[rendered:end], first=rendered == 0)
                    rendered = end
                live.update(tail(console, text[rendered:]), refresh=True)
        except BaseException:
            live.update(Text(""), refresh=True)
            console.print(Text(text[rendered:]), soft_wrap=False)
            raise
        live.update(Text(""), refresh=True)
    if text[rendered:].strip():
        print_block(console, text[rendered:], first=rendered == 0)


def print_block(console: Console, block: str, first: bool) -> None:
    """A finished block as Markdown, after one blank line unless it opens the answer: Rich separates
    the blocks inside one Markdown, not blocks printed one by one (and starts a list with an empty
    line of its own, dropped here so that every block gets the same single blank line)."""
    from rich.segment import Segment, Segments

    lines = console.render_lines(as_markdown(block), pad=False)
    while lines and not "".join(segment.text for segment in lines[0]):
        lines.pop(0)
    if not first:
        console.line()
    console.print(Segments([segment for line in lines for segment in (*line, Segment.line())]), end="")
