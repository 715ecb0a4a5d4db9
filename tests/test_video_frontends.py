"""Videos through every front-end, and hostile videos refused in one line by each.

`llava ask` (files mixed with images, stdin, --json records with the frames and video tokens,
--each over clips), the chat's /video (and /image refusing a video), `llava serve` (`video_url`
parts and video data: URLs, with the official openai client) and `--server` client mode; every
answer equals the in-process engine's, which tests/test_video.py holds equal to plain transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import BytesStdout, invoke
from fakes import answer_of
from helpers import slow_fixture
from hostile_videos import HOSTILE, write_hostile
from tiny_checkpoint import build_family_checkpoint
from videos import frames_of, write_video

from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.media.images import load_image
from llava_cli.media.video import load_video
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

pytest.importorskip("av")

MAX_NEW = "6"
QUESTION = "What happens?"


@slow_fixture(scope="module")
def onevision(tmp_path_factory) -> Path:
    return build_family_checkpoint("llava-onevision", tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "walk": write_video(folder / "walk.mp4", frames_of(20, 48, 36, seed=1)),
        "pan": write_video(folder / "pan.mkv", frames_of(16, 40, 40, seed=2)),
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    return write_hostile(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def engine_answer(onevision):
    """The in-process engine's answer for one turn of videos and images (the reference for the front-ends)."""
    settings = Settings(model=str(onevision), max_new_tokens=int(MAX_NEW))
    engine = Engine(load_model(settings))

    def answer(media: list[Path], question: str = QUESTION):
        engine.reset()
        conversation = Conversation()
        attached = [load_video(str(p)) if p.suffix in (".mp4", ".mkv") else load_image(str(p)) for p in media]
        conversation.ask(question, attached)
        text, stats = answer_of(engine.generate(conversation, settings), conversation)
        return text, stats

    return answer


def ask(monkeypatch, model: Path, *args: str, stdin: bytes = b""):
    return invoke(
        monkeypatch,
        "ask",
        "--no-server",
        "--no-save",
        "--model",
        str(model),
        "-n",
        MAX_NEW,
        *args,
        stdin=stdin,
        stdout=BytesStdout(),
    )


def test_ask_about_a_video_and_an_image_prints_the_engines_answer_and_json_reports_frames(
    monkeypatch, onevision, clips, images, engine_answer
):
    expected, stats = engine_answer([clips["walk"], images["red"]])
    outcome = ask(monkeypatch, onevision, str(clips["walk"]), str(images["red"]), QUESTION)
    assert (outcome.code, outcome.stderr, outcome.stdout) == (0, "", expected + "\n")
    record = json.loads(ask(monkeypatch, onevision, "--json", str(clips["walk"]), str(images["red"]), QUESTION).stdout)
    assert record["answer"] == expected
    assert record["videos"] == [
        {
            "name": str(clips["walk"]),
            "frames": [0, 2, 5, 7, 10, 12, 15, 17],
            "video_tokens": stats.videos[0]["video_tokens"],
        }
    ]
    assert record["videos"][0]["video_tokens"] == 8 * 2 * 2 + 1  # OneVision: 2x2 pooled tokens a frame, one newline


def test_ask_reads_a_video_from_stdin_and_takes_frames(monkeypatch, onevision, clips, engine_answer):
    outcome = ask(monkeypatch, onevision, "--json", "--frames", "3", "-", QUESTION, stdin=clips["pan"].read_bytes())
    assert outcome.code == 0, outcome.stderr
    record = json.loads(outcome.stdout)
    assert record["videos"][0]["frames"] == [0, 5, 10] and record["videos"][0]["name"] == "<stdin>"


@pytest.mark.parametrize("named", ["files", "folder"])
def test_ask_each_answers_each_clip(monkeypatch, onevision, clips, engine_answer, named):
    given = [str(clips["walk"]), str(clips["pan"])] if named == "files" else [str(clips["walk"].parent)]
    outcome = ask(monkeypatch, onevision, "--each", *given, "-p", QUESTION)
    assert (outcome.code, outcome.stderr) == (0, "")
    records = [json.loads(line) for line in outcome.stdout.splitlines()]
    order = ["walk", "pan"] if named == "files" else ["pan", "walk"]  # a folder's entries sorted by name
    assert [record["answer"] for record in records] == [engine_answer([clips[clip]])[0] for clip in order]
    frames = {"walk": [0, 2, 5, 7, 10, 12, 15, 17], "pan": [0, 2, 4, 6, 8, 10, 12, 14]}
    assert [record["videos"] for record in records] == [
        [{"name": str(clips[clip]), "frames": frames[clip], "video_tokens": 33}] for clip in order
    ]


