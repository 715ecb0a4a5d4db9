"""The chat's slash commands, driven in-process through `ChatLoop` with a scripted IO and the tiny
model; the terminal input line through prompt-toolkit's pipe input; Markdown output on a narrow
console; and one real session at a pseudo-terminal."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
from fake_io import FakeIO
from helpers import SHORT_ANSWER as MAX_NEW
from helpers import cli_env, default_sigint, render_llava15

from llava_cli.base.errors import LlavaError
from llava_cli.base.terminal import safe_for_terminal
from llava_cli.chat.clipboard import copy_to_clipboard
from llava_cli.chat.loop import ChatLoop, TerminalIO
from llava_cli.chat.slash import COMMANDS, help_text
from llava_cli.engine.local import Engine
from llava_cli.frontend.arguments import split_image_command
from llava_cli.store.conversations import Recorder, SessionStore


@pytest.fixture
def repl(llava_home_dir, tiny_loaded, tiny_settings):
    """run(lines) -> (loop, io): a saved chat on a fresh engine; call again to go on with the same loop."""
    state: dict = {}

    def run(lines: list[str]):
        if not state:
            state["io"] = FakeIO()
            state["loop"] = ChatLoop(Engine(tiny_loaded), tiny_settings, state["io"], Recorder(SessionStore.default()))
        state["io"].lines = list(lines)
        state["loop"].run([])
        return state["loop"], state["io"]

    return run


def saved_turns(loop) -> list[tuple[str, str]]:
    document = json.loads(loop.recorder.path.read_text())
    return [(turn["user"], turn["assistant"]) for turn in document["turns"]]


def test_retry_answers_again_greedily_the_same_and_undo_drops_the_exchange(repl, reference):
    loop, io = repl(["first question", "second question", "/retry"])
    assert io.answers[2] == io.answers[1]
    expected = reference.answer(
        render_llava15([("first question", 0, io.answers[0]), ("second question", 0, None)]), [], MAX_NEW
    )
    assert io.answers[1] == expected
    assert [turn.text for turn in loop.conversation.turns] == ["first question", "second question"]

    repl(["/undo"])
    assert [turn.text for turn in loop.conversation.turns] == ["first question"]
    assert io.infos[-1] == "dropped your last message (“second question”) and its answer"
    assert saved_turns(loop) == [("first question", io.answers[0])]  # the file follows the undo
    repl(["/undo", "/undo", "/retry"])
    assert io.errors == ["nothing to undo yet", "nothing to retry yet"]


def test_set_changes_settings_and_bad_values_are_refused_with_settings_unchanged(repl, tiny_settings, reference):
    loop, io = repl(
        ["/set temperature abc", "/set temperature 500", "/set max-new-tokens 0", "/set tempreature 1", "/set top-p"]
    )
    assert io.errors == [
        "temperature must be a number (got 'abc')",
        "temperature must be between 0 and 100 (got 500.0)",
        "max-new-tokens must be at least 1 (got 0)",
        "cannot set tempreature; did you mean temperature? (settable: temperature, top-p, max-new-tokens, seed, max-context)",
        "usage: /set top-p VALUE (now 1.0)",
    ]
    assert loop.settings == tiny_settings
    repl(["/set top_p 0.5", "/set seed 7", "/set seed none", "/set max-new-tokens 3", "hello", "/set"])
    assert (loop.settings.top_p, loop.settings.seed, loop.settings.max_new_tokens) == (0.5, None, 3)
    assert io.infos[:4] == ["top-p = 0.5", "seed = 7", "seed = none", "max-new-tokens = 3"]
    assert io.answers == [reference.answer(render_llava15([("hello", 0, None)]), [], 3)]
    assert io.infos[-1] == "temperature 0.0 · top-p 0.5 · max-new-tokens 3 · seed none · max-context none"
    assert json.loads(loop.recorder.path.read_text())["settings"]["max_new_tokens"] == 3


def test_system_text_applies_to_the_next_answer_and_can_be_shown_and_removed(repl, reference):
    loop, io = repl(["/system", "/system Be brief.", "hello", "/system", "/system off"])
    assert io.infos == [
        "no system text",
        "system text set; it applies from the next answer",
        "system text: Be brief.",
        "system text removed",
    ]
    assert io.answers == [reference.answer(render_llava15([("hello", 0, None)], system="Be brief."), [], MAX_NEW)]
    assert loop.conversation.system is None
    assert json.loads(loop.recorder.path.read_text())["system"] is None


def test_show_images_and_status_line_describe_the_session(repl, images, tiny_model):
    red, green = images["red"], images["green"]
    loop, io = repl([f"/image {red} what is it?", f"/image {green}", "/show", "/images"])
    show, listing = io.infos[-2:]
    stats = loop.last_figures
    used = stats.prompt_tokens + stats.completion_tokens
    assert show.splitlines() == [
        f"model     {tiny_model} on cpu (float32)",
        f"settings  temperature 0.0 · top-p 1.0 · max-new-tokens {MAX_NEW} · seed none · max-context none",
        "system    (none)",
        f"context   {used} of 1024 tokens ({100 * used // 1024}%)",
        "history   1 turn(s), 1 image(s), 1 waiting",
        f"saved     {loop.recorder.session_id} in {loop.recorder.path}",
        "markdown  off",
        "images",  # the tiny checkpoint's 32x32 input tile: (32 / 8) ** 2 patches = 16 tokens
        f"  {red}: 48x40 -> 32x32, 16 tokens (1.6% of context)",
        f"  {green}: 64x40 -> 32x32, 16 tokens (1.6% of context)",
    ]
    assert listing.splitlines() == [f"turn 1: {red}", f"next message: {green}"]
    assert (
        loop.status_line()
        == f" {tiny_model} · context {used} of 1024 tokens ({100 * used // 1024}%) · temperature 0.0 · {loop.recorder.session_id}"
    )


def test_save_names_a_conversation_and_load_switches_to_it(repl, llava_home_dir, tiny_loaded, tiny_settings, reference):
    loop, io = repl(["/save", "tell me about cats", "/save bad/name", "/save cats"])
    assert io.errors[:2] == [
        "nothing to save yet",
        "a name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (got 'bad/name')",
    ]
    assert io.infos[-1] == f"saved to {loop.recorder.path}; /load cats or `llava chat --resume cats` brings it back"
    cats_answer = io.answers[0]
    repl(["/clear", "something else"])  # a new conversation in a new file; cats stays saved
    assert len(list((llava_home_dir / "sessions").glob("*.json"))) == 2

    other = FakeIO(["/load cats", "and dogs?"])
    ChatLoop(Engine(tiny_loaded), tiny_settings, other, Recorder(SessionStore.default())).run([])
    assert other.errors == []
    assert other.infos[0] == "loaded " + f"{loop_id(llava_home_dir, 'cats')} (cats): 1 turn(s)"
    history = [("tell me about cats", 0, cats_answer), ("and dogs?", 0, None)]
    assert other.answers == [reference.answer(render_llava15(history), [], MAX_NEW)]
    taken = FakeIO(["hi", "/save cats"])
    ChatLoop(Engine(tiny_loaded), tiny_settings, taken, Recorder(SessionStore.default())).run([])
    assert taken.errors == [
        f"the name cats is taken by conversation {loop_id(llava_home_dir, 'cats')}; pick another, or `llava sessions rm cats` first"
    ]


def loop_id(llava_home_dir: Path, name: str) -> str:
    for path in (llava_home_dir / "sessions").glob("*.json"):
        if json.loads(path.read_text())["name"] == name:
            return path.stem
    raise AssertionError(f"no conversation named {name}")


def test_unknown_commands_get_a_suggestion_and_help_lists_every_command(repl):
    loop, io = repl(["/retyr", "/frobnicate", "/help", "//etc/hosts is a path"])
    assert io.errors == [
        "unknown command /retyr; did you mean /retry? (/help lists the commands)",
        "unknown command /frobnicate (/help lists the commands)",
    ]
    assert io.infos[0] == help_text(io.columns)
    assert all(f"  {entry.usage}" in io.infos[0] for entry in COMMANDS)  # /help lists every registered command
    assert [entry.name for entry in COMMANDS if entry.handler is None] == ["quit"]  # the loop's own: it ends the chat
    assert loop.conversation.turns[0].text == "/etc/hosts is a path"


def test_markdown_off_shows_answers_as_written_and_on_renders_them(tiny_loaded, tiny_settings, llava_home_dir):
    from rich.console import Console

    terminal = TerminalIO(tiny_settings)
    terminal.console = Console(file=io.StringIO(), width=60, color_system=None)
    loop = ChatLoop(Engine(tiny_loaded), tiny_settings, terminal, Recorder(SessionStore.default()))

    def shown_after(commands: list[str]) -> str:
        lines = iter(commands)
        terminal.read = lambda: next(lines, None)
        loop.run([])
        terminal.console.file.seek(0)
        terminal.console.file.truncate()
        terminal.stream(iter(["Some **bo", "ld** text"]))
        return terminal.console.file.getvalue()

    assert shown_after(["/markdown off"]) == "Some **bold** text\n"
    assert shown_after(["/markdown on"]).strip() == "Some bold text"
    lines = iter(["/markdown sideways"])
    terminal.read = lambda: next(lines, None)
    loop.run([])
    assert terminal.console.file.getvalue().splitlines()[-1] == "error: usage: /markdown on|off (now on)"


def test_copy_uses_a_clipboard_tool_when_there_is_one(repl, fake_clipboard):
    clipboard = fake_clipboard
    loop, io = repl(["/copy", "hello", "/copy"])
    assert io.errors == ["nothing to copy yet"]
    assert io.infos[-1] == "copied the last answer with wl-copy"
    assert clipboard.read_text() == safe_for_terminal(
        io.answers[0]
    )  # as shown: the model's controls left out (issue 28)


def test_copy_without_a_clipboard_says_so_or_uses_osc52_at_a_terminal(monkeypatch):
    monkeypatch.setenv("PATH", "")
    for variable in ("WAYLAND_DISPLAY", "DISPLAY"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(LlavaError, match=r"^no clipboard available: install wl-copy"):
        copy_to_clipboard("answer", None)
    terminal = io.StringIO()
    message = copy_to_clipboard("answer ✓", terminal)
    assert terminal.getvalue() == "\x1b]52;c;" + base64.b64encode("answer ✓".encode()).decode() + "\x07"
    assert "OSC 52" in message and "ignore it" in message


def test_a_dragged_in_path_works_with_image(tmp_path):
    assert split_image_command("'/tmp/my photos/cat.png' what is it?") == (["/tmp/my photos/cat.png"], "what is it?")
    assert split_image_command(r"/tmp/my\ photos/cat.png  what?") == (["/tmp/my photos/cat.png"], "what?")
    assert split_image_command("file:///tmp/my%20photos/cat.png") == (["/tmp/my photos/cat.png"], "")


# --- the input line: prompt-toolkit's pipe input -------------------------------------------------


@pytest.fixture
def terminal(llava_home_dir, tiny_settings):
    """read(*keys) -> the message a TerminalIO reads after those keystrokes (sent in order)."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    def read(*keys: str, waits: dict[int, str] | None = None) -> str | None:
        with create_pipe_input() as pipe:
            io_ = TerminalIO(tiny_settings, input=pipe, output=DummyOutput())
            feeder = threading.Thread(target=feed, args=(io_, pipe, keys, waits or {}), daemon=True)
            feeder.start()
            return io_.read()

    return read


