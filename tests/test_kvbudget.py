"""One KV-cache budget for the whole process (`--cache-mb`, engine/kvbudget.py; issue 21 item 5).

The running batch reserves its rows' worst case and gives it back the moment a row leaves; the
prefix pool's least recently used entries go first when a row needs room; a row that cannot fit
waits (`Full`) or, alone, fails with one line; `generate` (ask, chat) reserves its cache too; out of
memory in a step fails only the row it hit, the others keep the answers they get alone.
"""

from __future__ import annotations

import dataclasses

import pytest
from fakes import answer_of

from llava_cli.base.errors import ResourceError
from llava_cli.base.settings import Settings
from llava_cli.engine import scheduler as decodebatch
from llava_cli.engine.kvbudget import BATCH, CHAT, HISTORY, POOL, Full, KvBudget, kv_bytes_per_token
from llava_cli.engine.kvrows import nbytes, new_cache
from llava_cli.engine.local import Engine
from llava_cli.engine.pipeline import forward
from llava_cli.engine.prefixpool import PrefixPool
from llava_cli.engine.runner import PrefixCache, Prompt
from llava_cli.engine.scheduler import DecodeBatch, answers_in_order
from llava_cli.prompt.conversation import Conversation, Turn

BUDGET = 12  # tokens per row


@pytest.fixture
def settings(tiny_model) -> Settings:
    return Settings(model=str(tiny_model), max_new_tokens=BUDGET)


def encoded(engine: Engine, text: str) -> Prompt:
    return engine.encode(Conversation(turns=[Turn(text=text)]))


def alone(loaded, settings: Settings, text: str) -> str:
    return answer_of(Engine(loaded).generate(Conversation(turns=[Turn(text=text)]), settings))[0]


def text_of(engine: Engine, sequence) -> str:
    return engine.decode(sequence.row.tokens)


def test_a_row_that_leaves_gives_its_reservation_and_its_cache_back_at_once(tiny_loaded, settings):
    engine = Engine(tiny_loaded, cache_mb=64)
    per_token = kv_bytes_per_token(engine.model)
    batch = DecodeBatch(engine, PrefixPool(engine.budget))
    short, long = encoded(engine, "hi"), encoded(engine, "the quick brown fox jumps over the lazy dog")
    first, second = batch.admit(short, settings, BUDGET), batch.admit(long, settings, BUDGET)
    assert engine.budget.held[BATCH] == per_token * 2 * (
        len(long.ids) + BUDGET
    )  # both rows at the longest's worst case
    batch.step()
    batch.remove(second)  # cancelled: its reservation and its columns go at once
    assert engine.budget.held[BATCH] == per_token * 1 * (len(short.ids) + BUDGET)
    assert batch.width == first.length  # no padding left: the step attends to the short row's tokens only
    while len(batch):
        batch.step()  # finished: the last row leaves
    assert engine.budget.held[BATCH] == 0 and batch.width == 0
    assert engine.budget.used == engine.budget.held[POOL] == nbytes(next(iter(batch.pool.entries.values())).entry.kv)


def test_the_pool_gives_its_oldest_entries_back_when_a_row_needs_room(tiny_loaded, settings):
    import torch

    engine = Engine(tiny_loaded)
    per_token = kv_bytes_per_token(engine.model)
    prompt = encoded(engine, "the quick brown fox")
    row = per_token * (len(prompt.ids) + BUDGET)
    engine.budget = KvBudget(row + per_token * 50)  # one row, and 50 tokens beside it
    pool = PrefixPool(engine.budget)
    text = engine.model.config.text_config
    heads = text.num_key_value_heads or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    def entry(first: int, tokens: int) -> None:
        shape = (1, heads, tokens, head_dim)
        kv = new_cache(
            [
                (torch.zeros(shape, dtype=engine.model.dtype), torch.zeros(shape, dtype=engine.model.dtype))
                for _ in range(text.num_hidden_layers)
            ]
        )
        pool.keep(PrefixCache(kv=kv, ids=list(range(first, first + tokens))), tokens)

    for first in (1000, 2000, 3000):
        entry(first, 30)  # 90 tokens offered to a pool with room for 50 + one row's: the oldest went
    assert [held.entry.ids[0] for held in pool.entries.values()] == [2000, 3000]
    batch = DecodeBatch(engine, pool)
    batch.admit(prompt, settings, BUDGET)  # needs a row's room: the oldest entry left goes, not the newest
    assert [held.entry.ids[0] for held in pool.entries.values()] == [3000]
    assert engine.budget.used == row + per_token * 30 <= engine.budget.limit_bytes


