"""One `IMAGE... [PROMPT]` grammar (frontend/arguments.py) for `llava ask` and `ask --each`: an http(s) URL is
an image even without an image extension, so the prompt then comes from stdin. Through the real
entry point, in-process, against a local HTTP server and plain transformers' answers."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from cli_runner import BytesStdout, invoke
from helpers import render_llava15

MAX_NEW = 8
QUESTION = "what is in the picture?"


class PictureServer(http.server.BaseHTTPRequestHandler):
    """GET /picture (no extension) serves `body`."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def picture_url(images):
    PictureServer.body = images["green"].read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PictureServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/picture"
    httpd.shutdown()


def test_ask_takes_a_url_without_an_extension_as_an_image_and_the_prompt_from_stdin(
    monkeypatch, tiny_model, images, reference, picture_url
):
    outcome = invoke(
        monkeypatch,
        "ask",
        images["red"],
        picture_url,
        "--model",
        tiny_model,
        "-n",
        MAX_NEW,
        "--no-save",
        stdin=QUESTION.encode(),
    )

    expected = reference.answer(render_llava15([(QUESTION, 2, None)]), [images["red"], images["green"]], MAX_NEW)
    assert (outcome.code, outcome.stdout, outcome.stderr) == (0, expected + "\n", "")


def test_ask_each_takes_a_url_without_an_extension_as_an_image_and_the_prompt_from_stdin(
    monkeypatch, tiny_model, images, reference, picture_url
):
    outcome = invoke(
        monkeypatch,
        "ask",
        "--each",
        images["red"],
        picture_url,
        "--model",
        tiny_model,
        "-n",
        MAX_NEW,
        stdin=QUESTION.encode(),
        stdout=BytesStdout(),
    )

    prompt = render_llava15([(QUESTION, 1, None)])
    records = [json.loads(line) for line in outcome.stdout.splitlines()]
    assert outcome.code == 0, outcome.stderr
    assert [(record["image"], record["prompt"], record["answer"]) for record in records] == [
        (str(images["red"]), QUESTION, reference.answer(prompt, [images["red"]], MAX_NEW)),
        (picture_url, QUESTION, reference.answer(prompt, [images["green"]], MAX_NEW)),
    ]
