"""Image URLs (and other peers) that drip their bytes: a time limit holds for the whole exchange (issue 28 item 6).

A raw socket server sends its answer one byte at a time, far slower than any chunk fills but fast
enough that no single read waits long: before the fix each read reset the socket timeout and the
limit was checked only between 64 KB chunks, so a URL sending a byte every 2 s ran past 120 s.
Each case must end with the time-limit error shortly after the limit.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import slow_fixture

from llava_cli.base.errors import InputError
from llava_cli.media.urls import fetch_image_url

LIMIT_S = 1.0
DRIP_S = 0.1  # one byte every 0.1 s: each read sees data long before a 1 s socket timeout
DRIP_FOR_S = 6.0  # then hang up, so that even the old code ends (with another error, too late)
SLOW_HEADERS = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
SLOW_BODY = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"


def drip(connection: socket.socket, head: bytes, dripped: bytes) -> None:
    """Send `head` at once, then `dripped` a byte at a time, then hang up."""
    ends = time.monotonic() + DRIP_FOR_S
    try:
        connection.recv(65536)  # the request
        connection.sendall(head)
        for byte in dripped:
            if time.monotonic() > ends:
                break
            connection.sendall(bytes([byte]))
            time.sleep(DRIP_S)
    except OSError:  # the client hung up: what the fix does
        pass
    finally:
        connection.close()


@slow_fixture  # an HTTP server
def dripping_server() -> Iterator[callable]:
    """A server whose every connection gets `drip(head, dripped)`; yields a function (head, dripped) -> url."""
    listener = socket.create_server(("127.0.0.1", 0))
    answer: dict[str, bytes] = {}

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(connection, answer["head"], answer["dripped"]), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()

    def url(head: bytes, dripped: bytes) -> str:
        answer.update(head=head, dripped=dripped)
        return f"http://127.0.0.1:{listener.getsockname()[1]}/picture.png"

    yield url
    listener.close()


def fetch_within_limit(url: str) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(InputError) as refused:
        fetch_image_url(url, timeout=LIMIT_S)
    return str(refused.value), time.monotonic() - started


@pytest.mark.parametrize(
    "head, dripped",
    [(b"", SLOW_HEADERS), (SLOW_BODY, b"\x89PNG" + b"\0" * 1000)],
    ids=["slow headers", "slow body"],
)
def test_a_url_that_drips_its_answer_fails_at_the_time_limit(dripping_server, head, dripped):
    message, elapsed = fetch_within_limit(dripping_server(head, dripped))
    assert message == f"cannot fetch {dripping_server(head, dripped)}: no complete answer within {LIMIT_S:g} s"
    assert elapsed < LIMIT_S + 1.5


def test_a_url_that_answers_in_time_is_fetched(dripping_server):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (0, 200, 0)).save(buffer, "PNG")
    body = buffer.getvalue()
    head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    image = fetch_image_url(dripping_server(head + body[:-3], body[-3:]), timeout=LIMIT_S + 1)
    assert image.image.getpixel((1, 1)) == (0, 200, 0)


# ---------------------------------------------------------------- siblings: the probe of a discovered server


def test_the_probe_of_a_discovered_server_that_drips_its_answer_gives_up_at_its_limit(dripping_server):
    """`ask` probes a server found by discovery before using it; a port taken over by a process
    that drips bytes must not hold `ask` (before: each header byte reset the 2 s read timeout)."""
    from llava_cli.client.remote import PROBE_TIMEOUT_S, RemoteEngine

    url = dripping_server(b"", SLOW_HEADERS).removesuffix("/picture.png")
    started = time.monotonic()
    assert RemoteEngine(url, "m").reachable() is False
    assert time.monotonic() - started < PROBE_TIMEOUT_S + 1.5
