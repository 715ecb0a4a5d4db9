"""The one scheduler: answers prefilled alone, then decoded together (`ask` and `chat` are a batch of one).

Continuous batching as text-generation-inference's `CausalLMBatch` and mlx-lm's `BatchGenerator`
do it (transformers' own continuous batching takes no images yet):

- `admit(prompt, settings, budget) -> Sequence` prefills one prompt ALONE (its images, its own
  length), starting from a copy of the longest reusable prefix the `PrefixPool` holds, and picks
  its first token. Unless that token ends it, the sequence then joins the batch: its cache is
  copied into a free slot of the batch's static cache (engine/kvrows.py's `Slots`, preallocated for a
  bucket of rows and of columns, grown to the next buckets as needed), flush right at the batch's
  write column, so all rows take their next token in the same step (every row moves right first
  when the new one is longer).
- `step() -> list[Sequence]` runs one forward for every row: each row's newest token, at the
  row's own position (its count of cached tokens), under a mask that hides the row's padding
  columns, its keys and values written in place at the write column (no copy of the cache); then each row picks its token through its own pipeline (engine/pipeline.py: its `Sampler` with
  its settings and seeded generator, its hooks). Rows that end (end-of-sequence, budget spent) leave,
  and are returned. A row whose scores are not finite, or whose draw fails, ends with its `error`
  (`RowFault`) and leaves: the other rows go on with the answers they get alone.
- `admit_rows(prompt, settings, budget)`: as `admit`, for a request's `n` rows (one `Settings` each:
  its seed): ONE prefill, whose cache is copied into a slot for every row that goes on.
- `remove(sequence)` takes a row out at once (its client left); `clear()` empties the batch.

The step, per device (issue 21): uncaptured, it runs over exactly the live rows and columns (views
of the slots, no mask when no row has padding: on a CPU this is the fastest, bench/RESULTS.md); on
CUDA (`captured_shapes`, with a masked attention) it runs over whole buckets (a power of two of rows,
SLOT_COLUMNS columns; empty slots masked), the write column a device tensor, captured as a CUDA graph
per (rows, columns) bucket as vLLM captures one per batch size, and replayed; a row with
--no-cuda-graph or a failed capture (a note) runs it uncaptured. `--compile` (`compile_step`) runs
the bucketed step through `torch.compile` on every device (captured as well on CUDA). Tokens are
chosen on the host side of the step, as below, on every path.

Users: `ask` and `chat` (engine/local.py: a batch of one, its pool the chat's history), `ask --each`
(`answers_in_order`), `llava serve` and Ray's actors.

A row that leaves frees its slot at once (the last row moves into it); then the padding columns
that no row needs any more are dropped (every row moves left), so a step attends to no more than
it must. The slots themselves (and their graphs) stay while the batch lives (`free_memory` drops
them once it is empty). A row that ends (or is removed with `keep`: a stopped chat answer) gives a copy
of its cache, padding cut off, to the pool, for a client that sends the history again.

Greedy answers are the ones the prompt gets alone (plain `generate`): padding
is masked and positions are per row; seeded sampled answers too, each row drawing from its own
generator.

Memory (engine/kvbudget.py): the batch reserves, as its `holder` (`BATCH`; ask's and chat's: `CHAT`) in
the engine's `--cache-mb` budget, its running rows'
worst case (every row at the longest final length of any row: what its slots may come to hold);
`admit` first makes room (the pool's oldest entries go) and raises `Full` when the rows running leave
too little (the caller waits for one to end), `ResourceError` when the row cannot fit even alone. A
row that ends, fails or is removed gives its reservation back at once (before its cache goes to the pool). Out of memory in `admit`
raises `ResourceError` and leaves the batch as it was. Out of memory in a step's forward fails only
the rows it hit: the pool and the allocator give back what they hold, then each row runs that step
alone over its own slot (`step_alone`: a one-row view of the slots, no copy) and a row that still
runs out ends with a `ResourceError`; the others go on. Any other failure in `step` empties the
batch (every row has failed).
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

from llava_cli.base.errors import LlavaError, ResourceError, one_line
from llava_cli.base.settings import COMPILE_ATTENTION_REASON, Settings
from llava_cli.engine.kvbudget import BATCH, Full, budget_for, kv_bytes_per_token, over_budget
from llava_cli.engine.kvrows import Slots, columns, prefix_of
from llava_cli.engine.logprobs import TokenLogprob, logprob_hook
from llava_cli.engine.pipeline import NOT_FINITE, PaddedBatch, Row, RowFault, Sampler, checked_argmax, forward
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.runner import OUT_OF_MEMORY, PrefixCache, Prompt, Runner, image_keys
from llava_cli.engine.stops import before_stop

MASKED_ATTENTION = ("sdpa", "eager")  # the attentions that take the mask hiding a bucket's empty columns
CPU_MAX_BATCH = 8  # a CPU step's cost grows with its rows on big models; on small ones 8 rows cost what 1 does (bench/serve_concurrency.py)
MAX_BATCH_LIMIT = 64  # the default's cap: past this many rows a GPU decode step is no longer bound by reading the weights, and rows mostly add latency
SLOT_COLUMNS = (
    256,
    512,
    1024,
    2048,
    4096,
)  # the batch cache's column buckets (then doubling): a captured step attends to its whole bucket


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

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...] | None:
        """Each token's logprobs so far, when its settings ask for them (`Settings.logprobs`), else None."""
        recorded = logprob_hook(self.sampler.hooks)
        return None if recorded is None else tuple(recorded.tokens)


