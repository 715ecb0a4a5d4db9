"""Every slash command of chat/slash.py `COMMANDS`, on the fake backend (fakes.py): what it tells the
user, what it does to the conversation and settings, and its one-line refusals. In-process and
fast; test_repl_commands.py drives them on the tiny model, against plain transformers."""

from __future__ import annotations

import json

import pytest
from fake_io import FakeIO
from fakes import FakeBackend
from videos import frames_of, write_video

from llava_cli.base.settings import Settings
from llava_cli.chat.loop import ChatLoop
from llava_cli.chat.slash import COMMANDS, help_text
from llava_cli.engine.streaming import Stats
from llava_cli.store.conversations import Recorder, SessionStore

SCHEMA = '{"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}'


def chat(
    lines: list[str], backend: FakeBackend | None = None, recorder: Recorder | None = None
) -> tuple[ChatLoop, FakeIO]:
    """Run a chat of `lines` on `backend` (a FakeBackend answering "an answer" by default) to the end."""
    io = FakeIO(lines)
    loop = ChatLoop(backend or FakeBackend(), Settings(model="m"), io, recorder)
    loop.run([])
    return loop, io


def test_image_attaches_to_the_next_message_or_asks_now(images):
    loop, io = chat(
        [f"/image {images['red']}", "what is it?", f"/image {images['green']} {images['blue']} and these?", "/image"]
    )
    first, second = loop.conversation.turns
    assert (first.text, [image.name for image in first.images]) == ("what is it?", [str(images["red"])])
    assert (second.text, [image.name for image in second.images]) == (
        "and these?",
        [str(images["green"]), str(images["blue"])],
    )
    assert io.infos == [
        f"attached {images['red']}; it goes with your next message",
        f"attached {images['green']}, {images['blue']}; answering your question about it now",
    ]
    assert io.answers == ["an answer", "an answer"]
    assert io.errors == ["usage: /image PATH [PATH...] [question]"]


def test_video_attaches_a_clip_and_refuses_a_missing_one(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", frames_of(4, 32, 32))
    loop, io = chat([f"/video {clip} what happens?", f"/video {tmp_path / 'gone.mp4'}", "/video"])
    (turn,) = loop.conversation.turns
    assert (turn.text, [video.name for video in turn.images]) == ("what happens?", [str(clip)])
    assert io.infos[-1] == f"attached {clip}; answering your question about it now"
    assert io.errors == [f"video not found: {tmp_path / 'gone.mp4'}", "usage: /video PATH [question]"]


def test_paste_without_a_clipboard_tool_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "")
    for variable in ("WAYLAND_DISPLAY", "DISPLAY"):
        monkeypatch.delenv(variable, raising=False)
    loop, io = chat(["/paste"])
    assert len(io.errors) == 1 and io.errors[0].startswith("no clipboard")
    assert loop.attached == [] and loop.conversation.turns == []


def test_retry_answers_again_and_undo_drops_the_exchange():
    backend = FakeBackend(["first"])
    loop, io = chat(["/retry", "hello", "/retry", "/undo", "/undo"], backend)
    assert io.errors == ["nothing to retry yet", "nothing to undo yet"]
    assert io.answers == ["first", "first"]  # the message, then the retry of it
    assert "temperature is 0 (greedy), so the answer will be the same; /set temperature 0.7 to vary it" in io.infos
    assert io.infos[-1] == "dropped your last message (“hello”) and its answer"
    assert loop.conversation.turns == []


def test_system_shows_sets_and_removes_the_system_text():
    loop, io = chat(["/system", "/system Answer briefly.", "/system", "hi", "/system off", "/system"])
    assert io.infos == [
        "no system text",
        "system text set; it applies from the next answer",
        "system text: Answer briefly.",
        "system text removed",
        "no system text",
    ]
    assert loop.conversation.system is None


def test_schema_is_set_shown_and_removed_on_a_local_backend_or_a_server():
    loop, io = chat(
        ["/schema", f"/schema {SCHEMA}", "/schema", "/schema off", "/schema {not json"], FakeBackend(dtype="float32")
    )
    assert io.infos[:2] == [
        "no schema: answers are free text",
        "schema set: every answer is now JSON following it (/schema off to stop)",
    ]
    assert json.loads(io.infos[2].removeprefix("schema: ")) == json.loads(SCHEMA)
    assert io.infos[3] == "schema removed: answers are free text again"
    assert len(io.errors) == 1 and "/schema" in io.errors[0] and loop.settings.constraint is None

    loop, io = chat([f"/schema {SCHEMA}"], FakeBackend())  # a server (it tells no dtype) is sent the schema
    assert io.errors == [] and json.loads(loop.settings.constraint) == json.loads(SCHEMA)


