"""Errors the user can act on, each with the exit code it ends the program with.

Anything raised as a `LlavaError` is shown as one line on stderr, never as a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

EXIT_OK = 0
EXIT_FAILURE = 1  # something went wrong while running
EXIT_USAGE = 2  # bad options, bad input, a model that cannot be found
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class LlavaError(Exception):
    """A failure with a one-line, actionable message."""

    exit_code = EXIT_FAILURE


class UsageError(LlavaError):
    """An option or argument the user gave is wrong."""

    exit_code = EXIT_USAGE


class InputError(LlavaError):
    """An image or prompt cannot be used."""

    exit_code = EXIT_USAGE


class ModelError(LlavaError):
    """The model asked for cannot be found or is not a usable LLaVA checkpoint."""

    exit_code = EXIT_USAGE


class ResourceError(LlavaError):
    """The machine ran out of something (GPU memory) while working; a smaller job may succeed."""


class ContextError(LlavaError):
    """A message does not fit the model's context window even on its own."""

    exit_code = EXIT_USAGE


class SessionError(LlavaError):
    """A saved conversation cannot be found, read or continued."""

    exit_code = EXIT_USAGE


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can be long), or its type name."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def suggestion(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """'; did you mean {prefix}X?' for the closest of `choices` (difflib), or nothing."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