class DecodeBatch:
    def __init__(
        self,
        engine: Runner,
        pool: PrefixPool,
        *,
        captured_shapes: bool | None = None,
        holder: str = BATCH,
        compile_step: bool = False,
    ) -> None:
        """`captured_shapes`: step over whole buckets, replayed as CUDA graphs (default: on CUDA; on a
        CPU the same shapes run eagerly, for tests and bench/gpu.py's smoke run). `holder`: the name
        its rows' memory has in the budget. `compile_step` (`--compile`): the bucketed step runs through
        `torch.compile` (its fixed shapes compile once per bucket), captured or not."""
        masked = engine.model.config._attn_implementation in MASKED_ATTENTION  # flash-attention: exact shapes only
        if compile_step and not masked:
            raise LlavaError(f"--compile needs --attn sdpa or eager: {COMPILE_ATTENTION_REASON}")
        self.engine = engine
        self.model = engine.model
        self.compile_step = compile_step
        self.call = compiled(engine.model) if compile_step else engine.model  # what a bucketed step runs
        self.captured_shapes = compile_step or (
            engine.model.device.type == "cuda" and masked if captured_shapes is None else captured_shapes
        )
        self.holder = holder
        self.pool = pool
        self.budget = engine.budget
        self.token_bytes = kv_bytes_per_token(engine.model)
        self.sequences: list[Sequence] = []  # in slot order: sequence i holds row i of `slots`
        self.slots: Slots | None = None  # the static cache, kept (and its captured steps) while the batch lives
        self.width = 0  # the write column: every row's tokens end just before it
        self.captured: dict[tuple[int, int, bool], CapturedStep] = {}  # by (rows, columns, graph), over `slots`
        self.capture_failure: str | None = None  # once capture failed, it is not tried again
        self.notes: list[str] = []  # one-line explanations (a failed capture), for `take_notes`
        self.prefills = 0  # prompts prefilled (the rows of one request's `n` share one)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def live_slots(self) -> Slots:
        """The static cache; it exists while a row is in the batch (`join` made it)."""
        if self.slots is None:
            raise RuntimeError("the batch has no slots: no row has joined it")
        return self.slots

    def reservation(self, rows: int, longest: int) -> int:
        """The bytes `rows` rows may come to hold when the longest may reach `longest` tokens (the padded batch)."""
        return self.token_bytes * rows * longest

    def report(self) -> None:
        """Tell the budget what the running rows reserve now (a row that has ended reserves nothing)."""
        running = [sequence for sequence in self.sequences if not sequence.ended]
        longest = max((sequence.final_length for sequence in running), default=0)
        self.budget.hold(self.holder, self.reservation(len(running), longest))

    def make_room(self, final_length: int, rows: int = 1) -> None:
        """Reserve room for `rows` more rows of `final_length` tokens: `Full` while the rows running leave too
        little, `ResourceError` when they cannot fit even alone (the module docstring)."""
        longest = max([final_length, *(sequence.final_length for sequence in self.sequences)])
        wanted = self.reservation(len(self.sequences) + rows, longest)
        if self.budget.make_room(self.holder, wanted):
            return self.budget.hold(self.holder, wanted)
        alone = self.reservation(rows, final_length)
        if self.sequences and self.budget.could_hold(self.holder, alone):
            raise Full
        raise ResourceError(over_budget(alone, self.budget))

    def admit(self, prompt: Prompt, settings: Settings, budget: int) -> Sequence:
        """Prefill `prompt` (with at least one token of `budget`) alone, pick its first token, join the batch
        unless it has already ended (`Sequence.ended`: that token ended it, or its row failed).
        `Full` (nothing done) when the budget has no room for it until a row leaves."""
        return self.admit_rows(prompt, [settings], budget)[0]

    def admit_rows(self, prompt: Prompt, settings: list[Settings], budget: int) -> list[Sequence]:
        """`admit` for several rows answering the same prompt (a request's `n`), one per `settings`:
        the prompt is prefilled once and its cache copied into a slot for each row that goes on; room
        for all of them is reserved first."""
        import torch

        self.make_room(len(prompt.ids) + budget, len(settings))
        before = len(self.sequences)
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
                for sequence in sequences:
                    if sequence.ended:
                        self.give_to_pool(sequence, functools.partial(prefix_of, cache, sequence.length))
                    else:
                        self.join(sequence, cache)
        except torch.OutOfMemoryError:
            self.leave(self.sequences[before:])  # the rows this prompt had joined: the batch is as it was
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

    def join(self, sequence: Sequence, cache: Any) -> None:
        """Copy the prefilled one-row `cache` into the next free slot, flush right at the write column
        (moved right first, every row with it, if this row is longer than the others)."""
        live, length = len(self.sequences), columns(cache)
        width = max(self.width, length) if live else length
        self.reserve(live + 1, width + 1, cache)
        if width > self.width and live:
            self.live_slots.shift(live, self.width, width - self.width)
        self.width = width
        self.live_slots.put(live, cache, width)
        self.sequences.append(sequence)

    def reserve(self, rows: int, columns: int, like: Any) -> None:
        """Slots for `rows` rows of `columns` columns: the next buckets, the live rows copied over
        (the old slots and their captured steps are then freed)."""
        if self.slots is not None and rows <= self.slots.capacity_rows and columns <= self.slots.capacity_columns:
            return
        if self.slots is not None:
            rows, columns = max(rows, self.slots.capacity_rows), max(columns, self.slots.capacity_columns)
            self.slots = self.slots.grown(rows_bucket(rows), columns_bucket(columns), len(self.sequences), self.width)
        else:
            self.slots = Slots.like(like, rows_bucket(rows), columns_bucket(columns))
        self.captured = {}

    def step(self) -> list[Sequence]:
        """One token for every row; the rows that ended (finished, or failed alone), which have left the batch."""
        import torch

        try:
            with torch.inference_mode():
                self.reserve(len(self.sequences), self.width + 1, None)
                try:
                    logits = self.run_step()
                    outcomes: list[tuple[Any, int | None] | None] = list(zip(logits, checked_argmax(logits)))
                except torch.OutOfMemoryError:
                    outcomes = self.step_alone()
                self.width += 1
                for sequence, outcome in zip(self.sequences, outcomes):
                    sequence.length += 1
                    if outcome is None:
                        sequence.error = ResourceError(OUT_OF_MEMORY)
                    else:
                        self.advance(sequence, *outcome)
                ended = [sequence for sequence in self.sequences if sequence.ended]
                for sequence in ended:
                    self.give_to_pool(sequence, functools.partial(self.row_cache, sequence))
                self.leave(ended)
        except torch.OutOfMemoryError:
            self.clear()
            self.free_memory()
            raise ResourceError(OUT_OF_MEMORY) from None
        except BaseException:
            self.clear()  # a forward that failed halfway may have written only some layers
            raise
        finally:
            self.report()
        return ended

    def run_step(self) -> Any:
        """The next-token logits of every row: over whole buckets where `bucketed` (replayed as a CUDA graph
        where `graphs`), else one forward over exactly the live rows and columns."""
        if self.bucketed():
            tokens = [sequence.row.tokens[-1] for sequence in self.sequences]
            lengths = [sequence.length for sequence in self.sequences]
            columns = min(columns_bucket(self.width + 1), self.live_slots.capacity_columns)
            key = (rows_bucket(len(tokens)), columns, self.graphs())
            step = self.captured.get(key) or self.capture(key)
            if step is not None:
                return step.run(tokens, lengths, self.width)[: len(tokens)]
        return self.forward_rows(0, self.sequences)

    def forward_rows(self, first: int, sequences: list[Sequence]) -> Any:
        """The next-token logits of `sequences`, the rows of the slots from `first` on, uncaptured."""
        view = self.live_slots.view
        view.first, view.rows, view.visible, view.width, view.column = (
            first,
            len(sequences),
            self.width + 1,
            self.width,
            None,
        )
        tokens = [sequence.row.tokens[-1] for sequence in sequences]
        lengths = [sequence.length for sequence in sequences]
        # No row with padding (a batch of one never has any): a one-token query needs no mask.
        padded = any(length != self.width for length in lengths)
        inputs = step_inputs(tokens, lengths, self.width, self.width + 1, self.model.device, masked=padded)
        try:
            return forward(self.model, self.live_slots.cache, inputs, {})
        finally:
            view.first = 0

    def step_alone(self) -> list[tuple[Any, int | None] | None]:
        """After the step's forward ran out of memory: the pool and the allocator give back what they hold,
        then each row runs the step alone over its own slot (its keys and values written in place, as
        the batch's step would). Per row: its logits and `checked_argmax`, or None when it ran out alone too."""
        import torch

        self.free_memory()
        outcomes: list[tuple[Any, int | None] | None] = []
        for place, sequence in enumerate(self.sequences):
            try:
                logits = self.forward_rows(place, [sequence])
                outcomes.append((logits[0], checked_argmax(logits)[0]))
            except torch.OutOfMemoryError:
                outcomes.append(None)
        return outcomes

    def graphs(self) -> bool:
        """Whether bucketed steps are replayed as CUDA graphs (on CUDA): unless a row asked for --no-cuda-graph."""
        return not any(sequence.sampler.settings.no_cuda_graph for sequence in self.sequences)

    def bucketed(self) -> bool:
        """Whether the step runs over whole buckets: with captured shapes (CUDA, --compile) unless a capture
        failed, and, but for --compile's, only while its graph is replayed."""
        return self.captured_shapes and self.capture_failure is None and (self.compile_step or self.graphs())

    def capture(self, key: tuple[int, int, bool]) -> CapturedStep | None:
        """Make (and, where `key` says, capture) the step of `key` (rows, columns, graph); a failure becomes a
        note and the step runs uncaptured from then on."""
        step = CapturedStep(self.call, self.model, self.live_slots, *key)
        try:
            step.capture(self.width)
        except Exception as err:  # whatever stops a capture, the uncaptured step gives the same answers
            self.capture_failure = f"{type(err).__name__}: {one_line(err)}"
            self.notes.append(
                f"CUDA graph capture of the batch step failed ({self.capture_failure}); decoding without it"
            )
            return None
        self.captured[key] = step
        return step

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

    def give_to_pool(self, sequence: Sequence, kv: Callable[[], Any]) -> None:
        """Keep the ended `sequence`'s cache (`kv()`: a one-row cache of exactly its tokens) in the pool,
        unless it failed (its cache may hold what made it fail). Its reservation is given back first, so
        the pool may take its place."""
        if self.pool.keeps and sequence.error is None:
            self.report()
            self.pool.keep(
                PrefixCache(kv=kv(), ids=sequence.cached_ids, images=sequence.images),
                len(sequence.prompt_ids),
                sequence.source,
            )

    def remove(self, sequence: Sequence, keep: bool = False) -> None:
        """Take `sequence` out now (its client left, its answer was stopped); nothing if it is no longer in
        the batch. `keep`: what its cache holds goes to the pool, as an ended row's (a chat's next turn reuses it)."""
        import torch

        if sequence not in self.sequences:
            return
        with torch.inference_mode():
            kept = self.row_cache(sequence) if keep and self.pool.keeps else None
            self.leave([sequence])
            if kept is not None:
                self.give_to_pool(sequence, lambda: kept)
        self.report()

    def row_cache(self, sequence: Sequence) -> Any:
        """A one-row cache of exactly the tokens `sequence` has in its slot (copied)."""
        return self.live_slots.row(self.sequences.index(sequence), self.width - sequence.length, self.width)

    def leave(self, leaving: list[Sequence]) -> None:
        """Free the leaving rows' slots at once (the last live row moves into each hole), then move the
        rows left over the columns no row needs any more, so a step attends to no more than it must."""
        for place in sorted((self.sequences.index(sequence) for sequence in leaving), reverse=True):
            last = len(self.sequences) - 1
            if place != last:
                self.live_slots.move(last, place)
                self.sequences[place] = self.sequences[last]
            self.sequences.pop()
        if not self.sequences:
            self.width = 0
        elif unneeded := self.width - max(sequence.length for sequence in self.sequences):
            self.live_slots.shift(len(self.sequences), self.width, -unneeded)
            self.width -= unneeded

    def clear(self) -> None:
        self.sequences, self.width = [], 0
        self.report()

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def free_memory(self) -> None:
        """After running out: the slots with their captured steps (once no row is left), the pool's caches,
        then all the engine holds (`Engine.free_memory`) go back to the device."""
        if not self.sequences:
            self.drop_slots()
        self.pool.clear()
        self.engine.free_memory()

    def drop_slots(self) -> None:
        """Give the slots and their captured steps back (the batch must be empty: the next row makes new ones)."""
        self.slots, self.captured = None, {}


