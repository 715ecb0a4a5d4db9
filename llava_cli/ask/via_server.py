"""`llava ask --each` / `--from-file` through a server: up to N requests at once, one record per image.

`server_records(remote, names, prompt, settings, parallel, stdin_image)` is the sibling of ask/each.py's
`local_records`: it yields one record per name (frontend/records.py's keys), in INPUT order, while up to
`parallel` requests run at once against any OpenAI-compatible chat-completions server (`llava
serve`, vLLM, llama.cpp, Ollama) through client/remote.py's `RemoteEngine`. Answers that finish early wait
in memory for the slower ones before them; at most `parallel * LOOKAHEAD` images are sent ahead of
the oldest one not yet written, so what waits stays small whatever the number of images.

Each image is read and checked here, by the same readers as a local `--each` (a file, an http(s)
URL or stdin: frontend/arguments.py's `image_argument`), and sent as a lossless PNG `data:` URL, so that a
`llava serve` sees the pixels the local model would and gives the same answer. A record's
`prompt_tokens`, `completion_tokens` and `finish_reason` are what the server's usage and choice
say (null when it does not say), `seconds` the time of the request that answered.

Per image:
- an image that cannot be read becomes its error record at once (the local message);
- a request that fails with `ServerUnavailable` (connection refused or reset, HTTP 429, 502, 503,
  504) is tried again, at most MAX_ATTEMPTS times in all, waiting FIRST_BACKOFF_S, then twice as
  long each time up to MAX_BACKOFF_S (the server's Retry-After instead, when it sends one, up to
  the same cap): 0.5 + 1 + 2 + 4 + 8 = 15.5 s at most before giving up on an image;
- any other refusal (400, 413, a context window too small...) becomes the image's error record at
  once, `IMAGE: message`.
Errors that are not about one image stop the run at that image, every earlier line written: a
refused API key (401/403: `UsageError`) or a model the server does not serve (404: `ModelError`),
exit 2. And once an image has used up its attempts the server is taken as gone: no new request is
sent, those in flight finish (their records written, errors included), then the run stops with
one line saying how many images were not sent (exit 1); a rerun with the same `-o` finishes them.

Ctrl-C (or SIGTERM) stops at once: the lines finished in order are written; answers that came
back ahead of a slower earlier image are dropped and redone by a rerun, so the `-o` file stays in
input order. The requests run in daemon threads: an interrupted run exits without waiting for
them, and the server sees its connections close.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llava_cli.base.errors import LlavaError, ModelError, UsageError
from llava_cli.base.settings import DEFAULT_BATCH_SIZE, Settings
from llava_cli.client.remote import RemoteEngine, Reply, ServerUnavailable, whole_number
from llava_cli.engine.logprobs import as_openai
from llava_cli.frontend.arguments import AskOptions, image_argument
from llava_cli.frontend.records import make_record
from llava_cli.frontend.startup import connect_server, show_note
from llava_cli.prompt.conversation import Conversation

MAX_ATTEMPTS = 6  # one request and up to 5 retries
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0  # also caps a server's Retry-After: a longer wait means the server is not coming back soon
LOOKAHEAD = 8  # images sent ahead of the oldest unwritten one, per request at once
WAKE_S = 0.5  # waiting for an answer, look up this often: Ctrl-C is seen at once whatever the platform
FATAL = (UsageError, ModelError)  # refusals that would refuse every image alike: the key, the model


def batch_server(settings: Settings, options: AskOptions) -> RemoteEngine | None:
    """The server `ask --each` sends to (--server, LLAVA_SERVER, or a running `llava serve` for the
    model, as `llava ask` finds it), or None to answer with a model loaded here.

    --parallel needs a server; --batch-size is refused with a named one and noted with a found one."""
    remote = connect_server(settings, remember_images=False)  # each image is sent once: a cache would only grow
    if remote is None:
        if options.parallel is not None:
            raise UsageError(
                f"--parallel {options.parallel} sends requests to a server: give --server URL or start `llava serve` "
                "for this model (a model loaded here batches with --batch-size)"
            )
        return None
    if options.batch_size != DEFAULT_BATCH_SIZE:
        if settings.server:
            raise UsageError(
                f"--batch-size {options.batch_size} batches on a model loaded here; with --server, "
                "send requests at once with --parallel N"
            )
        show_note(f"answering through the llava serve at {remote.url}; --batch-size applies only with --no-server")
    return remote


def server_records(
    remote: RemoteEngine, names: list[str], prompt: str, settings: Settings, parallel: int, stdin_image: bytes
) -> Iterator[dict[str, Any]]:
    """One record per name, in input order, answered by `remote` with up to `parallel` requests at once."""
    pool = RequestPool(
        lambda index: answer_image(remote, names[index], prompt, settings, stdin_image), min(parallel, len(names))
    )
    sent = written = 0
    try:
        while written < len(names):
            while sent < min(len(names), written + parallel * LOOKAHEAD) and not pool.stopping.is_set():
                pool.submit(sent)
                sent += 1
            outcome = pool.take(written) if written < sent else Outcome(skipped=True)
            if outcome.skipped:
                break  # the server was given up on: this image and the ones after it were not sent
            if outcome.fatal is not None:
                raise outcome.fatal
            yield outcome.record
            written += 1
    finally:
        pool.close()
    if written < len(names):
        left = len(names) - written
        raise LlavaError(
            f"stopped: the server at {remote.url} did not answer after {MAX_ATTEMPTS} attempts; "
            f"{left} of {len(names)} images were not sent (run the same command with -o FILE again to finish them)"
        )


@dataclass
class Outcome:
    """What became of one image: its record, or a failure that stops the run, or not sent at all."""

    record: dict[str, Any] | None = None
    fatal: BaseException | None = None
    gave_up: bool = False  # its attempts were used up: the server is taken as gone
    skipped: bool = False  # not sent: the server had been given up on already


def answer_image(remote: RemoteEngine, name: str, prompt: str, settings: Settings, stdin_image: bytes) -> Outcome:
    """The record of one image: read it, ask the server (with retries), or say why not."""
    try:
        image = image_argument(name, stdin_image, settings)
    except LlavaError as err:
        return Outcome(make_record(name, prompt, settings.model, error=str(err)))
    conversation = Conversation(system=settings.system)
    conversation.ask(prompt, [image])
    try:
        reply = with_retries(lambda: remote.answer(conversation, settings))
    except FATAL as err:
        return Outcome(fatal=err)
    except ServerUnavailable as err:
        error = f"{name}: {err} (gave up after {MAX_ATTEMPTS} attempts)"
        return Outcome(make_record(name, prompt, settings.model, error=error), gave_up=True)
    except LlavaError as err:
        return Outcome(make_record(name, prompt, settings.model, error=f"{name}: {err}"))
    return Outcome(reply_record(name, prompt, settings, reply))


def reply_record(name: str, prompt: str, settings: Settings, reply: Reply) -> dict[str, Any]:
    return make_record(
        name,
        prompt,
        settings.model,
        answer=reply.text,
        prompt_tokens=whole_number(reply.usage.get("prompt_tokens"), None),
        completion_tokens=whole_number(reply.usage.get("completion_tokens"), None),
        seconds=round(reply.stats().seconds, 4),
        finish_reason=reply.finish_reason,
        **({"logprobs": as_openai(reply.logprobs)} if settings.logprobs is not None else {}),  # --logprobs N
    )


def with_retries(request: Callable[[], Reply]) -> Reply:
    """`request()`, tried again after `ServerUnavailable` (see the module docstring), at most MAX_ATTEMPTS times."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return request()
        except ServerUnavailable as err:
            if attempt == MAX_ATTEMPTS:
                raise
            time.sleep(retry_delay(attempt, err.retry_after))
    raise AssertionError("unreachable: the last attempt returns or raises")


