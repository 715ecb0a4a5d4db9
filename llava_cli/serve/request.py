"""A chat-completions request body, validated into a `Job` for `llava serve`'s worker.

Contract: `parse_job(body, served_model, base_settings)` returns a `Job` or raises `ApiError`
(HTTP status and OpenAI-style error body) naming the first thing wrong with the request:

- `model` must be the served one (404 otherwise); `n` 1..MAX_CHOICES (`Job.row_settings`: row i
  samples with seed + i); `logprobs`/`top_logprobs` (0..20) become `Settings.logprobs`; `stream` and
  `stream_options.include_usage` are booleans (`true` is not 1, and 1 is not `true`).
- `messages` (at most MAX_MESSAGES) become a `Conversation`: system/developer texts joined,
  consecutive user messages one turn, assistant messages that turn's answer; the last message
  must be the user's. `image_url` and `video_url` parts (at most MAX_IMAGES_PER_REQUEST; a data:
  URL is an image or a video by its bytes, media/attachments.py) are `data:` URLs or paths
  the Guard allows; they are checked for form here and decoded later (`Job.load_images`, within
  MAX_REQUEST_PIXELS): by the server before it queues the job (serve/imagedecode.py), a few requests'
  images at a time, or by the worker for a job queued undecoded.
- The request fields of the option table (base/options.py `REQUEST_FIELDS`: `temperature`, `top_p`,
  `max_tokens`/`max_completion_tokens`, `seed`) override the server's `Settings` for this request,
  each type-checked, then validated by `Settings`.
- `cache_salt` (a string, as vLLM has it) scopes the prefix cache: only requests with the same
  salt, sent with the same API key, share cached prefixes (`Job.cache_scope`).
- `stop` (a string or up to 4) becomes `Settings.stop` (engine/stops.py); `response_format` (text, json_object, json_schema) becomes `Settings.constraint` (engine/constraints.py).
- Any other field is refused with a 400 naming it (serve/fields.py), never silently ignored.

`api_error_from` turns what the engine refused (`LlavaError`) into the `ApiError` a client gets.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llava_cli.base.errors import ContextError, InputError, LlavaError, UsageError
from llava_cli.base.options import LOGPROBS, MAX_TOP_LOGPROBS, REQUEST_FIELDS
from llava_cli.base.settings import Settings
from llava_cli.engine.constraints import response_format_constraint
from llava_cli.engine.stops import stop_list
from llava_cli.media.attachments import Media, media_from_bytes
from llava_cli.media.images import MAX_IMAGE_BYTES, MAX_IMAGE_SIDE
from llava_cli.media.video import MAX_VIDEO_BYTES, VideoRef, is_video_name
from llava_cli.prompt.conversation import Conversation, Turn
from llava_cli.serve.fields import refused_field
from llava_cli.serve.guard import Guard, MediaRefused
from llava_cli.serve.log import log_detail

if TYPE_CHECKING:
    from starlette.responses import Response

MAX_MESSAGES = 4096  # per request: a 2,000-turn chat; trimming to the window costs a few encodes whatever the count
MAX_IMAGES_PER_REQUEST = 16
MAX_CACHE_SALT_CHARS = 256
MAX_CHOICES = 8  # `n`: rows of one request (also within the server's --max-batch)
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_SIDE**2  # decoded pixels of one request's images together (after shrinking)
LOCAL_IMAGE_REFUSED = (
    "the image cannot be used: send it as a data: URL (a path is read only when it lies under the "
    "server's --allowed-local-media-path and is an image)"
)


class ApiError(Exception):
    """A refused request: its HTTP status and the OpenAI-style error it is answered with."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        from starlette.responses import JSONResponse

        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.retry_after_s is not None:
            headers = {"Retry-After": str(self.retry_after_s)}
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
    n: int = 1  # answers asked for: row i samples with seed + i (`row_settings`)
    cache_salt: str = ""  # the request's `cache_salt`: only requests with the same salt (and key) share cached prefixes
    key_id: str = ""  # which of the server's API keys sent it (serve/app.py)

    @property
    def cache_scope(self) -> str:
        return f"{self.key_id}\n{self.cache_salt}"

    def row_settings(self) -> list[Settings]:
        """One `Settings` per answer of `n`: row i samples with `seed + i` (all unseeded without a seed), so
        a seeded request's answers are those of n single requests seeded seed, seed+1, ..."""
        seed = self.settings.seed
        return [
            dataclasses.replace(self.settings, seed=None if seed is None else seed + index) for index in range(self.n)
        ]

    decoded: bool = False  # the images are in their turns (llava serve decodes them before queueing the job)
    on_release: Callable[[], None] = lambda: None  # told when the decoded images are dropped
    pixels: int = 0  # the decoded images' pixels in all (a video has caps of its own, media/video.py)

    def load_images(self, guard: Guard, max_pixels: int, stop: Callable[[], bool]) -> bool:
        """Decode the images in order, within MAX_REQUEST_PIXELS; False if told to stop meanwhile. Once is enough."""
        if self.decoded:
            return True
        pixels = 0
        for pending in self.images:
            if stop():
                return False
            loaded = pending.load(guard, dataclasses.replace(self.settings, max_image_pixels=max_pixels))
            if isinstance(loaded, VideoRef):
                continue  # a video has caps of its own (media/video.py)
            width, height = loaded.image.size
            pixels += width * height
            if pixels > MAX_REQUEST_PIXELS:
                raise ApiError(
                    400,
                    f"the request's images hold more than {MAX_REQUEST_PIXELS:,} pixels in all; send fewer or smaller ones",
                    code="invalid_image",
                    param=pending.where,
                )
        self.decoded, self.pixels = True, pixels
        return True

    def release(self) -> None:
        """Drop the decoded images (the handler keeps the job until its response is sent)."""
        self.images.clear()
        for turn in self.conversation.turns:
            turn.images = []
        self.on_release()


