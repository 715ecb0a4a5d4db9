"""The running decode batch of `llava serve`: answers prefilled alone, then decoded together.

Continuous batching as text-generation-inference's `CausalLMBatch` and mlx-lm's `BatchGenerator`
do it (transformers' own continuous batching takes no images yet):

- `admit(prompt, settings, budget) -> Sequence` prefills one prompt ALONE (its images, its own
  length), starting from a copy of the longest reusable prefix the `PrefixPool` holds, and picks
  its first token. Unless that token ends it, the sequence then joins the batch: the shorter of
  the two caches is padded on the left to the other's length and the rows are stacked
  (engine/kvrows.py), so every row's tokens stay flush right and all rows take their next token in the
  same step.
- `step() -> list[Sequence]` runs one forward for every row: each row's newest token, at the
  row's own position (its count of cached tokens), under a mask that hides the row's padding
  columns; then each row picks its token through its own pipeline (engine/pipeline.py: its `Sampler` with
  its settings and seeded generator, its hooks). Rows that end (end-of-sequence, budget spent) leave,
  and are returned. A row whose scores are not finite, or whose draw fails, ends with its `error`
  (`RowFault`) and leaves: the other rows go on with the answers they get alone.
- `admit_rows(prompt, settings, budget)`: as `admit`, for a request's `n` rows (one `Settings` each:
  its seed): ONE prefill, whose cache is copied into every row that goes on (`batch_repeat_interleave`).
- `remove(sequence)` takes a row out at once (its client left); `clear()` empties the batch.

A row that leaves is selected out (`batch_select_indices`); then the padding columns that no row
needs any more are dropped, so memory follows the live rows. A row that ends (not one removed)
gives its cache, padding cut off, to the pool, for a client that sends the history again.

Greedy answers are the ones the prompt gets alone (`Engine.generate`, plain `generate`): padding
is masked and positions are per row; seeded sampled answers too, each row drawing from its own
generator.

Memory (engine/kvbudget.py): the batch reserves, as `BATCH` in the engine's `--cache-mb` budget, its rows'
worst case (every row at the longest final length of any row); `admit` first makes room (the pool's
oldest entries go) and raises `Full` when the rows running leave too little (the caller waits for
one to end), `ResourceError` when the row cannot fit even alone. A row that leaves (ended, failed,
removed) gives its reservation back at once. Out of memory in `admit` raises `ResourceError` and
leaves the batch as it was. Out of memory in a step's forward fails only the rows it hit: the pool
and the allocator give back what they hold, then each row runs that step alone (`step_alone`) and
a row that still runs out ends with a `ResourceError`; the others go on. Any other failure in
`step` empties the batch (every row has failed).
The caller owns the threading: one thread uses a `DecodeBatch`.

`rows_that_fit(engine, window)` is `llava serve`'s default `--max-batch`: on a CPU CPU_MAX_BATCH;
on CUDA as many rows as the `--cache-mb` budget holds when every row fills the whole context window
(KV bytes per token x window), between 1 and MAX_BATCH_LIMIT.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from llava_cli.base.errors import LlavaError, ResourceError
from llava_cli.base.settings import Settings
from llava_cli.engine.kvbudget import BATCH, Full, budget_for, kv_bytes_per_token, over_budget
from llava_cli.engine.kvrows import columns, drop_left, keep_columns, merged, rows_of
from llava_cli.engine.local import OUT_OF_MEMORY, Engine, PrefixCache, Prompt, image_keys
from llava_cli.engine.logprobs import TokenLogprob, logprob_hook
from llava_cli.engine.pipeline import NOT_FINITE, PaddedBatch, Row, RowFault, Sampler, checked_argmax, forward
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.stops import before_stop

CPU_MAX_BATCH = 8  # a CPU step's cost grows with its rows on big models; on small ones 8 rows cost what 1 does (bench/serve_concurrency.py)
MAX_BATCH_LIMIT = 64  # the default's cap: past this many rows a GPU decode step is no longer bound by reading the weights, and rows mostly add latency


@dataclass(eq=False)
class Sequence:
    """One answer in the batch: its prompt, sampler and progress, and how many of its tokens are cached."""

    prompt_ids: list[int]
    images: list[
        tuple[str, tuple[int, int]]
    ]  # the prompt's images as `image_keys` gives them (not the pictures: they are dropped)
    sampler: Sampler
    row: Row
    cached_tokens: int  # the prompt's tokens that came from the pool
    length: int  # tokens of this answer in the KV cache: its next position
    source: tuple[
        str, int | None
    ]  # (scope, key) of the pool entry whose conversation it continues, which its own cache replaces there
    error: LlavaError | None = None  # why this row failed alone (its scores went bad, it ran out of memory), else None

    @property
    def ended(self) -> bool:
        return bool(self.row.finish_reason) or self.error is not None

    @property
    def tokens(self) -> list[int]:
        """The answer's tokens so far (the front-ends read these, not the row's pipeline)."""
        return self.row.tokens

    @property
    def finish_reason(self) -> str:
        return self.row.finish_reason

    @property
    def final_length(self) -> int:
        """The most tokens this answer's cache may hold: its prompt and its whole token budget."""
        return len(self.prompt_ids) + self.row.budget

    @property
    def cached_ids(self) -> list[int]:
        return (self.prompt_ids + self.row.tokens)[: self.length]


