"""`llava serve`: keep one model loaded and answer the OpenAI chat-completions API over HTTP.

Endpoints: `POST /v1/chat/completions` (plain or `stream: true` server-sent events) and
`GET /v1/models`, served by uvicorn + Starlette. Contract:

- A request's `messages` become a `Conversation` (system/developer, user and assistant messages;
  `image_url` parts as `data:` URLs or paths of files on this machine) answered by
  `Engine.generate`, so a greedy answer is exactly the one `llava ask`/`llava chat` give locally, and
  the engine's prefix cache serves a multi-turn client's growing history without re-running it.
- One engine, one worker thread: requests wait their turn in arrival order and never share the
  cache mid-answer. A client that disconnects, or a server shutting down, stops its answer at the
  next chunk and frees the worker.
- `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`) and `seed` override the
  server's own options for one request; left out, the server's apply (greedy unless `llava serve`
  was given `--temperature`, unlike OpenAI's default of 1).
- `usage` carries `prompt_tokens`, `completion_tokens`, `total_tokens` and
  `prompt_tokens_details.cached_tokens`; a non-standard `llava` object carries the engine's figures
  (`Stats.as_dict`). Streams send it with the chunk holding `finish_reason`, and `usage` as a last
  chunk when `stream_options.include_usage` is true.
- Every refused request gets a 4xx status and an OpenAI-style body
  `{"error": {"message", "type", "param", "code"}}`; the server keeps serving.
- With an API key (`--api-key` or LLAVA_API_KEY) every endpoint needs `Authorization: Bearer KEY`.
- Shutdown: SIGTERM exits 0, SIGINT (Ctrl-C) exits 130; answers in flight are stopped and the
  discovery file (discovery.py) is removed. Nothing is printed but one-line messages on stderr.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import importlib.util
import json
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llava_cli.conversation import Conversation, Turn
from llava_cli.discovery import remove_server_file, write_server_file
from llava_cli.engine import Engine
from llava_cli.errors import EXIT_INTERRUPTED, EXIT_OK, ContextError, InputError, LlavaError, UsageError
from llava_cli.images import ImageRef, image_from_bytes, load_image
from llava_cli.settings import Settings
from llava_cli.streaming import Stats

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

SHUTDOWN_GRACE_S = 3  # answers are stopped at once; this only bounds a client that will not hang up
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# request field -> Settings field
REQUEST_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "seed": "seed",
}
INTEGER_OPTIONS = {"max_new_tokens", "seed"}


def log(message: str) -> None:
    print(f"llava serve: {message}", file=sys.stderr, flush=True)


class ApiError(Exception):
    """A refused request: its HTTP status and the OpenAI-style error it is answered with."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        from starlette.responses import JSONResponse

        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error_from(err: LlavaError) -> ApiError:
    """What the engine refused, as the API reports it."""
    if isinstance(err, ContextError):
        return ApiError(400, str(err), code="context_length_exceeded", param="messages")
    if isinstance(err, (InputError, UsageError)):
        return ApiError(400, str(err), param="messages")
    return ApiError(500, str(err), kind="server_error")


# ---------------------------------------------------------------- request -> Job


@dataclass
class Job:
    """One request, ready for the engine."""

    conversation: Conversation
    settings: Settings
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    cancelled: threading.Event = field(default_factory=threading.Event)


def parse_job(body: Any, served_model: str, base: Settings) -> Job:
    """Validate a chat-completions request; raise `ApiError` naming the first thing wrong with it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required", param="model")
    if model != served_model:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {served_model!r}",
                       code="model_not_found", param="model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stream_options = body.get("stream_options") or {}
    return Job(
        conversation=conversation_from_messages(body.get("messages"), base),
        settings=request_settings(body, base),
        stream=body.get("stream") is True,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
    )


def request_settings(body: dict[str, Any], base: Settings) -> Settings:
    """The server's settings with this request's sampling options applied (validated again)."""
    changes: dict[str, Any] = {}
    for key, name in REQUEST_OPTIONS.items():
        value = body.get(key)
        if value is None:
            continue
        wanted = int if name in INTEGER_OPTIONS else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ApiError(400, f"`{key}` must be {'an integer' if wanted is int else 'a number'}", param=key)
        changes[name] = value if name in INTEGER_OPTIONS else float(value)
    try:
        return dataclasses.replace(base, **changes)
    except UsageError as err:
        raise ApiError(400, f"invalid sampling option: {err}") from None


def conversation_from_messages(messages: Any, base: Settings) -> Conversation:
    """System texts joined; consecutive user messages make one turn; the last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.append(text_only(content, where))
        elif role == "user":
            add_user_message(turns, *message_content(content, where, base.max_image_pixels))
        elif role == "assistant":
            if not turns or turns[-1].answer is not None:
                raise ApiError(400, f"{where}: an assistant message must follow a user message", param=where)
            turns[-1].answer = text_only(content, where).strip()
        else:
            raise ApiError(400, f"{where}: unsupported role {role!r}", param=where)
    if not turns or turns[-1].answer is not None:
        raise ApiError(400, "the last message must be the user's", param="messages")
    return Conversation(system="\n".join(system) if system else base.system, turns=turns)


