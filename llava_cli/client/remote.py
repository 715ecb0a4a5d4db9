"""Client mode: answer through an OpenAI-compatible server instead of loading a model here.

`RemoteEngine` is a `Backend` (engine/backend.py), like the local `Engine`: `generate(conversation,
settings)` yields `TextChunk`s (joined: the answer with surrounding whitespace stripped) and, once the
answer is complete and added to the conversation, one `Done` with its figures (the server's usage,
timed here); `info()` names the model and the server's url (dtype and window are the server's, not
known here); `prompt_tokens` is None. The API is stateless, so every turn sends the whole
conversation: images as PNG `data:` URLs, the system text as a system message, and of `temperature`,
`top_p`, `max_tokens` and `seed` only those the user set (`Settings.chosen`), so that the server's
own defaults apply to the rest; what the answer must be, whenever set: the schema as
`response_format` (`json_object` for --format json, else `json_schema`) and the stop texts as
`stop`. The answer streams back as server-sent events. Plain OpenAI chat-completions: it works
against `llava serve`, vLLM, llama.cpp's server and Ollama's `/v1`.

The HTTP is httpx's, hardened as before: one connection per exchange, no redirect followed, no
proxy, `.netrc` or certificate bundle taken from the environment (the system's certificates), no
compression (the caps count the bytes sent): an event line over MAX_EVENT_BYTES and a refusal's
body past MAX_ERROR_BYTES are not read; the probe of a discovered server has a `Deadline` for the
whole exchange. Retries are the caller's (ask/via_server.py): a library's would retry other statuses,
with its own waits, and not a connection reset mid-answer.

Errors keep the local exit codes: a message over the context window raises `ContextError` (2), any
other refused request (image, model, API key) exit 2, an unreachable or failing server exit 1.
`ServerUnavailable` (exit 1) marks the failures that the same request may get past a little later:
the server cannot be reached, the connection was reset (before or during the answer), or it
answered 429/502/503/504 (with its `Retry-After`, if any); `ask --each` retries those (ask/via_server.py).
Closing the generator early (Ctrl-C) closes the connection, which stops the answer on a
`llava serve`. `--max-context` is the server's business; turns the server dropped to fit its
window are dropped from the conversation here too, with a `Note` as locally.

`answer(conversation, settings)` reads a whole answer without changing the conversation (for
`ask --each`, whose requests run in parallel threads: `RemoteEngine` keeps no state per request, and
with `remember_images=False` no image cache either, so memory does not grow with the images sent).

`choose_server(settings, notify)` returns the remote engine to use, or None to load the model here
(`notify` hears only why a discovered server was skipped; answers speak through `Note` events):
none with `--no-server`; else `--server`/LLAVA_SERVER; else a running `llava serve` for the same
model found through client/discovery.py, if it answers. LLAVA_API_KEY is sent as `Authorization: Bearer`,
but only to a server the user named (--server, LLAVA_SERVER): a discovered server is found through
a file and is never given the key (a server that needs one is then not used; name it instead).
"""

from __future__ import annotations

import base64
import email.utils
import functools
import io
import json
import os
import ssl
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from llava_cli.base.deadline import Deadline
from llava_cli.base.errors import ContextError, InputError, LlavaError, ModelError, UsageError
from llava_cli.base.options import DEFAULT_MODEL, request_fields, server_url
from llava_cli.base.settings import Settings
from llava_cli.client.discovery import find_server, only_server
from llava_cli.engine.backend import BackendInfo, Done, Events, Note, TextChunk
from llava_cli.engine.constraints import ANY_OBJECT
from llava_cli.engine.logprobs import TokenLogprob, from_openai
from llava_cli.engine.streaming import Stats, TextStream, decode_rate
from llava_cli.media.images import ImageRef
from llava_cli.media.video import VIDEO_MIME_TYPES, VideoRef
from llava_cli.prompt.conversation import Conversation

if TYPE_CHECKING:
    import httpx

