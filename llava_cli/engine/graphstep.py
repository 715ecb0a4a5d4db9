"""The default decode path on a GPU: a static KV cache grown in buckets, and a one-token step that never
waits for the host and, on a GPU, is replayed as a CUDA graph.

`StaticPath` is a `ForwardPath` (engine/paths.py). Its contract:

- Cache: a transformers `StaticCache` of the smallest bucket (`BUCKET_TOKENS`, then doubling,
  capped at the context window) that holds the turn: `cache_for(cache, held, needed)` before each
  prefill. A turn that outgrows the bucket gets the next one with the `held` keys and values copied
  into it on the device (cheaper than running the prompt and its images again; nothing is read back
  to the host) and the step captured again. The bucket is kept across turns and `/clear`, so the
  captured graph is kept too; memory is the largest bucket the conversation needed.
- Prefill (several tokens, or images) runs eagerly, as on every path.
- Decode (`steps`): the next token is chosen on the device (argmax, or the `Sampler`'s seeded
  draw: the same math and generator as engine/pipeline.py, so seeded answers do not change) and written
  in place into static input buffers (token id and position). `launch()` runs the one-token step
  over them, which chooses the following token; `read()` brings the token chosen before that launch
  to the host (a pinned copy and an event: it waits for that copy, not for the step launched after
  it). The engine launches step N+1 before it reads token N: one step of look-ahead, and the only
  host syncs are the reads that stream text.
- The write position is the cache's own `cumulative_length`, on the device; the position buffer is
  set from the engine's bookkeeping once per turn. A crop moves the write position back in place, so
  prefix reuse across turns works as on the other paths.
- CUDA graph: on CUDA, greedy and without --no-cuda-graph (`uncaptured_reason`), the step is captured
  once per bucket and replayed. If capture fails, the step runs uncaptured and a note (one line,
  shown with --verbose) says why; nothing else changes. Sampling runs uncaptured: its generator's
  state would have to be registered with the graph. On a CPU the step always runs uncaptured.
- It needs an attention that masks the static cache's empty and stale slots (forward.MASKED_ATTENTION)
  and a cache without sliding-window layers; `default_path` picks `EagerPath` otherwise, with a note.
  On a CPU and on Apple silicon (MPS) `default_path` picks `EagerPath` too: on a CPU it decodes faster (bench/decode_paths_cpu.py).
"""

from __future__ import annotations

from typing import Any

from llava_cli.base.errors import one_line
from llava_cli.base.settings import Settings
from llava_cli.engine.paths import MASKED_ATTENTION, EagerPath, ForwardPath, HostSteps, run_model
from llava_cli.engine.pipeline import Sampler

BUCKET_TOKENS = (1024, 2048, 4096)  # static cache sizes; past the last, doubling; never beyond the context window


def bucket_size(needed: int, window: int, buckets: tuple[int, ...] = BUCKET_TOKENS) -> int:
    """The smallest bucket of at least `needed` tokens, capped at the context window."""
    size = next((bucket for bucket in buckets if bucket >= needed), buckets[-1])
    while size < needed:
        size *= 2
    return min(size, window)


def uncaptured_reason(device_type: str, cuda_graph: bool, greedy: bool) -> str | None:
    """Why the decode step is not captured in a CUDA graph, or None when it is."""
    if device_type != "cuda":
        return "no CUDA device"
    if not cuda_graph:
        return "--no-cuda-graph"
    if not greedy:
        return "sampling draws from a seeded generator that the graph does not carry"
    return None


FLASH_NOTE = (
    "flash-attention 2 cannot mask a static cache's empty slots, so decoding keeps a growing "
    "dynamic cache without a CUDA graph (--attn sdpa for the static cache)"
)
SLIDING_NOTE = "this model's sliding-window layers keep a growing dynamic cache, without a CUDA graph"
# bench/decode_paths_cpu.py (bench/RESULTS.md): on a CPU there is no graph to replay, and the static
# bucket's masked attention over empty slots costs more than it saves (0.88x plain generate on a
# 300M-parameter decoder against the eager path's 1.08x; 0.88x against 1.06x on the tiny model).
MPS_NOTE = "on Apple silicon (MPS) decoding keeps a growing dynamic cache with plain eager forwards"
CPU_NOTE = "on a CPU decoding keeps a growing dynamic cache (the static cache is for GPUs: it measured slower here)"


