"""The per-row token pipeline every path decodes with: the token budget, the sampler, the hooks, the checks.

- `token_budget`: how many new tokens an answer may have (`--max-new-tokens`, within the room its
  prompt leaves in the context window). The streamed answer, every batch row and every serve row use it.
- `Sampler`: one row's choice of its next token. Greedy argmax when the temperature is below
  `settings.GREEDY_BELOW` (as vLLM: a temperature that small would overflow float32), else
  temperature + top-p sampling from the row's own float32 probabilities with the row's own
  `torch.Generator` seeded with `--seed` (a request's `seed`), so a seeded answer does not depend on
  the batch it is in or the path that runs it: `ask`, `chat`, `ask --each` at any `--batch-size`
  and `serve` give a prompt the same answer. Before the draw, each `TokenHook` may mask tokens.
- `TokenHook`: what later work plugs into every row, written once for every path: `constrain`
  (a token mask, e.g. structured output: logits with forbidden tokens at -inf, on the device) and
  `accepted` (each chosen token: logprobs, stop sequences; it may end the row). A row's hooks are
  given to its `Sampler` and its `Row`.
- `RowFault`: one row's scores went bad (not finite) or its draw failed. Only that row fails: the
  scheduler (engine/scheduler.py) takes it out and the other rows go on. `checked_argmax(logits)` is the
  per-row check and the greedy tokens, in one host sync for the whole batch.
- `Row`: one answer's tokens and, once it has stopped, why.
- `forward`: one forward of the model over a batch's new ids after what a `DynamicCache` holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llava_cli.base.errors import LlavaError, one_line
from llava_cli.base.settings import Settings

NOT_FINITE = "the model's scores for this answer became NaN or infinite; try another --temperature or a float32 --dtype"


class RowFault(LlavaError):
    """One row's scores or draw went bad: that answer fails alone."""


class TokenHook(Protocol):
    """A per-row step of the token pipeline (see the module docstring); every method is called on every path."""

    def constrain(self, logits: Any) -> Any:
        """The row's next-token logits with the tokens it may not take at -inf (the same tensor when none)."""
        ...

    def accepted(self, token: int) -> bool:
        """Take note of the row's chosen token (not an end-of-sequence one); True ends the row ("stop")."""
        ...


def token_budget(settings: Settings, window: int, prompt_tokens: int) -> int:
    """New tokens an answer to a `prompt_tokens`-token prompt may have in a `window`-token context."""
    return min(settings.max_new_tokens, window - prompt_tokens)


def new_generator(seed: int | None, device: str) -> Any:
    import torch

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class Sampler:
    """One row's next token: greedy argmax, or temperature + top-p sampling with the row's own generator."""

    def __init__(self, settings: Settings, device: str, hooks: Sequence[TokenHook] = ()) -> None:
        self.settings = settings
        self.hooks = tuple(hooks)
        self.generator = None if settings.greedy else new_generator(settings.seed, device)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no hook: a batch may take this row's token from one argmax over all rows."""
        return self.settings.greedy and not self.hooks

    def pick(self, logits: Any) -> int:
        """The next token from the row's logits (a vector over the vocabulary); `RowFault` if the draw fails."""
        try:
            return int(self.choose(logits))
        except RuntimeError as err:  # torch.multinomial refuses a distribution that is not one
            raise RowFault(f"{NOT_FINITE} ({one_line(err)})") from None

    def choose(self, logits: Any) -> Any:
        """`pick` without leaving the device: the token as a one-element tensor (no host sync)."""
        import torch

        for hook in self.hooks:
            logits = hook.constrain(logits)
        if self.settings.greedy:
            return torch.argmax(logits)
        return torch.multinomial(self.probabilities(logits), 1, generator=self.generator)

    def probabilities(self, logits: Any) -> Any:
        """Softmax at the temperature, in float32, with everything outside the top-p nucleus zeroed."""
        import torch

        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > self.settings.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return probs


def checked_argmax(logits: Any) -> list[int | None]:
    """For each row of `logits` ([rows, vocabulary]) its argmax, or None where the row went bad (a NaN
    or +inf score, or no finite one; -inf alone is a token ruled out): the batch's greedy tokens and
    its per-row check in one host sync."""
    import torch

    # A row's max is NaN when it holds a NaN, +inf when it holds +inf and -inf when no score is finite:
    # one reduction checks all three and gives the argmax.
    top, tokens = logits.max(dim=-1)
    return [None if token < 0 else token for token in torch.where(torch.isfinite(top), tokens, -1).tolist()]


@dataclass
class Row:
    """One answer's progress: its new tokens and, once it has stopped, why."""

    budget: int
    hooks: Sequence[TokenHook] = ()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = (
        ""  # "" while it runs, then "stop" (end-of-sequence, or a hook ended it) or "length" (budget spent)
    )

    def take(self, token: int, eos_ids: set[int]) -> None:
        if token in eos_ids:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if any([hook.accepted(token) for hook in self.hooks]):  # noqa: C419 (a list: every hook sees every token)
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.budget:
            self.finish_reason = "length"


@dataclass
class PaddedBatch:
    """The running rows' last inputs: token ids, the attention mask over everything so far (None: no padding), positions."""

    ids: Any
    mask: Any
    positions: Any


def forward(model: Any, cache: Any, batch: PaddedBatch, image_inputs: dict[str, Any]) -> Any:
    """One forward over the batch's new ids after what `cache` holds; the next-token logits, a row each."""
    output = model(
        input_ids=batch.ids,
        attention_mask=batch.mask,
        position_ids=batch.positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **image_inputs,
    )
    return output.logits[:, -1]
