"""`llava serve --keep-alive 0`: the model is unloaded after each answer and loaded again by the next
request; requests arriving meanwhile queue, `/health` and `/metrics` say so, and `llava ask`
through the server keeps working. One running server; answers checked against plain transformers.
Also the option parsers and the connection guard's request framing (no server needed).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from helpers import SHORT_ANSWER as MAX_NEW
from helpers import Server, client_for, data_url, render_llava15, run_llava, user

from llava_cli.base.errors import UsageError
from llava_cli.client.discovery import served_name
from llava_cli.serve.connections import RequestFraming
from llava_cli.serve.guard import api_keys_from_file
from llava_cli.serve.keepalive import parse_keep_alive

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    running = Server(tiny_model, tmp_path_factory.mktemp("serve-keepalive"), options=("--keep-alive", "0"))
    yield running
    if running.process.poll() is None:
        running.stop(15)


def wait_for_health(server: Server, loaded: bool) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/health").json()
        if health["loaded"] is loaded:
            return health
        time.sleep(0.05)
    raise AssertionError(f"/health never said loaded={loaded}: {health}")


def counter(server: Server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text  # no API key on this server
    return next(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_the_model_is_unloaded_when_idle_and_requests_meanwhile_queue_and_get_the_same_answers(
    server, images, reference
):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    expected = reference.answer(render_llava15([(QUESTION, 1, None)]), [images["red"]], MAX_NEW)

    def answer() -> str:
        reply = client.chat.completions.create(
            model=server.model, messages=[user(QUESTION, data_url(images["red"]))], max_tokens=MAX_NEW
        )
        return reply.choices[0].message.content

    assert answer() == expected
    assert wait_for_health(server, loaded=False) == {
        "status": "ok",
        "model": served_name(server.model),
        "loaded": False,
    }  # idle: still takes work
    assert counter(server, "llava_model_unloads_total") >= 1 and counter(server, "llava_model_loaded") == 0
    loads = counter(server, "llava_model_loads_total")
    answers: list[str] = []
    clients = [threading.Thread(target=lambda: answers.append(answer())) for _ in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    assert answers == [expected] * 3  # all three waited for the load instead of failing
    assert counter(server, "llava_model_loads_total") > loads
    assert "loaded the model again" in server.log() and "Traceback" not in server.log()


def test_ask_through_the_server_works_across_an_unload(server, images, reference):
    wait_for_health(server, loaded=False)
    expected = reference.answer(render_llava15([(QUESTION, 1, None)]), [images["blue"]], MAX_NEW)
    result = run_llava(
        "ask",
        str(images["blue"]),
        QUESTION,
        "--server",
        server.url,
        "--model",
        server.model,
        "-n",
        str(MAX_NEW),
        env=server.client_env(),
    )
    assert result.returncode == 0, result.stderr_text
    assert result.stdout_text.strip() == expected


def test_a_piped_chat_through_the_server_keeps_its_history_across_unloads(server, images, reference):
    loads = counter(server, "llava_model_loads_total")
    script = f"/image {images['red']}\nWhat is it?\nAnd its colour?\n"
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
    first = reference.answer(render_llava15([("What is it?", 1, None)]), [images["red"]], MAX_NEW)
    second = reference.answer(
        render_llava15([("What is it?", 1, first), ("And its colour?", 0, None)]), [images["red"]], MAX_NEW
    )
    assert [record["answer"] for record in records] == [first, second]
    assert counter(server, "llava_model_loads_total") >= loads + 2  # each turn loaded the model again


def test_keep_alive_durations_and_bad_values():
    assert [parse_keep_alive(text) for text in ("-1", "0", "30", "30s", "5m", "1h", "1.5m")] == [
        None,
        0,
        30,
        30,
        300,
        3600,
        90,
    ]
    for bad in ("5x", "-5", "", "m"):
        with pytest.raises(UsageError, match="--keep-alive must be a duration"):
            parse_keep_alive(bad)


def test_connections_stay_under_the_open_file_limit(monkeypatch):
    import resource

    from llava_cli.serve.connections import RESERVED_FILE_DESCRIPTORS, ConnectionLimits

    monkeypatch.setattr(resource, "getrlimit", lambda which: (300, 4096))
    limits = ConnectionLimits(max_connections=512, max_per_client=128)
    assert limits.max_connections == 300 - RESERVED_FILE_DESCRIPTORS
    admitted = [limits.admit(f"10.0.0.{n % 3}") for n in range(400)]
    assert admitted.count(True) == limits.max_connections and limits.by_client["10.0.0.0"] <= 128
    limits.release("10.0.0.0")
    assert limits.admit("10.0.0.9") and not limits.admit(
        "10.0.0.9"
    )  # a freed place goes to the next client, then full again


def test_a_key_file_holds_one_key_a_line(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-one\n\n  sk-two  \n")
    assert api_keys_from_file(str(keys)) == ("sk-one", "sk-two")
    keys.write_text("sk one\n")
    with pytest.raises(UsageError, match="one a line"):
        api_keys_from_file(str(keys))


def test_the_guard_finds_where_each_pipelined_request_head_ends():
    framing = RequestFraming()
    assert framing.feed(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab") is None
    assert framing.requests == 1 and not framing.in_head
    assert framing.feed(b"cdeGET / HTTP/1.1\r\nHo") is None  # the body's end, then half of the next head
    assert framing.in_head and framing.head_started and framing.requests == 1
    assert framing.feed(b"st: x\r\n\r\n") is None and framing.requests == 2 and not framing.head_started
    assert framing.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n") == "chunked"


def test_health_is_503_while_the_model_loads_again_and_metrics_can_be_public(tiny_loaded, tiny_model):
    from llava_cli.base.settings import Settings
    from llava_cli.engine.local import Engine

    loading = threading.Event()

    def slow_load() -> Engine:
        loading.set()
        time.sleep(1.5)
        return Engine(tiny_loaded)

    settings = Settings(model=str(tiny_model), max_new_tokens=2)
    app, service = client_for(tiny_loaded, settings, api_keys=("sk-k",), keep_alive_s=0, metrics_public=True)
    service.holder.load_engine, service.holder.keep_alive_s = slow_load, 0  # as `llava serve --keep-alive 0` builds it
    try:
        body = {"model": str(tiny_model), "messages": [{"role": "user", "content": "Hi?"}]}
        auth = {"Authorization": "Bearer sk-k"}
        assert app.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
        deadline = time.monotonic() + 10
        while service.holder.engine is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        replies = []
        sender = threading.Thread(
            target=lambda: replies.append(app.post("/v1/chat/completions", json=body, headers=auth))
        )
        sender.start()
        assert loading.wait(10)
        health = app.get("/health")
        sender.join(60)
        assert health.status_code == 503 and health.json() == {
            "status": "loading",
            "model": served_name(str(tiny_model)),
            "loaded": False,
        }
        assert replies[0].status_code == 200 and app.get("/health").status_code == 200
        assert (
            app.get("/metrics").status_code == 200 and app.get("/v1/models").status_code == 401
        )  # --metrics-public opens only /metrics
    finally:
        service.worker.stop()