def default_path(model: Any, settings: Settings, window: int, buckets: tuple[int, ...] = BUCKET_TOKENS) -> ForwardPath:
    """The path without --compile: `StaticPath` on a GPU where the model allows it, else `EagerPath`
    (the faster on a CPU) with a note saying why."""
    if model.config._attn_implementation not in MASKED_ATTENTION:
        return EagerPath(model, note=FLASH_NOTE)
    if has_sliding_layers(model):
        return EagerPath(model, note=SLIDING_NOTE)
    if model.device.type == "mps":  # the static path's in-place device-side steps are only tried on CUDA
        return EagerPath(model, note=MPS_NOTE)
    if model.device.type == "cpu":
        return EagerPath(model, note=CPU_NOTE)
    return StaticPath(model, window, cuda_graph=not settings.no_cuda_graph, buckets=buckets)


def has_sliding_layers(model: Any) -> bool:
    """Whether a static cache of `model` would have sliding-window layers (whose write position is a Python int)."""
    from transformers import StaticCache

    return any(
        getattr(layer, "is_sliding", False) for layer in StaticCache(config=model.config, max_cache_len=1).layers
    )


class StaticPath:
    """The default path: a bucketed static cache, eager prefill, device-chosen decode steps."""

    def __init__(
        self, model: Any, window: int, *, cuda_graph: bool = True, buckets: tuple[int, ...] = BUCKET_TOKENS
    ) -> None:
        self.model = model
        self.window = window
        self.cuda_graph = cuda_graph
        self.buckets = buckets
        self.cache: Any = None
        self.size = 0  # tokens the current bucket holds
        self.step: DecodeStep | None = None  # the current bucket's step (and its graph, if captured)
        self.capture_failure: str | None = None  # once capture failed, it is not tried again
        self.notes: list[str] = []  # one-line explanations for --verbose, each said once
        self.noted: set[str] = set()

    def suits(self, settings: Settings, window: int) -> bool:
        return not settings.compile and window == self.window and self.cuda_graph == (not settings.no_cuda_graph)

    def cache_for(self, cache: Any, held: int, needed: int) -> Any:
        """A cache holding the first `held` tokens of `cache` (None: nothing) with room for `needed`."""
        import torch
        from transformers import StaticCache

        if cache is None and self.cache is not None:
            with torch.inference_mode():
                self.cache.reset()  # the same tensors, emptied: the captured graph still points at them
            cache = self.cache
        if cache is not None and needed <= self.size:
            return cache
        size = bucket_size(needed, self.window, self.buckets)
        bigger = StaticCache(config=self.model.config, max_cache_len=size)
        if cache is not None and held:
            copy_held(cache, bigger, held)
        self.cache, self.size, self.step = bigger, size, None  # the old bucket and its graph are freed
        return bigger

    def __call__(self, cache: Any, ids: list[int], start: int, image_inputs: dict[str, Any]) -> Any:
        return run_model(self.model, self.model, cache, ids, start, image_inputs)

    def steps(
        self, cache: Any, logits: Any, start: int, sampler: Sampler, eos_ids: set[int]
    ) -> DeviceSteps | HostSteps:
        """This turn's decode steps, after a prefill that left `start` tokens in `cache` and `logits`."""
        if self.step is None or self.step.cache is not cache:
            self.step = DecodeStep(self.model, cache)
        if sampler.hooks:  # a hook sees each token before the next is chosen: no look-ahead on the device
            return HostSteps(self, cache, logits, start, sampler, eos_ids)
        reason = uncaptured_reason(self.model.device.type, self.cuda_graph, sampler.settings.greedy)
        if reason and self.model.device.type == "cuda" and reason not in self.noted:
            self.noted.add(reason)
            self.notes.append(f"decode steps run without a CUDA graph: {reason}")
        return DeviceSteps(self, self.step, logits, start, sampler, capture=reason is None)

    def capture(self, step: DecodeStep) -> None:
        """Capture `step` unless it is captured or capture failed before; a failure becomes a note."""
        if step.graph is not None or self.capture_failure is not None:
            return
        try:
            step.capture()
        except Exception as err:  # whatever stops a capture, the uncaptured step gives the same answers
            self.capture_failure = f"{type(err).__name__}: {one_line(err)}"
            self.notes.append(f"CUDA graph capture failed ({self.capture_failure}); decoding without it")
            return
        self.notes.append(f"decode steps replay a CUDA graph over a {self.size}-token static cache")

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


