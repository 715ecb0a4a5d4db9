"""The contract between the front-ends (ask, chat) and whatever answers: the `Backend` protocol.

Two backends implement it without importing each other: `Engine` (engine/local.py, a model loaded in
this process) and `RemoteEngine` (client/remote.py, an OpenAI-compatible server). A leaf module
(standard library and engine/streaming.py only), so front-ends and tests depend on the contract, not on
torch or HTTP.

- `generate(conversation, settings, stop)` answers the conversation's pending turn. It yields
  `TextChunk`s (joined: the answer with surrounding whitespace stripped) and `Note`s (one-line
  remarks for the user: the only way a backend speaks to the user), then exactly one `Done`
  carrying the answer's text and figures (`Stats`). A backend never changes the caller's
  conversation: the caller records the answer (`Answer.record_in`: the turns dropped to fit the
  window, then the answer). Nothing follows `Done`. When `stop()` says True, or the generator is
  closed early (Ctrl-C), or it raises, no `Done` comes and the conversation is as it was.
- `info()` is what the front-ends show about where answers come from (`BackendInfo`).
- `reset()` forgets what the backend keeps between answers (KV cache, encoded images): after
  /clear, or to free memory. Answers stay the same; only their speed changes.
- `prompt_tokens(conversation)` counts the tokens the conversation fills, or None where only the
  answers' figures tell (a server) or where it holds more than the model's window (not counted).

`Answer` wraps the events for a front-end that streams text: iterating it gives the text chunks;
once the iteration is over, `stats` is the `Done` event's figures and `record_in(conversation)`
puts the answer in the front-end's conversation.
Capabilities beyond the protocol belong to one backend and are typed with it (`ask --each` runs the
scheduler of engine/scheduler.py over an `Engine`, so it always loads the model locally).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from llava_cli.engine.logprobs import TokenLogprob
from llava_cli.engine.streaming import Stats

if TYPE_CHECKING:
    from llava_cli.base.settings import Settings
    from llava_cli.prompt.conversation import Conversation


@dataclass(frozen=True)
class TextChunk:
    """Newly visible text of the answer; `logprobs`: those of its tokens, where a backend streams them
    (llava serve's worker does; every backend reports them all in `Done`)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Note:
    """A one-line remark for the user about how the answer is made (turns dropped to fit, the decode path with --verbose)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer is complete: its text (whitespace stripped), its figures (`stats.dropped_turns`: the
    oldest turns left out to fit the window), and each token's logprobs when asked for (`Settings.logprobs`)."""

    stats: Stats
    logprobs: tuple[TokenLogprob, ...] = ()
    answer: str = ""


Event = TextChunk | Note | Done
Events = Generator[Event, None, None]


@dataclass(frozen=True)
class BackendInfo:
    """What the front-ends show about the backend."""

    name: str  # the model's name
    where: str  # the device it runs on ("cpu", "cuda"), or the server's url
    dtype: str | None = None  # None: not known (a server does not tell)
    load_seconds: float = 0.0
    context_window: int | None = None  # the model's window in tokens; None: not known

    def window(self, settings: Settings) -> int | None:
        """The window answers use (see `window_within`); None when not known."""
        return None if self.context_window is None else window_within(self.context_window, settings)


def window_within(window: int, settings: Settings) -> int:
    """The context window answers use: the model's `window`, within --max-context."""
    return min(window, settings.max_context) if settings.max_context else window


class Backend(Protocol):
    """Answers conversations; see the module docstring for the contract."""

    def generate(self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = ...) -> Events: ...

    def info(self) -> BackendInfo: ...

    def reset(self) -> None: ...

    def prompt_tokens(self, conversation: Conversation) -> int | None: ...


class Answer(Iterator[str]):
    """The text chunks of `events`; each `Note` goes to `show_note` (the front-end's way of saying it)
    as it comes; once they are all read, `stats` holds the `Done` event's figures."""

    def __init__(self, events: Events, show_note: Callable[[str], None] = lambda text: None) -> None:
        self.events = events
        self.show_note = show_note
        self.done: Done | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        event = next(self.events)  # its end ends the answer
        if self.done is not None:
            raise RuntimeError("a backend sent an event after its Done event")
        if isinstance(event, Done):
            self.done = event
            return next(self)  # the end, or an event too many
        if isinstance(event, Note):
            self.show_note(event.text)
            return next(self)
        return event.text

    def close(self) -> None:
        self.events.close()

    @property
    def stats(self) -> Stats:
        return self.finished.stats

    @property
    def finished(self) -> Done:
        if self.done is None:
            raise RuntimeError("the answer ended without its figures (a backend must end with a Done event)")
        return self.done

    def record_in(self, conversation: Conversation) -> None:
        """Put the finished answer in the caller's conversation (the backend never changes it): the
        turns left out to fit the window are dropped, the pending turn gets the answer."""
        conversation.drop_oldest(self.stats.dropped_turns)
        conversation.answer(self.finished.answer)
