"""`llava serve`: keep one model loaded and answer the OpenAI chat-completions API over HTTP.

Endpoints: `POST /v1/chat/completions` (plain or `stream: true` server-sent events) and
`GET /v1/models`, served by uvicorn + Starlette. Contract:

- Before anything else, serve/guard.py's `Guard` checks Host, Origin and Content-Type (403, 415),
  then the API key (401); the body must arrive within `--request-timeout` (408) and under
  `--max-request-mb` (413).
- A request's `messages` (at most MAX_MESSAGES, every field's type checked: `true` is not 1)
  become a `Conversation` (system/developer, user and assistant messages; `image_url` parts as
  `data:` URLs, or paths the Guard allows), so a greedy answer is exactly the one
  `llava ask`/`llava chat` give locally.
- At most MAX_OPEN_REQUESTS are open at once (503 beyond). One engine, one daemon worker thread
  that batches: requests are admitted in arrival order, prefilled alone and decoded together, up
  to `--max-batch` at once (continuous batching, serve/worker.py and engine/scheduler.py); the
  `--cache-mb` pool of recent answers' caches serves a multi-turn client's growing history
  without re-running it. A request's images (at most MAX_IMAGES_PER_REQUEST, MAX_REQUEST_PIXELS in
  all) are decoded only when it is admitted, and dropped once it is prefilled (glibc's heap
  trimmed), so memory holds one request's images at a time. A client that disconnects, or a
  server shutting down, stops its request wherever it is (queued, decoding, trimming, answering).
- `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`) and `seed` override the
  server's own options for one request; left out, the server's apply (greedy unless `llava serve`
  was given `--temperature`, unlike OpenAI's default of 1).
- `usage` carries `prompt_tokens`, `completion_tokens`, `total_tokens` and
  `prompt_tokens_details.cached_tokens`; a non-standard `llava` object carries the engine's figures
  (`Stats.as_dict`). Streams send it with the chunk holding `finish_reason`, and `usage` as a last
  chunk when `stream_options.include_usage` is true.
- Every refused request gets a 4xx status and an OpenAI-style body
  `{"error": {"message", "type", "param", "code"}}`; the server keeps serving.
- With an API key (`--api-key-file`, LLAVA_API_KEY or `--api-key`) every endpoint needs
  `Authorization: Bearer KEY`.
- Shutdown: SIGTERM drains: `/health` turns 503 at once, new requests get 503 with `Retry-After`,
  answers in flight finish for up to `--drain-timeout` seconds, then the server exits 0 (a second
  SIGTERM, or `--drain-timeout 0`, skips the wait). SIGINT (Ctrl-C) exits 130 within a few seconds
  whatever the worker is doing. Answers still in flight are stopped and the discovery file
  (client/discovery.py) is removed. Nothing is printed but one-line messages on stderr (uvicorn's
  tracebacks are folded into one line).
- Connections go through serve/connections.py's guard (header deadline, connection caps); idle kept-alive
  ones close after `--timeout-keep-alive`. `--keep-alive` unloads an idle model (serve/keepalive.py).

Where each part lives: serve/guard.py (who may ask), serve/request.py (a request body -> `Job`),
serve/worker.py (the engine's thread, scheduling the batch), serve/app.py (the HTTP endpoints and responses),
serve/log.py (one-line logging), serve/access.py (access log, request ids), serve/metrics.py (/metrics),
serve/connections.py (slow and too many connections); this module binds the socket, runs uvicorn and shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_cli.base.errors import EXIT_INTERRUPTED, EXIT_OK, LlavaError, UsageError
from llava_cli.base.settings import Settings
from llava_cli.client.discovery import remove_server_file, write_server_file
from llava_cli.serve.app import Service
from llava_cli.serve.guard import ServeOptions
from llava_cli.serve.log import log, one_line_records, set_verbose
from llava_cli.serve.worker import SHUTDOWN_GRACE_S

DRAIN_POLL_S = 0.05


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen before the slow model load: a busy port fails at once, early clients wait."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def local_url(sock: socket.socket) -> str:
    """The url a client on this machine uses (a wildcard address is reached through loopback)."""
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        return f"http://[{'::1' if host == '::' else host}]:{port}"
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def require_server_libraries() -> None:
    if any(importlib.util.find_spec(name) is None for name in ("starlette", "uvicorn")):
        raise LlavaError("llava serve needs starlette and uvicorn: pip install 'llava-cli[serve]'")


def run_serve(settings: Settings, options: ServeOptions) -> int:
    """Load the model, serve until SIGINT (exit code 130) or SIGTERM (0). The caller should leave at
    once (`cli.exit_now`): a forward may still be running, and torch's teardown takes seconds."""
    from llava_cli.frontend.startup import load_engine

    require_server_libraries()
    set_verbose(settings.verbose)
    sock = bind(options.host, options.port)
    service = Service(load_engine(settings), settings, options, load=functools.partial(load_engine, settings))
    url = local_url(sock)
    announced = announce(url, settings.model, service.model)
    try:
        log(
            f"serving {settings.model} as {service.model!r} at {url}/v1{' (API key required)' if options.api_keys else ''}, "
            f"up to {service.worker.max_batch} answers at once; Ctrl-C stops"
        )
        code = serve_until_signal(service, sock, settings.verbose, options)
    finally:
        if announced is not None:
            remove_server_file(announced)
        finished = service.worker.stop()
    if not finished:  # the engine is inside one long forward, and checks for the stop only between steps
        log("the answer in progress did not stop in time; exiting without it")
    return code


def announce(url: str, model: str, served_as: str) -> Path | None:
    """Write the discovery file for `ask` and `chat`; when its folder is not ours, serve unannounced, saying why."""
    try:
        return write_server_file(url, model, served_as)
    except OSError as err:
        log(
            f"not announced to llava ask/chat on this machine: cannot write in {err.filename or 'the runtime folder'}: {err.strerror or err}"
        )
        return None


def serve_until_signal(service: Service, sock: socket.socket, verbose: bool, options: ServeOptions) -> int:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from llava_cli.serve.connections import ConnectionLimits, guarded

    class Server(uvicorn.Server):
        """uvicorn that stops answers in flight on a signal and returns instead of re-raising it."""

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.signals: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets=sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.signals.append(sig)
            if sig == signal.SIGTERM and not service.draining and options.drain_timeout_s > 0:
                service.draining = True  # /health says so at once; new requests get 503
                self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))
                return
            service.worker.abandon()
            super().handle_exit(sig, frame)

        async def drain(self) -> None:
            """Let the answers in flight finish, for --drain-timeout at most, then stop."""
            log(
                f"SIGTERM: finishing the answers in flight (up to {options.drain_timeout_s:g} s), refusing new requests"
            )
            deadline = time.monotonic() + options.drain_timeout_s
            while (
                (service.worker.waiting or service.open_requests)
                and time.monotonic() < deadline
                and not self.should_exit
            ):
                await asyncio.sleep(DRAIN_POLL_S)
            service.worker.abandon()
            self.should_exit = True

    limits = ConnectionLimits(options.header_timeout_s, options.max_connections, options.max_connections_per_client)
    config = uvicorn.Config(
        service.app(),
        http=guarded(H11Protocol, limits),
        log_level="info" if verbose else "warning",
        access_log=False,  # serve/access.py writes it
        lifespan="off",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        timeout_keep_alive=options.timeout_keep_alive_s,
    )
    server = Server(config)
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(one_line_records)
    asyncio.run(server.serve(sockets=[sock]))
    return EXIT_INTERRUPTED if signal.SIGINT in server.signals else EXIT_OK
