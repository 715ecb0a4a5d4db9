"""Batched generation: answer several independent prompts in one `model.generate` call.

`generate_batch(engine, prompts, settings)` takes prompts encoded by `Engine.encode` (so they are
rendered and tokenized exactly as a single answer would be) and returns one `BatchAnswer` per
prompt, in order. Prompts of different lengths are padded on the left, with an attention mask
that hides the padding, so every row is generated as if it were alone: greedy answers are the
ones `Engine.generate` (and plain `transformers`) gives for each prompt by itself. Each row stops
at its own end-of-sequence token or its own token budget (`--max-new-tokens`, and the room left
in the context window). The engine's KV cache is not touched; its memo of preprocessed images
is emptied after each batch, since a batch run sees each image once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_cli.engine import Engine, Prompt
from llava_cli.errors import ResourceError
from llava_cli.settings import Settings


@dataclass(frozen=True)
class BatchAnswer:
    """One prompt's answer: the stripped text and its figures."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence) or "length" (token budget spent)


def seed_sampling(settings: Settings) -> None:
    """Make sampled batches repeatable with --seed (greedy needs no seed)."""
    if not settings.greedy and settings.seed is not None:
        import torch

        torch.manual_seed(settings.seed)


def token_budget(engine: Engine, prompt: Prompt, settings: Settings) -> int:
    """New tokens this prompt may have: --max-new-tokens, within the context window."""
    return min(settings.max_new_tokens, engine.context_window(settings) - len(prompt.ids))


def generate_batch(engine: Engine, prompts: list[Prompt], settings: Settings) -> list[BatchAnswer]:
    """Answer every prompt (each must leave room for at least one new token) in one batch."""
    import torch

    model, tokenizer = engine.model, engine.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(engine.eos_ids)
    longest = max(len(prompt.ids) for prompt in prompts)
    # Left padding: every row's last prompt token sits in the last column, so the new tokens
    # of all rows are appended in the same step; the mask keeps rows from seeing the padding.
    input_ids = [[pad_id] * (longest - len(p.ids)) + p.ids for p in prompts]
    mask = [[0] * (longest - len(p.ids)) + [1] * len(p.ids) for p in prompts]
    budgets = [token_budget(engine, prompt, settings) for prompt in prompts]
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids=torch.tensor(input_ids, device=model.device),
                attention_mask=torch.tensor(mask, device=model.device),
                max_new_tokens=max(budgets),
                pad_token_id=pad_id,
                eos_token_id=sorted(engine.eos_ids),
                **sampling_options(settings),
                **image_inputs(engine, prompts),
            )
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of memory answering {len(prompts)} images at once; lower --batch-size") from None
    finally:
        engine.vision.clear()  # each image is seen once: keeping them would grow with the run
    new_tokens = output[:, longest:].tolist()
    return [answer(engine, tokens[:budget], len(prompt.ids)) for tokens, budget, prompt in zip(new_tokens, budgets, prompts)]


def sampling_options(settings: Settings) -> dict[str, Any]:
    if settings.greedy:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": None}


def image_inputs(engine: Engine, prompts: list[Prompt]) -> dict[str, Any]:
    """The image arguments of every prompt, in prompt order, joined into one batch."""
    import torch

    per_prompt = [engine.image_inputs(prompt, keep=0) for prompt in prompts if prompt.images]
    return {name: torch.cat([inputs[name] for inputs in per_prompt]) for name in per_prompt[0]} if per_prompt else {}


def answer(engine: Engine, tokens: list[int], prompt_tokens: int) -> BatchAnswer:
    """Cut a row's new tokens at its first end-of-sequence token and decode them."""
    for count, token in enumerate(tokens):
        if token in engine.eos_ids:
            tokens, finish_reason = tokens[:count], "stop"
            break
    else:
        finish_reason = "length"
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return BatchAnswer(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(tokens), finish_reason=finish_reason)
