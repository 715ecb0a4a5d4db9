"""Images named by http(s):// URL: fetched with a time limit and a size limit, or a one-line error.

`open_image(name)` fetches a URL or reads a file. `fetch_image_url(url, max_pixels)` returns an
`ImageRef` like `images.load_image` does, and raises `InputError` for anything that goes wrong: an
HTTP error status, a server that does not answer in time, a body larger than the limit, a
redirect to anything but http(s), a video (by the URL's extension, before any download), or data
that is not an image. The body is read in chunks and
abandoned as soon as it passes the limit, so a huge or endless response costs at most the limit.
The time limit holds for the whole fetch - connecting, TLS, headers, redirects and body - however
slowly the server drips its bytes (`Deadline`: the sockets are shut when the time is up).
User names and passwords in a URL are never shown in messages."""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from llava_cli import __version__
from llava_cli.base.deadline import Deadline
from llava_cli.base.errors import InputError, one_line
from llava_cli.base.options import DEFAULT_MAX_IMAGE_PIXELS
from llava_cli.media.images import MAX_IMAGE_BYTES, ImageRef, image_from_bytes, load_image, refuse_video

URL_SCHEMES = ("http", "https")
URL_TIMEOUT_S = 30.0  # for the whole download, not just each read
CHUNK_BYTES = 1 << 16


def is_url(name: str) -> bool:
    return name.lower().startswith(tuple(f"{scheme}://" for scheme in URL_SCHEMES))


def redacted(url: str) -> str:
    """The URL without any user:password@ part, for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): never to ftp:// or file://."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not is_url(newurl):
            raise InputError(f"{redacted(req.full_url)} redirects to {redacted(newurl)}, which is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_image(name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageRef:
    """The image a user named: an http(s) URL is fetched, anything else is read as a file."""
    return fetch_image_url(name, max_pixels) if is_url(name) else load_image(name, max_pixels)


def fetch_image_url(
    url: str,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    timeout: float = URL_TIMEOUT_S,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> ImageRef:
    """Download and decode the image at `url`; `ImageRef.name` is the URL as given."""
    refuse_video(redacted(url), urllib.parse.urlsplit(url).path)
    return image_from_bytes(download(url, timeout, max_bytes), redacted(url), max_pixels)


def download(url: str, timeout: float, max_bytes: int) -> bytes:
    deadline = Deadline(timeout)
    opener = urllib.request.build_opener(
        HttpOnlyRedirects, deadline.handler(urllib.request.HTTPHandler), deadline.handler(urllib.request.HTTPSHandler)
    )
    request = urllib.request.Request(url, headers={"User-Agent": f"llava-cli/{__version__}"})
    try:
        with deadline, opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise too_large(url, max_bytes)
            body = read_limited(response, url, max_bytes)
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError and TLS errors are OSErrors
        if deadline.passed():  # the sockets were shut under a read: whatever it raised, the cause is the clock
            raise timed_out(url, timeout) from None
        raise fetch_failed(url, err, timeout) from None
    if deadline.passed():  # a shut socket may also read as the end of the body
        raise timed_out(url, timeout)
    return body


def fetch_failed(url: str, err: Exception, timeout: float) -> InputError:
    if isinstance(err, urllib.error.HTTPError):
        return InputError(f"cannot fetch {redacted(url)}: HTTP {err.code} {err.reason}")
    if isinstance(err, urllib.error.URLError):
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            return timed_out(url, timeout)
        return InputError(f"cannot fetch {redacted(url)}: {err.reason}")
    if isinstance(err, (TimeoutError, socket.timeout)):
        return timed_out(url, timeout)
    return InputError(f"cannot fetch {redacted(url)}: {one_line(err)}")  # reset mid-body, malformed URL or answer


def read_limited(response: Any, url: str, max_bytes: int) -> bytes:
    """Read the body in chunks, giving up past `max_bytes` (the `Deadline` bounds the time)."""
    chunks, size = [], 0
    while chunk := response.read(CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise too_large(url, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(url: str, max_bytes: int) -> InputError:
    return InputError(f"{redacted(url)} is larger than {max_bytes:,} bytes; is it really an image?")


def timed_out(url: str, timeout: float) -> InputError:
    return InputError(f"cannot fetch {redacted(url)}: no complete answer within {timeout:g} s")
