"""`Sampler` and `token_budget` on hand-made logits: no model, no checkpoint (torch only)."""

from __future__ import annotations

import math

import pytest
import torch

from llava_cli.base.settings import Settings
from llava_cli.engine.pipeline import Row, RowFault, Sampler, checked_argmax, token_budget

GREEDY = Settings()
SAMPLED = Settings(temperature=0.9, top_p=0.9, seed=7)


def logits_of(probabilities: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probabilities])


def test_greedy_picks_the_largest_logit():
    sampler = Sampler(GREEDY, "cpu")
    assert sampler.pick(torch.tensor([0.1, 2.0, -1.0, 1.9])) == 1
    assert sampler.plain_greedy and sampler.generator is None


@pytest.mark.parametrize("temperature", [3.981e-38, 1e-6, 9.99e-6])
def test_a_temperature_below_1e_5_is_greedy_as_in_vllm(temperature):
    """3.981e-38 passed the 0-100 check and made every score inf in float32 (issue 28 item 2)."""
    sampler = Sampler(Settings(temperature=temperature, seed=3), "cpu")
    assert sampler.plain_greedy
    assert sampler.pick(torch.tensor([0.1, 2.0, -1.0, 1.9])) == 1
    assert not Sampler(Settings(temperature=1e-5, seed=3), "cpu").plain_greedy


def test_a_draw_from_scores_that_are_not_finite_fails_that_row_with_one_line():
    sampler = Sampler(Settings(temperature=1.0, seed=3), "cpu")
    with pytest.raises(RowFault, match="NaN or infinite"):
        sampler.pick(torch.tensor([0.1, float("nan"), 1.0]))
    inf = float("inf")
    rows = [[0.0, 1.0], [inf, 0.0], [0.0, float("nan")], [3.0, -inf], [-inf, -inf]]
    assert checked_argmax(torch.tensor(rows)) == [1, None, None, 0, None]


class Forbid:
    """A token-mask hook: forbids one token, and ends the row when it sees `last`."""

    def __init__(self, token: int, last: int) -> None:
        self.token, self.last, self.seen = token, last, []

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, torch.tensor([self.token]), float("-inf"))

    def accepted(self, token: int) -> bool:
        self.seen.append(token)
        return token == self.last


def test_hooks_mask_tokens_before_the_draw_and_may_end_the_row():
    hook = Forbid(token=1, last=3)
    sampler = Sampler(GREEDY, "cpu", hooks=[hook])
    assert not sampler.plain_greedy  # a batch must not take this row's token from the shared argmax
    assert sampler.pick(torch.tensor([0.1, 2.0, -1.0, 1.9])) == 3
    row = Row(budget=5, hooks=[hook])
    for token in (2, 3, 4):
        if not row.finish_reason:
            row.take(token, eos_ids={0})
    assert (row.tokens, row.finish_reason, hook.seen[-2:]) == ([2, 3], "stop", [2, 3])


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


def draws(sampler: Sampler, logits: torch.Tensor, steps: int) -> list[int]:
    return [sampler.pick(logits) for _ in range(steps)]


FLAT = torch.zeros(50)  # every token equally likely: the draws show the generator alone


def test_a_seed_repeats_the_draws_and_another_seed_changes_them():
    first, again = draws(Sampler(SAMPLED, "cpu"), FLAT, 20), draws(Sampler(SAMPLED, "cpu"), FLAT, 20)
    other = draws(Sampler(Settings(temperature=0.9, top_p=0.9, seed=8), "cpu"), FLAT, 20)
    assert first == again and first != other


def test_each_row_draws_as_it_would_alone_whatever_the_batch():
    """Row r of a batch gets the draws a batch of one gets, even as other rows leave the batch."""
    alone = draws(Sampler(SAMPLED, "cpu"), FLAT, 6)
    samplers = [Sampler(SAMPLED, "cpu") for _ in range(3)]
    rows: dict[int, list[int]] = {0: [], 1: [], 2: []}
    running = [0, 1, 2]
    for step in range(6):
        for row, line in zip(running, FLAT.expand(len(running), -1)):
            rows[row].append(samplers[row].pick(line))
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
