"""`llava serve`'s HTTP endpoints: `POST /v1/chat/completions` and `GET /v1/models` (Starlette).

Contract: `Service(engine, settings, options).app()` is the ASGI app; its `Worker` batches up to
`options.max_batch` answers (default `rows_that_fit`, engine/scheduler.py) within the engine's `--cache-mb` budget (engine/kvbudget.py). Every request passes the
`Guard` (Host, Origin, Content-Type) and the API key first; the body must arrive within
`--request-timeout` (408) and under `--max-request-mb` (413); at most MAX_OPEN_REQUESTS are open
at once (503 beyond). The body becomes a `Job` (serve/request.py), its images decoded here
(serve/imagedecode.py, off the worker), answered by the `Worker` (serve/worker.py),
as one JSON completion or as server-sent events (`stream: true`). A request's `n` answers are
`choices` 0..n-1 (each stream chunk names its `index`; an `n` over the worker's `max_batch` is a
400); with `logprobs`, each choice has OpenAI's `logprobs.content`, a stream chunk those of its own
tokens. `usage` carries the token counts (the prompt once, every answer's completion tokens) and `prompt_tokens_details.cached_tokens`, a non-standard `llava` object the
engine's figures (`Stats.as_dict`). Every refusal is an OpenAI-style error body; a bug becomes a
500 and one log line, and the server keeps serving.

Also: `GET|HEAD /health` (no key, no Host check: load balancers) answers `{status, model, loaded}`,
200 when the server can take work (the model loaded or unloaded by `--keep-alive`), 503 while it
loads or drains. `GET /metrics` (serve/metrics.py) needs the key unless `--metrics-public`. With
`draining` set (SIGTERM, serve/server.py) every other request gets 503 with `Retry-After`. A body still
arriving after SLOW_BODY_AFTER_S takes one of MAX_SLOW_BODIES places, so clients that trickle
their bodies hold at most that share of MAX_OPEN_REQUESTS (503 beyond). Each request's key id
(`key-N`) scopes its prefix-cache entries and goes to the access log (serve/access.py), never the key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from llava_cli.base.settings import Settings
from llava_cli.client.discovery import served_name
from llava_cli.engine.backend import Done, TextChunk
from llava_cli.engine.local import Engine
from llava_cli.engine.logprobs import TokenLogprob, as_openai
from llava_cli.engine.scheduler import rows_that_fit
from llava_cli.engine.streaming import Stats
from llava_cli.serve.access import RECORD, AccessLog, note
from llava_cli.serve.guard import Guard, ServeOptions, key_id
from llava_cli.serve.imagedecode import DecodeAhead
from llava_cli.serve.keepalive import LOADING, ModelHolder
from llava_cli.serve.log import log, log_detail
from llava_cli.serve.metrics import Metrics
from llava_cli.serve.request import ApiError, Job, parse_job
from llava_cli.serve.worker import Choice, Failed, Item, Worker

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

MAX_OPEN_REQUESTS = (
    32  # being read, queued or answered (until a stream starts): with --max-request-mb, bounds what bodies hold
)
# Not uvicorn's `limit_concurrency`: that counts every connection (idle kept-alive ones too) and every request
# (/health, /metrics, whole streams), and refuses with a text/plain 503 where clients read an OpenAI error (server_busy).
MAX_SLOW_BODIES = (
    MAX_OPEN_REQUESTS // 4
)  # bodies still arriving after SLOW_BODY_AFTER_S: the rest stay free for other clients
SLOW_BODY_AFTER_S = 1.0
DRAIN_RETRY_AFTER_S = 5
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Ended = Callable[[list[Stats]], None]  # told the figures of a request's answers (its `n`) once all have finished


async def job_items(
    queue: asyncio.Queue[Item], first: Item, ended: Ended, n: int = 1
) -> AsyncIterator[tuple[int, Item]]:
    """`first`, then the job's items with their answer's index, up to and including its `n`th `Done`, or its
    `Unfinished` or `Failed`; `ended` gets the figures of the `n` answers once all have finished."""
    item, finished = first, []
    while True:
        index, bare = (item.index, item.item) if isinstance(item, Choice) else (0, item)
        if isinstance(bare, Done):
            finished.append(bare.stats)
            if len(finished) == n:
                ended(finished)
        yield index, bare
        if not isinstance(bare, TextChunk) and not (isinstance(bare, Done) and len(finished) < n):
            return
        item = await queue.get()


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to hang up, then stop its job (after the body, receive() only ends so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


# ---------------------------------------------------------------- responses


def usage(answers: list[Stats]) -> dict[str, Any]:
    """A request's usage: its prompt once (its `n` answers share it), the completion tokens of every answer."""
    completion = sum(stats.completion_tokens for stats in answers)
    return {
        "prompt_tokens": answers[0].prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": answers[0].prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": answers[0].cached_tokens},
    }


