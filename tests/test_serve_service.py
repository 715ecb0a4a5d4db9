"""`llava serve` as a long-running service, against one running server with two API keys (a key file):
`/health`, `/metrics`, the prefix cache scoped per key and `cache_salt`, the JSON access log with
request ids, slow and too many connections, slow bodies, and draining on SIGTERM (last: it ends
the server). Answers are checked against plain transformers greedy decoding (the `reference`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from helpers import SHORT_ANSWER as MAX_NEW
from helpers import Server, data_url, render_llava15, user

from llava_cli.client.discovery import served_name

KEYS = ("sk-first-0123456789", "sk-second-9876543210")
HEADER_TIMEOUT_S = 1.5
PER_CLIENT = 64
SLOW_ADDRESS = "127.0.0.2"  # loopback too, but another client address than the normal client's 127.0.0.1
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-service")
    key_file = folder / "keys"
    key_file.write_text("\n".join(KEYS) + "\n")
    key_file.chmod(0o600)
    running = Server(
        tiny_model,
        folder,
        options=(
            "--api-key-file",
            str(key_file),
            "--log-format",
            "json",
            "--header-timeout",
            str(HEADER_TIMEOUT_S),
            "--max-connections-per-client",
            str(PER_CLIENT),
            "--timeout-keep-alive",
            "1",
            "--cache-mb",
            "1024",
            "--drain-timeout",
            "300",  # the 900-token answer in flight must end by itself even on a loaded machine
        ),
    )
    yield running
    if running.process.poll() is None:
        running.process.kill()


def client(server: Server, key: str = KEYS[0], **headers: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key, default_headers=headers or None, max_retries=0)


def ask(server: Server, key: str, messages: list[dict], **extra):
    return client(server, key).chat.completions.create(
        model=server.model, messages=messages, max_tokens=MAX_NEW, extra_body=extra or None
    )


def metrics(server: Server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"}).text
    return {
        f"{sample.name}{json.dumps(sample.labels, sort_keys=True) if sample.labels else ''}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def log_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def test_health_needs_no_key_and_answers_head(server):
    reply = httpx.get(f"{server.url}/health")
    assert reply.status_code == 200 and reply.json() == {
        "status": "ok",
        "model": served_name(server.model),
        "loaded": True,
    }
    head = httpx.head(f"{server.url}/health")
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API itself still needs a key


def test_metrics_need_a_key_and_count_requests_tokens_and_times(server, images, reference):
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    before = metrics(server)
    reply = ask(server, KEYS[0], [user(QUESTION, data_url(images["red"]))])
    assert reply.choices[0].message.content == reference.answer(
        render_llava15([(QUESTION, 1, None)]), [images["red"]], MAX_NEW
    )
    after = metrics(server)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('llava_requests_total{"endpoint": "/v1/chat/completions", "status": "200"}') == 1
    assert (
        grew('llava_requests_total{"endpoint": "/metrics", "status": "401"}') == 0
    )  # counted before `before` was read
    assert grew("llava_prompt_tokens_total") == reply.usage.prompt_tokens
    assert grew("llava_cached_tokens_total") == reply.usage.prompt_tokens_details.cached_tokens
    assert grew("llava_generated_tokens_total") == reply.usage.completion_tokens
    assert (
        grew("llava_time_to_first_token_seconds_count") == 1
        and grew('llava_request_seconds_count{"endpoint": "/v1/chat/completions"}') == 1
    )
    assert grew("llava_time_per_output_token_seconds_count") == (1 if reply.usage.completion_tokens > 1 else 0)
    assert after["llava_model_loaded"] == 1 and after["llava_max_batch"] >= 1 and after["llava_queue_depth"] == 0
    assert 0 < after["llava_prefix_cache_bytes"] <= after["llava_prefix_cache_budget_bytes"] == 1024 * 2**20
    assert (
        after["llava_kv_cache_bytes"] == after["llava_prefix_cache_bytes"]
    )  # no answer running: its reservation was given back
    assert after["llava_model_loads_total"] == after["llava_model_unloads_total"] == 0


def test_one_key_never_gets_another_keys_or_another_salts_cached_tokens(server, images, reference):
    messages = [user("Describe this picture in detail, please.", data_url(images["blue"]))]
    expected = reference.answer(
        render_llava15([("Describe this picture in detail, please.", 1, None)]), [images["blue"]], MAX_NEW
    )

    def cached(key: str, **extra) -> int:
        reply = ask(server, key, messages, **extra)
        assert reply.choices[0].message.content == expected
        return reply.usage.prompt_tokens_details.cached_tokens

    salt = f"test-{time.monotonic_ns()}"  # a scope nothing has used yet
    assert cached(KEYS[0], cache_salt=salt) == 0
    again = cached(KEYS[0], cache_salt=salt)
    assert again > 16  # the same key and salt: the whole prompt but its last token, image included
    assert cached(KEYS[1], cache_salt=salt) == 0  # another key sending the same salt, image and text
    assert cached(KEYS[0], cache_salt=salt + "-b") == 0  # the same key, another salt
    assert cached(KEYS[0], cache_salt=salt) == again
    bad = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEYS[0]}"},
        json={"model": server.model, "messages": messages, "cache_salt": 7},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


def test_the_json_access_log_has_a_line_per_request_with_its_id_and_key_id_never_the_key(server, images):
    raw = client(server, KEYS[1], **{"X-Request-Id": "trace-42"}).chat.completions.with_raw_response.create(
        model=server.model, messages=[user("Hi?")], max_tokens=MAX_NEW
    )
    assert raw.headers["x-request-id"] == "trace-42"
    usage = raw.parse().usage
    made = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "not a valid id; <x>"}).headers["x-request-id"]
    assert made != "not a valid id; <x>" and len(made) == 32
    time.sleep(0.2)
    lines = {line["request_id"]: line for line in log_lines(server)}
    line = lines["trace-42"]
    assert line["key_id"] == "key-2" and line["status"] == 200 and line["path"] == "/v1/chat/completions"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert line["seconds"] >= line["ttft_s"] > 0 and line["time"].endswith("+00:00")
    assert lines[made]["path"] == "/health" and lines[made]["key_id"] is None
    assert not any(key in server.log() for key in KEYS)


def open_files(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def slow_connection(server: Server) -> socket.socket:
    """A connection from SLOW_ADDRESS that starts its request headers and goes on sending them a byte at a time."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), source_address=(SLOW_ADDRESS, 0))
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return connection


