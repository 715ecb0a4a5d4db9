"""The chat's input line at a terminal: history, completion and multi-line messages (prompt-toolkit).

`make_prompt_session(...)` builds the session `TerminalIO` reads from:
- input history kept across runs in `<data dir>/input-history` (0600, in a 0700 folder); in memory
  when that file cannot be written, or when it or its folder is not private (another user's file,
  writable by others, a link or not a regular file: it could collect what is typed), with a note;
- Tab completes slash commands (those registered in chat/slash.py), and file paths after a command
  that takes them, `/image` (written back quoted or with backslash-escaped spaces, as typed, so
  frontend/arguments.py's `split_image_command` reads them);
- Enter sends; Alt-Enter (or Esc then Enter) inserts a newline; a message that starts with `\"\"\"`
  goes on over several lines until a closing `\"\"\"`; pasted text (bracketed paste) is inserted as
  it is, newlines included, and sent as one message;
- a bottom toolbar shows `status()` (the model and how much of the context is used).
`message_text` removes the `\"\"\"` around a multi-line message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_cli.base.safeio import NotPrivate, NotRegularFile, make_private_dir, open_regular
from llava_cli.chat.slash import command_names, find

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completion
    from prompt_toolkit.history import History

BLOCK_QUOTES = '"""'
SHELL_SPECIAL = re.compile(r"""([\s"'\\])""")


def block_is_open(text: str) -> bool:
    """True while a message started with \"\"\" has not been closed by another \"\"\"."""
    stripped = text.strip()
    return stripped.startswith(BLOCK_QUOTES) and (
        len(stripped) < 2 * len(BLOCK_QUOTES) or not stripped.endswith(BLOCK_QUOTES)
    )


def message_text(text: str) -> str:
    """The message typed: a \"\"\"...\"\"\" block without its quotes, anything else as it is."""
    stripped = text.strip()
    if stripped.startswith(BLOCK_QUOTES) and stripped.endswith(BLOCK_QUOTES) and len(stripped) >= 2 * len(BLOCK_QUOTES):
        return stripped[len(BLOCK_QUOTES) : -len(BLOCK_QUOTES)].strip("\n")
    return text


def current_path_token(text: str) -> tuple[str, str, str | None]:
    """The path being typed at the end of `text`: (as typed, as meant, the quote it opened or None)."""
    start, value, quote = 0, [], None
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and quote != "'" and index + 1 < len(text):
            index += 1
            value.append(text[index])
        elif quote is not None:
            quote = None if char == quote else quote
            if quote is not None:
                value.append(char)
        elif char in "\"'":
            quote = char
        elif char.isspace():
            start, value = index + 1, []
        else:
            value.append(char)
        index += 1
    typed = text[start:]
    return typed, "".join(value), typed[0] if typed[:1] in ("'", '"') else None


def path_completions(text: str) -> Iterator[Completion]:
    """Files and folders that complete the path at the end of `text`, written as the user writes them."""
    from prompt_toolkit.completion import Completion

    typed, meant, quote = current_path_token(text)
    folder, prefix = os.path.split(meant)
    try:
        names = sorted(os.listdir(os.path.expanduser(folder or ".")))
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix) or (name.startswith(".") and not prefix.startswith(".")):
            continue
        full = os.path.join(folder, name)
        is_dir = os.path.isdir(os.path.expanduser(full))
        if quote:
            written = f"{quote}{full}/" if is_dir else f"{quote}{full}{quote}"
        else:
            written = SHELL_SPECIAL.sub(r"\\\1", full) + ("/" if is_dir else "")
        yield Completion(written, start_position=-len(typed), display=name + ("/" if is_dir else ""))


def command_completions(typed: str) -> list[str]:
    """The commands Tab offers for `/typed`: those it begins; when one of them begins all the others
    (`/ima`: image, images), that one alone, so Tab completes it at once (an `s` more reaches /images)."""
    matches = sorted(command for command in command_names() if command.startswith(typed))
    stem = min(matches, key=len, default="")
    return [stem] if matches and all(command.startswith(stem) for command in matches) else matches


def make_completer() -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class ChatCompleter(Completer):
        """Slash commands at the start of the line; file paths after /image."""

        def get_completions(self, document: Any, complete_event: Any) -> Iterator[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            name, space, rest = text[1:].partition(" ")
            if not space:
                for command in command_completions(name):
                    space = " " if find(command).needs_argument else ""  # type: ignore[union-attr]
                    yield Completion(command + space, start_position=-len(name), display=f"/{command}")
            elif (command := find(name)) is not None and command.completes_paths:
                yield from path_completions(rest)

    return ChatCompleter()


def make_key_bindings() -> Any:
    from prompt_toolkit.enums import DEFAULT_BUFFER
    from prompt_toolkit.filters import has_focus
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()
    editing = has_focus(DEFAULT_BUFFER)  # not while Ctrl-R search has the focus: Enter ends the search there

    @bindings.add("enter", filter=editing)
    def enter(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.complete_state is not None:  # Enter picks the highlighted completion; it does not send
            buffer.complete_state = None
        elif block_is_open(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter", filter=editing)
    def newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return bindings


def history_at(path: Path, notify: Callable[[str], None] = lambda message: None) -> History:
    """A history file of ours only, or an in-memory history when it cannot be written or is not private."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    try:
        make_private_dir(path.parent)  # refuses a folder that is a link, another user's or writable by others
        check_private_history(path)
    except (NotRegularFile, NotPrivate) as err:
        notify(f"input history is kept for this session only: {err.filename}: {err.strerror}")
        return InMemoryHistory()
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


def check_private_history(path: Path) -> None:
    """Create the history file 0600 if needed; refuse a link, a non-regular file or one others may write."""
    os.close(open_regular(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, follow_symlinks=False, private=True))


def make_prompt_session(
    history: Path,
    status: Callable[[], str],
    notify: Callable[[str], None] = lambda message: None,
    **streams: Any,
) -> PromptSession:
    """The chat's prompt session; `notify` hears why the history is not kept; `streams` (input=, output=) are for tests."""
    from prompt_toolkit import PromptSession

    return PromptSession(
        history=history_at(history, notify),
        completer=make_completer(),
        complete_while_typing=False,  # Tab completes, as in a shell; typing a message shows no menus
        key_bindings=make_key_bindings(),
        multiline=True,  # Enter is bound above: it sends unless a \"\"\" block is open
        prompt_continuation="... ",
        bottom_toolbar=lambda: status(),
        enable_history_search=False,
        **streams,
    )