def test_a_family_without_videos_refuses_one_in_a_line(monkeypatch, tiny_model, clips):
    outcome = ask(monkeypatch, tiny_model, str(clips["walk"]), QUESTION)
    assert outcome.code == 2
    assert (
        outcome.stderr
        == f"llava: error: {clips['walk']} is a video, and this model takes none; use a LLaVA-NeXT-Video or LLaVA-OneVision checkpoint\n"
    )


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_videos_get_one_line_in_ask(monkeypatch, onevision, hostile, name):
    outcome = ask(monkeypatch, onevision, str(hostile[name]), QUESTION)
    assert outcome.code == 2, outcome.stderr
    assert outcome.stdout == ""
    assert outcome.stderr.startswith(f"llava: error: {hostile[name]} ") and outcome.stderr.count("\n") == 1, (
        outcome.stderr
    )


def test_chat_video_command_answers_shows_frames_and_image_refuses_a_video(onevision, clips, hostile, engine_answer):
    from fake_io import FakeIO

    from llava_cli.chat.loop import ChatLoop

    settings = Settings(model=str(onevision), max_new_tokens=int(MAX_NEW))
    hostile_lines = [f"/video {path}" for path in hostile.values()]
    io = FakeIO([f"/image {clips['walk']}", *hostile_lines, f"/video {clips['walk']} {QUESTION}", "/show"])
    loop = ChatLoop(Engine(load_model(settings)), settings, io, None)
    loop.run([])
    assert io.errors[0] == f"{clips['walk']} is a video, not an image: attach it with /video {clips['walk']}"
    assert [error.split(" ")[0] for error in io.errors[1:]] == [str(path) for path in hostile.values()]
    assert all("\n" not in error for error in io.errors)
    assert io.answers == [engine_answer([clips["walk"]])[0]]
    assert (
        f"video     {clips['walk']}: 8 frames (at 0, 2, 5, 7, 10, 12, 15, 17), 33 tokens" in io.infos[-1].splitlines()
    )


def test_piped_chat_reports_a_hostile_video_in_one_line_and_answers_on(
    monkeypatch, onevision, clips, hostile, engine_answer
):
    script = f"/video {hostile['corrupt.avi']} {QUESTION}\n/video {clips['walk']} {QUESTION}\n".encode()
    outcome = invoke(
        monkeypatch, "chat", "--no-server", "--no-save", "--model", str(onevision), "-n", MAX_NEW, stdin=script
    )
    assert outcome.code == 1  # a piped message failed
    assert (
        outcome.stderr.startswith(f"llava: error: {hostile['corrupt.avi']} is truncated or corrupt")
        and outcome.stderr.count("\n") == 1
    )
    assert outcome.stdout == engine_answer([clips["walk"]])[0] + "\n"


def test_without_pyav_a_video_gets_the_install_hint_in_one_line(monkeypatch, onevision, clips):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError, as where PyAV is not installed
    outcome = ask(monkeypatch, onevision, str(clips["walk"]), QUESTION)
    assert (outcome.code, outcome.stderr) == (2, "llava: error: videos need PyAV: pip install 'llava-cli[video]'\n")


@slow_fixture(scope="module")  # an HTTP server
def clip_server(clips, hostile):
    """An http server of the clips' and the hostile videos' folders: http://127.0.0.1:PORT/clips/NAME, /hostile/NAME."""
    import functools
    import http.server
    import threading

    root = clips["walk"].parent.parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_ask_fetches_a_video_url_and_refuses_a_hostile_one_in_a_line(
    monkeypatch, onevision, clips, hostile, clip_server, engine_answer
):
    url = f"{clip_server}/{clips['walk'].parent.name}/walk.mp4"
    outcome = ask(monkeypatch, onevision, url, QUESTION)
    assert (outcome.code, outcome.stderr, outcome.stdout) == (0, "", engine_answer([clips["walk"]])[0] + "\n")
    bad = f"{clip_server}/{hostile['huge.avi'].parent.name}/huge.avi"
    outcome = ask(monkeypatch, onevision, bad, QUESTION)
    assert (
        outcome.code == 2
        and outcome.stderr.startswith(f"llava: error: {bad} has no frame of at most")
        and outcome.stderr.count("\n") == 1
    )