def parse_job(body: Any, served_model: str, base: Settings, aliases: frozenset[str] = frozenset()) -> Job:
    """Validate a chat-completions request; raise `ApiError` naming the first thing wrong with it.
    `model` must be `served_model` or one of its `aliases`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required", param="model")
    if model != served_model and model not in aliases:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {served_model!r}",
            code="model_not_found",
            param="model",
        )
    if refused := refused_field(body):
        raise ApiError(400, refused[1], code="unsupported_parameter", param=refused[0])
    stream_options = optional(body, "stream_options", dict, "an object") or {}
    conversation, images = conversation_from_messages(body.get("messages"), base)
    return Job(
        conversation=conversation,
        images=images,
        settings=dataclasses.replace(
            request_settings(body, base),
            constraint=response_constraint(body),
            stop=request_stops(body),
            logprobs=request_logprobs(body),
        ),
        n=choices_asked(body),
        stream=optional(body, "stream", bool, "true or false") is True,
        include_usage=optional(stream_options, "include_usage", bool, "true or false", "stream_options.") is True,
        cache_salt=cache_salt(body),
    )


def choices_asked(body: dict[str, Any]) -> int:
    """`n`: 1 to MAX_CHOICES answers, each a row of one batch sharing the prompt's prefill."""
    n = optional(body, "n", int, f"an integer from 1 to {MAX_CHOICES}")  # `true` is not 1
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"`n` must be between 1 and {MAX_CHOICES} (got {n})", param="n")
    return 1 if n is None else n


def request_logprobs(body: dict[str, Any]) -> int | None:
    """`logprobs` and `top_logprobs` as `Settings.logprobs`: the alternatives per token, or None (no logprobs)."""
    wanted = optional(body, "logprobs", bool, "true or false")
    top = optional(body, "top_logprobs", int, f"an integer from 0 to {MAX_TOP_LOGPROBS}")
    if top is not None and (fault := LOGPROBS.fault(top)) is not None:
        raise ApiError(400, f"`top_logprobs` {fault}", param="top_logprobs")
    if top and not wanted:
        raise ApiError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    return (top or 0) if wanted else None


def cache_salt(body: dict[str, Any]) -> str:
    salt = optional(body, "cache_salt", str, "a string") or ""
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise ApiError(400, f"`cache_salt` must be at most {MAX_CACHE_SALT_CHARS} characters", param="cache_salt")
    return salt


