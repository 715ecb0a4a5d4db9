"""`Sampler` and `token_budget` on hand-made logits: no model, no checkpoint (torch only)."""

from __future__ import annotations

import math

import pytest
import torch

from llava_cli.decoding import Row, Sampler, token_budget
from llava_cli.settings import Settings

GREEDY = Settings()
SAMPLED = Settings(temperature=0.9, top_p=0.9, seed=7)


def logits_of(probabilities: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probabilities])


def test_greedy_picks_the_largest_logit_for_one_row_and_for_each_row():
    sampler = Sampler(GREEDY, "cpu")
    assert sampler.pick(torch.tensor([0.1, 2.0, -1.0, 1.9])) == 1
    assert sampler.pick_rows(torch.tensor([[0.1, 2.0, 0.0], [3.0, 2.0, 0.0], [0.0, 0.0, 0.5]]), [0, 1, 2]) == [1, 0, 2]


def test_top_p_keeps_the_smallest_set_of_tokens_that_reaches_it():
    sampler = Sampler(Settings(temperature=1.0, top_p=0.7, seed=1), "cpu")
    probabilities = sampler.probabilities(logits_of([0.15, 0.5, 0.05, 0.3]))
    assert probabilities.tolist() == pytest.approx([0.0, 0.5, 0.0, 0.3])
    draws = {sampler.pick(logits_of([0.15, 0.5, 0.05, 0.3])) for _ in range(200)}
    assert draws == {1, 3}


def test_temperature_sharpens_in_float32():
    sampler = Sampler(Settings(temperature=0.5, top_p=1.0, seed=1), "cpu")
    probabilities = sampler.probabilities(logits_of([0.25, 0.75]).half())
    assert probabilities.dtype == torch.float32
    assert probabilities.tolist() == pytest.approx([0.1, 0.9], abs=1e-3)  # 0.25² : 0.75², normalized


def draws(sampler: Sampler, logits: torch.Tensor, row: int, steps: int) -> list[int]:
    return [sampler.pick(logits, row) for _ in range(steps)]


FLAT = torch.zeros(50)  # every token equally likely: the draws show the generator alone


def test_a_seed_repeats_the_draws_and_another_seed_changes_them():
    first, again = draws(Sampler(SAMPLED, "cpu"), FLAT, 0, 20), draws(Sampler(SAMPLED, "cpu"), FLAT, 0, 20)
    other = draws(Sampler(Settings(temperature=0.9, top_p=0.9, seed=8), "cpu"), FLAT, 0, 20)
    assert first == again and first != other


def test_each_row_draws_as_it_would_alone_whatever_the_batch():
    """Row r of a batch gets the draws a batch of one gets, even as other rows leave the batch."""
    alone = draws(Sampler(SAMPLED, "cpu"), FLAT, 0, 6)
    batch = Sampler(SAMPLED, "cpu", rows=3)
    rows: dict[int, list[int]] = {0: [], 1: [], 2: []}
    running = [0, 1, 2]
    for step in range(6):
        for row, token in zip(running, batch.pick_rows(FLAT.expand(len(running), -1), running)):
            rows[row].append(token)
        if step == 1:
            running = [0, 2]  # row 1 finished
    assert rows[0] == alone and rows[2] == alone and rows[1] == alone[:2]


def test_the_token_budget_is_the_smaller_of_max_new_tokens_and_the_room_left():
    settings = Settings(max_new_tokens=10)
    assert token_budget(settings, window=100, prompt_tokens=50) == 10
    assert token_budget(settings, window=100, prompt_tokens=95) == 5
    assert token_budget(settings, window=100, prompt_tokens=100) == 0


def test_a_row_stops_at_end_of_sequence_without_counting_it_or_at_its_budget():
    stopped, spent = Row(budget=5), Row(budget=2)
    for token in (4, 9, 0):
        stopped.take(token, eos_ids={0})
    for token in (4, 9):
        spent.take(token, eos_ids={0})
    assert (stopped.tokens, stopped.finish_reason) == ([4, 9], "stop")
    assert (spent.tokens, spent.finish_reason) == ([4, 9], "length")
