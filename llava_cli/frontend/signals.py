"""SIGTERM turned into an exception, so the front-ends stop the way they stop for Ctrl-C.

`sigterm_raises(exception)` installs, for the length of a `with` block and only in the main thread
(the only one that may), a SIGTERM handler raising `exception`: `finally` blocks and `except
BaseException` clean-ups run (a save in progress removes its temp file), the caller decides the
exit. `Terminated` is what `llava chat` raises: not a `KeyboardInterrupt`, which a terminal chat
takes as "stop this answer and go on".
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(BaseException):
    """SIGTERM arrived: stop, keep what is saved, exit cleanly."""


@contextmanager
def sigterm_raises(exception: type[BaseException]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise exception

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
