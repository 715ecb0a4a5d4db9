"""`llava serve` with videos: vLLM's `video_url` part and video data: URLs, through the official
openai client, and `--server` client mode; hostile videos get a 400 with one line, and the server
answers on. Answers equal the in-process engine's (tests/test_video.py holds that equal to plain
transformers)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cli_runner import invoke
from fakes import answer_of
from helpers import Server, slow_fixture
from hostile_videos import write_hostile
from tiny_checkpoint import build_family_checkpoint
from videos import frames_of, write_video

from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.media.video import load_video
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

pytest.importorskip("av")
pytest.importorskip("openai")

MAX_NEW = 8
QUESTION = "What happens?"
MIME = {".mp4": "video/mp4", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}


@slow_fixture(scope="module")
def onevision(tmp_path_factory) -> Path:
    return build_family_checkpoint("llava-onevision", tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def server(onevision, tmp_path_factory):
    running = Server(onevision, tmp_path_factory.mktemp("serve-video"), options=("--max-request-mb", "8"))
    yield running
    running.stop(15)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("clips") / "walk.mkv", frames_of(20, 48, 36, seed=1))


@pytest.fixture(scope="module")
def expected(onevision, clip) -> str:
    settings = Settings(model=str(onevision), max_new_tokens=MAX_NEW)
    conversation = Conversation()
    conversation.ask(QUESTION, [load_video(str(clip))])
    return answer_of(Engine(load_model(settings)).generate(conversation, settings), conversation)[0]


def data_url(path: Path) -> str:
    return f"data:{MIME.get(path.suffix, 'video/mp4')};base64," + base64.b64encode(path.read_bytes()).decode()


def message(part: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": part, part: {"url": url}}, {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("part", ["video_url", "image_url"])
def test_the_openai_client_gets_the_engines_answer_for_a_video(server, clip, expected, part):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=server.model, messages=message(part, data_url(clip)), max_tokens=MAX_NEW
    )
    assert reply.choices[0].message.content == expected


def test_ask_through_the_server_sends_the_video(monkeypatch, server, clip, expected):
    outcome = invoke(
        monkeypatch,
        "ask",
        "--server",
        server.url,
        "--no-save",
        "--model",
        server.model,
        "-n",
        str(MAX_NEW),
        str(clip),
        QUESTION,
    )
    assert (outcome.code, outcome.stderr, outcome.stdout) == (0, "", expected + "\n")


def test_hostile_videos_get_a_400_with_one_line_and_the_server_answers_on(server, clip, expected, tmp_path):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for name, path in write_hostile(tmp_path).items():
        url = "data:video/mp4;base64," if name == "empty.mp4" else data_url(path)
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=server.model, messages=message("video_url", url), max_tokens=MAX_NEW)
        text = refused.value.body["message"]
        assert "the data: URL" in text and "\n" not in text, (name, text)
    reply = client.chat.completions.create(
        model=server.model, messages=message("video_url", data_url(clip)), max_tokens=MAX_NEW
    )
    assert reply.choices[0].message.content == expected
