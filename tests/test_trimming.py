"""Context trimming (`Engine.fit`): the same prompt and dropped count as dropping one turn at a time,
found with a handful of encodes instead of one per dropped turn (issue 12, finding 4)."""

from __future__ import annotations

import copy
import math
import random

import pytest
from fakes import answer_text, with_notes
from helpers import render_llava15

from llava_cli.base.errors import ContextError
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.engine.runner import Prompt
from llava_cli.media.images import load_image
from llava_cli.prompt.conversation import Conversation, Turn
from llava_cli.prompt.trimming import TrimSearch

MAX_NEW = 8


def one_turn_at_a_time(engine: Engine, conversation: Conversation, settings: Settings) -> tuple[list[int], int]:
    """The trimming llava-cli shipped before: encode again after each dropped turn."""
    window = engine.context_window(settings)
    answer_room = min(settings.max_new_tokens, window // 2)
    for dropped in range(len(conversation.turns)):
        prompt = engine.encode(conversation.without_oldest(dropped))
        if len(prompt.ids) + answer_room <= window:
            break
    if len(prompt.ids) >= window:
        raise ContextError("too long")
    return prompt.ids, dropped


def conversation_of(turns: int, seed: int, images: list, system: str | None) -> Conversation:
    rng = random.Random(seed)
    words = ["cat", "window", "sunlight", "and", "the", "blue", "🙂", "ASSISTANT:", "</s>", "naïve", "42", "\n"]
    conversation = Conversation(system=system)
    for index in range(turns):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        attached = [rng.choice(images)] if images and rng.random() < 0.3 else []
        answer = None if index == turns - 1 else " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        conversation.turns.append(Turn(text=text, images=attached, answer=answer))
    return conversation


@pytest.fixture(scope="module")
def pictures(images):
    return [load_image(str(images[name])) for name in ("red", "green", "blue")]


@pytest.mark.parametrize(
    ("turns", "seed", "with_images", "system", "max_context"),
    [
        (1, 0, False, None, 200),
        (5, 1, False, None, 80),
        (40, 2, False, "You are terse.", 300),
        (40, 3, True, None, 700),
        (120, 4, True, "Answer in French, please.", None),
        (150, 5, False, None, None),  # drops 144 turns: the tiny window holds a few
        (30, 6, True, "Short.", 620),  # the image turns barely fit: the boundary between runs matters
    ],
)
def test_fit_gives_the_prompt_and_dropped_count_of_dropping_one_turn_at_a_time(
    tiny_loaded, pictures, turns, seed, with_images, system, max_context
):
    settings = Settings(model=tiny_loaded.name, max_new_tokens=MAX_NEW, max_context=max_context)
    conversation = conversation_of(turns, seed, pictures if with_images else [], system)
    expected_ids, expected_dropped = one_turn_at_a_time(Engine(tiny_loaded), conversation, settings)

    engine = Engine(tiny_loaded)
    encodes = counting_encodes(engine)
    trimmed = copy.copy(conversation)
    trimmed.turns = list(conversation.turns)
    prompt, dropped = engine.fit(trimmed, settings)
    assert (prompt.ids, dropped) == (expected_ids, expected_dropped)
    assert trimmed.turns == conversation.turns  # fit leaves the conversation alone: the caller drops the turns
    # A few encodes, not one per dropped turn.
    assert len(encodes) <= 3 + 4 * math.log2(turns + 1), (dropped, len(encodes))


def counting_encodes(engine: Engine) -> list[int]:
    calls: list[int] = []
    encode = engine.encode

    def counted(conversation: Conversation, limit: int | None = None) -> Prompt:
        calls.append(len(conversation.turns))
        return encode(conversation, limit)

    engine.encode = counted
    return calls


def test_a_long_trimmed_history_is_answered_as_plain_transformers_answers_what_is_left(tiny_loaded, images, reference):
    settings = Settings(model=tiny_loaded.name, max_new_tokens=MAX_NEW, max_context=256)
    conversation = Conversation(system="Be brief.")
    for index in range(400):
        conversation.turns.append(Turn(text=f"question {index} about the picture", answer=f"answer {index}"))
    conversation.ask("What is in this picture?", [load_image(str(images["green"]))])
    notes: list[str] = []
    answer = answer_text(with_notes(Engine(tiny_loaded), notes).generate(conversation, settings), conversation)
    kept = [(turn.text, len(turn.images), turn.answer) for turn in conversation.turns]
    dropped = 401 - len(kept)
    assert dropped > 300 and notes == [f"dropped the {dropped} oldest turn(s) to fit the 256-token context window"]
    expected = reference.answer(
        render_llava15(kept[:-1] + [(kept[-1][0], 1, None)], system="Be brief."), [images["green"]], MAX_NEW
    )
    assert answer == conversation.turns[-1].answer == expected


def linear_fewest_drops(lengths: list[int], limit: int) -> int:
    return next((dropped for dropped, length in enumerate(lengths) if length <= limit), len(lengths) - 1)


def onevision_like_lengths(images_per_turn: list[int], text_per_turn: list[int]) -> list[int]:
    """Prompt lengths per dropped count when a lone image costs 30 tokens and each of several costs 5."""
    lengths = []
    for dropped in range(len(images_per_turn)):
        kept_images = sum(images_per_turn[dropped:])
        image_tokens = 30 if kept_images == 1 else 5 * kept_images
        lengths.append(sum(text_per_turn[dropped:]) + image_tokens)
    return lengths


@pytest.mark.parametrize("seed", range(200))
def test_the_search_matches_the_linear_scan_even_where_a_lone_image_grows_the_prompt(seed):
    rng = random.Random(seed)
    turns = rng.randint(1, 60)
    images_per_turn = [rng.choice([0, 0, 0, 1, 2]) for _ in range(turns)]
    text_per_turn = [rng.randint(1, 12) for _ in range(turns)]
    lengths = onevision_like_lengths(images_per_turn, text_per_turn)
    limit = rng.randint(20, max(21, lengths[0] + 5))
    ids = lambda dropped: Prompt(ids=[0] * lengths[dropped], images=[], image_spans=[])  # noqa: E731
    assert TrimSearch(ids, limit).fewest_drops(images_per_turn) == linear_fewest_drops(lengths, limit)


def test_fit_stops_when_told_and_leaves_the_conversation_as_it_was(tiny_loaded):
    settings = Settings(model=tiny_loaded.name, max_new_tokens=MAX_NEW, max_context=400)
    conversation = conversation_of(50, 7, [], None)
    before = list(conversation.turns)
    asked: list[bool] = []

    def stop() -> bool:
        asked.append(True)
        return len(asked) > 1  # let the first encode run, then stop

    assert list(Engine(tiny_loaded).generate(conversation, settings, stop)) == []
    assert conversation.turns == before and conversation.pending and len(asked) == 2
