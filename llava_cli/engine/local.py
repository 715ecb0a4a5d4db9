"""The local `Backend` (engine/backend.py): `ask` and `chat` answer as a batch of one on the scheduler.

`Engine.generate(conversation, settings, stop)` yields `TextChunk`s (joined: exactly the answer with
surrounding whitespace stripped), then one `Done` with the answer and its figures; the caller records
the answer (`Done.answer`), the engine never changes the conversation. If it is stopped (`stop()`,
asked before each step), closed early (Ctrl-C) or raises, no `Done` comes.

One scheduler decodes every answer (issue 21): the answer is admitted to the engine's own
`DecodeBatch` (engine/scheduler.py: prefill alone, then the batch step, with its CUDA graph per bucket on
CUDA and `--compile`'s compiled step) and stepped until its row ends, each token through the row's
pipeline (engine/pipeline.py: sampler, constraint, stop texts, logprobs), exactly as a row of
`ask --each` or `llava serve`. Greedy answers are the ones plain `model.generate` gives for the full
prompt; seeded ones the ones every other path gives.

Cache reuse: the batch's pool is the chat's history (`PrefixPool(history=True)`): the cache of the last
answer, prompt and answer, exactly the tokens and image digests it holds. The next turn starts from
(is handed, not a copy of) its longest common prefix (never splitting an image, never trusting one whose content changed) and
runs only the new tokens; the vision tower sees only images that are not cached. A stopped answer
leaves what it cached too. `reset` (/clear) forgets it.

Memory: the engine's runner owns the process's `--cache-mb` budget (engine/kvbudget.py); the answer
reserves its worst case (prompt and whole token budget) as `CHAT` before its prefill and is refused with
one line (`ResourceError`) when it cannot fit; out of memory frees the cache and raises `ResourceError`.

Imports: engine/scheduler.py, engine/prefixpool.py, engine/runner.py and the engine's leaves.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from llava_cli.base.settings import Settings
from llava_cli.engine.backend import Done, Events, Note, TextChunk
from llava_cli.engine.kvbudget import CHAT
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.runner import Runner, Stopped, dropped_note
from llava_cli.engine.scheduler import DecodeBatch
from llava_cli.engine.streaming import Stats
from llava_cli.models.loader import LoadedModel
from llava_cli.prompt.conversation import Conversation


class Engine(Runner):
    """Answers conversations with a loaded model, one at a time, reusing the KV cache across turns."""

    def __init__(self, loaded: LoadedModel, cache_mb: int | None = None) -> None:
        super().__init__(loaded, cache_mb)
        self.history = PrefixPool(self.budget, history=True)
        self.batch: DecodeBatch | None = None  # made by the first answer, for its --compile

    def batch_for(self, settings: Settings) -> DecodeBatch:
        """The batch that decodes this answer: the one kept, unless `settings` switches --compile."""
        if self.batch is None or self.batch.compile_step != settings.compile:
            self.batch = DecodeBatch(self, self.history, holder=CHAT, compile_step=settings.compile)
        return self.batch

    def reset(self) -> None:
        """Forget the cache (after /clear, or when memory must be freed)."""
        self.history.clear()
        self.forget_images()

    def free_memory(self) -> None:
        """Give back what the history, an empty batch's slots and the image memo hold."""
        self.history.clear()
        if self.batch is not None and not len(self.batch):
            self.batch.drop_slots()
        super().free_memory()

    def generate(
        self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = lambda: False
    ) -> Events:
        """Stream the answer; `stop()` is asked before each step (fitting, prefill, every token), and
        when it says True the generator ends at once, with no `Done`."""
        started = time.perf_counter()
        self.reset_peak_memory()
        stats = Stats(load_s=self.loaded.load_seconds)
        try:
            prompt, stats.dropped_turns = self.fit(conversation, settings, stop)
        except Stopped:
            return
        if stop():
            return
        if stats.dropped_turns:
            yield Note(dropped_note(stats.dropped_turns, self.context_window(settings)))
        batch = self.batch_for(settings)
        batch.clear()  # a batch of one: nothing of an answer abandoned unclosed stays in it
        sequence = batch.admit(prompt, settings, self.token_budget(prompt, settings))
        stats.prompt_tokens, stats.cached_tokens = len(prompt.ids), sequence.cached_tokens
        stats.videos = self.video_report(prompt)
        stats.ttft_s = time.perf_counter() - started
        stream = self.detokenizer(settings.stop)
        streamed = 0
        try:
            while True:
                for token in sequence.tokens[streamed:]:
                    if chunk := stream.push(token):
                        yield TextChunk(chunk)
                streamed = len(sequence.tokens)
                if sequence.ended or stop():
                    break
                batch.step()
        finally:  # stopped, closed or failed midway: what it cached stays for the next turn
            batch.remove(sequence, keep=True)
        if sequence.error is not None:
            raise sequence.error
        if not sequence.finish_reason:
            return  # stopped
        yield from self.verbose_notes(batch, settings)
        if tail := stream.finish():
            yield TextChunk(tail)
        stats.end(len(sequence.tokens), sequence.finish_reason, time.perf_counter() - started, self.peak_memory_mb())
        yield Done(stats, sequence.logprobs or (), answer=stream.text.strip())

    @staticmethod
    def verbose_notes(batch: DecodeBatch, settings: Settings) -> Events:
        """How the step ran (a failed capture), with --verbose only, each said once."""
        notes = batch.take_notes()
        if settings.verbose:
            yield from (Note(note) for note in notes)
