"""The terminal (issue 14, section 4): /help and /stats laid out for the terminal's width without
splitting a word, the status line's context figure after /undo and after a resume, a stopped
`ask` answer ended by a newline, and a blank line between rendered Markdown blocks."""

from __future__ import annotations

import io
import re
from collections import Counter

import pytest
from cli_runner import invoke
from fake_io import FakeIO
from fakes import FakeBackend, use_backend
from rich.console import Console

from llava_cli.engine.streaming import Stats


def terminal_io(columns: int):
    """The chat's real TerminalIO, drawing on a Rich console `columns` wide that writes to a string."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from llava_cli.base.settings import Settings
    from llava_cli.chat.loop import TerminalIO

    with create_pipe_input() as pipe:
        terminal = TerminalIO(Settings(), input=pipe, output=DummyOutput())
    terminal.console = Console(file=io.StringIO(), width=columns, color_system=None, soft_wrap=True)
    return terminal


FIGURES = Stats(
    prompt_tokens=612,
    cached_tokens=600,
    completion_tokens=48,
    ttft_s=0.1234,
    tokens_per_s=31.5,
    seconds=1.6789,
    load_s=7.25,
    peak_memory_mb=14210.5,
)


@pytest.mark.parametrize(
    "command, row", [("help", r"^  /retry +answer the last message again$"), ("stats", r"^  peak_memory_mb +14210\.5$")]
)
def test_help_and_stats_never_split_a_word_from_40_columns_up(command, row):
    from llava_cli.base.settings import Settings
    from llava_cli.chat.loop import ChatLoop

    def shown(columns: int) -> str:
        terminal = terminal_io(columns)
        loop = ChatLoop(FakeBackend(stats=FIGURES), Settings(), terminal)
        loop.send("hi")  # one answer, so /stats has its figures to show
        terminal.console.file = io.StringIO()  # only what the command shows
        loop.command(command, "")
        return terminal.console.file.getvalue()

    words = Counter(shown(400).split())
    for columns in (40, 53, 80):
        text = shown(columns)
        assert Counter(text.split()) == words, f"a word was split at {columns} columns"
        assert max(map(len, text.splitlines())) <= columns
    assert re.search(row, shown(80), re.M)  # a table: each figure or command on its own row


def context_figure(loop) -> str:
    return re.search(r"context ([^·]+) ·", loop.status_line()).group(1).strip()


def test_the_status_line_knows_the_context_after_undo_and_after_a_resume(
    tiny_loaded, tiny_settings, llava_home_dir, images
):
    from llava_cli.chat.loop import ChatLoop
    from llava_cli.engine.local import Engine
    from llava_cli.media.images import load_image
    from llava_cli.store.conversations import Recorder, SessionStore

    store = SessionStore.default()
    loop = ChatLoop(Engine(tiny_loaded), tiny_settings, FakeIO(), Recorder(store))
    loop.attached = [load_image(str(images["red"]))]
    loop.send("what is it?")
    loop.send("and the colour?")
    two_turns = context_figure(loop)
    loop.command("undo", "")
    one_turn = context_figure(loop)
    window = tiny_loaded.context_window
    assert re.fullmatch(rf"\d+ of {window} tokens \(\d+%\)", one_turn), one_turn
    assert int(one_turn.split()[0]) < int(two_turns.split()[0])

    resumed = ChatLoop(Engine(tiny_loaded), tiny_settings, FakeIO(), Recorder(store), conversation=loop.conversation)
    assert context_figure(resumed) == one_turn


def test_ctrl_c_during_ask_ends_the_partial_answer_with_a_newline(monkeypatch, images, llava_home_dir):
    use_backend(monkeypatch, FakeBackend(["The picture shows"], raises=KeyboardInterrupt()))
    outcome = invoke(monkeypatch, "ask", images["red"], "what is it?")
    assert (outcome.code, outcome.stdout) == (130, "The picture shows\n")


def test_rendered_markdown_blocks_are_separated_by_a_blank_line():
    from llava_cli.chat.render import stream_markdown

    console = Console(file=io.StringIO(), width=60, color_system=None, soft_wrap=True)
    answer = "First paragraph.\n\nSecond paragraph.\n\n- one\n- two\n\nLast words."
    stream_markdown(
        console, iter(answer.split(" ")[:1] + [" " + word for word in answer.split(" ")[1:]]), lambda chunk: chunk
    )
    lines = [line.rstrip() for line in console.file.getvalue().splitlines()]
    assert lines == ["First paragraph.", "", "Second paragraph.", "", " • one", " • two", "", "Last words."]
