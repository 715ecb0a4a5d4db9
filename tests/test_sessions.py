"""Saved conversations: the file written after each answer, atomic and private; resuming it (chat
--resume, ask -c) gives the answers an uninterrupted conversation gives; damaged files, vanished
or changed images and an unwritable folder are reported clearly; `llava sessions` shows them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from cli_runner import invoke
from fake_io import FakeIO
from helpers import SHORT_ANSWER as MAX_NEW
from helpers import render_llava15

from llava_cli.base.errors import SessionError
from llava_cli.base.safeio import write_private_file
from llava_cli.base.settings import Settings
from llava_cli.chat.loop import ChatLoop
from llava_cli.engine.local import Engine
from llava_cli.media.images import load_image
from llava_cli.prompt.conversation import Conversation
from llava_cli.store.conversations import Recorder, SessionStore, data_dir
from llava_cli.store.resume import SessionOptions, open_conversation

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def chat(tiny_loaded, tiny_settings, lines, recorder="new", conversation=None) -> tuple[ChatLoop, FakeIO]:
    """Run `lines` through a ChatLoop on a fresh engine (empty cache), saving into LLAVA_HOME."""
    io = FakeIO(lines)
    if recorder == "new":
        recorder = Recorder(SessionStore.default())
    loop = ChatLoop(Engine(tiny_loaded), tiny_settings, io, recorder, conversation)
    loop.run([])
    return loop, io


def saved_files(llava_home_dir: Path) -> list[Path]:
    return sorted((llava_home_dir / "sessions").glob("*.json"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("platform", "env", "expected"),
    [
        ("linux", {"LLAVA_HOME": "~/elsewhere", "XDG_DATA_HOME": "/xdg"}, "{home}/elsewhere"),
        ("linux", {"XDG_DATA_HOME": "/xdg"}, "/xdg/llava-cli"),
        (
            "linux",
            {"XDG_DATA_HOME": "relative"},
            "{home}/.local/share/llava-cli",
        ),  # the XDG spec ignores relative paths
        ("linux", {}, "{home}/.local/share/llava-cli"),
        ("darwin", {"XDG_DATA_HOME": "/xdg"}, "{home}/Library/Application Support/llava-cli"),
    ],
)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX home and paths")
def test_the_data_folder_stays_where_earlier_versions_saved_conversations(
    tmp_path, monkeypatch, platform, env, expected
):
    if platform == "linux" and sys.platform != "linux":
        pytest.skip("platformdirs names the Linux folders on Linux only")
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("LLAVA_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert data_dir() == Path(expected.format(home=tmp_path))


def test_each_answer_is_saved_with_messages_images_model_settings_and_times(
    llava_home_dir, tiny_loaded, tiny_model, tiny_settings, images
):
    red = images["red"]
    loop, io = chat(tiny_loaded, tiny_settings, [f"/image {red} what is this?", "and the colour?"])
    (path,) = saved_files(llava_home_dir)
    document = json.loads(path.read_text())

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert document["format"] == "llava-cli-conversation" and document["version"] == 1
    assert document["id"] == path.stem == loop.recorder.session_id
    assert document["model"] == str(Path(tiny_model).resolve())
    assert document["settings"] == {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": MAX_NEW,
        "seed": None,
        "max_context": None,
    }
    assert document["system"] is None and document["name"] is None
    assert [(t["user"], t["assistant"]) for t in document["turns"]] == [
        ("what is this?", io.answers[0]),
        ("and the colour?", io.answers[1]),
    ]
    assert document["turns"][0]["images"] == [{"name": str(red), "path": str(red.resolve()), "sha256": sha256(red)}]
    assert document["turns"][1]["images"] == []
    for when in [document["created"], document["updated"]] + [t["answered_at"] for t in document["turns"]]:
        assert re.fullmatch(ISO_UTC, when)
    assert not list((llava_home_dir / "sessions").glob(".*"))  # no temp file left behind


def test_resume_answers_as_the_uninterrupted_conversation_and_plain_transformers(
    llava_home_dir, tiny_loaded, tiny_settings, images, reference
):
    red = images["red"]
    first, first_io = chat(tiny_loaded, tiny_settings, [f"/image {red} what is this?", "describe the colours."])

    opened = open_conversation(tiny_settings, SessionOptions(resume=True))
    assert [turn.text for turn in opened.conversation.turns] == ["what is this?", "describe the colours."]
    resumed, resumed_io = chat(
        tiny_loaded, opened.settings, ["which one is brightest?"], opened.recorder, opened.conversation
    )
    first.handle("which one is brightest?")  # the same question in the conversation that never stopped

    history = [("what is this?", 1, first_io.answers[0]), ("describe the colours.", 0, first_io.answers[1])]
    expected = reference.answer(render_llava15(history + [("which one is brightest?", 0, None)]), [red], MAX_NEW)
    assert resumed_io.answers == [expected] == first_io.answers[2:]
    assert resumed.recorder.session_id == first.recorder.session_id  # continued in the same file
    assert len(saved_files(llava_home_dir)) == 1


def test_resume_keeps_the_saved_model_and_settings_unless_given_on_the_command_line(
    llava_home_dir, tiny_loaded, tiny_settings, tiny_model
):
    chat(
        tiny_loaded,
        Settings(model=str(tiny_model), max_new_tokens=5, temperature=0.7, seed=3, system="Be brief."),
        ["hello"],
    )
    fresh = Settings(max_new_tokens=9, temperature=0.0, system="Be long.")  # the default model: not given
    opened = open_conversation(fresh, SessionOptions(resume=True, given=frozenset({"max_new_tokens", "system"})))
    assert opened.settings.model == str(Path(tiny_model).resolve())
    assert (opened.settings.temperature, opened.settings.seed, opened.settings.max_new_tokens) == (0.7, 3, 9)
    assert opened.conversation.system == "Be long."


def test_a_failed_save_leaves_the_previous_file_intact_and_the_chat_going(
    llava_home_dir, tiny_loaded, tiny_settings, monkeypatch
):
    loop, io = chat(tiny_loaded, tiny_settings, ["first question"])
    (path,) = saved_files(llava_home_dir)
    before = path.read_bytes()

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    io.lines = ["second question", "third question"]
    assert loop.run([]) == 0
    assert len(io.answers) == 3  # the chat went on
    assert io.errors == [
        f"the conversation could not be saved: No space left on device ({path.parent}); the chat goes on"
    ]
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temp file was removed


def test_ctrl_c_in_the_middle_of_a_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "conversation.json"
    write_private_file(path, b"old")

    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_private_file(path, b"new" * 1000)
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.slow  # starts processes
def test_a_process_killed_while_saving_leaves_a_complete_file(tmp_path):
    """SIGKILL a process that keeps rewriting the file: what is left is always one whole version."""
    path = tmp_path / "conversation.json"
    versions = ["A" * 3_000_000, "B" * 3_000_000]
    writer = (
        "import sys; from pathlib import Path; from llava_cli.base.safeio import write_private_file\n"
        "path = Path(sys.argv[1]); write_private_file(path, b'A' * 3_000_000); print('saved', flush=True)\n"
        "while True:\n"
        "    for text in ('B' * 3_000_000, 'A' * 3_000_000): write_private_file(path, text.encode())\n"
    )
    for delay in (0.05, 0.2):
        process = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE)
        assert (
            process.stdout.readline() == b"saved\n"
        )  # the first save is whole: `delay` runs from here, however busy the machine
        time.sleep(delay)  # not a wait for anything: where in the rewriting loop the kill lands
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        assert path.read_text() in versions


def test_a_corrupt_or_unknown_version_file_is_refused_clearly_and_left_untouched(llava_home_dir, monkeypatch):
    folder = llava_home_dir / "sessions"
    folder.mkdir(parents=True)
    (folder / "broken.json").write_text('{"format": "llava-cli-conversation", "version": 1, "id": ')
    future = {"format": "llava-cli-conversation", "version": 7, "id": "future"}
    (folder / "future.json").write_text(json.dumps(future))
    contents = {p: p.read_bytes() for p in folder.iterdir()}

    with pytest.raises(SessionError, match=r"broken\.json is not valid JSON \(.*\); it was left as it is"):
        SessionStore.default().find("broken")
    result = invoke(monkeypatch, "sessions", "show", "future")
    assert result.code == 2
    assert (
        result.stderr
        == f"llava: error: {folder / 'future.json'} has format version 7; upgrade llava-cli to read it (the file was left as it is)\n"
    )
    result = invoke(monkeypatch, "chat", "--resume", "broken")  # refused before any model is loaded
    assert result.code == 2 and "broken.json is not valid JSON" in result.first_error_line
    listing = invoke(monkeypatch, "sessions", "list")
    assert listing.code == 0 and listing.stdout == ""
    assert sorted(listing.stderr.splitlines()) == sorted(
        [
            f"llava: warning: {folder / 'broken.json'} is not valid JSON (Expecting value: line 1 column 58 (char 57)); it was left as it is",
            f"llava: warning: {folder / 'future.json'} has format version 7; upgrade llava-cli to read it (the file was left as it is)",
            f"no saved conversations yet (in {folder})",
        ]
    )
    assert {p: p.read_bytes() for p in folder.iterdir()} == contents


def test_an_unwritable_data_folder_warns_once_and_the_chat_goes_on(tmp_path, monkeypatch, tiny_loaded, tiny_settings):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    monkeypatch.setenv("LLAVA_HOME", str(blocker))
    loop, io = chat(tiny_loaded, tiny_settings, ["one", "two"])
    assert len(io.answers) == 2 and loop.failures == 0
    assert len(io.errors) == 1 and io.errors[0].startswith("the conversation could not be saved: Not a directory")


def test_a_changed_or_vanished_image_is_named_and_refused_unless_dropped(
    llava_home_dir, tmp_path, tiny_loaded, tiny_settings, images
):
    photo = tmp_path / "photo.png"
    shutil.copy(images["red"], photo)
    chat(tiny_loaded, tiny_settings, [f"/image {photo} what is this?", "more?"])

    shutil.copy(images["green"], photo)
    with pytest.raises(SessionError) as changed:
        open_conversation(tiny_settings, SessionOptions(resume=True))
    assert f"turn 1: {photo} has changed since it was attached ({photo} has different content now)" in str(
        changed.value
    )
    assert str(changed.value).endswith("Put the image back, or continue without it with --drop-missing-images")

    photo.unlink()
    with pytest.raises(SessionError, match=f"turn 1: {photo} is gone"):
        open_conversation(tiny_settings, SessionOptions(resume=True))
    opened = open_conversation(tiny_settings, SessionOptions(resume=True, drop_missing_images=True))
    assert [len(turn.images) for turn in opened.conversation.turns] == [0, 0]
    assert opened.notes == [f"continuing without an image (turn 1: {photo} is gone ({photo} no longer exists))"]


def test_ask_saves_and_ask_c_continues_the_last_conversation(
    llava_home_dir, monkeypatch, tiny_model, images, reference
):
    red = images["red"]
    common = ("--model", tiny_model, "-n", MAX_NEW, "--no-server")
    first = invoke(monkeypatch, "ask", red, "what is this?", *common)
    second = invoke(monkeypatch, "ask", "-c", "and the colour?", "--json", *common)
    assert first.code == 0 and second.code == 0, second.stderr

    answer = first.stdout.rstrip("\n")
    assert answer == reference.answer(render_llava15([("what is this?", 1, None)]), [red], MAX_NEW)
    record = json.loads(second.stdout)
    expected = reference.answer(
        render_llava15([("what is this?", 1, answer), ("and the colour?", 0, None)]), [red], MAX_NEW
    )
    assert record["answer"] == expected
    (path,) = saved_files(llava_home_dir)
    assert record["session"] == path.stem
    assert [t["user"] for t in json.loads(path.read_text())["turns"]] == ["what is this?", "and the colour?"]


def test_chat_resume_through_the_command_line_takes_the_model_from_the_file(
    llava_home_dir, monkeypatch, tiny_loaded, tiny_settings, images, reference
):
    red = images["red"]
    _, io = chat(tiny_loaded, tiny_settings, [f"/image {red} what is this?"])
    result = invoke(monkeypatch, "chat", "--resume", "--no-server", stdin=b"and now?\n")  # no --model: the saved one
    assert result.code == 0, result.stderr
    expected = reference.answer(
        render_llava15([("what is this?", 1, io.answers[0]), ("and now?", 0, None)]), [red], MAX_NEW
    )
    assert result.stdout == expected + "\n"


def test_chat_id_without_resume_is_a_usage_error(llava_home_dir, monkeypatch):
    result = invoke(monkeypatch, "chat", "20261125")
    assert (result.code, result.first_error_line) == (
        2,
        "llava: error: to continue conversation 20261125, add --resume: llava chat --resume 20261125",
    )


# --- llava sessions ------------------------------------------------------------------------------


@pytest.fixture
def two_saved(llava_home_dir, images, tiny_model) -> list[Recorder]:
    """Two conversations saved without a model: one with an image and a name, one plain."""
    tiny_settings = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW)
    recorders, newest = [], 0
    for name, turns in [
        ("cats", [("What is in this picture?", [images["red"]], "A red circle."), ("And the colour?", [], "Red.")]),
        (None, [("hello there", [], "Hi.")]),
    ]:
        conversation = Conversation(system="Be brief." if name else None)
        for text, paths, answer in turns:
            conversation.ask(text, [load_image(str(p)) for p in paths])
            conversation.answer(answer)
        recorder = Recorder(SessionStore.default())
        if name:
            recorder.rename(name)
        path = recorder.save(conversation, tiny_settings)
        newest = max(path.stat().st_mtime_ns, newest + 10**9)  # each saved after the last: the newest is listed first
        os.utime(path, ns=(newest, newest))
        recorders.append(recorder)
    return recorders


def test_sessions_list_newest_first_with_id_date_turns_model_name_and_first_words(monkeypatch, two_saved, tiny_model):
    result = invoke(monkeypatch, "sessions", "list")
    assert result.code == 0 and result.stderr == ""
    header, newest, oldest = result.stdout.splitlines()
    assert header.split() == ["ID", "UPDATED", "TURNS", "MODEL", "NAME", "FIRST", "WORDS"]
    assert newest.startswith(two_saved[1].session_id) and newest.endswith("-            hello there")
    assert oldest.startswith(two_saved[0].session_id) and oldest.endswith("cats         What is in this picture?")
    assert " 2  " in oldest and " 1  " in newest
    records = json.loads(invoke(monkeypatch, "sessions", "list", "--json").stdout)
    assert [(r["id"], r["turns"], r["name"]) for r in records] == [
        (two_saved[1].session_id, 1, None),
        (two_saved[0].session_id, 2, "cats"),
    ]


def test_sessions_show_prints_the_transcript_and_json(monkeypatch, two_saved, images, tiny_model):
    cats = two_saved[0]
    result = invoke(monkeypatch, "sessions", "show", "cats")  # by name
    lines = result.stdout.splitlines()
    assert lines[0] == f"conversation {cats.session_id} (cats)"
    assert lines[1] == f"model     {Path(tiny_model).resolve()}"
    assert (
        lines[3] == f"settings  temperature 0.0 · top-p 1.0 · max-new-tokens {MAX_NEW} · seed none · max-context none"
    )
    assert lines[4:] == [
        "system    Be brief.",
        "",
        f">>> [image: {images['red']}]",
        ">>> What is in this picture?",
        "A red circle.",
        "",
        ">>> And the colour?",
        "Red.",
    ]
    other = two_saved[1].session_id
    unique = next(cats.session_id[:n] for n in range(1, 64) if not other.startswith(cats.session_id[:n]))
    as_json = invoke(monkeypatch, "sessions", "show", unique, "--json")  # by unique id prefix
    assert json.loads(as_json.stdout) == json.loads(cats.path.read_text())


def test_sessions_export_markdown_and_json(monkeypatch, two_saved, images):
    cats = two_saved[0]
    markdown = invoke(monkeypatch, "sessions", "export", "cats", "--format", "markdown").stdout
    red = images["red"]
    assert markdown.startswith(f"# Conversation {cats.session_id} (cats)\n\n- Model: `")
    link = urllib.parse.quote(str(red.resolve()))  # a path, percent-encoded: never a scheme (issue 28)
    assert (
        f"## 1. User\n\n![{red}]({link}) <!-- sha256 {sha256(red)} -->\n\nWhat is in this picture?\n\n## 1. Assistant\n\nA red circle.\n"
        in markdown
    )
    assert markdown.endswith("## 2. User\n\nAnd the colour?\n\n## 2. Assistant\n\nRed.\n")
    exported = invoke(monkeypatch, "sessions", "export", "cats", "--format", "json").stdout
    assert json.loads(exported) == json.loads(cats.path.read_text())
    bad = invoke(monkeypatch, "sessions", "export", "cats", "--format", "pdf")
    assert (bad.code, bad.first_error_line) == (2, "llava: error: --format must be one of markdown, json (got 'pdf')")


def test_sessions_rm_removes_one_and_unknown_ids_are_errors(monkeypatch, two_saved, llava_home_dir):
    plain = two_saved[1]
    result = invoke(monkeypatch, "sessions", "rm", plain.session_id)
    assert (result.code, result.stdout) == (0, f"removed {plain.session_id}\n")
    assert saved_files(llava_home_dir) == [two_saved[0].path]
    missing = invoke(monkeypatch, "sessions", "rm", plain.session_id)
    assert (missing.code, missing.first_error_line) == (
        2,
        f"llava: error: no saved conversation {plain.session_id}; `llava sessions list` shows them",
    )
    sneaky = invoke(monkeypatch, "sessions", "show", "../etc/passwd")
    assert sneaky.code == 2 and "is not a conversation id or name" in sneaky.first_error_line


def age_saved(path: Path, days: float) -> None:
    """Make a saved conversation look last updated `days` ago."""
    from llava_cli.store.conversations import iso_time

    document = json.loads(path.read_text())
    document["updated"] = iso_time(time.time() - days * 86400)
    write_private_file(path, json.dumps(document).encode("utf-8"))


def test_sessions_prune_older_than_and_keep_leave_named_ones(
    monkeypatch, two_saved, llava_home_dir, images, tiny_model
):
    named, plain = (recorder.path for recorder in two_saved)
    olds = []
    for days in (10, 20):
        recorder = Recorder(SessionStore.default())
        conversation = Conversation()
        conversation.ask(f"{days} days ago", [])
        conversation.answer("ok")
        olds.append(recorder.save(conversation, Settings(model=str(tiny_model))))
        age_saved(olds[-1], days)
    age_saved(named, 30)

    assert invoke(monkeypatch, "sessions", "prune").code == 2
    assert invoke(monkeypatch, "sessions", "prune", "--older-than", "7 days").first_error_line == (
        "llava: error: --older-than takes a number and a unit: 30m, 12h, 7d or 2w (got '7 days')"
    )
    kept_two = invoke(monkeypatch, "sessions", "prune", "--keep", "2", "--older-than", "15d")
    assert kept_two.code == 0 and set(saved_files(llava_home_dir)) == {
        named,
        plain,
        olds[0],
    }  # only the 20-day-old one was both
    week = invoke(monkeypatch, "sessions", "prune", "--older-than", "7d")
    assert week.stdout == "removed 1 conversation(s); 1 unnamed kept, named ones are never pruned\n"
    assert set(saved_files(llava_home_dir)) == {named, plain}
    invoke(monkeypatch, "sessions", "prune", "--keep", "0")
    assert saved_files(llava_home_dir) == [named]


def test_llava_ask_no_save_in_the_environment_turns_saving_off(monkeypatch, llava_home_dir, tiny_model, images):
    monkeypatch.setenv("LLAVA_ASK_NO_SAVE", "1")
    result = invoke(
        monkeypatch, "ask", images["red"], "what is this?", "--model", tiny_model, "-n", MAX_NEW, "--no-server"
    )
    assert result.code == 0, result.stderr
    assert saved_files(llava_home_dir) == []
    monkeypatch.setenv("LLAVA_ASK_NO_SAVE", "0")
    assert (
        invoke(
            monkeypatch, "ask", images["red"], "what is this?", "--model", tiny_model, "-n", MAX_NEW, "--no-server"
        ).code
        == 0
    )
    assert len(saved_files(llava_home_dir)) == 1


def saved_session(llava_home_dir: Path, name: str, model: str, turns: list[tuple[str, str]]) -> Path:
    """A conversation file written as a hostile editor would: any number of turns of any length."""
    folder = llava_home_dir / "sessions"
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "format": "llava-cli-conversation",
        "version": 1,
        "id": name,
        "name": None,
        "model": model,
        "created": "2026-12-05T00:00:00Z",
        "updated": "2026-12-05T00:00:00Z",
        "system": None,
        "settings": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "seed": None, "max_context": None},
        "turns": [{"user": user, "images": [], "assistant": answer, "answered_at": None} for user, answer in turns],
    }
    (folder / f"{name}.json").write_text(json.dumps(document))
    return folder / f"{name}.json"


def test_a_session_with_one_huge_turn_resumes_without_tokenizing_it(llava_home_dir, monkeypatch, tiny_model, reference):
    """Issue 28, item 7: a 26 MB turn made `chat --resume` abort in the tokenizer (rc 134, 5 GB).
    Here 3 MB: the turn is dropped as any turn beyond the window is, and the tokenizer never sees it."""
    import llava_cli.prompt.prompting as prompting

    saved_session(llava_home_dir, "long", str(tiny_model), [("word " * 600_000, "a"), ("hi", "hello")])
    longest: list[int] = []
    real = prompting.untrusted_ranges  # runs right after the tokenizer, with every text it tokenized
    monkeypatch.setattr(
        prompting,
        "untrusted_ranges",
        lambda segments: longest.append(sum(len(s.text) for s in segments)) or real(segments),
    )
    result = invoke(monkeypatch, "chat", "--resume", "long", "--no-server", "--no-save", stdin=b"and now?\n")
    assert result.code == 0, result.stderr
    assert (
        result.stdout
        == reference.answer(render_llava15([("hi", 0, "hello"), ("and now?", 0, None)]), [], MAX_NEW) + "\n"
    )
    assert "dropped the 1 oldest turn(s) to fit the 1024-token context window" in result.stderr
    assert max(longest) < 10_000


def test_a_session_of_too_many_turns_is_refused_in_one_line_and_left_alone(llava_home_dir, monkeypatch, tiny_model):
    """Issue 28, item 7: 560,000 turns took 23.7 s and 2.9 GB to resume; more than a chat can keep is refused early."""
    from llava_cli.store.conversations import MAX_SESSION_TURNS

    path = saved_session(
        llava_home_dir, "many", str(tiny_model), [(f"q{i}", "a") for i in range(MAX_SESSION_TURNS + 1)]
    )
    before = path.read_bytes()
    result = invoke(monkeypatch, "chat", "--resume", "many", "--no-server", stdin=b"hi\n")
    assert (result.code, result.stderr) == (
        2,
        f"llava: error: {path} holds more than 10,000 turns, more than a chat keeps; it was left as it is\n",
    )
    path.write_text(json.dumps(json.loads(before) | {"turns": [{}] * 50_000}))  # objects of no kind are counted too
    assert invoke(monkeypatch, "sessions", "show", "many").first_error_line.endswith(
        "holds more than 10,000 turns, more than a chat keeps; it was left as it is"
    )
    assert saved_session(
        llava_home_dir, "fine", str(tiny_model), [(f"q{i}", "a") for i in range(MAX_SESSION_TURNS)]
    ).exists()
    assert invoke(monkeypatch, "sessions", "show", "fine").code == 0
