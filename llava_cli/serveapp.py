"""`llava serve`'s HTTP endpoints: `POST /v1/chat/completions` and `GET /v1/models` (Starlette).

Contract: `Service(engine, settings, options).app()` is the ASGI app; its `Worker` batches up to
`options.max_batch` answers (default `decodebatch.rows_that_fit`) with `options.cache_mb` of prefix caches. Every request passes the
`Guard` (Host, Origin, Content-Type) and the API key first; the body must arrive within
`--request-timeout` (408) and under `--max-request-mb` (413); at most MAX_OPEN_REQUESTS are open
at once (503 beyond). The body becomes a `Job` (apirequest.py), its images decoded here
(servedecode.py, off the worker), answered by the `Worker` (serveworker.py),
as one JSON completion or as server-sent events (`stream: true`). `usage` carries
the token counts and `prompt_tokens_details.cached_tokens`, a non-standard `llava` object the
engine's figures (`Stats.as_dict`). Every refusal is an OpenAI-style error body; a bug becomes a
500 and one log line, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from llava_cli.apirequest import ApiError, Job, parse_job
from llava_cli.decodebatch import rows_that_fit
from llava_cli.engine import Engine
from llava_cli.servedecode import DecodeAhead
from llava_cli.serveguard import Guard, ServeOptions
from llava_cli.servelog import log, log_detail
from llava_cli.serveworker import Failed, Finished, Item, Worker
from llava_cli.settings import Settings
from llava_cli.streaming import Stats

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

MAX_OPEN_REQUESTS = 32  # being read, queued or answered (until a stream starts): with --max-request-mb, bounds what bodies hold
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
        cache_bytes = options.cache_mb * 2**20
        max_batch = options.max_batch or rows_that_fit(engine, engine.context_window(settings), cache_bytes)
        self.worker = Worker(engine, self.guard, max_batch, cache_bytes)
        self.decoder = DecodeAhead(self.guard)  # images decoded here, not on the worker: one slow image stalls no answer
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
        release_images = await self.decoder.decode(job)  # a bad image raises here (its slot given back)
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
            release_images()  # the worker did once it prefilled the job: then a no-op
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

