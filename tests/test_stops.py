"""Stop sequences (engine/stops.py): the answer ends before the first stop text, whatever the chunk boundaries,
nothing past it is ever shown, and the row ends there ("stop"): `Engine.generate` (ask/chat), a
`DecodeBatch` row (serve, `ask --each`), `llava ask --stop` and serve's `stop` with the openai client."""

from __future__ import annotations

import json

import pytest
from fakes import answer_of
from helpers import render_llava15

from llava_cli.base.errors import UsageError
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.engine.stops import StopText, before_stop, stop_list
from llava_cli.media.images import load_image
from llava_cli.prompt.conversation import Conversation

MAX_NEW = 24
QUESTION = "What is in this picture?"
TEXT = "The cat sat. ## END ## and then more"


def shown(chunks: list[str], stops: list[str]) -> tuple[str, list[str]]:
    stop_text = StopText(stops)
    pieces = [stop_text.push(chunk) for chunk in chunks]
    return "".join(pieces) + stop_text.finish(), pieces


@pytest.mark.parametrize(
    "stops, expected", [(["## END"], "The cat sat."), (["sat", "cat"], "The"), (["zzz"], TEXT), (["more"], TEXT[:-5])]
)
def test_every_way_of_cutting_the_text_into_chunks_shows_the_same_text(stops, expected):
    for cut in range(1, len(TEXT)):
        assert shown([TEXT[:cut], TEXT[cut:]], stops)[0] == expected, cut
    text, pieces = shown(list(TEXT), stops)  # one character a chunk
    assert text == expected
    assert not any(stop in "".join(pieces[: index + 1]) for stop in stops for index in range(len(pieces)))


def test_only_text_that_could_still_become_a_stop_is_held_back():
    stop_text = StopText(["## END ##"])
    assert stop_text.push("The cat sat. #") == "The cat sat."  # " #" could begin the stop
    assert stop_text.push("# E") == ""
    assert stop_text.push("ND? no") == " ## END? no"
    assert stop_text.finish() == ""
    assert StopText(["xyz"]).push("abc x") == "abc"


def test_stop_lists_are_checked():
    assert stop_list("a", "`stop`") == ("a",) and stop_list(["a", "b"], "`stop`") == ("a", "b")
    for bad in ("", [""], 3, ["a", 1], ["a"] * 5):
        with pytest.raises(UsageError, match="`stop`"):
            stop_list(bad, "`stop`")


def reference_and_stop(reference, image) -> tuple[str, str]:
    """The plain transformers answer and a stop text from its middle."""
    full = reference.answer(render_llava15([(QUESTION, 1, None)]), [image], MAX_NEW)
    middle = len(full) // 2
    stop = full[middle : middle + 3]
    assert len(full) > 8 and stop.strip(), full
    return full, stop


@pytest.fixture(scope="module")
def engine(tiny_loaded) -> Engine:
    return Engine(tiny_loaded)


def test_the_engine_and_a_batch_row_end_before_the_stop(engine, tiny_model, reference, images):
    from llava_cli.engine.scheduler import answers_in_order

    full, stop = reference_and_stop(reference, images["red"])
    expected = before_stop(full, [stop])
    settings = Settings(model=str(tiny_model), max_new_tokens=MAX_NEW, stop=(stop,))
    conversation = Conversation()
    conversation.ask(QUESTION, [load_image(str(images["red"]))])
    streamed, figures = answer_of(engine.generate(conversation, settings), conversation)
    assert streamed == conversation.turns[-1].answer == expected
    assert figures.finish_reason == "stop" and figures.completion_tokens < MAX_NEW

    def prompt():
        asked = Conversation()
        asked.ask(QUESTION, [load_image(str(images["red"]))])
        return engine.fit(asked, settings)[0]

    [answer] = list(answers_in_order(engine, [prompt], settings, 2))
    assert (
        answer.text == expected
        and answer.finish_reason == "stop"
        and answer.completion_tokens == figures.completion_tokens
    )


def test_ask_stop_prints_the_answer_up_to_the_stop(monkeypatch, tiny_model, reference, images, tmp_path):
    from cli_runner import invoke

    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    full, stop = reference_and_stop(reference, images["red"])
    outcome = invoke(
        monkeypatch,
        "ask",
        str(images["red"]),
        QUESTION,
        "--model",
        str(tiny_model),
        "-n",
        str(MAX_NEW),
        "--stop",
        "never-said",
        "--stop",
        stop,
        "--json",
        "--no-save",
    )
    assert outcome.code == 0, outcome.stderr
    record = json.loads(outcome.stdout)
    assert record["answer"] == before_stop(full, [stop]) and record["finish_reason"] == "stop"
