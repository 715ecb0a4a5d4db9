"""The backend contract (engine/backend.py): events, `Answer`, `BackendInfo`, and the front-ends taking an
answer's figures from its final `Done` event, with one fake backend and no model."""

from __future__ import annotations

import json

import pytest
from cli_runner import invoke
from fake_io import FakeIO
from fakes import FakeBackend, use_backend

from llava_cli.base.settings import Settings
from llava_cli.chat.loop import ChatLoop
from llava_cli.engine.backend import Answer, BackendInfo, Done, Note, TextChunk
from llava_cli.engine.streaming import Stats

FIGURES = Stats(prompt_tokens=41, cached_tokens=17, completion_tokens=9, seconds=0.5, finish_reason="length")


def events(*items):
    yield from items


def test_an_answer_streams_its_text_and_then_holds_the_final_figures():
    answer = Answer(events(TextChunk("a "), TextChunk("cat"), Done(FIGURES)))
    assert list(answer) == ["a ", "cat"]
    assert answer.stats is FIGURES


def test_notes_reach_the_front_end_in_order_as_they_come_and_never_the_text():
    shown: list[str] = []
    answer = Answer(
        events(Note("dropped 2 turns"), TextChunk("a "), Note("decoding note"), TextChunk("cat"), Done(FIGURES)),
        shown.append,
    )
    assert next(answer) == "a " and shown == ["dropped 2 turns"]
    assert list(answer) == ["cat"] and shown == ["dropped 2 turns", "decoding note"]
    assert answer.stats is FIGURES


def test_an_answer_without_its_final_event_or_with_events_after_it_is_refused():
    stopped = Answer(events(TextChunk("a")))
    assert list(stopped) == ["a"]
    with pytest.raises(RuntimeError, match="ended without its figures"):
        _ = stopped.stats
    with pytest.raises(RuntimeError, match="after its Done event"):
        list(Answer(events(Done(FIGURES), TextChunk("late"))))


@pytest.mark.parametrize(
    ("window", "max_context", "used"), [(4096, None, 4096), (4096, 1024, 1024), (512, 1024, 512), (None, 1024, None)]
)
def test_the_window_answers_use_is_the_models_within_max_context(window, max_context, used):
    assert BackendInfo("m", "cpu", context_window=window).window(Settings(max_context=max_context)) == used


def test_ask_json_reports_the_figures_of_the_final_event(monkeypatch, images, llava_home_dir):
    use_backend(monkeypatch, FakeBackend(["a red ", "square"], stats=FIGURES))
    outcome = invoke(monkeypatch, "ask", "--json", "--no-save", images["red"], "what is it?")
    record = json.loads(outcome.stdout)
    assert (outcome.code, record["answer"]) == (0, "a red square")
    assert {key: record[key] for key in FIGURES.as_dict()} == FIGURES.as_dict()


def test_chat_takes_the_figures_of_each_answer_and_resets_the_backend_on_clear(llava_home_dir):
    backend = FakeBackend(stats=FIGURES)
    io = FakeIO(["hello", "/stats", "/show", "/clear"])
    loop = ChatLoop(backend, Settings(model="m"), io)
    loop.run([])
    assert io.answers == ["an answer"]
    shown = dict(line.split() for line in io.infos[0].splitlines())
    assert shown == {key: str(value) for key, value in FIGURES.as_dict().items()}
    assert io.infos[1].splitlines()[:1] == ["model     m on nowhere (server)"]
    assert "context   50 tokens" in io.infos[1].splitlines()  # prompt + completion; a server does not tell its window
    assert (backend.resets, io.infos[-1]) == (1, "conversation cleared")


@pytest.mark.parametrize(
    "content",
    [
        [{"token": "a"}],  # no logprob
        [{"token": 7, "logprob": -1.0}],  # a token that is not text
        [{"token": "a", "logprob": -1.0, "bytes": [300]}],  # not a byte
        [{"token": "a", "logprob": "x"}],
        {"token": "a"},  # not a list
    ],
)
def test_a_servers_logprobs_of_another_shape_are_one_error_line(content):
    from llava_cli.base.errors import LlavaError
    from llava_cli.client.remote import server_logprobs

    with pytest.raises(LlavaError, match=r"^the server at http://h sent logprobs that are not OpenAI's shape"):
        server_logprobs(content, "http://h")


def test_a_servers_logprobs_read_back_as_sent():
    from llava_cli.client.remote import server_logprobs
    from llava_cli.engine.logprobs import as_openai

    content = [
        {
            "token": "é",
            "logprob": -0.5,
            "bytes": [195, 169],
            "top_logprobs": [{"token": "e", "logprob": -1.5, "bytes": [101]}],
        }
    ]
    assert as_openai(server_logprobs(content, "http://h")) == content
    assert server_logprobs(None, "http://h") == ()