def copy_held(old: Any, new: Any, held: int) -> None:
    """The first `held` tokens' keys and values of each layer of `old` into `new`, on the device."""
    import torch

    with torch.inference_mode():  # the old tensors were made under it
        for source, target in zip(old.layers, new.layers):
            if not source.is_initialized:
                continue
            target.lazy_initialization(source.keys, source.values)
            target.keys[:, :, :held].copy_(source.keys[:, :, :held])
            target.values[:, :, :held].copy_(source.values[:, :, :held])
            target.cumulative_length.copy_(source.cumulative_length)


class DecodeStep:
    """The one-token step over one bucket's cache: static input buffers, run eagerly or replayed."""

    def __init__(self, model: Any, cache: Any) -> None:
        import torch

        self.model = model
        self.cache = cache
        with torch.inference_mode():
            self.ids = torch.zeros((1, 1), dtype=torch.long, device=model.device)
            self.positions = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        self.graph: Any = None

    def start(self, token: Any, position: int) -> None:
        """Set the buffers for a turn: the first chosen token and where it goes."""
        import torch

        with torch.inference_mode():
            self.ids.copy_(token.view(1, 1))
            self.positions.fill_(position)

    def forward(self, choose: Any) -> None:
        """Run the token in `ids` at `positions`, choose the next with `choose(logits)` into `ids`."""
        import torch

        with torch.inference_mode():
            logits = run_step(self.model, self.ids, self.positions, self.cache)
            self.ids.copy_(choose(logits).view(1, 1))
            self.positions.add_(1)

    def run(self, choose: Any, replay: bool) -> None:
        if replay and self.graph is not None:
            self.graph.replay()
        else:
            self.forward(choose)

    def capture(self) -> None:
        """Record the greedy step as a CUDA graph; the buffers and the cache are left as they were.

        A warm-up run on a side stream comes first (as CUDA graphs require): it writes one key and
        value past the write position, which the restore moves back over (the slot is overwritten
        by the next real step), whether or not anything raised."""
        import torch

        saved_ids, saved_positions = self.ids.clone(), self.positions.clone()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self.forward(greedy_choice)
            torch.cuda.current_stream().wait_stream(side)
            # thread_local: CUDA work of another thread (a server's) does not spoil this capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.forward(greedy_choice)
        finally:
            self.restore(saved_ids, saved_positions)
        self.graph = graph

    def restore(self, ids: Any, positions: Any) -> None:
        import torch

        with torch.inference_mode():
            self.ids.copy_(ids)
            self.positions.copy_(positions)
            for layer in self.cache.layers:  # the write position is where the next token goes
                layer.cumulative_length.copy_(positions.view(()))


def greedy_choice(logits: Any) -> Any:
    import torch

    return torch.argmax(logits)


def run_step(model: Any, ids: Any, positions: Any, cache: Any) -> Any:
    """One forward of the token in `ids` at `positions`: the next token's logits, no host sync."""
    output = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    return output.logits[0, -1]


class DeviceSteps:
    """One turn's decode over a `DecodeStep`: `launch()` feeds the chosen token and chooses the next
    on the device; `read()` is the one host sync, for the token chosen before the last launch."""

    def __init__(
        self, path: StaticPath, step: DecodeStep, logits: Any, start: int, sampler: Sampler, capture: bool
    ) -> None:
        self.path = path
        self.step = step
        self.choose = sampler.choose
        self.capture = capture
        self.reader = TokenReader(step.ids.device)
        step.start(self.choose(logits), start)
        self.staged = False

    def launch(self) -> bool:
        """Feed the chosen token and choose the next; True: the token was fed (always, here)."""
        if self.capture:
            self.path.capture(self.step)
        self.reader.stage(self.step.ids)  # copied out before the step overwrites it
        self.step.run(self.choose, replay=self.capture)
        self.staged = True
        return True

    def read(self) -> int:
        """The token chosen before the last `launch` (or the current one, if none since the last read)."""
        if not self.staged:
            self.reader.stage(self.step.ids)
        self.staged = False
        return self.reader.value()


class TokenReader:
    """Brings a one-token tensor to the host: on CUDA a non-blocking copy into pinned memory and an
    event, so reading waits for that copy only, not for the work queued after it."""

    def __init__(self, device: Any) -> None:
        import torch

        on_cuda = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.long, pin_memory=on_cuda)
        self.copied = torch.cuda.Event() if on_cuda else None

    def stage(self, token: Any) -> None:
        self.host.copy_(token.view(1), non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def value(self) -> int:
        if self.copied is not None:
            self.copied.synchronize()
        return int(self.host[0])