API_KEY_ENV = "LLAVA_API_KEY"
CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0  # a discovered server that does not answer this fast is not used
SERVER_FIGURES = ("load_s", "peak_memory_mb", "dropped_turns")  # from `llava serve`'s `llava` object
MAX_EVENT_BYTES = 1 << 20  # one server-sent event line; a server's answer comes in small pieces
MAX_ERROR_BYTES = 1 << 16  # the body of a refusal: a short JSON message
GUARD_CODES = {"host_not_allowed", "origin_not_allowed"}  # llava serve's 403s that are not about the key
BUSY_STATUSES = {429, 502, 503, 504}  # too many requests, a restarting server or its proxy: try again later
# Failures of the connection itself (refused, reset, timed out): nothing was wrong with the request.
CONNECTION_FAILURES = (ConnectionError, TimeoutError)
Default = TypeVar("Default")


class ServerUnavailable(LlavaError):
    """The server could not answer now (unreachable, reset, busy); the same request may succeed later.

    `retry_after`: the seconds the server asked the client to wait (its Retry-After), else None."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RemoteEngine:
    """Answers conversations through an OpenAI-compatible chat-completions server."""

    def __init__(self, url: str, model: str, api_key: str | None = None, remember_images: bool = True) -> None:
        self.parts = parts = server_url(url)
        self.url = url.rstrip("/")
        # Both http://host:port and the OpenAI-style base http://host:port/v1 are accepted.
        self.prefix = parts.path.rstrip("/").removesuffix("/v1") + "/v1"
        self.model = model
        self.api_key = api_key
        # image digest -> encoded once per session (a chat resends its images every turn); None: never kept
        self.data_urls: dict[str, str] | None = {} if remember_images else None

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.model, where=self.url)

    def reset(self) -> None:
        if self.data_urls is not None:
            self.data_urls.clear()

    def prompt_tokens(self, conversation: Conversation) -> None:
        return None  # only the server's tokenizer could tell; the answers' usage does

    def generate(
        self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = lambda: False
    ) -> Events:
        reply = Reply(time.perf_counter())
        with closing(self.stream(conversation, settings, reply)) as chunks:  # stopped or closed early: hang up at once
            for chunk in chunks:
                if stop():
                    return
                if chunk:
                    yield TextChunk(chunk)
        stats = reply.stats()
        if not 0 <= stats.dropped_turns < len(conversation.turns):  # a server is not trusted
            stats.dropped_turns = 0
        if stats.dropped_turns:
            yield Note(f"the server dropped the {stats.dropped_turns} oldest turn(s) to fit its context window")
        yield Done(stats, tuple(reply.logprobs), answer=reply.text.strip())

    def answer(self, conversation: Conversation, settings: Settings) -> Reply:
        """The whole answer to the conversation's last question, read to its end; the conversation is unchanged."""
        reply = Reply(time.perf_counter())
        for _ in self.stream(conversation, settings, reply):
            pass
        return reply

    def stream(self, conversation: Conversation, settings: Settings, reply: Reply) -> Generator[str, None, None]:
        """Send the conversation; for each event of the answer, record it in `reply` and yield the text it makes visible."""
        with self.exchange("POST", "/chat/completions", self.request_body(conversation, settings)) as response:
            for event in self.events(response):  # leaving early (Ctrl-C) closes the connection: the server stops
                yield reply.take(event, self.url)

    def reachable(self) -> bool:
        """True if the server answers GET /v1/models at once (used before trusting a discovered one)."""
        try:
            # a deadline for the whole answer: a peer dripping bytes resets each read's timeout
            with (
                Deadline(PROBE_TIMEOUT_S) as deadline,
                self.exchange(
                    "GET",
                    "/models",
                    None,
                    read_timeout=PROBE_TIMEOUT_S,
                    connect_timeout=PROBE_TIMEOUT_S,
                    deadline=deadline,
                ),
            ):
                pass
        except LlavaError:
            return False
        return not deadline.passed()  # a shut socket reads as the end of the headers

    def request_body(self, conversation: Conversation, settings: Settings) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": self.messages(conversation),
            "stream": True,
            "stream_options": {"include_usage": True},
            **request_fields(settings),  # only the options the user chose: the rest is left to the server's defaults
            **answer_shape(settings),
        }

    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if conversation.system:
            messages.append({"role": "system", "content": conversation.system})
        for turn in conversation.turns:
            images = [content_part(image, self.data_url(image)) for image in turn.images]
            content = [*images, {"type": "text", "text": turn.text}] if images else turn.text
            messages.append({"role": "user", "content": content})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": turn.answer})
        return messages

    def data_url(self, image: ImageRef | VideoRef) -> str:
        """PNG is lossless, so the server sees exactly the pixels `llava` would use here; a video goes as its own bytes."""
        if self.data_urls is None:
            return media_data_url(image)
        if image.digest not in self.data_urls:
            self.data_urls[image.digest] = media_data_url(image)
        return self.data_urls[image.digest]

    @contextmanager
    def exchange(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        read_timeout: float | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        deadline: Deadline | None = None,
    ) -> Iterator[httpx.Response]:
        """Send a request; give its 200 response, still streaming, or raise what went wrong. The
        connection is closed on leaving: one connection per exchange, never a redirect followed."""
        import httpx

        transport = httpx.HTTPTransport(
            verify=system_tls(), trust_env=False
        )  # no proxy, .netrc or certificate from the environment
        if deadline:
            clock(transport, deadline)
        timeout = httpx.Timeout(
            read_timeout, connect=connect_timeout
        )  # an answer may wait its turn behind others: no read limit
        with httpx.Client(transport=transport, timeout=timeout, trust_env=False, follow_redirects=False) as client:
            data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
            request = client.build_request(method, self.endpoint(path), content=data, headers=self.headers())
            try:
                response = client.send(request, stream=True)
                if response.status_code != 200:
                    raise refusal(
                        response.status_code, response_json(response), self.url, response.headers.get("Retry-After")
                    )
            except (OSError, httpx.HTTPError) as err:
                raise failure(err)(
                    f"cannot reach the server at {self.url} ({describe(err)}); is `llava serve` running?"
                ) from None
            with closing(response):
                yield response

    def endpoint(self, path: str) -> httpx.URL:
        """The url of an API path: the server's scheme, host and port (never credentials or a query from --server)."""
        import httpx

        return httpx.URL(
            scheme=self.parts.scheme, host=self.parts.hostname or "", port=self.parts.port, path=self.prefix + path
        )

    def headers(self) -> dict[str, str]:
        # identity: the byte caps below count what the server sends, not what it inflates to
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "Accept-Encoding": "identity",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def events(self, response: httpx.Response) -> Iterator[dict[str, Any]]:
        """The JSON payloads of the server-sent events, up to `data: [DONE]` or the end of the stream."""
        import httpx

        try:
            for line in capped_lines(response.iter_raw(), MAX_EVENT_BYTES):
                data = line.decode("utf-8").strip()
                if not data.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = data[len("data:") :].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict):
                    yield event
        except (OSError, httpx.HTTPError, ValueError, RecursionError) as err:
            raise failure(err)(f"the connection to {self.url} broke mid-answer ({describe(err)})") from None