def rows_bucket(rows: int) -> int:
    """Slots are made, and steps captured, for a power of two of rows (as vLLM captures per batch size)."""
    return 1 << (rows - 1).bit_length()


def columns_bucket(needed: int) -> int:
    """The smallest of SLOT_COLUMNS that holds `needed` columns; past the last, doubling."""
    size = next((bucket for bucket in SLOT_COLUMNS if bucket >= needed), SLOT_COLUMNS[-1])
    while size < needed:
        size *= 2
    return size


def replays_graphs(model: Any) -> bool:
    """Whether a bucketed step of `model` is captured and replayed as a CUDA graph: on CUDA only."""
    return bool(model.device.type == "cuda")


def compiled(model: Any) -> Any:
    """`model.__call__` through `torch.compile` for the bucketed step's fixed shapes (--compile)."""
    import torch

    return torch.compile(model.__call__, dynamic=False, fullgraph=False)


def step_inputs(
    tokens: list[int], lengths: list[int], width: int, visible: int, device: Any, masked: bool = True
) -> PaddedBatch:
    """Each row's newest token (written at column `width`) at its own position, the mask over `visible`
    columns showing each row its own tokens and the new one only (rows past `tokens` are empty slots:
    they see their new column alone, so their scores stay finite); no mask unless `masked`."""
    import torch

    rows = torch.tensor(lengths, dtype=torch.long, device=device).unsqueeze(1)
    ids = torch.tensor(tokens, device=device).unsqueeze(1)
    if not masked:
        return PaddedBatch(ids, None, rows)
    column = torch.arange(visible, device=device).unsqueeze(0)
    return PaddedBatch(ids, ((column >= width - rows) & (column <= width)).long(), rows)