class DecodeBatch:
    def __init__(self, engine: Engine, pool: PrefixPool) -> None:
        self.engine = engine
        self.model = engine.model
        self.pool = pool
        self.budget = engine.budget
        self.token_bytes = kv_bytes_per_token(engine.model)
        self.sequences: list[Sequence] = []  # in batch order
        self.cache: Any = None  # rows in batch order, `width` columns
        self.prefills = 0  # prompts prefilled (the rows of one request's `n` share one)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def width(self) -> int:
        return columns(self.cache) if self.sequences else 0

    def reservation(self, rows: int, longest: int) -> int:
        """The bytes `rows` rows may come to hold when the longest may reach `longest` tokens (the padded batch)."""
        return self.token_bytes * rows * longest

    def report(self) -> None:
        """Tell the budget what the running rows reserve now."""
        longest = max((sequence.final_length for sequence in self.sequences), default=0)
        self.budget.hold(BATCH, self.reservation(len(self.sequences), longest))

    def make_room(self, final_length: int, rows: int = 1) -> None:
        """Reserve room for `rows` more rows of `final_length` tokens: `Full` while the rows running leave too
        little, `ResourceError` when they cannot fit even alone (the module docstring)."""
        longest = max([final_length, *(sequence.final_length for sequence in self.sequences)])
        wanted = self.reservation(len(self.sequences) + rows, longest)
        if self.budget.make_room(BATCH, wanted):
            return self.budget.hold(BATCH, wanted)
        alone = self.reservation(rows, final_length)
        if self.sequences and self.budget.could_hold(BATCH, alone):
            raise Full
        raise ResourceError(over_budget(alone, self.budget))

    def admit(self, prompt: Prompt, settings: Settings, budget: int) -> Sequence:
        """Prefill `prompt` (with at least one token of `budget`) alone, pick its first token, join the batch
        unless it has already ended (`Sequence.ended`: that token ended it, or its row failed).
        `Full` (nothing done) when the budget has no room for it until a row leaves."""
        return self.admit_rows(prompt, [settings], budget)[0]

    def admit_rows(self, prompt: Prompt, settings: list[Settings], budget: int) -> list[Sequence]:
        """`admit` for several rows answering the same prompt (a request's `n`), one per `settings`:
        the prompt is prefilled once and its cache copied into each row that goes on; room for all
        of them is reserved first."""
        import torch

        self.make_room(len(prompt.ids) + budget, len(settings))
        try:
            with torch.inference_mode():
                cache, keep, source = self.pool.start(prompt)
                new = prompt.ids[keep:]
                alone = PaddedBatch(
                    torch.tensor([new], device=self.model.device),
                    None,
                    torch.arange(keep, len(prompt.ids), device=self.model.device).unsqueeze(0),
                )
                logits = forward(self.model, cache, alone, self.engine.image_inputs(prompt, keep))
                self.prefills += 1
                greedy = checked_argmax(logits)[0]
                sequences = [self.started(prompt, each, budget, keep, source, logits[0], greedy) for each in settings]
                going = [sequence for sequence in sequences if not sequence.ended]
                for sequence in sequences:
                    if sequence.ended:
                        self.give_to_pool(sequence, cache, 0)
                if len(going) > 1:
                    cache.batch_repeat_interleave(len(going))
                if going:
                    self.cache = merged(self.cache, cache) if self.sequences else cache
                    self.sequences += going
        except torch.OutOfMemoryError:
            self.free_memory()
            raise ResourceError(OUT_OF_MEMORY) from None
        finally:
            self.report()  # the reservation made for them, or given back
        return sequences

    def started(
        self,
        prompt: Prompt,
        settings: Settings,
        budget: int,
        keep: int,
        source: tuple[str, int | None],
        logits: Any,
        greedy: int | None,
    ) -> Sequence:
        """A new row for `prompt`, its first token picked from the prefill's `logits` through its own pipeline."""
        sampler = self.engine.sampler(settings)
        sequence = Sequence(
            prompt.ids, image_keys(prompt), sampler, Row(budget, sampler.hooks), keep, len(prompt.ids), source
        )
        self.advance(sequence, logits, greedy)
        return sequence

    def step(self) -> list[Sequence]:
        """One token for every row; the rows that ended (finished, or failed alone), which have left the batch."""
        import torch

        try:
            with torch.inference_mode():
                failed: list[Sequence] = []
                try:
                    logits = forward(self.model, self.cache, self.next_inputs(), {})
                except torch.OutOfMemoryError:
                    logits, failed = self.step_alone()
                for sequence in self.sequences:
                    sequence.length += 1
                checked = checked_argmax(logits) if self.sequences else []
                for place, sequence in enumerate(self.sequences):
                    self.advance(sequence, logits[place], checked[place])
                ended = [sequence for sequence in self.sequences if sequence.ended]
                for sequence in ended:
                    self.give_to_pool(sequence, self.cache, self.sequences.index(sequence))
                self.leave(ended)
        except torch.OutOfMemoryError:
            self.clear()
            self.free_memory()
            raise ResourceError(OUT_OF_MEMORY) from None
        except BaseException:
            self.clear()  # a forward that failed halfway may have grown only some layers
            raise
        finally:
            self.report()
        return failed + ended

    def step_alone(self) -> tuple[Any, list[Sequence]]:
        """After the step's forward ran out of memory: the pool and the allocator give back what they hold,
        each row runs the step alone (a copy of its own columns), and a row that still runs out fails
        (`ResourceError`) and leaves; the others are the batch again. Their logits, and the rows that failed."""
        import torch

        width = self.width
        keep_columns(self.cache, width)  # the failed forward may have grown some layers
        inputs = self.next_inputs()
        alone = [rows_of(self.cache, place, width - sequence.length) for place, sequence in enumerate(self.sequences)]
        self.cache = None
        self.free_memory()
        ran, failed = [], []
        for place, (sequence, cache) in enumerate(zip(self.sequences, alone)):
            one = PaddedBatch(inputs.ids[place : place + 1], None, inputs.positions[place : place + 1])
            try:
                ran.append((sequence, cache, forward(self.model, cache, one, {})))
            except torch.OutOfMemoryError:
                sequence.error = ResourceError(OUT_OF_MEMORY)
                failed.append(sequence)
        self.sequences = [sequence for sequence, _, _ in ran]
        self.cache = functools.reduce(merged, [cache for _, cache, _ in ran]) if ran else None
        return (torch.cat([logits for _, _, logits in ran]) if ran else None), failed

    def advance(self, sequence: Sequence, logits: Any, greedy: int | None) -> None:
        """The row's next token through its pipeline (`greedy`: the row's `checked_argmax`, None when
        its scores are not finite); a bad row (`RowFault`) records its error and ends, touching no other row."""
        try:
            if greedy is None:
                raise RowFault(NOT_FINITE)
            token = greedy if sequence.sampler.plain_greedy else sequence.sampler.pick(logits)
        except RowFault as fault:
            sequence.error = fault
            return
        sequence.row.take(token, self.engine.eos_ids)

    def next_inputs(self) -> PaddedBatch:
        """Each row's newest token at its own position, the mask hiding each row's padding columns."""
        import torch

        device = self.model.device
        lengths = torch.tensor([sequence.length for sequence in self.sequences], device=device).unsqueeze(1)
        width = self.width + 1  # the columns after this step
        mask = (torch.arange(width, device=device).unsqueeze(0) >= width - 1 - lengths).long()
        tokens = torch.tensor([sequence.row.tokens[-1] for sequence in self.sequences], device=device).unsqueeze(1)
        return PaddedBatch(tokens, mask, lengths)

    def give_to_pool(self, sequence: Sequence, cache: Any, place: int) -> None:
        """Keep a copy of the ended `sequence`'s row (row `place` of `cache`, padding cut off) in the pool,
        unless it failed (its cache may hold what made it fail)."""
        if self.pool.keeps and sequence.error is None:
            kv = rows_of(cache, place, columns(cache) - sequence.length)
            self.pool.keep(
                PrefixCache(kv=kv, ids=sequence.cached_ids, images=sequence.images),
                len(sequence.prompt_ids),
                sequence.source,
            )

    def remove(self, sequence: Sequence) -> None:
        import torch

        with torch.inference_mode():
            self.leave([sequence])
        self.report()

    def leave(self, leaving: list[Sequence]) -> None:
        """Select the other rows, then drop the padding columns no row needs any more."""
        if not leaving:
            return
        import torch

        staying = [place for place, sequence in enumerate(self.sequences) if sequence not in leaving]
        self.sequences = [self.sequences[place] for place in staying]
        if not self.sequences:
            self.cache = None
            return
        self.cache.batch_select_indices(torch.tensor(staying, device=self.model.device))
        if unneeded := self.width - max(sequence.length for sequence in self.sequences):
            drop_left(self.cache, unneeded)

    def clear(self) -> None:
        self.sequences, self.cache = [], None
        self.report()

    def free_memory(self) -> None:
        """After running out: the pool's caches, then all the engine holds (`Engine.free_memory`), go back to the device."""
        self.pool.clear()
        self.engine.free_memory()