def add_user_message(turns: list[Turn], text: str, images: list[ImageRef]) -> None:
    if turns and turns[-1].answer is None:
        turns[-1].text = "\n".join(part for part in (turns[-1].text, text) if part)
        turns[-1].images.extend(images)
    else:
        turns.append(Turn(text=text, images=images))


def text_only(content: Any, where: str) -> str:
    text, images = message_content(content, where, max_pixels=1)
    if images:
        raise ApiError(400, f"{where}: only user messages can carry images", param=where)
    return text


def message_content(content: Any, where: str, max_pixels: int) -> tuple[str, list[ImageRef]]:
    """A string, or a list of `text` and `image_url` parts -> (text, images)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param=where)
    texts: list[str] = []
    images: list[ImageRef] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(image_from_url(part.get("image_url"), where, max_pixels))
        else:
            raise ApiError(400, f"{where}: unsupported content part {kind!r}; use text and image_url parts", param=where)
    return "\n".join(texts), images


def image_from_url(spec: Any, where: str, max_pixels: int) -> ImageRef:
    """A `data:` URL, a `file://` URL or a path on this machine -> image; `ApiError` if unusable."""
    url = spec.get("url") if isinstance(spec, dict) else spec
    try:
        if not isinstance(url, str) or not url:
            raise InputError("an image_url part needs a url")
        if url.startswith("data:"):
            return image_from_bytes(decode_data_url(url), "the data: URL", max_pixels)
        if url.startswith(("http://", "https://")):
            raise InputError("images must be data: URLs or file paths on the server's machine, not http(s) URLs")
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
        return load_image(path, max_pixels)
    except InputError as err:
        raise ApiError(400, f"{where}: {err}", code="invalid_image", param=where) from None


def decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InputError("a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise InputError("the data: URL is not valid base64") from None


# ---------------------------------------------------------------- the engine's worker thread


@dataclass
class Finished:
    """The end of a job: the answer's figures, or None when it was stopped before the end."""

    stats: Stats | None


@dataclass
class Failed:
    error: ApiError


Item = str | Finished | Failed  # what a job sends back: text chunks, then Finished or Failed


class Worker:
    """Runs jobs on one thread, one at a time, in the order they were submitted."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-engine")
        self.stopping = threading.Event()  # the server is shutting down: stop every answer

    def submit(self, job: Job) -> asyncio.Queue[Item]:
        """Queue `job`; its chunks, then a `Finished` or `Failed`, arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()

        def emit(item: Item) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        self.executor.submit(self.run, job, emit)
        return queue

    def run(self, job: Job, emit: Callable[[Item], None]) -> None:
        try:
            emit(self.generate(job, emit))
        except LlavaError as err:
            emit(Failed(api_error_from(err)))
        except Exception as err:  # a bug or a broken model: report it, keep serving
            log(f"generation failed: {type(err).__name__}: {err}")
            emit(Failed(ApiError(500, f"generation failed: {type(err).__name__}", kind="server_error")))
        finally:
            # The preprocessed-image memo pays off within one chat, but a server sees endless
            # images: keep it from growing without bound (the KV cache of the chat stays).
            self.engine.vision.clear()

    def generate(self, job: Job, emit: Callable[[Item], None]) -> Finished:
        if self.must_stop(job):  # its client left while it waited
            return Finished(None)
        sent = 0
        with contextlib.closing(self.engine.generate(job.conversation, job.settings)) as chunks:
            for chunk in chunks:
                if self.must_stop(job):
                    reason = "the server is shutting down" if self.stopping.is_set() else "the client disconnected"
                    log(f"stopped an answer after {sent} chunk(s): {reason}")
                    return Finished(None)
                emit(chunk)
                sent += 1
        return Finished(self.engine.last_stats)

    def must_stop(self, job: Job) -> bool:
        return job.cancelled.is_set() or self.stopping.is_set()

    def stop(self) -> None:
        self.stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)


