"""`llava serve`'s access log and request ids: an ASGI middleware around the app.

Contract: `AccessLog(app, metrics, json_lines, endpoints)` gives every HTTP request an id (the client's
`X-Request-Id` when it is 1 to 128 characters of letters, digits and `._:-`, else a new one),
echoes it in the response's `X-Request-Id`, counts the request in `metrics` (by endpoint, one of
`endpoints` or `other`, and status, with its time), and writes one line when the response has ended (streams included):

- `json_lines`: a JSON object per request on stderr, always: `time` (UTC, ISO 8601),
  `request_id`, `client`, `method`, `path`, `status`, `key_id`, `prompt_tokens`,
  `cached_tokens`, `completion_tokens`, `ttft_s`, `seconds`;
- else, with --verbose only (as uvicorn's access log was), the same as one human-readable line.

Handlers add what they know (`key_id`, the answer's tokens) with `note(scope, **fields)`. The key
id names a key (`key-N`), never the key. Paths are the client's: JSON-escaped in both formats.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from llava_cli.serve.log import log_detail
from llava_cli.serve.metrics import Metrics

RECORD = "llava.access"  # the ASGI scope key of a request's log record
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def note(scope: dict[str, Any], **fields: Any) -> None:
    """Add `fields` to the request's access-log record."""
    scope.setdefault(RECORD, {}).update(fields)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class AccessLog:
    def __init__(self, app: Any, metrics: Metrics, json_lines: bool, endpoints: frozenset[str]) -> None:
        self.app = app
        self.endpoints = endpoints  # paths counted by name; others as `other`, so labels stay few
        self.metrics = metrics
        self.json_lines = json_lines

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        record = scope[RECORD] = {"request_id": request_id(scope.get("headers", [])), "status": 500}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", record["request_id"].encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            path = scope.get("path", "")
            self.metrics.request(path if path in self.endpoints else "other", record["status"], seconds)
            self.write(scope, record, seconds)

    def write(self, scope: dict[str, Any], record: dict[str, Any], seconds: float) -> None:
        client = scope.get("client")
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": record["request_id"],
            "client": client[0] if client else None,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": record["status"],
            "key_id": record.get("key_id"),
            "prompt_tokens": record.get("prompt_tokens"),
            "cached_tokens": record.get("cached_tokens"),
            "completion_tokens": record.get("completion_tokens"),
            "ttft_s": record.get("ttft_s"),
            "seconds": round(seconds, 4),
        }
        if self.json_lines:
            print(json.dumps(line), file=sys.stderr, flush=True)
            return
        tokens = (
            f" {line['prompt_tokens']}+{line['completion_tokens']} tokens" if line["prompt_tokens"] is not None else ""
        )
        log_detail(
            f"{line['client']} {line['method']} {json.dumps(line['path'])} {line['status']}{tokens} "
            f"{seconds:.3f}s key={line['key_id'] or '-'} id={line['request_id']}"
        )
