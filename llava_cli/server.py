"""`llava serve`: keep one model loaded and answer the OpenAI chat-completions API over HTTP.

Endpoints: `POST /v1/chat/completions` (plain or `stream: true` server-sent events) and
`GET /v1/models`, served by uvicorn + Starlette. Contract:

- Before anything else, serveguard.py's `Guard` checks Host, Origin and Content-Type (403, 415),
  then the API key (401); the body must arrive within `--request-timeout` (408) and under
  `--max-request-mb` (413).
- A request's `messages` (at most MAX_MESSAGES, every field's type checked: `true` is not 1)
  become a `Conversation` (system/developer, user and assistant messages; `image_url` parts as
  `data:` URLs, or paths the Guard allows) answered by `Engine.generate`, so a greedy answer is
  exactly the one `llava ask`/`llava chat` give locally, and the engine's prefix cache serves a
  multi-turn client's growing history without re-running it.
- At most MAX_OPEN_REQUESTS are open at once (503 beyond). One engine, one daemon worker thread:
  requests wait their turn in arrival order and never share
  the cache mid-answer. A request's images (at most MAX_IMAGES_PER_REQUEST, MAX_REQUEST_PIXELS in
  all) are decoded only when its turn comes, and dropped afterwards (glibc's heap trimmed), so
  memory holds one request's images at a time. A client that disconnects, or a server shutting
  down, stops its request wherever it is (queued, decoding, trimming, answering) and frees the worker.
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
- Shutdown: SIGTERM exits 0, SIGINT (Ctrl-C) exits 130, within a few seconds whatever the worker is
  doing; answers in flight are stopped and the discovery file (discovery.py) is removed. Nothing is
  printed but one-line messages on stderr (uvicorn's tracebacks are folded into one line).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import dataclasses
import functools
import hmac
import importlib.util
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llava_cli.conversation import Conversation, Turn
from llava_cli.discovery import remove_server_file, write_server_file
from llava_cli.engine import Engine
from llava_cli.errors import EXIT_INTERRUPTED, EXIT_OK, ContextError, InputError, LlavaError, UsageError, one_line
from llava_cli.images import MAX_IMAGE_SIDE, ImageRef, image_from_bytes, load_image
from llava_cli.options import REQUEST_FIELDS
from llava_cli.serveguard import Guard, MediaRefused, ServeOptions
from llava_cli.settings import Settings
from llava_cli.streaming import Stats

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

SHUTDOWN_GRACE_S = 3  # answers are stopped at once; this only bounds a client that will not hang up
MAX_MESSAGES = 4096  # per request: a 2,000-turn chat; trimming to the window costs a few encodes whatever the count
MAX_IMAGES_PER_REQUEST = 16
MAX_OPEN_REQUESTS = 32  # being read, queued or answered (until a stream starts): with --max-request-mb, bounds what bodies hold
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_SIDE**2  # decoded pixels of one request's images together (after shrinking)
LOCAL_IMAGE_REFUSED = (
    "the image cannot be used: send it as a data: URL (a path is read only when it lies under the "
    "server's --allowed-local-media-path and is an image)"
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


VERBOSE = False  # --verbose: also log why requests were refused (details a client is not told)


def log(message: str) -> None:
    print(f"llava serve: {message}", file=sys.stderr, flush=True)


def log_detail(message: str) -> None:
    if VERBOSE:
        log(message)


def one_line_records(record: logging.LogRecord) -> bool:
    """A logging filter: a record with a traceback (uvicorn cancelling a request at shutdown) becomes one line."""
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        if isinstance(error, asyncio.CancelledError):
            record.msg = "a request still open at shutdown was cancelled"
        else:
            record.msg = f"{record.getMessage().strip()}: {type(error).__name__}: {one_line(error)}"
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
    return True


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
    """One request, ready for the engine once `load_images` has decoded its images into their turns."""

    conversation: Conversation
    settings: Settings
    images: list[PendingImage] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    cancelled: threading.Event = field(default_factory=threading.Event)

    def load_images(self, guard: Guard, max_pixels: int, stop: Callable[[], bool]) -> bool:
        """Decode the images in order, within MAX_REQUEST_PIXELS; False if told to stop meanwhile."""
        pixels = 0
        for pending in self.images:
            if stop():
                return False
            width, height = pending.load(guard, max_pixels).image.size
            pixels += width * height
            if pixels > MAX_REQUEST_PIXELS:
                raise ApiError(400, f"the request's images hold more than {MAX_REQUEST_PIXELS:,} pixels in all; send fewer or smaller ones",
                               code="invalid_image", param=pending.where)
        return True

    def release(self) -> None:
        """Drop the decoded images (the handler keeps the job until its response is sent)."""
        self.images.clear()
        for turn in self.conversation.turns:
            turn.images = []


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
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # bool is an int to Python, not to the API
        raise ApiError(400, "only n=1 is supported", param="n")
    stream_options = optional(body, "stream_options", dict, "an object") or {}
    conversation, images = conversation_from_messages(body.get("messages"), base)
    return Job(
        conversation=conversation,
        images=images,
        settings=request_settings(body, base),
        stream=optional(body, "stream", bool, "true or false") is True,
        include_usage=optional(stream_options, "include_usage", bool, "true or false", "stream_options.") is True,
    )


def optional(body: dict[str, Any], key: str, kind: type, described: str, prefix: str = "") -> Any:
    """`body[key]` when it is absent, null or of type `kind`; else a 400 naming the field."""
    value = body.get(key)
    if value is not None and type(value) is not kind:
        raise ApiError(400, f"`{prefix}{key}` must be {described}", param=prefix + key)
    return value


def request_settings(body: dict[str, Any], base: Settings) -> Settings:
    """The server's settings with this request's sampling options applied (validated again)."""
    changes: dict[str, Any] = {}
    for key, option in REQUEST_FIELDS.items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, option.json_kinds):
            raise ApiError(400, f"`{key}` must be {option.json_described}", param=key)
        changes[option.name] = option.kind(value)
    try:
        return dataclasses.replace(base, **changes)
    except UsageError as err:
        raise ApiError(400, f"invalid sampling option: {err}") from None


def conversation_from_messages(messages: Any, base: Settings) -> tuple[Conversation, list[PendingImage]]:
    """System texts joined; consecutive user messages make one turn; the last message must be the user's.

    The images are checked for form here but decoded later, by the worker (`Job.load_images`)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"a request may hold at most {MAX_MESSAGES:,} messages (this one has {len(messages):,})",
                       code="too_many_messages", param="messages")
    system: list[str] = []
    turns: list[Turn] = []
    images: list[PendingImage] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.append(text_only(content, where))
        elif role == "user":
            text, sources = message_content(content, where)
            turn = add_user_message(turns, text)
            images += [PendingImage(turn, source, where) for source in sources]
            if len(images) > MAX_IMAGES_PER_REQUEST:
                raise ApiError(400, f"a request may hold at most {MAX_IMAGES_PER_REQUEST} images", code="too_many_images", param=where)
        elif role == "assistant":
            if not turns or turns[-1].answer is not None:
                raise ApiError(400, f"{where}: an assistant message must follow a user message", param=where)
            turns[-1].answer = text_only(content, where).strip()
        else:
            raise ApiError(400, f"{where}: unsupported role {role!r}", param=where)
    if not turns or turns[-1].answer is not None:
        raise ApiError(400, "the last message must be the user's", param="messages")
    return Conversation(system="\n".join(system) if system else base.system, turns=turns), images


