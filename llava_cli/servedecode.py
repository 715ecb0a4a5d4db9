"""`llava serve`'s images, decoded before their request is queued, off the engine's worker thread.

Contract: `await DecodeAhead(guard).decode(job)` decodes the job's images into its turns (in a
thread, which waits on a decoder process: decodepool.py) and marks the job decoded, so the worker
only prefills it; it raises the `ApiError` of the first bad image. It returns a `release` function,
also set as the job's `on_release`: the worker calls it once the images are prefilled and dropped,
the request handler when the request ends (whichever comes first counts; later calls do nothing).

Why here: decoding on the worker stalled every running answer for as long as one image took (a
20,000-scan JPEG held a concurrent "hi" for 60 s). Decoding in the handlers instead lets the
answers go on; the byte-level limits and the decode budget bound each decode. Memory stays
bounded too: at most DECODED_AHEAD requests hold decoded images not yet prefilled (each within
apirequest's MAX_REQUEST_PIXELS); the next image request waits for a slot, text-only ones do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from llava_cli.apirequest import Job
from llava_cli.serveguard import Guard

DECODED_AHEAD = 2  # the request being prefilled and the next one: the worker prefills one at a time


class DecodeAhead:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.slots: asyncio.Semaphore | None = None  # made on the event loop

    async def decode(self, job: Job) -> Callable[[], None]:
        """Decode `job`'s images within a slot; the slot's release function (see the module docstring)."""
        from starlette.concurrency import run_in_threadpool

        if not job.images:
            return lambda: None
        if self.slots is None:
            self.slots = asyncio.Semaphore(DECODED_AHEAD)
        await self.slots.acquire()
        release = job.on_release = once(self.slots.release, asyncio.get_running_loop())
        try:
            await run_in_threadpool(job.load_images, self.guard, job.settings.max_image_pixels, job.cancelled.is_set)
        except BaseException:
            release()
            raise
        return release


def once(action: Callable[[], None], loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """`action` run on `loop` the first time the returned function is called, from any thread."""
    lock, done = threading.Lock(), []

    def run() -> None:
        with lock:
            if done:
                return
            done.append(True)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for the slot
            loop.call_soon_threadsafe(action)

    return run
