"""Decoding images in helper processes, each decode within a time budget.

Contract: `decode_elsewhere(data, name, max_pixels, budget_s)` returns the RGB `PIL.Image` that
`images.decode` makes of `data`, or raises `InputError` (the decoder's own one-line refusal, a
decode that ran past `budget_s` seconds, or a decoder that crashed). The work runs in a helper
process (`python -m llava_cli.media.decodechild`), started on first use and kept for the next image.

Why a process: a decoder stuck in C (a pathological file no byte-level check foresaw) cannot be
stopped from another thread - Python can only stop waiting for it, and the thread would go on
burning a core and holding its memory. A process can be killed: at the budget the helper gets
SIGKILL, the caller gets a one-line error, and the next image starts a fresh helper. A helper
also crashes alone (a decoder bug or the kernel's OOM killer takes it, not llava-cli).

The exchange is a fixed binary framing, never pickle, so a helper subverted by hostile bytes can
send back only pixels or a message: request `>QQI` (max_pixels, data size, name size), name, data;
reply `K` `>II` (width, height) and the RGB bytes, or `E` `>I` (size) and the UTF-8 message.
Several threads may decode at once: each takes an idle helper or starts one; at most IDLE_HELPERS
are kept. A helper ignores SIGINT (Ctrl-C at a terminal reaches the whole process group; the
parent decides what stops) and ends when its stdin closes, so it never outlives llava-cli.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from llava_cli.base.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

REQUEST = struct.Struct(">QQI")
SIZE = struct.Struct(">II")
MESSAGE = struct.Struct(">I")
IDLE_HELPERS = 2
READ_CHUNK = 1 << 20


class DecoderGone(Exception):
    """The helper ended (crashed, or was killed) without a reply."""


class Helper:
    """One helper process and its pipes."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llava_cli.media.decodechild"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):  # closing flushes what the dead helper will never read
                pipe.close()

    def decode(self, data: bytes, name: str, max_pixels: int, deadline: float) -> Image.Image:
        from PIL import Image

        encoded_name = name.encode("utf-8", "replace")
        try:
            self.process.stdin.write(REQUEST.pack(max_pixels, len(data), len(encoded_name)) + encoded_name)
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise DecoderGone from None
        status = self.read(1, deadline)
        if status == b"E":
            (size,) = MESSAGE.unpack(self.read(MESSAGE.size, deadline))
            raise InputError(self.read(size, deadline).decode("utf-8", "replace"))
        width, height = SIZE.unpack(self.read(SIZE.size, deadline))
        return Image.frombytes("RGB", (width, height), self.read(width * height * 3, deadline))

    def read(self, size: int, deadline: float) -> bytes:
        """Exactly `size` bytes of the reply; TimeoutError at the deadline, DecoderGone if the helper ended."""
        fd = self.process.stdout.fileno()
        data = bytearray()
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size - len(data), READ_CHUNK))
            if not chunk:
                raise DecoderGone
            data += chunk
        return bytes(data)


class DecoderPool:
    """Idle helpers, handed to one decode at a time."""

    def __init__(self) -> None:
        self.idle: list[Helper] = []
        self.lock = threading.Lock()

    def take(self) -> Helper:
        with self.lock:
            while self.idle:
                helper = self.idle.pop()
                if helper.alive():
                    return helper
        return Helper()

    def give_back(self, helper: Helper) -> None:
        with self.lock:
            if len(self.idle) < IDLE_HELPERS:
                self.idle.append(helper)
                return
        helper.kill()


POOL = DecoderPool()


def decode_elsewhere(data: bytes, name: str, max_pixels: int, budget_s: float) -> Image.Image:
    """`images.decode(data, name, max_pixels)` in a helper process, abandoned (killed) after `budget_s` seconds."""
    deadline = time.monotonic() + budget_s
    helper = POOL.take()
    try:
        image = helper.decode(data, name, max_pixels, deadline)
    except InputError:
        POOL.give_back(helper)
        raise
    except TimeoutError:
        helper.kill()
        raise InputError(
            f"{name} took more than {budget_s:g} s to decode and was abandoned; re-save it (e.g. as PNG or a baseline JPEG)"
        ) from None
    except (DecoderGone, OSError):
        helper.kill()
        raise InputError(
            f"{name} could not be decoded: the decoder stopped (out of memory or a decoder bug); re-save it"
        ) from None
    except BaseException:  # Ctrl-C while waiting: the helper is mid-reply, of no further use
        helper.kill()
        raise
    POOL.give_back(helper)
    return image