def add_user_message(turns: list[Turn], text: str) -> Turn:
    """The turn this user message belongs to (consecutive user messages make one)."""
    if turns and turns[-1].answer is None:
        turns[-1].text = "\n".join(part for part in (turns[-1].text, text) if part)
    else:
        turns.append(Turn(text=text))
    return turns[-1]


def text_only(content: Any, where: str) -> str:
    text, images = message_content(content, where)
    if images:
        raise ApiError(400, f"{where}: only user messages can carry images; put the image in a user message", param=where)
    return text


def message_content(content: Any, where: str) -> tuple[str, list[str]]:
    """A string, or a list of `text` and `image_url` parts -> (text, the images' urls)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param=where)
    texts: list[str] = []
    urls: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            urls.append(image_url(part.get("image_url"), where))
        else:
            raise ApiError(400, f"{where}: unsupported content part {kind!r}; use text and image_url parts", param=where)
    return "\n".join(texts), urls


def image_url(spec: Any, where: str) -> str:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: an image_url part needs a url", code="invalid_image", param=where)
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: images must be data: URLs (or files the server allows), not http(s) URLs",
                       code="invalid_image", param=where)
    return url


@dataclass
class PendingImage:
    """An image of a request, not decoded until the worker reaches the request."""

    turn: Turn
    url: str
    where: str

    def load(self, guard: Guard, max_pixels: int) -> ImageRef:
        """Decode into its turn; `ApiError` if unusable (one message for any local-file problem)."""
        try:
            if self.url.startswith("data:"):
                image = image_from_bytes(decode_data_url(self.url), "the data: URL", max_pixels)
            else:
                image = self.local_file(guard, max_pixels)
        except InputError as err:
            raise ApiError(400, f"{self.where}: {err}", code="invalid_image", param=self.where) from None
        self.turn.images.append(image)
        return image

    def local_file(self, guard: Guard, max_pixels: int) -> ImageRef:
        url = self.url
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
        try:
            return load_image(guard.local_media(path), max_pixels)
        except (MediaRefused, InputError) as err:
            log_detail(f"{self.where}: refused the local image {path!r}: {err}")
            raise InputError(LOCAL_IMAGE_REFUSED) from None


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
    """Runs jobs on one daemon thread, one at a time, in the order they were submitted.

    A daemon thread, so that a job deep in a forward never keeps a stopping server alive."""

    def __init__(self, engine: Engine, guard: Guard) -> None:
        self.engine = engine
        self.guard = guard
        self.jobs: queue.SimpleQueue[tuple[Job, Callable[[Item], None]] | None] = queue.SimpleQueue()
        self.waiting: dict[str, Callable[[Item], None]] = {}  # job id -> emit, for jobs not finished yet
        self.stopping = threading.Event()  # the server is shutting down: stop every answer
        self.thread = threading.Thread(target=self.loop, name="llava-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> asyncio.Queue[Item]:
        """Queue `job`; its chunks, then a `Finished` or `Failed`, arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Item] = asyncio.Queue()

        def emit(item: Item) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is listening
                loop.call_soon_threadsafe(items.put_nowait, item)

        self.waiting[job.id] = emit
        self.jobs.put((job, emit))
        return items

    def loop(self) -> None:
        while (entry := self.jobs.get()) is not None:
            self.run(*entry)

    def run(self, job: Job, emit: Callable[[Item], None]) -> None:
        try:
            emit(self.generate(job, emit))
        except ApiError as err:
            emit(Failed(err))
        except LlavaError as err:
            emit(Failed(api_error_from(err)))
        except Exception as err:  # a bug or a broken model: report it, keep serving
            log(f"generation failed: {type(err).__name__}: {err}")
            emit(Failed(ApiError(500, f"generation failed: {type(err).__name__}", kind="server_error")))
        finally:
            self.waiting.pop(job.id, None)
            # The preprocessed-image memo pays off within one chat, but a server sees endless
            # images: keep it from growing without bound (the KV cache of the chat stays).
            self.engine.vision.clear()
            if job.images:
                job.release()
                give_memory_back()

    def generate(self, job: Job, emit: Callable[[Item], None]) -> Finished:
        stop = functools.partial(self.must_stop, job)
        if not job.load_images(self.guard, job.settings.max_image_pixels, stop):
            return self.stopped(0, job)
        sent = 0
        with contextlib.closing(self.engine.generate(job.conversation, job.settings, stop)) as chunks:
            for chunk in chunks:
                if stop():
                    break
                emit(chunk)
                sent += 1
        if stop():
            return self.stopped(sent, job)
        return Finished(self.engine.last_stats)

    def stopped(self, sent: int, job: Job) -> Finished:
        reason = "the server is shutting down" if self.stopping.is_set() else "the client disconnected"
        log(f"stopped an answer after {sent} chunk(s): {reason}")
        return Finished(None)

    def must_stop(self, job: Job) -> bool:
        return job.cancelled.is_set() or self.stopping.is_set()

    def abandon(self) -> None:
        """On a signal: stop every answer and tell every waiting request at once (not when the engine gets to it)."""
        self.stopping.set()
        for emit in list(self.waiting.values()):
            emit(Finished(None))

    def stop(self) -> bool:
        """Stop, waiting SHUTDOWN_GRACE_S at most for the job in hand; True if the thread ended."""
        self.abandon()
        self.jobs.put(None)
        self.thread.join(SHUTDOWN_GRACE_S)
        return not self.thread.is_alive()


