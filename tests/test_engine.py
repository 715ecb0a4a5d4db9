"""The engine against plain transformers: identical greedy answers, with the KV cache reused."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from fakes import answer_of, answer_text, with_notes
from helpers import chat, render_llava15

from llava_cli.base.errors import ContextError
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.media.images import load_image
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation, Turn

MAX_NEW = 12


@pytest.fixture(scope="module")
def settings(tiny_model) -> Settings:
    return Settings(model=str(tiny_model), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def loaded(settings):
    return load_model(settings)


@pytest.fixture
def engine(loaded):
    notes: list[str] = []
    engine = with_notes(Engine(loaded), notes)
    engine.notes = notes
    return engine


def test_six_turns_three_images_equal_plain_transformers_and_reuse_the_cache(engine, settings, reference, images):
    script = [
        ("What is in this picture?", [images["red"]]),
        ("Describe the colours.", []),
        ("Compare these two.", [images["green"], images["blue"]]),
        ("Which one is brightest?", []),
        ("Now look at this one again.", [images["red"]]),
        ("Summarise everything.", []),
    ]
    stats = chat(engine, settings, Conversation(), reference, script)
    assert stats[0].cached_tokens == 0
    for previous, current in itertools.pairwise(stats):
        # Everything up to the previous answer is reused; at most that answer is re-run.
        assert current.cached_tokens >= previous.prompt_tokens
        assert current.prompt_tokens > current.cached_tokens


def test_system_text_and_answers_match_reference(engine, settings, reference, images):
    script = [("hello", [images["blue"]]), ("and again?", [])]
    chat(
        engine,
        dataclasses.replace(settings, system="Be brief."),
        Conversation(system="Be brief."),
        reference,
        script,
        system="Be brief.",
    )


def test_a_different_image_in_the_same_place_is_not_taken_from_the_cache(engine, settings, reference, images):
    chat(engine, settings, Conversation(), reference, [("what is this?", [images["red"]])])
    # Same text, same token ids, different pixels: the cache must not serve the red image's keys.
    stats = chat(engine, settings, Conversation(), reference, [("what is this?", [images["green"]])])
    assert stats[0].cached_tokens <= 5  # at most the text before the image


def test_editing_history_invalidates_only_what_changed(engine, settings, reference, images):
    conversation = Conversation()
    chat(engine, settings, conversation, reference, [("first", [images["red"]]), ("second", [])])
    conversation.system = "Changed system text."
    stats = chat(engine, settings, conversation, reference, [("third", [])], system="Changed system text.")
    # The old history is kept in the prompt but the cache is not trusted: the image had to run again.
    assert 0 < stats[0].cached_tokens < 5
    assert conversation.turns[0].answer is not None


def test_old_turns_are_dropped_to_fit_the_context_window(engine, loaded, images, reference):
    settings = Settings(model=loaded.name, max_new_tokens=MAX_NEW, max_context=80)
    conversation = Conversation()
    for text in ["first question here", "second question", "third question please", "fourth"]:
        conversation.ask(text, [load_image(str(images["red"]))] if text == "fourth" else [])
        _, figures = answer_of(engine.generate(conversation, settings), conversation)
        assert figures.prompt_tokens + min(MAX_NEW, 40) <= 80
    assert engine.notes and "dropped" in engine.notes[0]
    assert figures.dropped_turns >= 1
    # What is left is answered exactly as plain transformers answers that shorter history.
    kept = [(t.text, len(t.images), t.answer) for t in conversation.turns]
    expected = reference.answer(
        render_llava15(kept[:-1] + [(kept[-1][0], kept[-1][1], None)]), [images["red"]], MAX_NEW
    )
    assert conversation.turns[-1].answer == expected


def test_a_message_too_long_for_the_window_is_refused_and_the_conversation_kept(engine, loaded, reference):
    settings = Settings(model=loaded.name, max_new_tokens=MAX_NEW, max_context=40)
    conversation = Conversation()
    conversation.ask("short")
    answer_of(engine.generate(conversation, settings), conversation)
    conversation.ask("word " * 200)
    with pytest.raises(ContextError, match="context window is 40"):
        answer_of(engine.generate(conversation, settings), conversation)
    assert [t.text for t in conversation.turns] == ["short", "word " * 200]
    conversation.discard_pending()
    conversation.ask("still works")
    text, _ = answer_of(engine.generate(conversation, settings), conversation)
    assert conversation.turns[-1].answer == text
    kept = [(turn.text, 0, turn.answer) for turn in conversation.turns]
    assert kept[-1][2] == reference.answer(render_llava15(kept[:-1] + [("still works", 0, None)]), [], MAX_NEW)


def test_sampling_with_a_seed_is_repeatable(engine, loaded):
    settings = Settings(model=loaded.name, max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.9, seed=7)
    answers = []
    for _ in range(2):
        conversation = Conversation()
        conversation.ask("tell me something")
        answers.append(answer_text(engine.generate(conversation, settings), conversation))
    assert answers[0] == answers[1]
    greedy = Conversation()
    greedy.ask("tell me something")
    assert answer_text(engine.generate(greedy, dataclasses.replace(settings, temperature=0.0)), greedy) != answers[0]


def test_generate_leaves_the_callers_conversation_alone_even_when_it_drops_turns(tiny_loaded, images):
    """The backend contract: `Done` carries the answer and the dropped turns; the caller records them."""
    import copy

    from llava_cli.engine.backend import Answer

    settings = Settings(model=tiny_loaded.name, max_new_tokens=8, max_context=60)
    conversation = Conversation(turns=[Turn(text="an old question " * 6, answer="an old answer " * 6), Turn(text="hi")])
    before = copy.deepcopy(conversation)
    answer = Answer(Engine(tiny_loaded).generate(conversation, settings))
    streamed = "".join(answer)
    assert conversation == before
    assert answer.stats.dropped_turns == 1 and answer.finished.answer == streamed.strip()
    answer.record_in(conversation)
    assert [(turn.text, turn.answer) for turn in conversation.turns] == [("hi", streamed.strip())]
