"""The decoding core shared by one answer and a batch: the token budget, the sampler, the batch loop.

- `token_budget`: how many new tokens an answer may have (`--max-new-tokens`, within the room its
  prompt leaves in the context window). Both the streamed answer and every batch row use it.
- `Sampler`: greedy argmax at temperature 0, else temperature + top-p sampling. Each row draws
  with its own `torch.Generator` seeded with `--seed`, from its own row's float32 probabilities,
  so a seeded answer does not depend on the batch it is in: `ask`, `ask --each` and any
  `--batch-size` give an image the same answer.
- `decode_batch`: independent prompts answered together, with no cache reuse. Prompts are padded
  on the left with an attention mask that hides the padding, and each row's positions come from
  its mask (`cumsum(mask) - 1`), as plain `transformers.generate` does, so greedy answers are the
  ones each prompt gets alone. A row leaves the batch at its first end-of-sequence token or when
  its budget is spent; the others go on without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava_cli.settings import Settings


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
    """Greedy argmax at temperature 0, else temperature + top-p sampling, one generator per row."""

    def __init__(self, settings: Settings, device: str, rows: int = 1) -> None:
        self.settings = settings
        self.generators = [] if settings.greedy else [new_generator(settings.seed, device) for _ in range(rows)]

    def pick(self, logits: Any, row: int = 0) -> int:
        """The next token of `row` from its logits (a vector over the vocabulary)."""
        return int(self.choose(logits, row))

    def choose(self, logits: Any, row: int = 0) -> Any:
        """`pick` without leaving the device: the token as a one-element tensor (no host sync)."""
        import torch

        if self.settings.greedy:
            return torch.argmax(logits)
        return torch.multinomial(self.probabilities(logits), 1, generator=self.generators[row])

    def pick_rows(self, logits: Any, rows: list[int]) -> list[int]:
        """The next token of each of `rows` from `logits` (one line per row, in that order)."""
        if self.settings.greedy:
            return logits.argmax(dim=-1).tolist()
        return [self.pick(line, row) for line, row in zip(logits, rows)]

    def probabilities(self, logits: Any) -> Any:
        """Softmax at the temperature, in float32, with everything outside the top-p nucleus zeroed."""
        import torch

        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > self.settings.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return probs


@dataclass
class Row:
    """One prompt's progress through a batch: its new tokens and, once it has stopped, why."""

    budget: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "" while it runs, then "stop" (end-of-sequence) or "length" (budget spent)

    def take(self, token: int, eos_ids: set[int]) -> None:
        if token in eos_ids:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if len(self.tokens) >= self.budget:
            self.finish_reason = "length"


@dataclass
class PaddedBatch:
    """The running rows' last inputs: token ids, the attention mask over everything so far, positions."""

    ids: Any
    mask: Any
    positions: Any

    @classmethod
    def left_padded(cls, prompts: list[list[int]], pad_id: int, device: Any) -> PaddedBatch:
        import torch

        # Left padding puts every row's last prompt token in the last column, so all rows take
        # their next token in the same step; the mask keeps rows from seeing the padding.
        longest = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        return cls(ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))

    def advance(self, tokens: list[int], keep: Any) -> None:
        """Keep the rows at indices `keep` and feed each its newest token."""
        import torch

        mask = self.mask[keep]
        self.ids = torch.tensor(tokens, device=mask.device).unsqueeze(1)
        self.mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions[keep, -1:] + 1


def decode_batch(
    model: Any, prompts: list[list[int]], image_inputs: dict[str, Any], budgets: list[int], sampler: Sampler, eos_ids: set[int], pad_id: int
) -> list[Row]:
    """Answer every prompt (each with a budget of at least one token); one `Row` per prompt, in order."""
    import torch
    from transformers import DynamicCache

    rows = [Row(budget) for budget in budgets]
    running = list(range(len(rows)))  # the rows still in the batch, in batch order
    batch = PaddedBatch.left_padded(prompts, pad_id, model.device)
    cache = DynamicCache(config=model.config.text_config)
    with torch.inference_mode():
        logits = forward(model, cache, batch, image_inputs)
        while True:
            for index, token in zip(running, sampler.pick_rows(logits, running)):
                rows[index].take(token, eos_ids)
            keep = [place for place, index in enumerate(running) if not rows[index].finish_reason]
            if not keep:
                return rows
            if len(keep) < len(running):
                cache.batch_select_indices(torch.tensor(keep, device=model.device))
            running = [running[place] for place in keep]
            batch.advance([rows[index].tokens[-1] for index in running], keep)
            logits = forward(model, cache, batch, {})


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
