"""Forward paths: how the engine runs the model over its KV cache.

A path gives the cache for a turn (`cache_for`), runs token ids after what the cache holds
(`__call__`, the prefill), returning the logits for the next token, and gives the turn's decode
`Steps` (`steps`): `launch()` feeds the chosen token and computes the next one, `read()` returns the
chosen token on the host. The engine never looks inside the cache beyond `crop`.

- `StaticPath` (engine/graphstep.py) is the default on a GPU: a bucketed static cache and device-chosen steps,
  replayed as a CUDA graph.
- `EagerPath` (the default on a CPU, where it decodes faster, and with flash-attention, which cannot
  mask a static cache): a `DynamicCache`
  that grows with the conversation; every forward is a plain eager call, each token picked on the host.
- `CompiledPath` (`--compile`): one `StaticCache` sized for the whole context window, allocated
  once and kept for the engine's life. Prefill (several tokens, or images) runs eagerly; one-token
  decode steps run through `torch.compile` (CUDA graphs on a GPU), whose fixed shapes a static
  cache makes possible. Cropping a static cache only moves its write position back: the stale
  keys behind it are masked out by causality and overwritten by the next tokens, so cache reuse
  across turns works as with the default path. Greedy answers are the same as the default path's.
  The first answer pays for compiling (seconds on a GPU, up to a minute on a CPU), and attention
  always spans the whole window (masked), which makes prefill slower than on the default path.
"""

from __future__ import annotations

from typing import Any, Protocol

from llava_cli.base.errors import LlavaError
from llava_cli.base.settings import COMPILE_ATTENTION_REASON, Settings
from llava_cli.engine.pipeline import Sampler

MASKED_ATTENTION = ("sdpa", "eager")  # the attentions that take the mask hiding a static cache's unused slots


class Steps(Protocol):
    def launch(self) -> bool:
        """Feed the chosen token to the model and choose the next; False when it was not fed (an
        end-of-sequence token a host-side step saw). A device-side step feeds it unseen: the engine
        crops what the answer does not use."""
        ...

    def read(self) -> int:
        """The token chosen before the last `launch` (or the one chosen now, if none since the last read)."""
        ...


class ForwardPath(Protocol):
    def suits(self, settings: Settings, window: int) -> bool:
        """Whether this path serves `settings` with a context window of `window` tokens."""
        ...

    def cache_for(self, cache: Any, held: int, needed: int) -> Any:
        """A cache holding the first `held` tokens of `cache` (None: an empty one) with room for `needed` tokens."""
        ...

    def __call__(self, cache: Any, ids: list[int], start: int, image_inputs: dict[str, Any]) -> Any:
        """Run `ids` after the `start` tokens `cache` holds and return the next token's logits.
        `image_inputs` are the model's keyword inputs for the new images (`pixel_values`, ...), or {}."""
        ...

    def steps(self, cache: Any, logits: Any, start: int, sampler: Sampler, eos_ids: set[int]) -> Steps:
        """The turn's decode steps after a prefill that left `start` tokens in `cache` and gave `logits`."""
        ...

    def take_notes(self) -> list[str]:
        """One-line explanations of how the path runs, for --verbose, each given once."""
        ...


def run_model(call: Any, model: Any, cache: Any, ids: list[int], start: int, image_inputs: dict[str, Any]) -> Any:
    """One forward of `call` (the model or a compiled wrapper of it) over `ids` at positions `start`...;
    `start` comes from the engine's bookkeeping so a static cache's position is never read back."""
    import torch

    with torch.inference_mode():
        output = call(
            input_ids=torch.tensor([ids], device=model.device),
            position_ids=torch.arange(start, start + len(ids), device=model.device).unsqueeze(0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **image_inputs,
        )
    return output.logits[0, -1]


class HostSteps:
    """The decode steps of the eager and --compile paths: each token picked on the host (one sync
    per token) and then run; an end-of-sequence token is never run."""

    def __init__(
        self, path: ForwardPath, cache: Any, logits: Any, start: int, sampler: Sampler, eos_ids: set[int]
    ) -> None:
        self.path, self.cache, self.logits, self.position = path, cache, logits, start
        self.sampler, self.eos_ids = sampler, eos_ids
        self.picked: int | None = None

    def launch(self) -> bool:
        self.picked = self.sampler.pick(self.logits)
        if self.picked in self.eos_ids:
            return False
        self.logits = self.path(self.cache, [self.picked], self.position, {})
        self.position += 1
        return True

    def read(self) -> int:
        token = self.picked if self.picked is not None else self.sampler.pick(self.logits)
        self.picked = None
        return token


class EagerPath:
    """A growing `DynamicCache` and plain eager forwards (`note`: why it was chosen, for --verbose)."""

    def __init__(self, model: Any, note: str | None = None) -> None:
        self.model = model
        self.notes = [note] if note else []

    def suits(self, settings: Settings, window: int) -> bool:
        return not settings.compile

    def cache_for(self, cache: Any, held: int, needed: int) -> Any:
        from transformers import DynamicCache

        return cache if cache is not None else DynamicCache(config=self.model.config.text_config)

    def __call__(self, cache: Any, ids: list[int], start: int, image_inputs: dict[str, Any]) -> Any:
        return run_model(self.model, self.model, cache, ids, start, image_inputs)

    def steps(self, cache: Any, logits: Any, start: int, sampler: Sampler, eos_ids: set[int]) -> Steps:
        return HostSteps(self, cache, logits, start, sampler, eos_ids)

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


class CompiledPath:
    """`--compile`: a static cache for `window` tokens; decode steps through `torch.compile`.

    `compile_step=False` runs the very same static-cache path without compiling; the tests use it
    because compiling on a CPU costs up to a minute.
    """

    def __init__(self, model: Any, window: int, *, compile_step: bool = True) -> None:
        from transformers import StaticCache

        if model.config._attn_implementation not in MASKED_ATTENTION:
            raise LlavaError(f"--compile needs --attn sdpa or eager: {COMPILE_ATTENTION_REASON}")
        self.model = model
        self.window = window
        self.cache = StaticCache(config=model.config, max_cache_len=window)
        self.step = compiled(model) if compile_step else model

    def suits(self, settings: Settings, window: int) -> bool:
        return settings.compile and window <= self.window

    def cache_for(self, cache: Any, held: int, needed: int) -> Any:
        if cache is not None:
            return cache
        import torch

        # The same tensors every time (new ones would make the compiled step recompile), emptied.
        # They were made under inference mode, so they can only be written to under it.
        with torch.inference_mode():
            self.cache.reset()
        return self.cache

    def steps(self, cache: Any, logits: Any, start: int, sampler: Sampler, eos_ids: set[int]) -> Steps:
        return HostSteps(self, cache, logits, start, sampler, eos_ids)

    def take_notes(self) -> list[str]:
        return []

    def __call__(self, cache: Any, ids: list[int], start: int, image_inputs: dict[str, Any]) -> Any:
        if len(ids) > 1 or image_inputs:
            return run_model(self.model, self.model, cache, ids, start, image_inputs)  # prefill: shapes vary
        import torch

        try:
            return run_model(self.step, self.model, cache, ids, start, {})
        except torch._dynamo.exc.TorchDynamoException as err:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LlavaError(f"--compile failed ({first_line}); run without --compile") from None


def compiled(model: Any) -> Any:
    """`model.__call__` compiled for one-token steps; CUDA graphs remove the launch overhead on a GPU."""
    import torch

    mode = "reduce-overhead" if model.device.type == "cuda" else "default"
    return torch.compile(model.__call__, mode=mode, dynamic=False, fullgraph=False)
