"""Who and what `llava serve` accepts: the checks made before a request reaches the model.

`ServeOptions` holds the server's network and access options, validated once. `Guard(options)`
then answers, for each request, with a `Refusal` (HTTP status, message, error code) or None:

- Host: the `Host` header must name the server as its clients reach it: `localhost`, an IP
  address (a page cannot make a browser send another site's IP as Host, so IP literals are safe),
  the `--host` it listens on, or a name given with `--allowed-host` (`*` turns the check off).
  This defeats DNS rebinding, where a web page's own name is pointed at 127.0.0.1 (the attack of
  Ollama's CVE-2024-28224; the check follows Ollama's fix).
- Origin: a request carrying a browser `Origin` header (sent by web pages, never by API clients)
  is refused with 403 unless `--allowed-origin` names that origin (or is `*`).
- Content-Type: a POST must say `application/json` (415 otherwise), so a cross-site "simple"
  form or `text/plain` POST, which browsers send without asking, is never parsed.
- Local files: an `image_url` that is a path (or `file://` URL) is read only when
  `--allowed-local-media-path DIR` is given and the path, with every symlink resolved, lies inside
  DIR; `local_media(path, max_bytes)` returns the real path and the bytes, or raises
  `MediaRefused` with one message for every reason (outside DIR, missing, not a file...), so a
  client learns nothing about the server's disk. The file is opened once and where the *opened*
  file lies is what is checked, then read from that same descriptor (safeio's `read_within`):
  swapping a file for a symlink between a check and the read cannot reach outside DIR (CWE-367).

The API key can come from `--api-key-file` (read with safeio's hardened reader; one key a line, so
one server can serve several keys), LLAVA_API_KEY or `--api-key`; the last is visible to every
local user in `ps`, so the help says to prefer the others. `key_id(authorization)` names the key a
request sent (`key-N`, its place in the file: logs and cache scopes never hold a key), or None.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llava_cli.base.errors import UsageError
from llava_cli.base.safeio import read_regular, read_within
from llava_cli.base.settings import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    DEFAULT_MAX_REQUEST_MB,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_TIMEOUT_KEEP_ALIVE_S,
)
from llava_cli.client.discovery import LOOPBACK_NAMES

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
ANY = "*"
LOG_FORMATS = ("text", "json")
MAX_API_KEY_FILE_BYTES = 64 * 1024  # keys, one a line; anything longer is not a key file
MAX_API_KEYS = 1024
# The fix spelled out for curl, whose -d sends a form's Content-Type unless told otherwise.
JSON_ONLY = "the request body must be JSON sent with the header Content-Type: application/json (curl: -H 'Content-Type: application/json')"


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str


@dataclass(frozen=True)
class ServeOptions:
    """`llava serve`'s own options (the model's are in `Settings`), checked when built."""

    host: str
    port: int
    api_keys: tuple[str, ...] = ()  # none: no key needed
    max_request_mb: int = DEFAULT_MAX_REQUEST_MB
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    allowed_local_media_path: str | None = None
    max_batch: int | None = (
        None  # answers decoded at once; None: as many as the device holds (engine/scheduler.py's rows_that_fit)
    )
    keep_alive_s: float | None = None  # --keep-alive: unload the model after this idle time; None: never
    metrics_public: bool = False  # GET /metrics without the API key
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    timeout_keep_alive_s: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    log_format: str = "text"  # or "json": one JSON line per request
    served_model_name: str | None = None  # the model id clients send; None: discovery.served_name(--model)
    media_root: Path | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_request_mb < 1:
            raise UsageError(f"--max-request-mb must be at least 1 (got {self.max_request_mb})")
        if not self.request_timeout_s > 0:
            raise UsageError(f"--request-timeout must be more than 0 seconds (got {self.request_timeout_s:g})")
        if self.max_batch is not None and self.max_batch < 1:
            raise UsageError(f"--max-batch must be at least 1 (got {self.max_batch})")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise UsageError("--served-model-name is empty; give the id clients should send, or leave it out")
        if not self.header_timeout_s > 0:
            raise UsageError(f"--header-timeout must be more than 0 seconds (got {self.header_timeout_s:g})")
        if self.max_connections < 1 or self.max_connections_per_client < 1:
            raise UsageError("--max-connections and --max-connections-per-client must be at least 1")
        if not self.timeout_keep_alive_s > 0:
            raise UsageError(f"--timeout-keep-alive must be more than 0 seconds (got {self.timeout_keep_alive_s:g})")
        if not self.drain_timeout_s >= 0:
            raise UsageError(f"--drain-timeout must be 0 seconds or more (got {self.drain_timeout_s:g})")
        if self.log_format not in LOG_FORMATS:
            raise UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)} (got {self.log_format!r})")
        if any(not key.strip() for key in self.api_keys):
            raise UsageError(
                "the API key is empty; give a key or leave --api-key, --api-key-file and LLAVA_API_KEY out"
            )
        for origin in self.allowed_origins:
            if origin != ANY and ("://" not in origin or origin.endswith("/")):
                raise UsageError(
                    f"--allowed-origin {origin!r} is not an origin; write it as scheme://host[:port], e.g. http://localhost:3000"
                )
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path).expanduser()
            if not root.is_dir():
                raise UsageError(f"--allowed-local-media-path {self.allowed_local_media_path}: not a folder")
            object.__setattr__(self, "media_root", Path(os.path.realpath(root)))


def api_keys_from_file(path: str) -> tuple[str, ...]:
    """The keys in `path`, one a line (surrounding whitespace removed, blank lines skipped); `UsageError` naming the file if unusable."""
    try:
        text = read_regular(Path(path).expanduser(), MAX_API_KEY_FILE_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or "it is not UTF-8 text"
        raise UsageError(f"cannot read the API key from --api-key-file {path}: {reason}") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not keys or len(keys) > MAX_API_KEYS or any(" " in key or "\t" in key for key in keys):
        raise UsageError(f"--api-key-file {path} must hold API keys, one a line (at most {MAX_API_KEYS})")
    return keys


def key_id(keys: tuple[str, ...], authorization: str) -> str | None:
    """`key-N` for the Nth key when `authorization` is `Bearer` that key, else None; every key compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    sent = token.strip().encode()
    found = None
    for place, key in enumerate(keys, 1):
        if hmac.compare_digest(sent, key.encode()) and found is None:
            found = f"key-{place}"
    return found if scheme.lower() == "bearer" else None