def feed(io_, pipe, keys, waits) -> None:
    """Send each key; before key i, wait until the input line reads waits[i] (completion is async)."""
    for index, key in enumerate(keys):
        deadline = time.monotonic() + 10
        while index in waits and io_.session.default_buffer.text != waits[index] and time.monotonic() < deadline:
            time.sleep(0.01)
        pipe.send_text(key)


def test_multi_line_input_alt_enter_triple_quotes_and_paste_stay_one_message(terminal):
    assert terminal("first line\x1b\rsecond line\r") == "first line\nsecond line"
    assert terminal('"""\r', "def f():\r", "    return 1\r", '"""\r') == "def f():\n    return 1"
    assert terminal("\x1b[200~pasted\nthree\nlines\x1b[201~", "\r") == "pasted\nthree\nlines"


def test_input_history_is_kept_across_runs(terminal, llava_home_dir):
    assert terminal("what is a llava?\r") == "what is a llava?"
    assert terminal("\x1b[A", "\r") == "what is a llava?"  # a new session: Up brings back the last run's line
    assert terminal("something else\r") == "something else"
    assert terminal("\x12llava", "\r", "\r") == "what is a llava?"  # Ctrl-R search
    assert (llava_home_dir / "input-history").stat().st_mode & 0o777 == 0o600