def capped_lines(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """The lines of a byte stream; ValueError as soon as one grows past `limit` bytes (never held whole)."""
    pending = bytearray()
    for chunk in chunks:
        *ends, rest = chunk.split(b"\n")
        for end in ends:
            pending += end
            yield bytes(within(pending, limit))
            pending.clear()
        pending += rest
        within(pending, limit)
    if pending:
        yield bytes(pending)


def within(line: bytearray, limit: int) -> bytearray:
    if len(line) > limit:
        raise ValueError(f"an event over {limit:,} bytes")
    return line


def clock(transport: httpx.HTTPTransport, deadline: Deadline) -> None:
    """Make the transport's connections connect within the deadline's time left, their sockets watched by it."""
    import httpcore

    class OnTheClock(httpcore.SyncBackend):
        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> httpcore.NetworkStream:
            stream = super().connect_tcp(host, port, deadline.left(), local_address, socket_options)
            deadline.watch(stream.get_extra_info("socket"))
            return stream

    # httpx names no network backend of its own; httpcore's pool (pinned in constraints.txt) takes one
    transport._pool._network_backend = OnTheClock()  # type: ignore[attr-defined]


@functools.cache
def system_tls() -> ssl.SSLContext:
    """The system's certificate store, as Python's own clients use (httpx alone would use certifi's); made once."""
    return ssl.create_default_context()


def failure(err: BaseException) -> type[LlavaError]:
    """`ServerUnavailable` for a failure of the connection itself (refused, reset, timed out, closed
    before or during the answer: nothing was wrong with the request), else `LlavaError`."""
    import httpx

    if isinstance(
        err, (httpx.TimeoutException, httpx.RemoteProtocolError)
    ):  # a read timed out; closed before or during the answer
        return ServerUnavailable
    return ServerUnavailable if isinstance(os_error(err), CONNECTION_FAILURES) else LlavaError


def os_error(err: BaseException) -> OSError | None:
    """The system's error under httpx's and httpcore's wrappers, if any."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause


class Reply:
    """One streamed answer as it arrives: the text, its timing, usage and finish reason."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.trimmer = TextStream(tokenizer=None)  # only its whitespace trimming: the server sends text
        self.ttft_s = 0.0
        self.deltas = 0
        self.finish_reason: str | None = None  # None until the server says why the answer ended
        self.usage: dict[str, Any] = {}
        self.figures: dict[str, Any] = {}
        self.logprobs: list[TokenLogprob] = []  # each token's, when asked for (`logprobs` in the request)

    @property
    def text(self) -> str:
        return self.trimmer.text

    def take(self, event: dict[str, Any], url: str) -> str:
        """Record one event; return the text it makes visible."""
        if event.get("error"):
            raise LlavaError(f"the server at {url} stopped the answer: {error_message(event)}")
        if isinstance(usage := event.get("usage"), dict):
            self.usage = usage
        if isinstance(figures := event.get("llava"), dict):
            self.figures = figures
        visible = ""
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(content := delta.get("content"), str) and content:
                self.deltas += 1
                self.ttft_s = self.ttft_s or time.perf_counter() - self.started
                visible += self.trimmer.release(content)
            if isinstance(choice, dict) and isinstance(logprobs := choice.get("logprobs"), dict):
                self.logprobs += server_logprobs(logprobs.get("content"), url)
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        return visible

    def stats(self) -> Stats:
        seconds = time.perf_counter() - self.started
        completion = whole_number(self.usage.get("completion_tokens"), self.deltas)
        details = self.usage.get("prompt_tokens_details")
        stats = Stats(
            prompt_tokens=whole_number(self.usage.get("prompt_tokens"), 0),
            cached_tokens=whole_number(details.get("cached_tokens"), 0) if isinstance(details, dict) else 0,
            completion_tokens=completion,
            ttft_s=self.ttft_s,
            tokens_per_s=decode_rate(completion, seconds - self.ttft_s),
            seconds=seconds,
            finish_reason=self.finish_reason or "stop",
        )
        for name in SERVER_FIGURES:
            if type(self.figures.get(name)) in ((int,) if name == "dropped_turns" else (int, float)):
                setattr(stats, name, self.figures[name])
        return stats


def answer_shape(settings: Settings) -> dict[str, Any]:
    """The request fields for what the answer must be, as OpenAI's API spells them: its JSON
    (`response_format`: any object for --format json, else the schema) and its stop texts."""
    fields: dict[str, Any] = {}
    if settings.constraint == ANY_OBJECT:
        fields["response_format"] = {"type": "json_object"}
    elif settings.constraint:
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": json.loads(settings.constraint)},
        }
    if settings.stop:
        fields["stop"] = list(settings.stop)
    if settings.logprobs is not None:
        fields |= {"logprobs": True, "top_logprobs": settings.logprobs}
    return fields


