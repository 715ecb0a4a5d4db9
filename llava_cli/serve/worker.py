"""`llava serve`'s worker: one engine, one daemon thread, a running batch that requests join and leave.

Contract: `Worker.submit(job)` (on the event loop) queues a `Job` and returns an asyncio queue on
which the job's events arrive: the backend contract's `TextChunk`s (engine/backend.py; with logprobs asked
for, each carries those of its tokens), then exactly one `Done` (the answer's `Stats` and logprobs),
`Unfinished` (stopped before the end) or `Failed` (the `ApiError` the client gets). A job asking for
`n` > 1 answers is prefilled once and decodes as `n` rows (`DecodeBatch.admit_rows`, row i seeded
seed + i): each row's chunks and `Done` come wrapped in a `Choice` with its index; the job ends with
the last `Done`, or with the first `Unfinished`/`Failed` (its other rows are stopped). A job's `n`
rows join the batch together, within `max_batch` (serve/app.py refuses an `n` over it).

The thread is a scheduler (continuous batching, engine/scheduler.py): between two decode steps it admits
waiting jobs, in arrival order, until `max_batch` answers run at once; each job admitted is fitted
to the context window and prefilled alone, then decodes with the others, one token per step, its
text streamed as it comes (a `TextStream` per answer); an answer that ends leaves the batch and a
waiting job takes its place at the next step. Greedy and seeded answers are those of the job alone.
Prefill starts from the longest reusable prefix of the `PrefixPool` (KV caches of recent answers,
least recently used out), so a chat client resending its history pays only for what is new. The
rows and the pool share the engine's `--cache-mb` budget (engine/kvbudget.py): a job the budget has no
room for while rows run (`Full`) waits at the head of the queue until one ends; one that cannot
fit alone fails with its one-line error (400). The worker uses only the engine's and the batch's
public methods (`fit`, `token_budget`, `detokenizer`, `forget_images`; `admit`, `step`, `remove`).

A job's images are decoded only when it is admitted, and dropped once it is prefilled (glibc's
heap trimmed). A client that disconnects (`job.cancelled`) or a server shutting down (`abandon`,
`stop`) stops its job wherever it is: queued, decoding, trimming, or at the next step. A failure
while admitting a job (a bad image, a prompt over the window, out of memory) fails that job only;
a row whose scores go bad (not finite), or that runs out of memory in a step even alone, fails
alone; any other failure of a decode step fails the answers in the batch, and the server goes on.
A daemon thread, so that a job deep in a forward never keeps a stopping server alive.

`--keep-alive` (serve/keepalive.py's `ModelHolder`): idle past it, the thread drops the batch, the pool's
caches and the engine (`unload`); the next job loads the model again first (`load`), and jobs
arriving meanwhile queue. Each job's cache entries are scoped by `job.cache_scope` (engine/prefixpool.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llava_cli.base.errors import LlavaError
from llava_cli.engine.backend import Done, TextChunk
from llava_cli.engine.kvbudget import Full, KvBudget
from llava_cli.engine.local import Engine
from llava_cli.engine.logprobs import TokenLogprob, logprob_hook
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.runner import Stopped
from llava_cli.engine.scheduler import DecodeBatch, Sequence
from llava_cli.engine.stops import StoppedStream, before_stop
from llava_cli.engine.streaming import Stats, TextStream
from llava_cli.serve.guard import Guard
from llava_cli.serve.keepalive import ModelHolder, give_memory_back
from llava_cli.serve.log import log
from llava_cli.serve.request import ApiError, Job, api_error_from

# A request whose decoded images held this many pixels gives the heap glibc keeps back to the system
# after them (malloc_trim); below it a trim (~0.6 ms of the engine's thread) is not worth it.
TRIM_AFTER_PIXELS = 1_000_000
SHUTDOWN_GRACE_S = 3  # answers are stopped at once; this only bounds a client that will not hang up


@dataclass(frozen=True)
class Unfinished:
    """The end of a job stopped before its answer ended (its client left, or the server is shutting down)."""


@dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclass(frozen=True)
class Choice:
    """An item of answer `index` of a job asking for `n` > 1 answers (a job with one sends its items bare)."""

    index: int
    item: TextChunk | Done


Item = TextChunk | Done | Unfinished | Failed | Choice  # what a job sends back: text chunks, then one of the others
Emit = Callable[[Item], None]


@dataclass(eq=False)
class ServedAnswer:
    """A job being answered: where its text goes, its detokenizer, its figures, its row in the batch."""

    job: Job
    emit: Emit
    stream: TextStream | StoppedStream
    stats: Stats
    started: float = field(default_factory=time.perf_counter)
    sequence: Sequence | None = None
    sent: int = 0  # text chunks emitted
    reported: int = 0  # tokens whose logprobs were sent with a chunk

    @property
    def admitted(self) -> Sequence:
        """Its row in the batch; asked for only once it was admitted."""
        if self.sequence is None:
            raise RuntimeError("an answer not admitted yet has no row")
        return self.sequence


class Worker:
    """Runs jobs on one daemon thread, up to `max_batch` at once, admitted in the order they were submitted."""

    def __init__(self, engine: Engine, guard: Guard, max_batch: int, holder: ModelHolder | None = None) -> None:
        self.engine: Engine | None = engine
        self.guard = guard
        self.max_batch = max_batch
        self.budget: KvBudget = engine.budget  # the loaded engine's: the rows and the pool report to it
        self.pool = PrefixPool(self.budget)
        self.batch: DecodeBatch | None = DecodeBatch(engine, self.pool)
        self.holder = holder or ModelHolder(engine)
        self.jobs: queue.SimpleQueue[tuple[Job, Emit] | None] = queue.SimpleQueue()
        self.queued: collections.deque[tuple[Job, Emit]] = collections.deque()  # submitted, not admitted yet
        self.answers: list[ServedAnswer] = []  # admitted, in the batch
        self.waiting: dict[str, Emit] = {}  # job id -> emit, for jobs not finished yet
        self.earlier_prefills = 0  # by the batches of engines unloaded since (--keep-alive)
        self.rows_left: dict[str, int] = {}  # job id -> its rows still running (a request's `n`)
        self.stopping = threading.Event()  # the server is shutting down: stop every answer
        self.thread = threading.Thread(target=self.loop, name="llava-engine", daemon=True)
        self.thread.start()

    @property
    def loaded(self) -> Engine:
        """The engine; asked for only while a model is loaded (jobs are admitted after `load`)."""
        if self.engine is None:
            raise RuntimeError("no model is loaded")
        return self.engine

    @property
    def running(self) -> DecodeBatch:
        """The running batch; it exists while a model is loaded."""
        if self.batch is None:
            raise RuntimeError("no model is loaded")
        return self.batch

    def submit(self, job: Job) -> asyncio.Queue[Item]:
        """Queue `job`; its chunks, then a `Done`, `Unfinished` or `Failed`, arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Item] = asyncio.Queue()

        def emit(item: Item) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is listening
                loop.call_soon_threadsafe(items.put_nowait, item)

        self.waiting[job.id] = emit
        self.jobs.put((job, emit))
        return items

    def loop(self) -> None:
        while self.gather():
            self.drop_stopped()
            if self.queued and self.batch is None and not self.load():
                continue
            while (
                self.queued and len(self.running) + self.queued[0][0].n <= self.max_batch
            ):  # a job's `n` rows join at once
                job, emit = self.queued.popleft()
                try:
                    self.admit(job, emit)
                except Full:  # no room in the budget until a row ends: it waits at the head of the queue
                    self.queued.appendleft((job, emit))
                    break
            if self.answers:
                self.step()

    def gather(self) -> bool:
        """Move submitted jobs to `queued`, waiting for one only when there is nothing to do; False once told to stop."""
        idle = not self.answers and not self.queued
        while True:
            try:
                entry = self.jobs.get(timeout=self.holder.idle_wait_s()) if idle else self.jobs.get_nowait()
            except queue.Empty:
                if not idle:
                    return True
                self.unload()  # idle past --keep-alive
                continue
            if entry is None:
                return False
            self.queued.append(entry)
            idle = False

    def drop_stopped(self) -> None:
        """Stop the jobs whose client left (or all, shutting down): queued ones, and rows of the batch."""
        staying: collections.deque[tuple[Job, Emit]] = collections.deque()
        for job, emit in self.queued:  # each asked once: a client may leave meanwhile
            if self.must_stop(job):
                self.stopped(ServedAnswer(job, emit, TextStream(None), Stats()))
            else:
                staying.append((job, emit))
        self.queued = staying
        for answer in [answer for answer in self.answers if self.must_stop(answer.job)]:
            self.running.remove(answer.admitted)
            self.answers.remove(answer)
            self.stopped(answer)

    def admit(self, job: Job, emit: Emit) -> None:
        """Decode the job's images, fit it to the window, prefill it once and add its `n` rows to the batch;
        `Full` (nothing done; its decoded images kept for its next try) when the budget has no room for
        it until a row ends."""
        answer = ServedAnswer(
            job, emit, self.loaded.detokenizer(job.settings.stop), Stats(load_s=self.loaded.info().load_seconds)
        )
        stop = functools.partial(self.must_stop, job)
        waits = False  # only the job at the head of the queue waits, so at most one job's images are kept
        try:
            if not job.load_images(self.guard, job.settings.max_image_pixels, stop):
                return self.stopped(answer)
            prompt, answer.stats.dropped_turns = self.loaded.fit(job.conversation, job.settings, stop)
            if stop():
                return self.stopped(answer)
            self.pool.use_scope(job.cache_scope)
            sequences = self.running.admit_rows(
                prompt, job.row_settings(), self.loaded.token_budget(prompt, job.settings)
            )
        except Full:
            waits = True
            raise
        except Stopped:
            return self.stopped(answer)
        except Exception as err:
            return self.end(answer, failure(err))
        finally:
            # The preprocessed-image memo pays off within one chat, but a server sees endless images:
            # keep it from growing without bound (the pool keeps the KV caches of recent answers).
            self.loaded.forget_images()
            if job.images and not waits:
                job.release()
                if job.pixels >= TRIM_AFTER_PIXELS:
                    give_memory_back()
        answer.stats.prompt_tokens, answer.stats.cached_tokens = len(prompt.ids), sequences[0].cached_tokens
        answer.stats.ttft_s = time.perf_counter() - answer.started
        self.rows_left[job.id] = len(sequences)
        for index, sequence in enumerate(sequences):
            row = (
                answer
                if index == 0
                else dataclasses.replace(
                    answer, stream=self.loaded.detokenizer(job.settings.stop), stats=dataclasses.replace(answer.stats)
                )
            )
            row.sequence = sequence
            if job.n > 1:
                row.emit = functools.partial(choice_emit, emit, index)
            self.answers.append(row)
            self.send(row)

    def step(self) -> None:
        """One token for every answer in the batch, sent to its client; the answers that ended are finished."""
        try:
            self.running.step()
        except Exception as err:  # the batch has emptied itself: every answer in it failed
            failed, self.answers = self.answers, []
            for answer in failed:
                self.end(answer, failure(err))
            return
        for answer in list(self.answers):
            self.send(answer)

    def send(self, answer: ServedAnswer) -> None:
        """Emit the text of the answer's new tokens (a stream's as they come, with their logprobs when asked
        for; a plain answer's once it has ended: every item wakes the event loop); once it has ended, its figures.
        A plain answer is detokenized once, whole, at its end: per-token detokenizing (two decodes
        a token) cost as much as a decode step of the tiny model for 8 rows."""
        sequence = answer.admitted
        if answer.job.stream:
            for token in sequence.tokens[len(answer.stream.ids) :]:
                if chunk := answer.stream.push(token):
                    answer.emit(TextChunk(chunk, self.unreported(answer)))
                    answer.sent += 1
        if not sequence.ended:
            return
        if sequence.error is not None:  # this row alone went bad; the batch goes on
            self.answers.remove(answer)
            return self.end(answer, failure(sequence.error))
        if answer.job.stream:
            tail, rest = answer.stream.finish(), self.unreported(answer)
        else:  # the whole answer, at once, as a batch answer's text is made (its logprobs travel in `Done`)
            tail, rest = before_stop(self.loaded.decode(sequence.tokens), answer.job.settings.stop), ()
        if rest or tail:  # a stream's last tokens may show no text (a stop held them back)
            answer.emit(TextChunk(tail, rest))
        self.answers.remove(answer)
        self.end(answer, Done(self.figures(answer), sequence.logprobs or ()))

    def unreported(self, answer: ServedAnswer) -> tuple[TokenLogprob, ...]:
        """The logprobs of the tokens pushed so far and not yet sent (none unless asked for)."""
        recorded = logprob_hook(answer.admitted.sampler.hooks)
        if recorded is None:
            return ()
        new = recorded.tokens[answer.reported : len(answer.stream.ids)]
        answer.reported += len(new)
        return tuple(new)

    def figures(self, answer: ServedAnswer) -> Stats:
        sequence = answer.admitted
        answer.stats.end(
            len(sequence.tokens),
            sequence.finish_reason,
            time.perf_counter() - answer.started,
            self.loaded.peak_memory_mb(),
        )
        return answer.stats

    def end(self, answer: ServedAnswer, item: Done | Unfinished | Failed) -> None:
        """The end of one of the job's rows; a failure ends the whole job (its other rows are stopped)."""
        job = answer.job
        left = self.rows_left.get(job.id, 1) - 1
        if isinstance(item, Done) and left > 0:
            self.rows_left[job.id] = left
            return answer.emit(item)
        self.rows_left.pop(job.id, None)
        self.waiting.pop(job.id, None)
        if job.n > 1 and not isinstance(item, Done):
            job.cancelled.set()  # one answer failed: the request fails, and its other rows stop
        answer.emit(item)

    def stopped(self, answer: ServedAnswer) -> None:
        reason = "the server is shutting down" if self.stopping.is_set() else "the client disconnected"
        log(f"stopped an answer after {answer.sent} chunk(s): {reason}")
        self.end(answer, Unfinished())

    @property
    def prefills(self) -> int:
        """Prompts prefilled since the server started (`/metrics`)."""
        return self.earlier_prefills + (self.batch.prefills if self.batch is not None else 0)

    def unload(self) -> None:
        self.earlier_prefills = self.prefills
        self.pool.clear()
        self.engine = self.batch = None
        self.holder.unload()

    def load(self) -> bool:
        """Load the model again for the queued jobs; False (and every queued job failed) if it cannot be."""
        try:
            self.engine = self.holder.load()
        except Exception as err:
            for job, emit in self.queued:
                emit(Failed(ApiError(503, f"the model could not be loaded again: {err}", kind="server_error")))
                self.waiting.pop(job.id, None)
            self.queued.clear()
            return False
        self.budget = self.engine.budget
        self.pool = PrefixPool(self.budget)  # emptied when unloaded; its entries count in the new engine's budget
        self.batch = DecodeBatch(self.engine, self.pool)
        return True

    def must_stop(self, job: Job) -> bool:
        return job.cancelled.is_set() or self.stopping.is_set()

    def abandon(self) -> None:
        """On a signal: stop every answer and tell every waiting request at once (not when the engine gets to it)."""
        self.stopping.set()
        for emit in list(self.waiting.values()):
            emit(Unfinished())

    def stop(self) -> bool:
        """Stop, waiting SHUTDOWN_GRACE_S at most for the step in hand; True if the thread ended."""
        self.abandon()
        self.jobs.put(None)
        self.thread.join(SHUTDOWN_GRACE_S)
        return not self.thread.is_alive()


def choice_emit(emit: Emit, index: int, item: Item) -> None:
    """`emit` for answer `index` of a job with `n` > 1: its chunks and `Done` marked with the index; its end as is."""
    emit(Choice(index, item) if isinstance(item, (TextChunk, Done)) else item)


def failure(err: Exception) -> Failed:
    """What a client is told of an error while answering it."""
    if isinstance(err, ApiError):
        return Failed(err)
    if isinstance(err, LlavaError):
        return Failed(api_error_from(err))
    log(f"generation failed: {type(err).__name__}: {err}")  # a bug or a broken model: report it, keep serving
    return Failed(ApiError(500, f"generation failed: {type(err).__name__}", kind="server_error"))