def test_tab_completes_commands_and_image_paths(terminal, tmp_path, monkeypatch):
    (tmp_path / "my photos").mkdir()
    (tmp_path / "my photos" / "cat one.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert terminal("/ret\t", "\r", waits={1: "/retry"}) == "/retry"
    assert (
        terminal("/ima\t", "cat.png\r", waits={1: "/image "}) == "/image cat.png"
    )  # it needs a path: the space is there
    assert terminal("/sa\t", "\r", waits={1: "/save"}) == "/save"  # its name is optional: no space
    typed = terminal(
        "/image my\t", "c\t", " what?\r", waits={1: "/image my\\ photos/", 2: "/image my\\ photos/cat\\ one.png"}
    )
    assert typed == "/image my\\ photos/cat\\ one.png what?"
    assert split_image_command(typed.removeprefix("/image ")) == (["my photos/cat one.png"], "what?")
    quoted = terminal('/image "my photos/ca\t', "\r", waits={1: '/image "my photos/cat one.png"'})
    assert split_image_command(quoted.removeprefix("/image ")) == (["my photos/cat one.png"], "")


# --- output --------------------------------------------------------------------------------------


def test_answers_render_as_markdown_within_a_narrow_terminal(tiny_settings, llava_home_dir):
    from rich.console import Console

    answer = "Some **bold** advice that is long enough to need wrapping on a narrow screen.\n\n```python\ndef greet():\n    return 'hi'\n```\n\n- one\n- two"
    io_ = TerminalIO(tiny_settings)
    io_.console = Console(file=io.StringIO(), width=32, color_system=None, soft_wrap=True)
    io_.stream(iter(answer[i : i + 5] for i in range(0, len(answer), 5)))
    shown = io_.console.file.getvalue()
    assert all(len(line) <= 32 for line in shown.splitlines())
    assert "**" not in shown and "```" not in shown  # rendered, not raw
    assert "def greet():" in shown and "return 'hi'" in shown
    assert re.search(r"• one\s*\n\s*• two", shown)
    words = " ".join(shown.split())
    assert "Some bold advice that is long enough to need wrapping on a narrow screen." in words


# --- a real terminal -----------------------------------------------------------------------------


def drawn(text: str) -> str:
    """A pattern for `text` as a terminal may draw it: escape sequences allowed between its characters."""
    escapes = r"(?:\x1b\[[0-?]*[ -/]*[@-~])*"
    return escapes.join(re.escape(char) for char in text)


def test_a_session_at_a_pseudo_terminal(tiny_model, tmp_path, reference):
    env = cli_env(LLAVA_HOME=str(tmp_path / "home"), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    args = ["-m", "llava_cli", "chat", "--model", str(tiny_model), "-n", str(MAX_NEW), "--no-server", "--no-markdown"]
    child = pexpect.spawn(
        sys.executable, args, env=env, timeout=60, dimensions=(30, 100), encoding="utf-8", preexec_fn=default_sigint
    )
    child.expect_exact(">>>")
    child.send('"""\r')
    child.send("two\r")
    child.send('lines"""\r')
    child.send("/sh\t")  # read by the next prompt, once the answer is written
    child.expect(drawn("/show"))  # the completion may be drawn in pieces, with cursor moves between
    child.send("\r")
    child.expect_exact("context")
    child.send("/quit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    (saved,) = (tmp_path / "home" / "sessions").glob("*.json")
    turn = json.loads(saved.read_text())["turns"][0]
    assert turn["user"] == "two\nlines"
    assert turn["assistant"] == reference.answer(render_llava15([("two\nlines", 0, None)]), [], MAX_NEW)
    assert "+two" in (tmp_path / "home" / "input-history").read_text()


RETRY_AT_ZERO = "temperature is 0 (greedy), so the answer will be the same; /set temperature 0.7 to vary it"


def test_retry_at_temperature_0_says_the_answer_will_be_the_same(repl):
    _, io = repl(["question", "/retry"])
    assert io.infos.count(RETRY_AT_ZERO) == 1
    repl(["/set temperature 0.7", "/retry"])
    assert io.infos.count(RETRY_AT_ZERO) == 1 and len(io.answers) == 3


def test_image_with_a_question_says_it_is_answered_now(repl, images):
    _, io = repl([f"/image {images['red']} what is it?", f"/image {images['green']}"])
    assert io.infos[:2] == [
        f"attached {images['red']}; answering your question about it now",
        f"attached {images['green']}; it goes with your next message",
    ]
    assert len(io.answers) == 1


def test_piped_chat_shows_what_commands_were_asked_for_on_stderr_and_only_answers_on_stdout(
    monkeypatch, llava_home_dir, tiny_model
):
    from cli_runner import invoke

    script = b"/help\n/system\nhi\n/stats\n/show\n/set\n/images\n"
    result = invoke(monkeypatch, "chat", "--no-server", "--model", tiny_model, "-n", MAX_NEW, stdin=script)
    assert result.code == 0, result.stderr
    assert result.stdout.count("\n") == 1  # the one answer
    for shown_text in (
        "Type a message and press Enter. Commands:",
        "no system text",
        "completion_tokens",
        f"model     {tiny_model}",
        "temperature",
        "no images",
    ):
        assert shown_text in result.stderr
