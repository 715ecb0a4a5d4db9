"""SIGTERM turned into an exception, so the front-ends stop the way they stop for Ctrl-C.

`sigterm_raises(exception)` installs, for the length of a `with` block and only in the main thread
(the only one that may), a SIGTERM handler raising `exception`: `finally` blocks and `except
BaseException` clean-ups run (a save in progress removes its temp file), the caller decides the
exit. `Terminated` is what `llava chat` raises: not a `KeyboardInterrupt`, which a terminal chat
takes as "stop this answer and go on".

`handlers_kept(*signals)` is the one place handlers are put back: whatever a `with` block installs
for `signals` (ours, uvicorn's, `ray.init`'s) is replaced by what was there before, on leaving it.
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
def handlers_kept(*signals: signal.Signals) -> Iterator[None]:
    """The handlers of `signals` as they are now, put back when the block ends (main thread only)."""
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                if handler is not None:  # None: installed outside Python, nothing to put back
                    signal.signal(sig, handler)


@contextmanager
def sigterm_raises(exception: type[BaseException]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise exception

    with handlers_kept(signal.SIGTERM):
        signal.signal(signal.SIGTERM, handler)
        yield
