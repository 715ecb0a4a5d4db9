"""The two contracts between the chat and its parts, as protocols with no code: `ChatIO`, how the
chat talks to the user (chat/loop.py's `TerminalIO` and `PipeIO`, the tests' `FakeIO`), and `Chat`,
what a slash command (chat/slash.py) may use of the running chat (chat/loop.py's `ChatLoop`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llava_cli.base.settings import Settings
    from llava_cli.engine.backend import Backend
    from llava_cli.engine.streaming import Stats
    from llava_cli.media.images import ImageRef
    from llava_cli.prompt.conversation import Conversation
    from llava_cli.store.conversations import Recorder


class ChatIO(Protocol):
    interactive: bool  # a person is there: Ctrl-C stops an answer instead of the program
    markdown: bool  # render answers as Markdown (only a terminal does)
    columns: int  # the width to lay out /help and /stats for

    def read(self) -> str | None: ...
    def stream(self, chunks: Iterator[str]) -> None: ...
    def answered(self, record: dict) -> None: ...  # records.answer_record: the answer and its figures
    def info(self, message: str) -> None: ...  # chatter: notes on what happened
    def report(self, message: str) -> None: ...  # what a command was asked to show (/show, /stats, /help)
    def error(self, message: str) -> None: ...


class Chat(Protocol):
    """The running chat as its commands see it: state they read and change, and the steps they reuse."""

    engine: Backend
    settings: Settings
    io: ChatIO
    recorder: Recorder | None  # None: not saved (--no-save)
    conversation: Conversation
    attached: list[ImageRef]  # images waiting for the next message
    context_tokens: int | None  # tokens after the last answer; None: to be counted again
    last_figures: Stats  # the last answer's figures (/stats)

    def send(self, text: str) -> None: ...
    def attach_paths(
        self, paths: list[str], asked_now: bool = False, kind: str = "image"
    ) -> None: ...  # kind: media.open_local's
    def respond(self, undo: Callable[[], None], stopped: str) -> None: ...  # answer the pending turn; `undo` on failure
    def autosave(self) -> None: ...