def test_a_hundred_slow_connections_are_closed_in_time_and_a_normal_client_is_answered(server, images, reference):
    files_before = open_files(server)
    connections = [slow_connection(server) for _ in range(100)]
    started = time.monotonic()
    keep_trickling = threading.Event()

    def trickle() -> None:  # a byte every 0.3 s: each byte would reset a plain idle timer
        while not keep_trickling.wait(0.3):
            for connection in connections:
                with contextlib.suppress(OSError):
                    connection.send(b"X")

    threading.Thread(target=trickle, daemon=True).start()
    replies = []
    normal = threading.Thread(
        target=lambda: replies.append(ask(server, KEYS[0], [user(QUESTION, data_url(images["green"]))]))
    )
    normal.start()  # a normal client, answered meanwhile
    try:
        answers = []
        for connection in connections:
            connection.settimeout(HEADER_TIMEOUT_S + 5)
            received = b""
            with contextlib.suppress(OSError):
                while piece := connection.recv(4096):
                    received += piece
            answers.append(received.split(b"\r\n")[0])
        closed_after = time.monotonic() - started
        normal.join(120)
    finally:
        keep_trickling.set()
        for connection in connections:
            connection.close()
    assert replies[0].choices[0].message.content == reference.answer(
        render_llava15([(QUESTION, 1, None)]), [images["green"]], MAX_NEW
    )
    assert answers.count(b"HTTP/1.1 408 Request Timeout") == PER_CLIENT  # each closed at its header deadline
    assert (
        answers.count(b"HTTP/1.1 503 Service Unavailable") == 100 - PER_CLIENT
    )  # over the per-client cap: refused at once
    assert closed_after < HEADER_TIMEOUT_S + 4
    deadline = time.monotonic() + 5
    while open_files(server) > files_before + 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (
        open_files(server) <= files_before + 10
    )  # the 64 slow sockets are given back (a few fds: the normal client's connection, first-request setup)


def test_a_connection_that_sends_nothing_and_an_idle_kept_alive_one_are_closed(server):
    host, port = server.url.removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    kept = socket.create_connection((host, int(port)))
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    started = time.monotonic()
    for connection in (silent, kept):
        connection.settimeout(10)
        received = b""
        while piece := connection.recv(4096):
            received += piece
        connection.close()
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 3
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1") == 1  # answered, then closed when idle


def test_slow_bodies_hold_only_a_share_and_other_clients_are_answered(server):
    from llava_cli.serve.app import MAX_SLOW_BODIES

    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    ).encode()
    slow = []
    for _ in range(MAX_SLOW_BODIES + 4):
        connection = socket.create_connection((host, int(port)), source_address=(SLOW_ADDRESS, 0))
        connection.sendall(head)
        slow.append(connection)
    try:
        time.sleep(2.5)  # past SLOW_BODY_AFTER_S: the first MAX_SLOW_BODIES hold their places, the rest were refused
        refused = 0
        for connection in slow:
            connection.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                refused += connection.recv(4096).startswith(b"HTTP/1.1 503")
        assert refused == 4
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEYS[0]}"},
            json={"model": server.model, "messages": [user("Hi?")], "max_tokens": 2},
            timeout=60,
        )
        assert reply.status_code == 200
    finally:
        for connection in slow:
            connection.close()


def draining_health(server: Server) -> httpx.Response:
    """/health once the server has taken the SIGTERM (polled: the signal is handled asynchronously)."""
    while (health := httpx.get(f"{server.url}/health")).status_code == 200:
        pass
    return health


def test_sigterm_drains_answers_in_flight_refuses_new_work_and_exits_0(server):
    long_answer = {
        "model": server.model,
        "messages": [user("Tell me a long story.")],
        "max_tokens": 900,
        "stream": True,
    }
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=long_answer, headers=auth, timeout=60
    ) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        server.process.send_signal(signal.SIGTERM)
        health = draining_health(server)
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={**long_answer, "stream": False}, headers=auth)
        rest = [line for line in lines if line]
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert (
        refused.status_code == 503
        and refused.headers["retry-after"].isdigit()
        and refused.json()["error"]["code"] == "server_draining"
    )
    assert rest[-1] == "data: [DONE]"  # the answer in flight ran to its end
    finished = [json.loads(line[len("data: ") :]) for line in rest if line.startswith("data: {")][-1]
    assert finished["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.log() and not list(server.runtime.glob("server-*.json"))
