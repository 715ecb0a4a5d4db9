"""Forward paths: how the engine runs the model over its KV cache.

A path makes the cache (`new_cache`) and runs token ids after what the cache holds (`__call__`),
returning the logits for the next token. The engine never looks inside the cache beyond `crop`.

- `EagerPath` (the default): a `DynamicCache` that grows with the conversation; every forward is a
  plain eager call (SDPA or flash-attention, whatever the model was loaded with).
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

from llava_cli.errors import LlavaError
from llava_cli.settings import COMPILE_ATTENTION_REASON

MASKED_ATTENTION = ("sdpa", "eager")  # the attentions that take the mask hiding a static cache's unused slots


class ForwardPath(Protocol):
    def suits(self, compile: bool, window: int) -> bool:
        """Whether this path serves `--compile` = `compile` with a context window of `window` tokens."""
        ...

    def new_cache(self) -> Any:
        """An empty KV cache for this path."""
        ...

    def __call__(self, cache: Any, ids: list[int], start: int, image_inputs: dict[str, Any]) -> Any:
        """Run `ids` after the `start` tokens `cache` holds and return the next token's logits.
        `image_inputs` are the model's keyword inputs for the new images (`pixel_values`, ...), or {}."""
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


class EagerPath:
    """The default path: a growing `DynamicCache` and plain eager forwards."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def suits(self, compile: bool, window: int) -> bool:
        return not compile

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.text_config)

    def __call__(self, cache: Any, ids: list[int], start: int, image_inputs: dict[str, Any]) -> Any:
        return run_model(self.model, self.model, cache, ids, start, image_inputs)


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

    def suits(self, compile: bool, window: int) -> bool:
        return compile and window <= self.window

    def new_cache(self) -> Any:
        import torch

        # The same tensors every time (new ones would make the compiled step recompile), emptied.
        # They were made under inference mode, so they can only be written to under it.
        with torch.inference_mode():
            self.cache.reset()
        return self.cache

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


def forward_path(model: Any, compile: bool, window: int) -> ForwardPath:
    return CompiledPath(model, window) if compile else EagerPath(model)