def server_logprobs(content: Any, url: str) -> tuple[TokenLogprob, ...]:
    """A choice's `logprobs.content` from a server, checked (a server is not trusted); null is none."""
    if content is None:
        return ()
    try:
        tokens = from_openai(content)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LlavaError(
            f"the server at {url} sent logprobs that are not OpenAI's shape ({type(err).__name__})"
        ) from None
    pieces = [piece for token in tokens for piece in (token, *token.top)]
    if not all(
        isinstance(piece.token, str) and all(type(b) is int and 0 <= b < 256 for b in piece.bytes) for piece in pieces
    ):
        raise LlavaError(f"the server at {url} sent logprobs that are not OpenAI's shape (a token or its bytes)")
    return tokens


def whole_number(value: Any, default: Default) -> int | Default:
    """A count the server reported, or `default` when it sent something else (a server is not trusted)."""
    return value if type(value) is int and value >= 0 else default


def content_part(item: ImageRef | VideoRef, url: str) -> dict[str, Any]:
    """An attachment as a chat-completions content part: `image_url`, or vLLM's `video_url`."""
    kind = "video_url" if isinstance(item, VideoRef) else "image_url"
    return {"type": kind, kind: {"url": url}}


def media_data_url(item: ImageRef | VideoRef) -> str:
    if isinstance(item, VideoRef):
        return f"data:{VIDEO_MIME_TYPES[item.info.container]};base64," + base64.b64encode(item.data).decode("ascii")
    return png_data_url(item)