@dataclass(frozen=True)
class BatchAnswer:
    """One prompt's answer from `answers_in_order`: the stripped text and its figures."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence) or "length" (token budget spent)
    seconds: float  # from its admission (its image read, its prefill) to its last token
    videos: tuple[dict[str, Any], ...] = ()  # the prompt's videos as `Stats.videos` reports them
    logprobs: tuple[TokenLogprob, ...] | None = None  # each token's, when asked for (`Settings.logprobs`)


def answers_in_order(
    engine: Engine, prompts: Iterable[Callable[[], Prompt]], settings: Settings, rows: int
) -> Iterator[BatchAnswer | LlavaError]:
    """Answer independent prompts on one `DecodeBatch` of at most `rows` rows, admitted continuously:
    a row that ends is replaced at once by the next prompt, so no row waits for the longest answer.

    Each of `prompts` makes its prompt when admitted (an image is read then, not before) or raises
    `LlavaError`. One result per prompt, in order: its `BatchAnswer`, or the `LlavaError` that failed
    it alone (its prompt, its row's scores, out of memory in its prefill or its step alone, a row
    over the whole `--cache-mb` budget). A prompt the budget has no room for while rows run waits,
    made, until one ends. No cache is reused (an empty pool): a batch sees each image once.
    """
    batch = DecodeBatch(engine, PrefixPool(None))
    done: dict[int, BatchAnswer | LlavaError] = {}
    running: dict[
        Sequence, tuple[int, float, tuple[dict[str, Any], ...]]
    ] = {}  # a row's index among `prompts`, when it was admitted, its videos
    waiting, emitted, exhausted = enumerate(prompts), 0, False
    held: tuple[int, Callable[[], Prompt]] | None = None  # made, waiting for room in the budget

    def end(sequence: Sequence, index: int, started: float, videos: tuple[dict[str, Any], ...]) -> None:
        recorded = logprob_hook(sequence.sampler.hooks)
        done[index] = sequence.error or BatchAnswer(
            before_stop(engine.decode(sequence.row.tokens), settings.stop),
            len(sequence.prompt_ids),
            len(sequence.row.tokens),
            sequence.row.finish_reason,
            time.perf_counter() - started,
            videos,
            None if recorded is None else tuple(recorded.tokens),
        )

    while True:
        while not exhausted and len(batch) < rows:
            entry, held = held or next(waiting, None), None
            if entry is None:
                exhausted = True
                break
            index, make_prompt = entry
            started = time.perf_counter()
            try:
                prompt = make_prompt()
                videos = tuple(engine.video_report(prompt))
                sequence = batch.admit(prompt, settings, engine.token_budget(prompt, settings))
            except Full:
                held = (index, functools.partial(lambda made: made, prompt))
                break
            except LlavaError as err:
                done[index] = err
                continue
            finally:
                engine.forget_images()  # a batch sees each image once: the memo would only grow
            if sequence.ended:
                end(sequence, index, started, videos)
            else:
                running[sequence] = (index, started, videos)
        while emitted in done:
            yield done.pop(emitted)
            emitted += 1
        if not running:
            if exhausted:
                return
            continue
        try:
            ended = batch.step()
        except ResourceError as err:  # the step's rows failed; the batch has emptied itself
            ended, failed, running = [], running, {}
            for index, _, _ in failed.values():
                done[index] = err
        for sequence in ended:
            end(sequence, *running.pop(sequence))


def rows_that_fit(engine: Engine, window: int) -> int:
    """The default --max-batch (module docstring): rows whose worst-case KV cache fits the `--cache-mb` budget."""
    if engine.loaded.device != "cuda":
        return CPU_MAX_BATCH
    limit = engine.budget.limit_bytes or budget_for(None, "cuda").limit_bytes  # --cache-mb 0: the device's memory
    if limit is None:
        return MAX_BATCH_LIMIT
    return max(1, min(MAX_BATCH_LIMIT, limit // (kv_bytes_per_token(engine.model) * window)))
