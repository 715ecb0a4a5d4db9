"""Client mode sends only the generation options the user set (issue 14, section 3): the server's
own defaults (`llava serve --temperature ...`) apply to the rest. A stand-in OpenAI server on
127.0.0.1 records each request body; `llava ask`/`chat` run in-process (no model is loaded)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cli_runner import invoke
from helpers import slow_fixture

ANSWER = "a red circle"
OPTION_KEYS = {"temperature", "top_p", "max_tokens", "seed"}


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.bodies: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: RecordingServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.reply(
            "application/json", json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        )

    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        events = [
            {"choices": [{"index": 0, "delta": {"content": ANSWER}}]},
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3},
            },
        ]
        self.reply(
            "text/event-stream",
            "".join(f"data: {json.dumps(event)}\n\n" for event in events).encode() + b"data: [DONE]\n\n",
        )

    def reply(self, kind: str, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@slow_fixture  # an HTTP server
def recording_server():
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def sent_options(body: dict) -> dict:
    return {key: body[key] for key in OPTION_KEYS if key in body}


@pytest.mark.parametrize(
    "options, sent",
    [
        ((), {}),
        (("-t", "0.7"), {"temperature": 0.7}),
        (("--top-p", "0.9", "-n", "20", "--seed", "3"), {"top_p": 0.9, "max_tokens": 20, "seed": 3}),
        (("--temperature", "0"), {"temperature": 0.0}),  # set to the default on purpose: still the user's choice
    ],
)
def test_ask_through_a_server_sends_only_the_options_given(
    monkeypatch, recording_server, images, llava_home_dir, options, sent
):
    outcome = invoke(monkeypatch, "ask", "--server", recording_server.url, *options, images["red"], "what is it?")
    assert (outcome.code, outcome.stdout) == (0, ANSWER + "\n"), outcome.stderr
    assert [sent_options(body) for body in recording_server.bodies] == [sent]


def test_a_discovered_server_gets_only_the_options_given(
    monkeypatch, recording_server, images, llava_home_dir, tmp_path
):
    from llava_cli.client.discovery import write_server_file

    monkeypatch.setenv("LLAVA_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("LLAVA_SERVER", raising=False)
    write_server_file(recording_server.url, "org/served-model")  # this process stands for the server: it is alive
    outcome = invoke(monkeypatch, "ask", "--model", "org/served-model", "-n", "7", images["red"], "what is it?")
    assert (outcome.code, outcome.stdout) == (0, ANSWER + "\n"), outcome.stderr
    assert [sent_options(body) for body in recording_server.bodies] == [{"max_tokens": 7}]


def test_chat_sends_what_set_changed_from_then_on(monkeypatch, recording_server, images, llava_home_dir):
    script = f"/image {images['red']} what is it?\n/set temperature 0.4\nand now?\n".encode()
    outcome = invoke(monkeypatch, "chat", "--server", recording_server.url, "--top-p", "0.5", stdin=script)
    assert (outcome.code, outcome.stdout) == (0, f"{ANSWER}\n{ANSWER}\n"), outcome.stderr
    assert [sent_options(body) for body in recording_server.bodies] == [
        {"top_p": 0.5},
        {"top_p": 0.5, "temperature": 0.4},
    ]


def test_with_no_model_named_the_one_running_server_is_used_and_verbose_says_so(
    monkeypatch, recording_server, images, llava_home_dir, tmp_path
):
    from llava_cli.client.discovery import write_server_file

    monkeypatch.setenv("LLAVA_RUNTIME_DIR", str(tmp_path / "run"))
    for name in ("LLAVA_SERVER", "LLAVA_MODEL"):
        monkeypatch.delenv(name, raising=False)
    write_server_file(
        recording_server.url, str(tmp_path), "my-model"
    )  # a folder, served as --served-model-name my-model
    outcome = invoke(monkeypatch, "ask", "--verbose", images["red"], "what is it?")
    assert (outcome.code, outcome.stdout) == (0, ANSWER + "\n"), outcome.stderr
    assert [body["model"] for body in recording_server.bodies] == ["my-model"]
    assert (
        f"answering through the server at {recording_server.url}\nno model named: using the one running llava serve, which serves my-model\n"
        in outcome.stderr
    )


def test_with_no_model_named_and_two_servers_running_none_is_picked(
    monkeypatch, recording_server, images, llava_home_dir, tmp_path
):
    import os

    from llava_cli.client.discovery import write_server_file

    monkeypatch.setenv("LLAVA_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    for name in ("LLAVA_SERVER", "LLAVA_MODEL"):
        monkeypatch.delenv(name, raising=False)
    write_server_file(recording_server.url, "org/one")
    other = tmp_path / "run" / f"server-{os.getppid()}.json"  # a second live server (the parent process stands for it)
    other.write_text(
        json.dumps({"url": recording_server.url, "model": "org/two", "model_key": "org/two", "pid": os.getppid()})
    )
    other.chmod(0o600)
    outcome = invoke(monkeypatch, "ask", images["red"], "what is it?")
    assert outcome.code != 0 and recording_server.bodies == []
    assert outcome.stderr.startswith("note: 2 llava serve servers are running (")
    assert "name one with --model, else llava-hf/llava-1.5-7b-hf is loaded here" in outcome.stderr.splitlines()[0]
