"""Stop sequences: an answer ends before the first stop text, and nothing past it is ever shown.

Contract:
- `StopText(stops)`: text arriving in chunks -> the part that may be shown now. It holds back only
  a tail that could still become a stop (a stop's beginning) and trailing whitespace (answers are
  stripped); at the first stop it releases the text before it (stripped) and `hit` becomes true.
  Joined, its output is the answer up to the first stop, whatever the chunk boundaries.
- `StoppedStream(stream, stops)`: a `TextStream` (engine/streaming.py) whose output goes through `StopText`;
  the engine and the server stream with it (`Engine.detokenizer`).
- `StopHook(tokenizer, stops)`: the `TokenHook` (engine/pipeline.py) that ends the row ("stop") on the
  token whose text completes a stop; it reads the same `TextStream` text, so it ends the row exactly
  where the shown text stops.
- `before_stop(text, stops)`: a whole answer's text up to its first stop (batch answers).
- `stop_list(value, where, limit)`: a request's/command line's stops, checked: non-empty strings, at most `limit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llava_cli.base.errors import UsageError
from llava_cli.engine.streaming import TextStream

MAX_REQUEST_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


class StopText:
    """Chunks in, what may be shown out (see the module docstring)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""
        self.hit = False

    def push(self, chunk: str) -> str:
        if self.hit:
            return ""
        text = self.held + chunk
        if (index := first_stop(text, self.stops)) is not None:
            self.hit, self.held = True, ""
            return text[:index].rstrip()
        shown = len(text) - self.possible_stop(text)
        shown = len(text[:shown].rstrip())
        self.held = text[shown:]
        return text[:shown]

    def possible_stop(self, text: str) -> int:
        """The length of the longest end of `text` that is the beginning of a stop."""
        return max(
            (
                size
                for stop in self.stops
                for size in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:size])
            ),
            default=0,
        )

    def finish(self) -> str:
        """At the end of an answer that met no stop: what was held back."""
        held, self.held = self.held, ""
        return "" if self.hit else held.rstrip()


class StoppedStream:
    """A `TextStream` that stops at the first stop text; same interface (`push`, `finish`, `text`, `ids`)."""

    def __init__(self, stream: TextStream, stops: Sequence[str]) -> None:
        self.stream = stream
        self.filter = StopText(stops)
        self.text = ""

    @property
    def ids(self) -> list[int]:
        return self.stream.ids

    @property
    def hit(self) -> bool:
        return self.filter.hit

    def push(self, token_id: int) -> str:
        return self.shown(self.filter.push(self.stream.push(token_id)))

    def finish(self) -> str:
        return self.shown(self.filter.push(self.stream.finish()) + self.filter.finish())

    def shown(self, text: str) -> str:
        self.text += text
        return text


class StopHook:
    """Ends a row on the token that completes a stop text (a `TokenHook`)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.stream = StoppedStream(TextStream(tokenizer), stops)

    def constrain(self, logits: Any) -> Any:
        return logits

    def accepted(self, token: int) -> bool:
        self.stream.push(token)
        return self.stream.hit


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop in `text` begins, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def before_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to its first stop, stripped."""
    index = first_stop(text, stops)
    return text if index is None else text[:index].rstrip()


def stop_list(value: Any, where: str, limit: int | None = MAX_REQUEST_STOPS) -> tuple[str, ...]:
    """A string or a list of strings as stops; `UsageError` naming `where` unless each is 1..MAX_STOP_CHARS characters."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(
        isinstance(stop, str) and 0 < len(stop) <= MAX_STOP_CHARS for stop in stops
    ):
        raise UsageError(f"{where} must be a string or a list of strings, each 1 to {MAX_STOP_CHARS} characters")
    if limit is not None and len(stops) > limit:
        raise UsageError(f"{where} takes at most {limit} strings (got {len(stops)})")
    return tuple(stops)
