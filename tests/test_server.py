"""`llava serve` and client mode, end to end: a real server process on a free 127.0.0.1 port.

Every answer is checked against plain transformers greedy decoding (the `reference` fixture):
through the OpenAI API (streamed and not), through `llava ask`/`llava chat --server`, and through
`llava ask` finding the running server by itself. Also: eight concurrent clients, every kind of
bad request, the API key, a client hanging up mid-stream, and shutdown on SIGINT and SIGTERM.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import httpx
import pytest
from helpers import EXIT_TIMEOUT_S, Server, data_url, render_llava15, run_llava, user

from llava_cli.client.discovery import find_server, remove_server_file, write_server_file
from llava_cli.engine.streaming import Stats

MAX_NEW = 12
LONG = 900  # max_tokens for answers that must still be running when they are cut off
API_KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def servers(tiny_model, image_dir, tmp_path_factory):
    """Every server this module needs, started together so that their start-ups overlap."""
    started = {
        "main": Server(
            tiny_model, tmp_path_factory.mktemp("serve"), options=("--allowed-local-media-path", str(image_dir))
        ),
        "keyed": Server(tiny_model, tmp_path_factory.mktemp("serve-keyed"), env={"LLAVA_API_KEY": API_KEY}),
        "doomed": Server(tiny_model, tmp_path_factory.mktemp("serve-doomed"), options=("--drain-timeout", "0")),
    }
    yield started
    for running in started.values():
        if running.process.poll() is None:
            running.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def server(servers) -> Server:
    """The server without an API key that most tests share."""
    return servers["main"]


def request(server: Server, messages: list[dict], **options) -> dict:
    return {"model": server.model, "messages": messages, **options}


def streamed(server: Server, body: dict) -> tuple[str, list[dict]]:
    """POST with stream: true; returns the joined content and every event."""
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    text = "".join(choice["delta"].get("content", "") for event in events for choice in event["choices"])
    return text, events


def test_openai_requests_streamed_or_not_get_the_plain_transformers_answer(server, images, reference):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [entry["id"] for entry in models["data"]] == [
        Path(server.model).name
    ]  # a folder's name, not its absolute path

    first = user("What is in this picture?", data_url(images["red"]))
    expected = reference.answer(render_llava15([("What is in this picture?", 1, None)]), [images["red"]], MAX_NEW)
    reply = server.post(request(server, [first], max_tokens=MAX_NEW))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    prompt_ids = reference.processor(
        text=render_llava15([("What is in this picture?", 1, None)]),
        images=[reference_image(images["red"])],
        return_tensors="pt",
    )["input_ids"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_ids.shape[1]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (usage["completion_tokens"] == MAX_NEW) == (body["choices"][0]["finish_reason"] == "length")

    # Second turn, streamed, with the image given as a file path this time: the prefix cache serves the history.
    second = user("Compare it with this one.", str(images["green"]))
    history = [first, {"role": "assistant", "content": expected}, second]
    text, events = streamed(
        server, request(server, history, max_tokens=MAX_NEW, stream_options={"include_usage": True})
    )
    turns = [("What is in this picture?", 1, expected), ("Compare it with this one.", 1, None)]
    assert text == reference.answer(render_llava15(turns), [images["red"], images["green"]], MAX_NEW)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        events[-1]["choices"] == []
        and events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"]
    )


def reference_image(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_the_openai_client_library_gets_the_same_answers(server, images, reference):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [user("What is in this picture?", data_url(images["green"]))]
    expected = reference.answer(render_llava15([("What is in this picture?", 1, None)]), [images["green"]], MAX_NEW)
    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_NEW)
    assert reply.choices[0].message.content == expected
    chunks = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=MAX_NEW, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    for chunk in chunks:
        pieces += [choice.delta.content or "" for choice in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == expected and usage.total_tokens == reply.usage.total_tokens
    with pytest.raises(NotFoundError, match="not served here"):
        client.chat.completions.create(model="no/such-model", messages=messages)


UNSUPPORTED = {  # field -> a value an OpenAI client may send, which this server does not honour
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "logit_bias": {"1": 5},
    "presence_penalty": 0.5,
    "colour": "blue",  # unknown to OpenAI too
}


def test_the_openai_client_gets_400_naming_each_field_the_server_does_not_honour(server, images, reference):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    for field, value in UNSUPPORTED.items():
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(
                model=server.model, messages=messages, max_tokens=2, extra_body={field: value}
            )
        assert refused.value.body["param"] == field and f"`{field}`" in refused.value.body["message"], field
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(
            model=server.model, messages=messages, stream=True, stream_options={"include_obfuscation": True}
        )
    assert refused.value.body["param"] == "stream_options.include_obfuscation"
    expected = reference.answer(render_llava15([("hi", 0, None)]), [], 3)
    reply = client.chat.completions.create(
        model=server.model, messages=messages, max_completion_tokens=3, logprobs=False, user="me", tools=None
    )
    assert reply.choices[0].message.content == expected and reply.usage.completion_tokens <= 3


def test_response_format_gives_the_answer_transformers_gives_under_xgrammars_processor(server, images, reference):
    pytest.importorskip("xgrammar")
    from openai import BadRequestError, OpenAI
    from pydantic import BaseModel

    class Colour(BaseModel):
        colour: Literal["red", "green", "blue"]

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    question = "What is in this picture?"
    messages = [user(question, data_url(images["green"]))]
    prompt = render_llava15([(question, 1, None)])
    schema = {
        "type": "object",
        "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["count"],
    }
    reply = client.chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    assert reply.choices[0].message.content == reference.answer(
        prompt, [images["green"]], 40, schema=json.dumps(schema)
    )
    parsed = client.chat.completions.parse(model=server.model, messages=messages, max_tokens=40, response_format=Colour)
    pydantic_schema = {
        "type": "json_schema",
        "json_schema": {"name": "Colour", "strict": True, "schema": openai_schema(Colour)},
    }
    expected = reference.answer(
        prompt, [images["green"]], 40, schema=json.dumps(pydantic_schema["json_schema"]["schema"])
    )
    assert parsed.choices[0].message.parsed == Colour.model_validate_json(expected)
    anything = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=40, response_format={"type": "json_object"}
    )
    assert anything.choices[0].message.content == reference.answer(
        prompt, [images["green"]], 40, schema='{"type": "object"}'
    )
    for bad in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "nope"}}}):
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=server.model, messages=messages, response_format=bad)
        assert refused.value.body["param"] == "response_format"


def openai_schema(model) -> dict:
    """The JSON schema the openai package sends for a pydantic model (`parse`)."""
    from openai.lib._pydantic import to_strict_json_schema

    return to_strict_json_schema(model)


def test_stop_ends_a_streamed_answer_before_the_stop_and_streams_nothing_past_it(server, images, reference):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    question = "What is in this picture?"
    full = reference.answer(render_llava15([(question, 1, None)]), [images["blue"]], 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)].rstrip()
    messages = [user(question, data_url(images["blue"]))]
    chunks = list(
        client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=24, stream=True, stop=["never-said", stop]
        )
    )
    pieces = [choice.delta.content or "" for chunk in chunks for choice in chunk.choices]
    assert "".join(pieces) == expected and len([piece for piece in pieces if piece]) > 1
    assert [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason] == ["stop"]
    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=24, stop=stop)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model=server.model, messages=messages, stop=["a", "b", "c", "d", "e"])
    assert refused.value.body["param"] == "stop"


def test_ask_through_the_server_prints_what_a_local_ask_prints(server, images, reference):
    expected = reference.answer(render_llava15([("What is in this picture?", 1, None)]), [images["blue"]], MAX_NEW)
    common = ["--model", server.model, "-n", str(MAX_NEW), str(images["blue"]), "What is in this picture?"]

    plain = run_llava("ask", "--server", server.url, *common, env=server.client_env())
    assert (plain.returncode, plain.stdout_text, plain.stderr_text) == (0, expected + "\n", "")

    as_json = run_llava("ask", "--json", *common, env=server.client_env(LLAVA_SERVER=f"{server.url}/v1"))
    record = json.loads(as_json.stdout_text)
    assert {"answer", "model", "images"} | set(Stats().as_dict()) <= set(record)  # every figure a local ask gives
    assert (record["answer"], record["model"], record["images"]) == (expected, server.model, [str(images["blue"])])
    assert record["prompt_tokens"] > record["completion_tokens"] > 0


def test_ask_uses_a_running_server_by_itself_unless_told_not_to(server, images, reference):
    expected = reference.answer(render_llava15([("Describe the colours.", 1, None)]), [images["green"]], MAX_NEW)
    common = [
        "ask",
        "--verbose",
        "--model",
        server.model,
        "-n",
        str(MAX_NEW),
        str(images["green"]),
        "Describe the colours.",
    ]

    found = run_llava(*common, env=server.client_env())
    assert (found.returncode, found.stdout_text) == (0, expected + "\n")
    assert f"answering through the server at {server.url}" in found.stderr_text

    local = run_llava(*common, env=server.client_env(LLAVA_NO_SERVER="1"))
    assert (local.returncode, local.stdout_text) == (0, expected + "\n")
    assert "answering through" not in local.stderr_text and "loaded" in local.stderr_text


def test_piped_chat_through_the_server_answers_every_turn_like_plain_transformers(server, images, reference):
    script = f"/image {images['red']}\nWhat is it?\nAnd its colour?\n/image {images['green']} {images['blue']} Compare these.\n"
    result = run_llava(
        "chat",
        "--json",
        "--server",
        server.url,
        "--model",
        server.model,
        "-n",
        str(MAX_NEW),
        stdin=script,
        env=server.client_env(),
    )
    assert result.returncode == 0, result.stderr_text
    records = [json.loads(line) for line in result.stdout_text.splitlines()]
    turns, paths = (
        [("What is it?", 1), ("And its colour?", 0), ("Compare these.", 2)],
        [images["red"], images["green"], images["blue"]],
    )
    history: list[tuple[str, int, str | None]] = []
    for (text, count), record in zip(turns, records, strict=True):
        used = paths[: sum(c for _, c in turns[: len(history) + 1])]
        expected = reference.answer(render_llava15(history + [(text, count, None)]), used, MAX_NEW)
        assert record["answer"] == expected, f"turn {len(history) + 1}"
        history.append((text, count, expected))
    assert all(record["cached_tokens"] > 0 for record in records[1:])  # the server reused the chat's prefix


def test_eight_concurrent_clients_each_get_their_own_answer(server, images, reference):
    jobs = [(f"Question number {i}: what is here?", ["red", "green", "blue"][i % 3]) for i in range(8)]
    expected = [reference.answer(render_llava15([(text, 1, None)]), [images[colour]], MAX_NEW) for text, colour in jobs]
    answers: list[str | None] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def client(index: int) -> None:
        text, colour = jobs[index]
        body = request(server, [user(text, data_url(images[colour]))], max_tokens=MAX_NEW)
        start.wait()
        if index % 2:
            answers[index] = streamed(server, body)[0]
        else:
            answers[index] = server.post(body).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == expected


def bad_requests(model: str, red: Path) -> dict[str, tuple[bytes | dict, int, str | None]]:
    """name -> (body, status, error code)"""
    good = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    image = lambda url: {**good, "messages": [user("what?", url)]}  # noqa: E731
    return {
        "malformed JSON": (b'{"model": "x", "messages": [', 400, "invalid_json"),
        "unknown model": ({**good, "model": "no/such-model"}, 404, "model_not_found"),
        "missing image file": (image(str(red.parent / "missing.png")), 400, "invalid_image"),
        "not an image": (image("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400, "invalid_image"),
        "bad base64": (image("data:image/png;base64,@@@"), 400, "invalid_image"),
        "remote image URL": (image("https://example.com/a.png"), 400, "invalid_image"),
        "oversized body": ({**good, "padding": "x" * (2 * 2**20)}, 413, "request_too_large"),
        "prompt over the context": (
            {**good, "messages": [{"role": "user", "content": "word " * 3000}]},
            400,
            "context_length_exceeded",
        ),
        "no messages": ({**good, "messages": []}, 400, None),
        "last message not the user's": (
            {**good, "messages": [*good["messages"], {"role": "assistant", "content": "x"}]},
            400,
            None,
        ),
        "temperature out of range": ({**good, "temperature": -1}, 400, None),
    }


@pytest.mark.parametrize("case", list(bad_requests("m", Path("r.png"))))
def test_a_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, images, case):
    body, status, code = bad_requests(server.model, images["red"])[case]
    reply = server.post(body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    again = server.post(request(server, [{"role": "user", "content": "hi"}], max_tokens=2))
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] <= 2


def test_client_mode_keeps_the_exit_codes(server, images, tmp_path):
    common = ["ask", "--model", server.model, str(images["red"])]
    unreachable = run_llava(*common, "hi", "--server", "http://127.0.0.1:9", env=server.client_env())
    assert unreachable.returncode == 1
    assert unreachable.stderr_text.startswith("llava: error: cannot reach the server at http://127.0.0.1:9")

    too_long = run_llava(*common, "--server", server.url, stdin="word " * 3000, env=server.client_env())
    assert too_long.returncode == 2
    assert "context window is 1024" in too_long.stderr_text.splitlines()[0]

    unknown = run_llava(
        "ask", "--model", "no/such-model", "--server", server.url, str(images["red"]), "hi", env=server.client_env()
    )
    assert unknown.returncode == 2 and "not served here" in unknown.stderr_text


def test_a_client_hanging_up_mid_stream_stops_its_answer(server, images, reference):
    body = request(server, [user("Tell me a long story.", data_url(images["blue"]))], max_tokens=LONG, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the answer is under way: hang up
    deadline = time.monotonic() + 10
    while "client disconnected" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "stopped an answer after" in server.log() and "client disconnected" in server.log()
    expected = reference.answer(render_llava15([("hello", 0, None)]), [], MAX_NEW)
    assert (
        server.post(request(server, [{"role": "user", "content": "hello"}])).json()["choices"][0]["message"]["content"]
        == expected
    )


def test_an_api_key_is_required_when_set_and_ctrl_c_stops_the_server(servers, images, reference):
    keyed, key = servers["keyed"], API_KEY
    body = request(keyed, [{"role": "user", "content": "hello"}])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        refused = keyed.post(body, **headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    expected = reference.answer(render_llava15([("hello", 0, None)]), [], MAX_NEW)
    assert keyed.post(body, Authorization=f"Bearer {key}").json()["choices"][0]["message"]["content"] == expected

    ask = ["ask", "--server", keyed.url, "--model", keyed.model, "-n", str(MAX_NEW), str(images["red"]), "hello"]
    without = run_llava(*ask, env={k: v for k, v in keyed.client_env().items() if k != "LLAVA_API_KEY"})
    assert without.returncode == 2 and "LLAVA_API_KEY" in without.stderr_text
    with_key = run_llava(*ask, env=keyed.client_env())
    answer = reference.answer(render_llava15([("hello", 1, None)]), [images["red"]], MAX_NEW)
    assert with_key.returncode == 0 and with_key.stdout_text == answer + "\n"

    assert keyed.stop(signal.SIGINT) == 130
    assert "Traceback" not in keyed.log() and key not in keyed.log()
    assert not list(keyed.runtime.glob("server-*.json"))


def test_sigterm_stops_an_answer_in_flight_and_exits_0(servers, images):
    doomed = servers["doomed"]
    body = request(doomed, [user("Tell me a long story.", data_url(images["red"]))], max_tokens=LONG, stream=True)
    with httpx.stream("POST", f"{doomed.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        doomed.process.send_signal(signal.SIGTERM)
        rest = list(lines)  # the stream ends instead of running on to LONG tokens
    assert any("shutting down" in line for line in rest) and "data: [DONE]" not in rest
    assert doomed.process.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert "Traceback" not in doomed.log() and "the server is shutting down" in doomed.log()
    assert not list(doomed.runtime.glob("server-*.json"))


def test_discovery_matches_any_spelling_of_the_folder_and_forgets_killed_servers(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_RUNTIME_DIR", str(tmp_path / "run"))
    announced = write_server_file("http://127.0.0.1:1234", str(tiny_model))
    monkeypatch.chdir(tiny_model.parent)
    assert find_server(f"./{tiny_model.name}") == ("http://127.0.0.1:1234", str(tiny_model))
    assert find_server("llava-hf/llava-1.5-7b-hf") is None
    assert oct(announced.stat().st_mode & 0o777) == oct(0o600)

    remove_server_file(announced)
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale = announced.with_name(f"server-{killed.pid}.json")
    stale.write_text(json.dumps({"url": "http://127.0.0.1:1", "model": "m", "model_key": "m", "pid": killed.pid}))
    assert find_server("m") is None and not stale.exists()
