"""`llava serve`'s worker: one engine, one daemon thread, jobs answered one at a time in arrival order.

Contract: `Worker.submit(job)` (on the event loop) queues a `Job` and returns an asyncio queue on
which the job's text chunks arrive, then exactly one `Finished` (the answer's `Stats`, or None when
it was stopped before the end) or `Failed` (the `ApiError` the client gets). Jobs never share the
engine's cache mid-answer. A job's images are decoded only when its turn comes and dropped
afterwards (glibc's heap trimmed). A client that disconnects (`job.cancelled`) or a server shutting
down (`abandon`, `stop`) stops its job wherever it is: queued, decoding, trimming or answering.
A daemon thread, so that a job deep in a forward never keeps a stopping server alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from llava_cli.apirequest import ApiError, Job, api_error_from
from llava_cli.backend import Done
from llava_cli.engine import Engine
from llava_cli.errors import LlavaError
from llava_cli.serveguard import Guard
from llava_cli.servelog import log
from llava_cli.streaming import Stats

SHUTDOWN_GRACE_S = 3  # answers are stopped at once; this only bounds a client that will not hang up


@dataclass
class Finished:
    """The end of a job: the answer's figures, or None when it was stopped before the end."""

    stats: Stats | None


@dataclass
class Failed:
    error: ApiError


Item = str | Finished | Failed  # what a job sends back: text chunks, then Finished or Failed


class Worker:
    """Runs jobs on one daemon thread, one at a time, in the order they were submitted.

    A daemon thread, so that a job deep in a forward never keeps a stopping server alive."""

    def __init__(self, engine: Engine, guard: Guard) -> None:
        self.engine = engine
        self.guard = guard
        self.jobs: queue.SimpleQueue[tuple[Job, Callable[[Item], None]] | None] = queue.SimpleQueue()
        self.waiting: dict[str, Callable[[Item], None]] = {}  # job id -> emit, for jobs not finished yet
        self.stopping = threading.Event()  # the server is shutting down: stop every answer
        self.thread = threading.Thread(target=self.loop, name="llava-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> asyncio.Queue[Item]:
        """Queue `job`; its chunks, then a `Finished` or `Failed`, arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Item] = asyncio.Queue()

        def emit(item: Item) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is listening
                loop.call_soon_threadsafe(items.put_nowait, item)

        self.waiting[job.id] = emit
        self.jobs.put((job, emit))
        return items

    def loop(self) -> None:
        while (entry := self.jobs.get()) is not None:
            self.run(*entry)

    def run(self, job: Job, emit: Callable[[Item], None]) -> None:
        try:
            emit(self.generate(job, emit))
        except ApiError as err:
            emit(Failed(err))
        except LlavaError as err:
            emit(Failed(api_error_from(err)))
        except Exception as err:  # a bug or a broken model: report it, keep serving
            log(f"generation failed: {type(err).__name__}: {err}")
            emit(Failed(ApiError(500, f"generation failed: {type(err).__name__}", kind="server_error")))
        finally:
            self.waiting.pop(job.id, None)
            # The preprocessed-image memo pays off within one chat, but a server sees endless
            # images: keep it from growing without bound (the KV cache of the chat stays).
            self.engine.vision.clear()
            if job.images:
                job.release()
                give_memory_back()

    def generate(self, job: Job, emit: Callable[[Item], None]) -> Finished:
        stop = functools.partial(self.must_stop, job)
        if not job.load_images(self.guard, job.settings.max_image_pixels, stop):
            return self.stopped(0, job)
        sent = 0
        with contextlib.closing(self.engine.generate(job.conversation, job.settings, stop)) as events:
            for event in events:
                if stop():
                    break
                if isinstance(event, Done):
                    return Finished(event.stats)
                emit(event.text)
                sent += 1
        return self.stopped(sent, job)  # the engine ends without `Done` only when told to stop

    def stopped(self, sent: int, job: Job) -> Finished:
        reason = "the server is shutting down" if self.stopping.is_set() else "the client disconnected"
        log(f"stopped an answer after {sent} chunk(s): {reason}")
        return Finished(None)

    def must_stop(self, job: Job) -> bool:
        return job.cancelled.is_set() or self.stopping.is_set()

    def abandon(self) -> None:
        """On a signal: stop every answer and tell every waiting request at once (not when the engine gets to it)."""
        self.stopping.set()
        for emit in list(self.waiting.values()):
            emit(Finished(None))

    def stop(self) -> bool:
        """Stop, waiting SHUTDOWN_GRACE_S at most for the job in hand; True if the thread ended."""
        self.abandon()
        self.jobs.put(None)
        self.thread.join(SHUTDOWN_GRACE_S)
        return not self.thread.is_alive()


def give_memory_back() -> None:
    """After big images, hand glibc's freed-but-kept heap back to the system (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)