class CapturedStep:
    """The batch step over `rows` slots and `columns` columns with static input buffers, replayed as a
    CUDA graph: the host sets the buffers (rows past the live ones are empty slots), the graph runs the
    forward, writes each row's new keys and values at the device's write column and leaves the logits."""

    def __init__(self, call: Any, model: Any, slots: Slots, rows: int, columns: int, graph: bool) -> None:
        import torch

        self.call, self.model, self.slots, self.rows, self.columns = call, model, slots, rows, columns
        self.record = graph and replays_graphs(model)
        device = model.device
        self.inputs = PaddedBatch(
            *(torch.zeros(shape, dtype=torch.long, device=device) for shape in ((rows, 1), (rows, columns), (rows, 1)))
        )
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: Any = None
        self.logits: Any = None

    def set(self, tokens: list[int], lengths: list[int], width: int) -> None:
        empty = self.rows - len(tokens)
        filled = step_inputs(tokens + [0] * empty, lengths + [0] * empty, width, self.columns, "cpu")
        for buffer, values in zip(
            (self.inputs.ids, self.inputs.mask, self.inputs.positions), (filled.ids, filled.mask, filled.positions)
        ):
            buffer.copy_(values, non_blocking=True)
        self.column.fill_(width)

    def forward(self) -> Any:
        view = self.slots.view
        view.rows, view.visible, view.width, view.column = self.rows, self.columns, 0, self.column
        try:
            return forward(self.call, self.slots.cache, self.inputs, {})
        except Exception as err:
            import torch

            if isinstance(err, torch._dynamo.exc.TorchDynamoException):
                raise LlavaError(f"--compile failed ({one_line(err)}); run without --compile") from None
            raise
        finally:
            view.column = None

    def capture(self, width: int) -> None:
        """Warm up on a side stream (as CUDA graphs require), then record. Both write keys and values
        at column `width` of every slot: the next real step overwrites them there."""
        import torch

        if not self.record:
            return  # the same shapes, run eagerly (or compiled)
        self.set([0] * self.rows, [0] * self.rows, width)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        # thread_local: CUDA work of another thread (a server's) does not spoil this capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self.forward()
        self.graph = graph

    def run(self, tokens: list[int], lengths: list[int], width: int) -> Any:
        self.set(tokens, lengths, width)
        if self.graph is None:  # on a CPU
            return self.forward()
        self.graph.replay()
        return self.logits


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
    engine: Runner,
    prompts: Iterable[Callable[[], Prompt]],
    settings: Settings,
    rows: int,
    captured_shapes: bool | None = None,
) -> Iterator[BatchAnswer | LlavaError]:
    """Answer independent prompts on one `DecodeBatch` of at most `rows` rows, admitted continuously:
    a row that ends is replaced at once by the next prompt, so no row waits for the longest answer.

    Each of `prompts` makes its prompt when admitted (an image is read then, not before) or raises
    `LlavaError`. One result per prompt, in order: its `BatchAnswer`, or the `LlavaError` that failed
    it alone (its prompt, its row's scores, out of memory in its prefill or its step alone, a row
    over the whole `--cache-mb` budget). A prompt the budget has no room for while rows run waits,
    made, until one ends. No cache is reused (an empty pool): a batch sees each image once.
    `captured_shapes`: as `DecodeBatch`'s.
    """
    batch = DecodeBatch(engine, PrefixPool(None), captured_shapes=captured_shapes)
    done: dict[int, BatchAnswer | LlavaError] = {}
    running: dict[
        Sequence, tuple[int, float, tuple[dict[str, Any], ...]]
    ] = {}  # a row's index among `prompts`, when it was admitted, its videos
    waiting, emitted, exhausted = enumerate(prompts), 0, False
    held: tuple[int, Callable[[], Prompt]] | None = None  # made, waiting for room in the budget

    def end(sequence: Sequence, index: int, started: float, videos: tuple[dict[str, Any], ...]) -> None:
        done[index] = sequence.error or BatchAnswer(
            before_stop(engine.decode(sequence.row.tokens), settings.stop),
            len(sequence.prompt_ids),
            len(sequence.row.tokens),
            sequence.row.finish_reason,
            time.perf_counter() - started,
            videos,
            sequence.logprobs,
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


def rows_that_fit(engine: Runner, window: int) -> int:
    """The default --max-batch (module docstring): rows whose worst-case KV cache fits the `--cache-mb` budget."""
    if engine.loaded.device != "cuda":
        return CPU_MAX_BATCH
    limit = engine.budget.limit_bytes or budget_for(None, "cuda").limit_bytes  # --cache-mb 0: the device's memory
    if limit is None:
        return MAX_BATCH_LIMIT
    return max(1, min(MAX_BATCH_LIMIT, limit // (kv_bytes_per_token(engine.model) * window)))