def retry_delay(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2...): the server's Retry-After if it
    sent one, else FIRST_BACKOFF_S doubled for each attempt before; never over MAX_BACKOFF_S."""
    wanted = retry_after if retry_after is not None else FIRST_BACKOFF_S * 2 ** (attempt - 1)
    return min(wanted, MAX_BACKOFF_S)


class RequestPool:
    """`threads` daemon threads answering submitted indexes with `work`; `take(index)` waits for one.

    Once an image's attempts are used up, or a fatal error comes back, or the pool is closed,
    `stopping` is set: the images still queued are not sent (their outcome is `skipped`), the ones
    in flight finish."""

    def __init__(self, work: Callable[[int], Outcome], threads: int) -> None:
        self.work = work
        self.jobs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.done: dict[int, Outcome] = {}
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.threads = threads
        for _ in range(threads):
            threading.Thread(target=self.serve, daemon=True, name="llava-each-request").start()

    def submit(self, index: int) -> None:
        self.jobs.put(index)

    def take(self, index: int) -> Outcome:
        with self.changed:
            while index not in self.done:
                self.changed.wait(WAKE_S)
            return self.done.pop(index)

    def close(self) -> None:
        """No more work: each thread ends after its current request (an interrupted run does not wait for them)."""
        self.stopping.set()
        for _ in range(self.threads):
            self.jobs.put(None)

    def serve(self) -> None:
        while (index := self.jobs.get()) is not None:
            if self.stopping.is_set():
                outcome = Outcome(skipped=True)
            else:
                try:
                    outcome = self.work(index)
                except (
                    Exception
                ) as err:  # a bug: handed to the main thread, which reports it, rather than lost with this thread
                    outcome = Outcome(fatal=err)
            if outcome.gave_up or outcome.fatal is not None:
                self.stopping.set()
            with self.changed:
                self.done[index] = outcome
                self.changed.notify_all()
