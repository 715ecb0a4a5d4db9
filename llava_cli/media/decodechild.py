"""The helper process of media/decodepool.py: decodes the images it is sent, one at a time, until its stdin closes.

Run as `python -m llava_cli.media.decodechild`; speaks media/decodepool.py's framing on stdin/stdout and
writes nothing else there (file descriptor 1 is pointed at stderr, so a library that prints
cannot corrupt a reply). Each image goes through `images.decode`: the same checks and the same
pixels as decoding in llava-cli itself.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import BinaryIO

from llava_cli.base.errors import InputError
from llava_cli.media.decodepool import MESSAGE, REQUEST, SIZE
from llava_cli.media.images import decode


def read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size) if size else b""
    return data if len(data) == size else None


def reply(data: bytes, name: str, max_pixels: int) -> bytes:
    try:
        image = decode(data, name, max_pixels)
    except InputError as err:
        message = str(err).encode("utf-8")
        return b"E" + MESSAGE.pack(len(message)) + message
    return b"K" + SIZE.pack(*image.size) + image.tobytes()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while (header := read_exact(requests, REQUEST.size)) is not None:
        max_pixels, size, name_size = REQUEST.unpack(header)
        name, data = read_exact(requests, name_size), read_exact(requests, size)
        if name is None or data is None:
            return
        replies.write(reply(data, name.decode("utf-8", "replace"), max_pixels))
        replies.flush()


if __name__ == "__main__":
    main()