async def job_items(queue: asyncio.Queue[Item], first: Item) -> AsyncIterator[Item]:
    """`first`, then the job's items up to and including its `Finished` or `Failed`."""
    item = first
    while True:
        yield item
        if not isinstance(item, str):
            return
        item = await queue.get()


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to hang up, then stop its job (after the body, receive() only ends so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


# ---------------------------------------------------------------- responses


def usage(stats: Stats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


SHUTTING_DOWN = ApiError(503, "the server is shutting down", kind="server_error")


# ---------------------------------------------------------------- the service


class Service:
    """The HTTP endpoints around one loaded model."""

    def __init__(self, engine: Engine, settings: Settings, api_key: str | None, max_request_bytes: int) -> None:
        self.worker = Worker(engine)
        self.settings = settings
        self.model = settings.model
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.started = int(time.time())

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [
            Route("/v1/chat/completions", self.guarded(self.chat_completions), methods=["POST"]),
            Route("/v1/models", self.guarded(self.models), methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: self.http_error})

    async def http_error(self, request: Request, err: Exception) -> Response:
        """Unknown paths and methods, in the API's error shape."""
        status = getattr(err, "status_code", 404)
        return ApiError(status, f"{request.method} {request.url.path}: {getattr(err, 'detail', 'not found')}").response()

    def guarded(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """Check the API key, and turn every `ApiError` (and any bug) into its response."""

        async def endpoint(request: Request) -> Response:
            try:
                self.check_key(request)
                return await handler(request)
            except ApiError as err:
                return err.response()
            except Exception as err:  # a bug: one line in the log, a 500 for the client, keep serving
                log(f"{request.method} {request.url.path} failed: {type(err).__name__}: {err}")
                return ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").response()

        return endpoint

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send Authorization: Bearer KEY", code="invalid_api_key")

    async def models(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        entry = {"id": self.model, "object": "model", "created": self.started, "owned_by": "llava-cli"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = parse_json(await read_body(request, self.max_request_bytes))
        job = await run_in_threadpool(parse_job, body, self.model, self.settings)  # images decode off the loop
        queue = self.worker.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        streaming = False
        try:
            first = await queue.get()
            if isinstance(first, Failed):
                raise first.error
            if job.stream:
                streaming = True  # from here on, the end of the stream stops the job and the watcher
                return self.streamed(job, queue, first, watcher)
            return await self.completed(job, queue, first)
        finally:
            if not streaming:
                job.cancelled.set()  # a no-op once the job has finished
                watcher.cancel()

    async def completed(self, job: Job, queue: asyncio.Queue[Item], first: Item) -> Response:
        from starlette.responses import JSONResponse

        pieces: list[str] = []
        finished = Finished(None)
        async for item in job_items(queue, first):
            if isinstance(item, str):
                pieces.append(item)
            elif isinstance(item, Failed):
                raise item.error
            else:
                finished = item
        if finished.stats is None:
            raise SHUTTING_DOWN
        stats = finished.stats
        message = {"role": "assistant", "content": "".join(pieces)}
        choice = {"index": 0, "message": message, "finish_reason": stats.finish_reason}
        return JSONResponse({**self.envelope(job, "chat.completion"), "choices": [choice], "usage": usage(stats), "llava": stats.as_dict()})

    def streamed(self, job: Job, queue: asyncio.Queue[Item], first: Item, watcher: asyncio.Task) -> Response:
        from starlette.responses import StreamingResponse

        return StreamingResponse(self.events(job, queue, first, watcher), media_type="text/event-stream", headers=SSE_HEADERS)

    async def events(self, job: Job, queue: asyncio.Queue[Item], first: Item, watcher: asyncio.Task) -> AsyncIterator[str]:
        try:
            yield sse(self.chunk(job, {"role": "assistant", "content": ""}))
            async for item in job_items(queue, first):
                if isinstance(item, str):
                    yield sse(self.chunk(job, {"content": item}))
                elif isinstance(item, Failed) or item.stats is None:
                    yield sse((item.error if isinstance(item, Failed) else SHUTTING_DOWN).body())
                    return
                else:
                    yield sse({**self.chunk(job, {}, item.stats.finish_reason), "llava": item.stats.as_dict()})
                    if job.include_usage:
                        yield sse({**self.envelope(job, "chat.completion.chunk"), "choices": [], "usage": usage(item.stats)})
            yield sse("[DONE]")
        finally:
            job.cancelled.set()  # the client went away mid-stream: free the engine
            watcher.cancel()

    def envelope(self, job: Job, kind: str) -> dict[str, Any]:
        return {"id": job.id, "object": kind, "created": job.created, "model": self.model}

    def chunk(self, job: Job, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {**self.envelope(job, "chat.completion.chunk"), "choices": [choice]}


async def read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"the request body is over {limit:,} bytes (llava serve --max-request-mb raises the limit)",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


# ---------------------------------------------------------------- process


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


def run_serve(settings: Settings, host: str, port: int, api_key: str | None, max_request_mb: int) -> int:
    """Load the model, serve until SIGINT (exit 130) or SIGTERM (exit 0)."""
    from llava_cli.session import load_engine

    require_server_libraries()
    if max_request_mb < 1:
        raise UsageError(f"--max-request-mb must be at least 1 (got {max_request_mb})")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the option (and LLAVA_API_KEY) out")
    sock = bind(host, port)
    service = Service(load_engine(settings), settings, api_key, max_request_mb * 2**20)
    url = local_url(sock)
    announced = write_server_file(url, settings.model)
    try:
        log(f"serving {settings.model} at {url}/v1{' (API key required)' if api_key else ''}; Ctrl-C stops")
        return serve_until_signal(service, sock, settings.verbose)
    finally:
        remove_server_file(announced)
        service.worker.stop()


def serve_until_signal(service: Service, sock: socket.socket, verbose: bool) -> int:
    import uvicorn

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

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.signals.append(sig)
            service.worker.stopping.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        service.app(),
        log_level="info" if verbose else "warning",
        access_log=verbose,
        lifespan="off",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = Server(config)
    asyncio.run(server.serve(sockets=[sock]))
    return EXIT_INTERRUPTED if signal.SIGINT in server.signals else EXIT_OK
