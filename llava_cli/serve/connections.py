"""`llava serve`'s connection guard: slow headers, and how many connections one client may hold.

uvicorn bounds neither: a new connection that sends nothing, or sends its request headers a byte at
a time, is kept open for ever (its keep-alive timer only runs between requests, and any byte
cancels it), so a few hundred such connections use up the file descriptors before the API key is
ever looked at. hypercorn and granian are whole other servers to trust and ship; the guard is a
thin wrapper around uvicorn's own HTTP protocol instead, at the socket, where these limits belong.

Contract: `guarded(protocol_class, limits)` returns a protocol class for `uvicorn.Config(http=...)`
that passes everything through to uvicorn's and adds:

- a header deadline: each request's headers must be complete within `limits.header_timeout_s`
  from the connection's start (first request) or the request's first byte (later requests on a
  kept-alive connection); else the connection is closed (408 first when nothing else was sent on it);
- caps on open connections: `max_connections` in all and `max_per_client` from one address; a
  connection over either gets a 503 with `Retry-After` and is closed at once, so file descriptors
  stay bounded whatever arrives;
- `Transfer-Encoding` request bodies are refused (411): the guard must see where each body ends to
  find the next request's headers, and clients send JSON with a Content-Length.

Idle kept-alive connections are closed by uvicorn's `timeout_keep_alive` (`--timeout-keep-alive`);
bodies that trickle in by the server's body deadline and slow-body share (serve/app.py).
"""

from __future__ import annotations

import asyncio
import collections
import resource
from dataclasses import dataclass, field
from typing import Any

from llava_cli.base.settings import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
)

RESERVED_FILE_DESCRIPTORS = 64  # the model's files, logs, the listening socket: never taken by clients
MAX_HEAD_BYTES = 64 * 1024  # past this, uvicorn refuses the request anyway (h11's limit is 16 KiB)

BUSY = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
TOO_SLOW = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
NO_LENGTH = b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass
class ConnectionLimits:
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    open: int = 0
    by_client: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.max_connections = min(self.max_connections, descriptors_for_clients())

    def admit(self, client: str) -> bool:
        if self.open >= self.max_connections or self.by_client[client] >= self.max_per_client:
            return False
        self.open += 1
        self.by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]


def descriptors_for_clients() -> int:
    """How many connections the process's open-file limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - RESERVED_FILE_DESCRIPTORS) if soft != resource.RLIM_INFINITY else DEFAULT_MAX_CONNECTIONS


class RequestFraming:
    """Just enough HTTP/1.1 parsing to know, for a stream of requests, whether headers are being awaited."""

    def __init__(self) -> None:
        self.head = bytearray()  # the current request's head so far
        self.body_left = 0  # bytes of the current body still to come
        self.requests = 0  # heads completed

    @property
    def in_head(self) -> bool:
        return self.body_left == 0

    def feed(self, data: bytes) -> str | None:
        """Account for `data`; "chunked" if a request uses Transfer-Encoding, else None."""
        view = memoryview(data)
        while view:
            if self.body_left:
                taken = min(self.body_left, len(view))
                self.body_left -= taken
                view = view[taken:]
                continue
            scanned = max(0, len(self.head) - 3)
            self.head += view
            end = self.head.find(b"\r\n\r\n", scanned)
            if end < 0:
                del self.head[:-MAX_HEAD_BYTES]  # uvicorn will refuse an oversized head; keep memory bounded
                return None
            rest = bytes(self.head[end + 4 :])
            length, chunked = body_framing(bytes(self.head[:end]))
            if chunked:
                return "chunked"
            self.head.clear()
            self.requests += 1
            self.body_left = length
            view = memoryview(rest)
        return None

    @property
    def head_started(self) -> bool:
        return bool(self.head.strip(b"\r\n"))


def body_framing(head: bytes) -> tuple[int, bool]:
    """A request head's body length (0 when absent or unreadable: uvicorn refuses those) and whether it is chunked."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    return length, chunked


def guarded(protocol_class: type, limits: ConnectionLimits) -> type:
    """`protocol_class` (uvicorn's HTTP protocol) with the module docstring's limits."""

    class Guarded(asyncio.Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = protocol_class(*args, **kwargs)
            self.framing = RequestFraming()
            self.transport: Any = None
            self.client = ""
            self.admitted = False
            self.deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            peer = transport.get_extra_info("peername")
            self.client = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
            if not limits.admit(self.client):
                transport.write(BUSY)
                transport.close()
                return
            self.admitted = True
            self.inner.connection_made(transport)
            self.start_deadline()

        def data_received(self, data: bytes) -> None:
            if not self.admitted:
                return
            heads = self.framing.requests
            if self.framing.feed(data) == "chunked":
                self.refuse(NO_LENGTH)
                return
            if self.framing.requests > heads or not self.framing.in_head:  # a head is complete: its deadline is met
                self.stop_deadline()
            if self.framing.in_head and self.framing.head_started and self.deadline is None:  # the next request began
                self.start_deadline()
            self.inner.data_received(data)

        def eof_received(self) -> bool | None:
            return self.inner.eof_received() if self.admitted else None

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.admitted:
                return
            self.admitted = False
            self.stop_deadline()
            limits.release(self.client)
            self.inner.connection_lost(exc)

        def pause_writing(self) -> None:
            if self.admitted:
                self.inner.pause_writing()

        def resume_writing(self) -> None:
            if self.admitted:
                self.inner.resume_writing()

        def start_deadline(self) -> None:
            self.deadline = asyncio.get_running_loop().call_later(limits.header_timeout_s, self.too_slow)

        def stop_deadline(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def too_slow(self) -> None:
            self.deadline = None
            self.refuse(TOO_SLOW if self.framing.requests == 0 else b"")

        def refuse(self, response: bytes) -> None:
            if response:
                self.transport.write(response)
            self.transport.close()

    return Guarded