def test_set_changes_a_setting_and_refuses_bad_keys_and_values():
    loop, io = chat(["/set temperature 0.5", "/set tempreature 1", "/set top_p 7", "/set temperature"])
    assert io.infos[0] == "temperature = 0.5" and loop.settings.temperature == 0.5
    assert io.errors[0].startswith("cannot set tempreature; did you mean temperature?")
    assert io.errors[1] == "top-p must be in (0, 1] (got 7.0)" and loop.settings.top_p == Settings().top_p
    assert io.errors[2] == "usage: /set temperature VALUE (now 0.5)"


def test_images_lists_each_image_with_its_turn(images):
    _, io = chat(
        [
            "/images",
            f"/image {images['red']} what is it?",
            f"/image {images['green']} {images['blue']} and these?",
            "/images",
        ]
    )
    assert io.infos[0] == "no images; /image PATH attaches one"
    assert io.infos[-1] == f"turn 1: {images['red']}\nturn 2: {images['green']}\nturn 2: {images['blue']}"


def test_save_names_a_conversation_and_load_brings_it_back(llava_home_dir):
    store = SessionStore.default()
    _, io = chat(["/save", "hello", "/save cats"], recorder=Recorder(store))
    assert io.errors == ["nothing to save yet"]
    assert io.infos[-1].startswith("saved to ") and io.infos[-1].endswith(
        "; /load cats or `llava chat --resume cats` brings it back"
    )

    loop, io = chat(["/load", "/load dogs", "/load cats"], recorder=Recorder(store))
    assert io.errors[0] == "usage: /load NAME|ID (`llava sessions list` shows them)"
    assert len(io.errors) == 2 and "dogs" in io.errors[1]
    assert len(io.infos) == 1 and io.infos[0].startswith("loaded ") and io.infos[0].endswith(" (cats): 1 turn(s)")
    assert [(turn.text, turn.answer) for turn in loop.conversation.turns] == [("hello", "an answer")]

    _, io = chat(["hi", "/save"], recorder=None)  # --no-save
    assert io.errors == ["this chat is not being saved (it was started with --no-save)"]


def test_markdown_switches_rendering_on_and_off():
    loop, io = chat(["/markdown on", "/markdown maybe", "/markdown off"])
    assert io.infos == ["markdown on", "markdown off"]
    assert io.errors == ["usage: /markdown on|off (now on)"]
    assert loop.io.markdown is False


def test_copy_puts_the_last_answer_on_the_clipboard_or_says_why_not(monkeypatch):
    monkeypatch.setenv("PATH", "")
    for variable in ("WAYLAND_DISPLAY", "DISPLAY"):
        monkeypatch.delenv(variable, raising=False)
    _, io = chat(["/copy", "hello", "/copy"])
    assert io.errors[0] == "nothing to copy yet"
    assert io.errors[1].startswith("no clipboard available: install wl-copy")


def test_clear_and_stats_and_quit_with_each_alias():
    backend = FakeBackend(stats=Stats(prompt_tokens=7, completion_tokens=3))
    loop, io = chat(["hello", "/clear", "/stats", "/quit", "never read"], backend)
    assert (backend.resets, io.infos[0]) == (1, "conversation cleared")
    figures = dict(
        line.split() for line in io.infos[1].splitlines()
    )  # the last answer's, the conversation cleared or not
    assert (figures["prompt_tokens"], figures["completion_tokens"]) == ("7", "3") and io.errors == []
    assert loop.conversation.turns == [] and io.answers == ["an answer"]
    assert io.lines == ["never read"]
    for alias in ("/exit", "/bye"):
        loop, io = chat([alias, "never read"])
        assert io.lines == ["never read"] and io.answers == []


def test_help_lists_every_command():
    _, io = chat(["/help"])
    assert io.infos == [help_text(FakeIO.columns)]
    assert all(f"  {entry.usage}" in io.infos[0] for entry in COMMANDS)


def test_every_command_is_tested_here():
    """A new command gets its fast test in this module (its name in a test's name)."""
    tested = " ".join(name for name in globals() if name.startswith("test_"))
    assert [entry.name for entry in COMMANDS if entry.name not in tested] == []


@pytest.fixture(autouse=True)
def home(llava_home_dir):
    """Every chat here saves, if at all, to the test's own LLAVA_HOME."""
    return llava_home_dir