def give_memory_back() -> None:
    """After big images, hand glibc's freed-but-kept heap back to the system (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)


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

    def __init__(self, engine: Engine, settings: Settings, options: ServeOptions) -> None:
        self.guard = Guard(options)
        self.worker = Worker(engine, self.guard)
        self.settings = settings
        self.model = settings.model
        self.api_key = options.api_key
        self.max_request_bytes = options.max_request_mb * 2**20
        self.request_timeout_s = options.request_timeout_s
        self.open_requests = 0  # changed on the event loop only
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
        """Check Host, Origin, Content-Type and the API key, and turn every `ApiError` (and any bug) into its response."""

        async def endpoint(request: Request) -> Response:
            try:
                if refusal := self.guard.refusal(request.method, request.headers):
                    log_detail(f"refused {request.method} {request.url.path}: {refusal.message}")
                    raise ApiError(refusal.status, refusal.message, code=refusal.code)
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
        if self.open_requests >= MAX_OPEN_REQUESTS:
            raise ApiError(503, f"the server is busy with {MAX_OPEN_REQUESTS} requests; try again shortly",
                           code="server_busy", kind="server_error")
        self.open_requests += 1
        try:
            return await self.answer(request)
        finally:
            self.open_requests -= 1

    async def answer(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = parse_json(await read_body(request, self.max_request_bytes, self.request_timeout_s))
        job = await run_in_threadpool(parse_job, body, self.model, self.settings)  # long histories: off the loop
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


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, at most `limit` bytes, all of it within `timeout_s` (a body that trickles in is cut off: 408)."""
    too_large = ApiError(413, f"the request body is over {limit:,} bytes (llava serve --max-request-mb raises the limit)",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()

    async def receive() -> None:
        async for piece in request.stream():
            body.extend(piece)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (llava serve --request-timeout)",
                       code="request_timeout") from None
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
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