def test_a_row_waits_for_room_and_a_row_too_big_alone_fails_with_one_line(tiny_loaded, settings):
    engine = Engine(tiny_loaded)
    per_token = kv_bytes_per_token(engine.model)
    prompt = encoded(engine, "hi")
    engine.budget = KvBudget(per_token * (len(prompt.ids) + BUDGET))  # room for exactly one such row
    batch = DecodeBatch(engine, PrefixPool(engine.budget))
    batch.admit(prompt, settings, BUDGET)
    with pytest.raises(Full):
        batch.admit(prompt, settings, BUDGET)
    assert (
        len(batch) == 1 and engine.budget.held[BATCH] == engine.budget.limit_bytes
    )  # nothing done for the one waiting
    with pytest.raises(
        ResourceError,
        match=r"^this answer needs [0-9.]+ MB of KV cache but --cache-mb allows [0-9.]+ MB; raise --cache-mb",
    ):
        batch.admit(prompt, settings, BUDGET + 1)  # over the whole budget even alone: waiting would not help


def test_ask_each_waits_for_room_and_answers_every_prompt_as_alone(tiny_loaded, settings):
    engine = Engine(tiny_loaded)
    texts = ["hi", "the quick brown fox", "numbers 0 1 2 3", "what colour is it?"]
    prompts = [encoded(engine, text) for text in texts]
    longest = max(len(prompt.ids) for prompt in prompts) + BUDGET
    engine.budget = KvBudget(
        kv_bytes_per_token(engine.model) * longest * 2
    )  # two rows at a time, whatever --batch-size says
    answers = list(answers_in_order(engine, [lambda p=p: p for p in prompts], settings, rows=4))
    assert [answer.text for answer in answers] == [alone(tiny_loaded, settings, text) for text in texts]
    assert engine.budget.used == 0


def test_generate_reserves_its_cache_and_refuses_an_answer_that_cannot_fit(tiny_loaded, settings):
    engine = Engine(tiny_loaded)
    conversation = Conversation(turns=[Turn(text="hi")])
    prompt_tokens = len(engine.encode(conversation).ids)
    engine.budget = KvBudget(kv_bytes_per_token(engine.model) * (prompt_tokens + BUDGET))
    engine.history = PrefixPool(engine.budget, history=True)  # the engine's own, on the new budget
    text, _ = answer_of(engine.generate(conversation, settings), conversation)
    assert text == alone(tiny_loaded, settings, "hi")
    (entry,) = (held.entry for held in engine.history.entries.values())
    # The answer's row gave its reservation back; its history is kept, within the budget.
    assert (
        engine.budget.held[CHAT] == 0 and engine.budget.held[HISTORY] == nbytes(entry.kv) <= engine.budget.limit_bytes
    )
    engine.reset()
    assert engine.budget.held[HISTORY] == 0
    longer = dataclasses.replace(settings, max_new_tokens=BUDGET + 1)
    with pytest.raises(ResourceError, match=r"^this answer needs .* MB of KV cache but --cache-mb allows"):
        answer_of(engine.generate(Conversation(turns=[Turn(text="hi")]), longer))


@pytest.mark.parametrize("bucketed", [False, True], ids=["exact-shapes", "captured-shapes"])
def test_out_of_memory_in_a_step_fails_only_the_row_it_hit(tiny_loaded, settings, monkeypatch, bucketed):
    """The step runs out (with `bucketed`, the step a CUDA graph replays, run eagerly): each row then runs
    it alone over its own slot, and only the row that runs out alone too fails."""
    import torch

    engine = Engine(tiny_loaded)
    texts = ["hi", "the quick brown fox jumps over the lazy dog", "numbers 0 1 2 3"]
    prompts = [encoded(engine, text) for text in texts]
    batch = DecodeBatch(engine, PrefixPool(engine.budget), captured_shapes=bucketed)
    sequences = [batch.admit(prompt, settings, BUDGET) for prompt in prompts]
    hit = sequences[1]
    runs_out_at = hit.length + 3  # its fourth step, in the batch and then alone

    def forward_running_out(model, cache, padded, image_inputs):
        if runs_out_at in padded.positions[:, -1].tolist():
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(model, cache, padded, image_inputs)

    monkeypatch.setattr(decodebatch, "forward", forward_running_out)
    ended = []
    while len(batch):
        ended += batch.step()
    assert set(ended) == set(sequences) and isinstance(hit.error, ResourceError) and len(hit.row.tokens) == 4
    for place in (0, 2):
        assert sequences[place].error is None and text_of(engine, sequences[place]) == alone(
            tiny_loaded, settings, texts[place]
        )
    assert engine.budget.held[BATCH] == 0
