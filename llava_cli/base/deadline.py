"""A time limit for a whole network exchange, not just for each read of it.

Contract: `with Deadline(seconds) as deadline:` starts a timer; the sockets handed to
`deadline.watch(sock)`, those of an `http.client` connection passed to `deadline.clock` before it
connects, and those of connections made through `deadline.handler(HTTPHandler)` (or
HTTPSHandler) in a urllib opener, are shut down when the time is up, so a read blocked on them
returns at once whatever the peer does. The caller then sees an error or a short read and asks
`deadline.passed()` to say why. Leaving the block cancels the timer. Stdlib only: a leaf.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.request
from typing import Any


class Deadline:
    """One exchange's clock: every socket it watches is shut when the time is up, whatever read it is in.

    A socket timeout alone bounds each read, not the exchange: a server that sends a byte every
    few seconds (in its headers, its TLS handshake or its body) never lets one expire. So the
    sockets it watches (`watch`, or every connection made through a urllib `handler`) are shut by a
    timer at the deadline: a read blocked on one returns at once (an error or an early end), and the
    caller, seeing `passed()`, reports the time limit. Each connect waits at most the time left."""

    def __init__(self, seconds: float) -> None:
        self.ends = time.monotonic() + seconds
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self.shut)
        self.timer.daemon = True

    def __enter__(self) -> Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()

    def passed(self) -> bool:
        return time.monotonic() >= self.ends

    def left(self) -> float:
        return max(self.ends - time.monotonic(), 0.001)

    def shut(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` at the deadline (at once if it has passed)."""
        with self.lock:
            self.sockets.append(sock)
        if self.passed():  # connected just as the timer fired
            self.shut()

    def connect(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        """`socket.create_connection` within the time left, the socket watched."""
        sock = socket.create_connection(address, self.left(), source_address)
        self.watch(sock)
        return sock

    def clock(self, connection: http.client.HTTPConnection) -> http.client.HTTPConnection:
        """`connection`, not connected yet, made to connect through `self.connect` (HTTPS wraps that socket in TLS after)."""
        connection._create_connection = self.connect  # type: ignore[attr-defined]  # http.client's hook for its socket
        return connection

    def handler(self, base: type[urllib.request.AbstractHTTPHandler]) -> urllib.request.BaseHandler:
        """An instance of urllib's `base` handler whose connections connect through `self.connect`."""
        deadline = self

        class OnTheClock(base):  # type: ignore[misc, valid-type]
            def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
                def connection(*args: Any, **options: Any) -> http.client.HTTPConnection:
                    return deadline.clock(http_class(*args, **options))

                return super().do_open(connection, req, **kwargs)

        return OnTheClock()