def logprobs_field(job: Job, tokens: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """A choice's `logprobs` (OpenAI's shape) when the request asked for them, else nothing."""
    return {} if job.settings.logprobs is None else {"logprobs": {"content": as_openai(tokens)}}


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


SHUTTING_DOWN = ApiError(503, "the server is shutting down", kind="server_error")
DRAINING = ApiError(
    503,
    "the server is shutting down; send the request again elsewhere or later",
    code="server_draining",
    kind="server_error",
    retry_after_s=DRAIN_RETRY_AFTER_S,
)


# ---------------------------------------------------------------- the service


class Service:
    """The HTTP endpoints around one loaded model."""

    def __init__(
        self, engine: Engine, settings: Settings, options: ServeOptions, load: Callable[[], Engine] | None = None
    ) -> None:
        self.guard = Guard(options)
        max_batch = options.max_batch or rows_that_fit(engine, engine.context_window(settings))
        self.metrics = Metrics()
        self.holder = ModelHolder(engine, load, options.keep_alive_s, self.metrics)
        self.worker = Worker(engine, self.guard, max_batch, self.holder)
        self.watch_worker()
        self.decoder = DecodeAhead(
            self.guard
        )  # images decoded here, not on the worker: one slow image stalls no answer
        self.settings = settings
        self.model = options.served_model_name or served_name(settings.model)  # the id clients send
        # Without --served-model-name, the --model text as typed is accepted too (clients of earlier versions send it).
        self.aliases = frozenset() if options.served_model_name else frozenset({settings.model})
        self.api_keys = options.api_keys
        self.metrics_public = options.metrics_public
        self.json_log = options.log_format == "json"
        self.draining = False  # set on SIGTERM (serve/server.py)
        self.slow_bodies = 0  # changed on the event loop only
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
            Route(
                "/metrics",
                self.guarded(self.render_metrics, keyless=self.metrics_public, during_drain=True),
                methods=["GET"],
            ),
            Route("/health", self.health, methods=["GET"]),  # Starlette adds HEAD
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: self.http_error})
        return AccessLog(app, self.metrics, self.json_log, frozenset(route.path for route in routes))

    def watch_worker(self) -> None:
        worker = self.worker
        self.metrics.watch(
            {
                "llava_queue_depth": (
                    "Requests waiting for a place in the batch",
                    lambda: worker.jobs.qsize() + len(worker.queued),
                ),
                "llava_running_rows": ("Answers being decoded together", lambda: len(worker.answers)),
                "llava_max_batch": ("Answers that may be decoded together (--max-batch)", lambda: worker.max_batch),
                "llava_prefills": (
                    "Prompts prefilled since the server started (the n answers of a request share one)",
                    lambda: worker.prefills,
                ),
                "llava_prefix_cache_bytes": (
                    "Bytes of KV cache held in the prefix cache",
                    lambda: worker.pool.held_bytes,
                ),
                "llava_prefix_cache_budget_bytes": (
                    "The KV-cache budget of the process (--cache-mb; 0: none)",
                    lambda: worker.budget.limit_bytes or 0,
                ),
                "llava_kv_cache_bytes": (
                    "KV-cache bytes held or reserved in all: running answers, prefix cache",
                    lambda: worker.budget.used,
                ),
                "llava_model_loaded": ("1 while the model is loaded", lambda: float(worker.holder.engine is not None)),
            }
        )

    async def health(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        state = "draining" if self.draining else self.holder.state
        body = {
            "status": "ok" if state in ("loaded", "unloaded") else state,
            "model": self.model,
            "loaded": self.holder.engine is not None and state != LOADING,
        }
        return JSONResponse(
            body, status_code=200 if body["status"] == "ok" else 503, headers={"Cache-Control": "no-store"}
        )

    async def render_metrics(self, request: Request) -> Response:
        from starlette.responses import Response

        text, content_type = self.metrics.render()
        return Response(text, media_type=content_type)

    async def http_error(self, request: Request, err: Exception) -> Response:
        """Unknown paths and methods, in the API's error shape."""
        status = getattr(err, "status_code", 404)
        return ApiError(
            status, f"{request.method} {request.url.path}: {getattr(err, 'detail', 'not found')}"
        ).response()

    def guarded(
        self, handler: Callable[[Request], Any], keyless: bool = False, during_drain: bool = False
    ) -> Callable[[Request], Any]:
        """Check Host, Origin, Content-Type and the API key (unless `keyless`), refuse work while draining (unless
        `during_drain`), and turn every `ApiError` (and any bug) into its response."""

        async def endpoint(request: Request) -> Response:
            try:
                if refusal := self.guard.refusal(request.method, request.headers):
                    log_detail(f"refused {request.method} {request.url.path}: {refusal.message}")
                    raise ApiError(refusal.status, refusal.message, code=refusal.code)
                if not keyless:
                    self.check_key(request)
                if self.draining and not during_drain:
                    raise DRAINING
                return await handler(request)
            except ApiError as err:
                return err.response()
            except Exception as err:  # a bug: one line in the log, a 500 for the client, keep serving
                log(f"{request.method} {request.url.path} failed: {type(err).__name__}: {err}")
                return ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").response()

        return endpoint

    def check_key(self, request: Request) -> None:
        """401 unless the request sends one of the keys (when there are any); its key id goes to the access log."""
        if not self.api_keys:
            return
        found = key_id(self.api_keys, request.headers.get("authorization", ""))
        if found is None:
            raise ApiError(401, "a valid API key is required: send Authorization: Bearer KEY", code="invalid_api_key")
        note(request.scope, key_id=found)

    async def models(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        entry = {"id": self.model, "object": "model", "created": self.started, "owned_by": "llava-cli"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(self, request: Request) -> Response:
        if self.open_requests >= MAX_OPEN_REQUESTS:
            raise ApiError(
                503,
                f"the server is busy with {MAX_OPEN_REQUESTS} requests; try again shortly",
                code="server_busy",
                kind="server_error",
            )
        self.open_requests += 1
        try:
            return await self.answer(request)
        finally:
            self.open_requests -= 1

    async def answer(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = parse_json(await self.read_body(request))
        job = await run_in_threadpool(
            parse_job, body, self.model, self.settings, self.aliases
        )  # long histories: off the loop
        if job.n > self.worker.max_batch:
            raise ApiError(
                400,
                f"`n` must be at most {self.worker.max_batch}, the answers this server decodes at once (llava serve --max-batch)",
                param="n",
            )
        job.key_id = request.scope.get(RECORD, {}).get("key_id", "")
        ended = functools.partial(self.answered, request.scope)
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
                return self.streamed(job, queue, first, watcher, ended)
            return await self.completed(job, queue, first, ended)
        finally:
            release_images()  # the worker did once it prefilled the job: then a no-op
            if not streaming:
                job.cancelled.set()  # a no-op once the job has finished
                watcher.cancel()

    def answered(self, scope: MutableMapping[str, Any], answers: list[Stats]) -> None:
        """Count a request's answers (the `n` of them share one prompt: its tokens count once) and log them."""
        for index, stats in enumerate(answers):
            self.metrics.answered(stats if index == 0 else dataclasses.replace(stats, prompt_tokens=0, cached_tokens=0))
        first = answers[0]
        note(
            scope,
            prompt_tokens=first.prompt_tokens,
            cached_tokens=first.cached_tokens,
            completion_tokens=sum(stats.completion_tokens for stats in answers),
            ttft_s=round(first.ttft_s, 4),
        )

    async def read_body(self, request: Request) -> bytes:
        """The body (see `read_body`); one that is still arriving after SLOW_BODY_AFTER_S needs a slow-body place."""
        reading = asyncio.ensure_future(read_body(request, self.max_request_bytes, self.request_timeout_s))
        done, _ = await asyncio.wait({reading}, timeout=SLOW_BODY_AFTER_S)
        if done:
            return reading.result()
        if self.slow_bodies >= MAX_SLOW_BODIES:
            reading.cancel()
            raise ApiError(
                503,
                f"{MAX_SLOW_BODIES} request bodies are already arriving slowly; send the body at once or try again shortly",
                code="server_busy",
                kind="server_error",
                retry_after_s=1,
            )
        self.slow_bodies += 1
        try:
            return await reading
        finally:
            self.slow_bodies -= 1

    async def completed(self, job: Job, queue: asyncio.Queue[Item], first: Item, ended: Ended) -> Response:
        from starlette.responses import JSONResponse

        pieces: dict[int, list[str]] = {index: [] for index in range(job.n)}
        done: dict[int, Done] = {}
        async for index, item in job_items(queue, first, ended, job.n):
            if isinstance(item, TextChunk):
                pieces[index].append(item.text)
            elif isinstance(item, Failed):
                raise item.error
            elif isinstance(item, Done):
                done[index] = item
        if len(done) < job.n:
            raise SHUTTING_DOWN
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(pieces[index])},
                **logprobs_field(job, done[index].logprobs),
                "finish_reason": done[index].stats.finish_reason,
            }
            for index in range(job.n)
        ]
        figures = [done[index].stats for index in range(job.n)]
        return JSONResponse(
            {
                **self.envelope(job, "chat.completion"),
                "choices": choices,
                "usage": usage(figures),
                "llava": figures[0].as_dict(),
            }
        )

    def streamed(
        self, job: Job, queue: asyncio.Queue[Item], first: Item, watcher: asyncio.Task, ended: Ended
    ) -> Response:
        from starlette.responses import StreamingResponse

        return StreamingResponse(
            self.events(job, queue, first, watcher, ended), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def events(
        self, job: Job, queue: asyncio.Queue[Item], first: Item, watcher: asyncio.Task, ended: Ended
    ) -> AsyncIterator[str]:
        try:
            for index in range(job.n):
                yield sse(self.chunk(job, {"role": "assistant", "content": ""}, index=index))
            figures: list[Stats] = []
            async for index, item in job_items(queue, first, ended, job.n):
                if isinstance(item, TextChunk):
                    yield sse(self.chunk(job, {"content": item.text}, index=index, logprobs=item.logprobs))
                elif not isinstance(item, Done):
                    yield sse((item.error if isinstance(item, Failed) else SHUTTING_DOWN).body())
                    return
                else:
                    figures.append(item.stats)
                    yield sse(
                        {**self.chunk(job, {}, item.stats.finish_reason, index=index), "llava": item.stats.as_dict()}
                    )
            if job.include_usage:
                yield sse({**self.envelope(job, "chat.completion.chunk"), "choices": [], "usage": usage(figures)})
            yield sse("[DONE]")
        finally:
            job.cancelled.set()  # the client went away mid-stream: free the engine
            watcher.cancel()

    def envelope(self, job: Job, kind: str) -> dict[str, Any]:
        return {"id": job.id, "object": kind, "created": job.created, "model": self.model}

    def chunk(
        self,
        job: Job,
        delta: dict[str, str],
        finish_reason: str | None = None,
        index: int = 0,
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> dict[str, Any]:
        """One event of a stream; a text chunk's `logprobs` are those of its tokens (when asked for)."""
        choice = {
            "index": index,
            "delta": delta,
            **(logprobs_field(job, logprobs) if logprobs is not None else {}),
            "finish_reason": finish_reason,
        }
        return {**self.envelope(job, "chat.completion.chunk"), "choices": [choice]}


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, at most `limit` bytes, all of it within `timeout_s` (a body that trickles in is cut off: 408)."""
    too_large = ApiError(
        413,
        f"the request body is over {limit:,} bytes (llava serve --max-request-mb raises the limit)",
        code="request_too_large",
    )
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
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g} s (llava serve --request-timeout)",
            code="request_timeout",
        ) from None
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
