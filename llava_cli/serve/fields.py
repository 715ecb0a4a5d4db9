"""Which chat-completions request fields `llava serve` reads, and the first one it must refuse.

Contract: `refused_field(body)` returns `(param, message)` for the first field of a request body
(a dict) that the server does not honour, else None; serve/request.py answers it with a 400 naming
the field. No field is ever silently ignored:

- READ: fields serve/request.py reads and checks itself (`model`, `messages`, `n`, `stream`,
  `stream_options`, `response_format`, `stop`, `cache_salt`, `logprobs`, `top_logprobs`), plus the option table's request fields (base/options.py `REQUEST_FIELDS`).
- HARMLESS: fields that ask for nothing of the answer (`user`, an end-user id for the client's
  own records).
- OFF_VALUES: OpenAI fields accepted only at the value that asks for nothing (`presence_penalty: 0`...). Anything else of theirs, and every field not named here (`tools`,
  `tool_choice`, `functions`, `audio`, `modalities`, typos), is refused.

A null value is the same as leaving the field out. `stream_options` may hold `include_usage` only.
This module is a leaf: it imports only base/options.py.
"""

from __future__ import annotations

import json
from typing import Any

from llava_cli.base.options import REQUEST_FIELDS

READ = frozenset(
    {
        "model",
        "messages",
        "n",
        "stream",
        "stream_options",
        "response_format",
        "stop",
        "cache_salt",
        "logprobs",
        "top_logprobs",
        *REQUEST_FIELDS,
    }
)
HARMLESS = frozenset({"user"})
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "parallel_tool_calls": (True, False),  # says how tools may be called; no tools are accepted anyway
    "store": (False,),
}
STREAM_OPTIONS = frozenset({"include_usage"})


def refused_field(body: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) for the first field this server does not honour, else None."""
    for key, value in body.items():
        if value is None or key in READ or key in HARMLESS or off(key, value):
            continue
        if key in OFF_VALUES:
            return key, f"`{key}` is not supported by this server (only {describe(OFF_VALUES[key])})"
        return key, f"`{key}` is not supported by this server; see README (llava serve) for the fields it reads"
    options = body.get("stream_options")
    for key in options if isinstance(options, dict) else ():
        if key not in STREAM_OPTIONS:
            return (
                f"stream_options.{key}",
                f"`stream_options.{key}` is not supported by this server (only include_usage)",
            )
    return None


def off(key: str, value: Any) -> bool:
    """Whether `value` is the value of `key` that asks for nothing (`true` is not 1)."""
    return any(type(value) is type(allowed) and value == allowed for allowed in OFF_VALUES.get(key, ()))


def describe(values: tuple[Any, ...]) -> str:
    return " or ".join(json.dumps(value) for value in values)