def optional(body: dict[str, Any], key: str, kind: type, described: str, prefix: str = "") -> Any:
    """`body[key]` when it is absent, null or of type `kind`; else a 400 naming the field."""
    value = body.get(key)
    if value is not None and type(value) is not kind:
        raise ApiError(400, f"`{prefix}{key}` must be {described}", param=prefix + key)
    return value


def response_constraint(body: dict[str, Any]) -> str | None:
    """`response_format` as the answer's schema text (engine/constraints.py); a 400 naming the field if unusable."""
    try:
        return response_format_constraint(body.get("response_format"))
    except UsageError as err:
        raise ApiError(400, str(err), code="invalid_response_format", param="response_format") from None


def request_stops(body: dict[str, Any]) -> tuple[str, ...]:
    """`stop`: a string or up to 4 (engine/stops.py); a 400 naming the field otherwise."""
    try:
        return () if body.get("stop") is None else stop_list(body["stop"], "`stop`")
    except UsageError as err:
        raise ApiError(400, str(err), param="stop") from None


def request_settings(body: dict[str, Any], base: Settings) -> Settings:
    """The server's settings with this request's sampling options applied (validated again)."""
    changes: dict[str, Any] = {}
    for key, option in REQUEST_FIELDS.items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, option.json_kinds):
            raise ApiError(400, f"`{key}` must be {option.json_described}", param=key)
        if (fault := option.fault(option.kind(value))) is not None:
            raise ApiError(400, f"`{key}` {fault}", param=key)  # the API's field, not the CLI's flag
        changes[option.name] = option.kind(value)
    return dataclasses.replace(base, **changes)


def conversation_from_messages(messages: Any, base: Settings) -> tuple[Conversation, list[PendingImage]]:
    """System texts joined; consecutive user messages make one turn; the last message must be the user's.

    The images are checked for form here but decoded later (`Job.load_images`)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(
            400,
            f"a request may hold at most {MAX_MESSAGES:,} messages (this one has {len(messages):,})",
            code="too_many_messages",
            param="messages",
        )
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
                raise ApiError(
                    400,
                    f"a request may hold at most {MAX_IMAGES_PER_REQUEST} images",
                    code="too_many_images",
                    param=where,
                )
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
        raise ApiError(
            400, f"{where}: only user messages can carry images; put the image in a user message", param=where
        )
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
        elif kind in ("image_url", "video_url"):  # video_url: vLLM's part; the bytes decide which it is
            urls.append(image_url(part.get(kind), where))
        else:
            raise ApiError(
                400, f"{where}: unsupported content part {kind!r}; use text, image_url and video_url parts", param=where
            )
    return "\n".join(texts), urls


def image_url(spec: Any, where: str) -> str:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: an image_url part needs a url", code="invalid_image", param=where)
    if url.startswith(("http://", "https://")):
        raise ApiError(
            400,
            f"{where}: images must be data: URLs (or files the server allows), not http(s) URLs",
            code="invalid_image",
            param=where,
        )
    return url


@dataclass
class PendingImage:
    """An image of a request, not decoded until the worker reaches the request."""

    turn: Turn
    url: str
    where: str

    def load(self, guard: Guard, settings: Settings) -> Media:
        """Decode into its turn (an image, or a video by its bytes); `ApiError` if unusable (one message for any local-file problem)."""
        try:
            if self.url.startswith("data:"):
                image = media_from_bytes(decode_data_url(self.url), "the data: URL", settings)
            else:
                image = self.local_file(guard, settings)
        except InputError as err:
            raise ApiError(400, f"{self.where}: {err}", code="invalid_image", param=self.where) from None
        self.turn.images.append(image)
        return image

    def local_file(self, guard: Guard, settings: Settings) -> Media:
        url = self.url
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
        try:
            real, data = guard.local_media(path, MAX_VIDEO_BYTES if is_video_name(path) else MAX_IMAGE_BYTES)
            return dataclasses.replace(media_from_bytes(data, real, settings), path=real)
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