def png_data_url(image: ImageRef) -> str:
    buffer = io.BytesIO()
    image.image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def response_json(response: httpx.Response) -> Any:
    """A refusal's JSON body, read up to MAX_ERROR_BYTES; None when it is not JSON."""
    body = b""
    for chunk in response.iter_raw():
        body += chunk
        if len(body) >= MAX_ERROR_BYTES:
            break
    try:
        return json.loads(body[:MAX_ERROR_BYTES])
    except (ValueError, RecursionError):
        return None


def error_message(body: Any) -> str:
    """OpenAI's {"error": {"message"}}, or vLLM's flat {"message"}."""
    error = body.get("error") if isinstance(body, dict) else None
    source = error if isinstance(error, dict) else body if isinstance(body, dict) else {}
    return str(source.get("message") or error or "no details")


def refusal(status: int, body: Any, url: str, retry_after: str | None = None) -> LlavaError:
    """A non-200 answer as the error the local engine would have raised, with its exit code;
    `ServerUnavailable` for the statuses that say "later" (BUSY_STATUSES)."""
    message = error_message(body)
    if status in BUSY_STATUSES:
        return ServerUnavailable(
            f"the server at {url} is busy (HTTP {status}): {message}", seconds_to_wait(retry_after)
        )
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("code") == "context_length_exceeded":
        return ContextError(message)
    if status == 401 or (status == 403 and not (isinstance(error, dict) and error.get("code") in GUARD_CODES)):
        return UsageError(f"{url} refused the request ({message}); set {API_KEY_ENV} to the server's API key")
    if status == 404:
        return ModelError(f"{url}: {message} (--model must name a model the server lists at /v1/models)")
    if 400 <= status < 500:
        return InputError(f"{url} refused the request: {message}")
    return LlavaError(f"the server at {url} failed (HTTP {status}): {message}")


def seconds_to_wait(retry_after: str | None) -> float | None:
    """A Retry-After header's delay in seconds (a number or an HTTP date), or None when absent or unreadable."""
    if not retry_after:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None


def describe(err: BaseException) -> str:
    cause = os_error(err) or err
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__


def model_named(settings: Settings) -> bool:
    """The user chose the model (--model, LLAVA_MODEL, a resumed conversation's), rather than the default."""
    return "model" in settings.chosen or settings.model != DEFAULT_MODEL


def the_only_server(notify: Callable[[str], None]) -> tuple[str, str] | None:
    """With no model named: the one running `llava serve`, whatever it serves; several are named, not picked."""
    found = only_server(notify)
    if isinstance(found, list):
        notify(
            f"{len(found)} llava serve servers are running ({', '.join(found)}); name one with --model, "
            f"else {DEFAULT_MODEL} is loaded here"
        )
        return None
    return found


def choose_server(
    settings: Settings, notify: Callable[[str], None], remember_images: bool = True
) -> RemoteEngine | None:
    """The remote engine these settings ask for, or None to load the model in this process."""
    if settings.no_server:
        return None
    api_key = os.environ.get(API_KEY_ENV) or None
    if settings.server:
        return RemoteEngine(settings.server, settings.model, api_key, remember_images)
    found = find_server(settings.model, notify) or (None if model_named(settings) else the_only_server(notify))
    if found is None:
        return None
    url, served_as = found
    engine = RemoteEngine(url, served_as, None, remember_images)  # never the key: the user did not name this server
    return engine if engine.reachable() else None