def run_serve(settings: Settings, options: ServeOptions) -> int:
    """Load the model, serve until SIGINT (exit code 130) or SIGTERM (0). The caller should leave at
    once (`cli.exit_now`): a forward may still be running, and torch's teardown takes seconds."""
    from llava_cli.session import load_engine

    require_server_libraries()
    global VERBOSE
    VERBOSE = settings.verbose
    sock = bind(options.host, options.port)
    service = Service(load_engine(settings), settings, options)
    url = local_url(sock)
    announced = write_server_file(url, settings.model)
    try:
        log(f"serving {settings.model} at {url}/v1{' (API key required)' if options.api_key else ''}; Ctrl-C stops")
        code = serve_until_signal(service, sock, settings.verbose)
    finally:
        remove_server_file(announced)
        finished = service.worker.stop()
    if not finished:  # the engine is inside one long forward, and checks for the stop only between steps
        log("the answer in progress did not stop in time; exiting without it")
    return code


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
            service.worker.abandon()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        service.app(),
        log_level="info" if verbose else "warning",
        access_log=verbose,
        lifespan="off",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = Server(config)
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(one_line_records)
    asyncio.run(server.serve(sockets=[sock]))
    return EXIT_INTERRUPTED if signal.SIGINT in server.signals else EXIT_OK