class MediaRefused(Exception):
    """A local image path the server will not read; deliberately says nothing about why."""


class Guard:
    """The per-request checks of the module docstring."""

    def __init__(self, options: ServeOptions) -> None:
        self.any_host = ANY in options.allowed_hosts
        names = {options.host, *options.allowed_hosts} - WILDCARD_HOSTS
        self.hosts = frozenset(name.lower().strip("[]") for name in names) | LOOPBACK_NAMES
        self.any_origin = ANY in options.allowed_origins
        self.origins = frozenset(origin.lower() for origin in options.allowed_origins)
        self.media_root = options.media_root

    def refusal(self, method: str, headers: Mapping[str, str]) -> Refusal | None:
        """Why this request is refused before its body is read, or None."""
        if not self.any_host and not self.host_allowed(headers.get("host", "")):
            return Refusal(
                403,
                "this server does not answer to that Host name (llava serve --allowed-host NAME adds one)",
                "host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self.any_origin and origin.lower() not in self.origins:
            return Refusal(
                403,
                "requests from web pages are refused (llava serve --allowed-origin ORIGIN allows one)",
                "origin_not_allowed",
            )
        if method == "POST" and media_type(headers.get("content-type", "")) != "application/json":
            return Refusal(415, JSON_ONLY, "unsupported_media_type")
        return None

    def host_allowed(self, header: str) -> bool:
        host = host_name(header)
        if host in self.hosts:
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    def local_media(self, path: str, max_bytes: int) -> tuple[str, bytes]:
        """(real path, bytes) of a file the client may have read; `MediaRefused` otherwise (see module docstring)."""
        if self.media_root is None:
            raise MediaRefused("reading local files is off (no --allowed-local-media-path)")
        try:
            return read_within(Path(path).expanduser(), self.media_root, max_bytes)
        except (ValueError, RuntimeError):  # a NUL byte, an unencodable character, an unknown ~user
            raise MediaRefused(f"{path!r} is not a valid path") from None
        except OSError as err:  # also a link swapped for a file while it was resolved
            raise MediaRefused(err.strerror or str(err)) from None


def host_name(header: str) -> str:
    """The host of a Host header, without its port or IPv6 brackets, lower-case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else header


def media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()
