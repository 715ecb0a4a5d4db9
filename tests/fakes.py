"""One fake `Backend` (engine/backend.py) for the front-end tests: scripted text, then the answer and its figures.

`FakeBackend` keeps the protocol's contract: its chunks, then (unless told to raise midway, as a
Ctrl-C does) one `Done` with the joined answer and `stats`; the caller's conversation is not changed.
`use_backend` makes `llava ask` and `llava chat` answer with it (`startup.start_engine`, the one
place the front-ends get their backend). `answer_of(events, conversation)` reads an answer and
records it in the conversation, as a front-end does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import closing

from llava_cli.base.settings import Settings
from llava_cli.engine.backend import Answer, BackendInfo, Done, Events, Note, TextChunk
from llava_cli.engine.streaming import Stats
from llava_cli.prompt.conversation import Conversation


class FakeBackend:
    """Answers every message with `chunks`; `raises` (e.g. KeyboardInterrupt) is raised after the chunks instead.
    `dtype` None: it tells no dtype, as a server; set, it is a model loaded here."""

    def __init__(
        self,
        chunks: Sequence[str] = ("an answer",),
        stats: Stats | None = None,
        raises: BaseException | None = None,
        dtype: str | None = None,
    ) -> None:
        self.chunks = list(chunks)
        self.dtype = dtype
        self.stats = stats or Stats()
        self.raises = raises
        self.resets = 0

    def generate(
        self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = lambda: False
    ) -> Events:
        for chunk in self.chunks:
            yield TextChunk(chunk)
        if self.raises is not None:
            raise self.raises
        yield Done(self.stats, answer="".join(self.chunks).strip())

    def info(self) -> BackendInfo:
        return BackendInfo(name="fake", where="nowhere", dtype=self.dtype, load_seconds=self.stats.load_s)

    def reset(self) -> None:
        self.resets += 1

    def prompt_tokens(self, conversation: Conversation) -> None:
        return None


def use_backend(monkeypatch, backend: FakeBackend) -> None:
    """Make the front-ends answer through `backend`."""
    monkeypatch.setattr("llava_cli.frontend.startup.start_engine", lambda settings: backend)


def answer_of(events: Events, conversation: Conversation | None = None) -> tuple[str, Stats]:
    """A backend's whole answer and its figures (`Answer` checks there is one `Done`, at the end),
    recorded in `conversation` as a front-end does, for a next turn."""
    answer = Answer(events)
    text = "".join(answer)
    if conversation is not None:
        answer.record_in(conversation)
    return text, answer.stats


def with_notes(backend, notes: list[str]):
    """`backend`, its answers' `Note` texts also appended to `notes` (the events still reach the caller)."""
    generate = backend.generate

    def noted(*args, **kwargs) -> Events:
        with closing(generate(*args, **kwargs)) as events:
            for event in events:
                if isinstance(event, Note):
                    notes.append(event.text)
                yield event

    backend.generate = noted
    return backend


def answer_text(events: Events, conversation: Conversation | None = None) -> str:
    return answer_of(events, conversation)[0]
