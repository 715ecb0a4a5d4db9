"""`llava serve`'s images, decoded before their request is queued, off the engine's worker thread.

Contract: `await DecodeAhead(guard).decode(job)` decodes the job's images into its turns (in a
thread, which waits on a decoder process: media/decodepool.py) and marks the job decoded, so the worker
only prefills it; it raises the `ApiError` of the first bad image. It returns a `release` function,
also set as the job's `on_release`: the worker calls it once the images are prefilled and dropped,
the request handler when the request ends (whichever comes first counts; later calls do nothing).

Why here: decoding on the worker stalled every running answer for as long as one image took (a
20,000-scan JPEG held a concurrent "hi" for 60 s). Decoding in the handlers instead lets the
answers go on; the byte-level limits and the decode budget bound each decode. Memory stays
bounded too: at most DECODERS decodes run at once, and a decode starts only while the decoded
images waiting for the worker (not yet prefilled) hold fewer than WAITING_PIXELS pixels; so at
most WAITING_PIXELS plus DECODERS requests' worth (each within apirequest's MAX_REQUEST_PIXELS)
are held, about 1.2 GB at worst, while requests of ordinary pictures never wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from llava_cli.serve.guard import Guard
from llava_cli.serve.request import MAX_REQUEST_PIXELS, Job

DECODERS = 2  # decodes at once: each is one thread waiting on one helper process
WAITING_PIXELS = 4 * MAX_REQUEST_PIXELS  # decoded and waiting for the worker, beyond which decoding pauses


class DecodeAhead:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.waiting_pixels = 0  # changed on the event loop only
        self.decoders: asyncio.Semaphore | None = None  # made on the event loop
        self.room = asyncio.Event()

    async def decode(self, job: Job) -> Callable[[], None]:
        """Decode `job`'s images (see the module docstring); the function that gives their room back."""
        from starlette.concurrency import run_in_threadpool

        if not job.images:
            return lambda: None
        if self.decoders is None:
            self.decoders = asyncio.Semaphore(DECODERS)
        while self.waiting_pixels >= WAITING_PIXELS:
            self.room.clear()
            await self.room.wait()
        async with self.decoders:
            await run_in_threadpool(job.load_images, self.guard, job.settings.max_image_pixels, job.cancelled.is_set)
        pixels = job.pixels
        self.waiting_pixels += pixels
        release = job.on_release = once(lambda: self.give_back(pixels), asyncio.get_running_loop())
        return release

    def give_back(self, pixels: int) -> None:
        self.waiting_pixels -= pixels
        self.room.set()


def once(action: Callable[[], None], loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """`action` run on `loop` the first time the returned function is called, from any thread."""
    lock, done = threading.Lock(), []

    def run() -> None:
        with lock:
            if done:
                return
            done.append(True)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for the room
            loop.call_soon_threadsafe(action)

    return run
