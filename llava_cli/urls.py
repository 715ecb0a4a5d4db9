"""Images named by http(s):// URL: fetched with a time limit and a size limit, or a one-line error.

`open_image(name)` fetches a URL or reads a file. `fetch_image_url(url, max_pixels)` returns an
`ImageRef` like `images.load_image` does, and raises `InputError` for anything that goes wrong: an
HTTP error status, a server that does not answer in time, a body larger than the limit, a
redirect to anything but http(s), a video (by the URL's extension, before any download), or data
that is not an image. The body is read in chunks and
abandoned as soon as it passes the limit, so a huge or endless response costs at most the limit.
User names and passwords in a URL are never shown in messages."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from llava_cli import __version__
from llava_cli.errors import InputError
from llava_cli.images import MAX_IMAGE_BYTES, ImageRef, image_from_bytes, load_image, refuse_video
from llava_cli.options import DEFAULT_MAX_IMAGE_PIXELS

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
    opener = urllib.request.build_opener(HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": f"llava-cli/{__version__}"})
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise too_large(url, max_bytes)
            return read_limited(response, url, timeout, max_bytes)
    except urllib.error.HTTPError as err:
        raise InputError(f"cannot fetch {redacted(url)}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise timed_out(url, timeout) from None
        raise InputError(f"cannot fetch {redacted(url)}: {err.reason}") from None
    except (TimeoutError, socket.timeout):
        raise timed_out(url, timeout) from None
    except (OSError, ValueError) as err:  # connection reset mid-body, malformed URL
        raise InputError(f"cannot fetch {redacted(url)}: {err}") from None


def read_limited(response: Any, url: str, timeout: float, max_bytes: int) -> bytes:
    """Read the body in chunks, giving up past `max_bytes` or after `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    while chunk := response.read(CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise too_large(url, max_bytes)
        if time.monotonic() > deadline:
            raise timed_out(url, timeout)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(url: str, max_bytes: int) -> InputError:
    return InputError(f"{redacted(url)} is larger than {max_bytes:,} bytes; is it really an image?")


def timed_out(url: str, timeout: float) -> InputError:
    return InputError(f"cannot fetch {redacted(url)}: no complete answer within {timeout:g} s")
