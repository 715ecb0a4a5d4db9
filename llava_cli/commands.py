"""The chat's slash commands beyond the basics: retry, undo, settings, saving, clipboard, display.

`ReplCommands` is mixed into `ChatLoop` (chat.py), which registers each method in its `commands`
dict and provides what they use: `engine`, `settings`, `io`, `conversation`, `attached`,
`recorder`, `context_tokens`, `respond()` and `autosave()`. Every command reports through the
`ChatIO` and raises `InputError` with a one-line message when it cannot do what was asked. Text
from saved conversations (names, model, system text, image names) is passed on as it is: the
`ChatIO` shows it through terminal.py's choke point, which strips escape sequences at a terminal.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import TYPE_CHECKING, Any, Callable

from llava_cli.clipboard import copy_to_clipboard
from llava_cli.conversation import Conversation, Turn
from llava_cli.errors import InputError, LlavaError, UsageError, suggestion
from llava_cli.images import ImageRef
from llava_cli.store import (
    SAVED_SETTINGS,
    Recorder,
    SessionStore,
    describe_settings,
    model_id,
    restore_conversation,
    restored_settings,
    shorten,
)
from llava_cli.terminal import is_terminal, table

if TYPE_CHECKING:
    from llava_cli.chat import ChatIO
    from llava_cli.backend import Backend
    from llava_cli.settings import Settings

QUIT_COMMANDS = ("quit", "exit", "bye")
COMMAND_HELP = [
    ("/image PATH [PATH...] [question]", "attach images to the next message (or ask about them now)"),
    ("/retry", "answer the last message again"),
    ("/undo", "drop the last message and its answer"),
    ("/system [TEXT|off]", "show, set or remove the system text (applies to the whole conversation)"),
    ("/set [KEY VALUE]", "show or change temperature, top-p, max-new-tokens, seed, max-context"),
    ("/show", "model, device, settings, context used, where the conversation is saved"),
    ("/images", "the images in the conversation and the turn each belongs to"),
    ("/save [NAME]", "save now, optionally under a name for /load and --resume"),
    ("/load NAME|ID", "switch to a saved conversation"),
    ("/markdown on|off", "render answers as Markdown (on by default at a terminal)"),
    ("/copy", "copy the last answer to the clipboard"),
    ("/clear", "start a new conversation (the old one stays saved)"),
    ("/stats", "figures for the last answer"),
    ("/help", "this help"),
    ("/quit", "leave (Ctrl-D too)"),
]
HELP_NOTES = (
    'Alt-Enter (or Esc, Enter) starts a new line; """ begins and ends a multi-line message. '
    "Tab completes commands and image paths. // sends text that begins with /. Ctrl-C stops an answer."
)


def help_text(columns: int) -> str:
    """/help laid out for a terminal `columns` wide: commands in a table, notes wrapped between words."""
    notes = textwrap.wrap(HELP_NOTES, columns, break_long_words=False, break_on_hyphens=False)
    return "\n".join(["Type a message and press Enter. Commands:", *table(COMMAND_HELP, columns), *notes])


def optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


# /set KEY: (Settings field, parser of the typed value, what the value must be)
SETTABLE: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "temperature": ("temperature", float, "a number"),
    "top-p": ("top_p", float, "a number"),
    "max-new-tokens": ("max_new_tokens", int, "a whole number"),
    "seed": ("seed", optional_int, "a whole number or none"),
    "max-context": ("max_context", optional_int, "a whole number or none"),
}


class ReplCommands:
    """Slash commands for `ChatLoop`; see the module docstring for what they rely on."""

    engine: Backend
    settings: Settings
    conversation: Conversation
    attached: list[ImageRef]
    io: ChatIO
    recorder: Recorder | None
    context_tokens: int | None
    respond: Callable[[Callable[[], None], str], None]  # answer the pending turn; `undo` on failure
    autosave: Callable[[], None]

    def help(self, _: str) -> None:
        self.io.info(help_text(self.io.columns))

    def recap(self) -> None:
        """After --resume: which conversation this is, and its last exchange to pick up from."""
        turns = self.conversation.turns
        label = (self.recorder.name or self.recorder.session_id) if self.recorder else "the conversation"
        self.io.info(f"resumed {label}: {len(turns)} turn(s)")
        if turns:
            self.io.info(f">>> {shorten(turns[-1].text, 200)}\n{shorten(turns[-1].answer or '', 400)}")

    def last_exchange(self, action: str) -> Turn:
        if not self.conversation.turns:
            raise InputError(f"nothing to {action} yet")
        return self.conversation.turns[-1]

    def retry(self, _: str) -> None:
        """Answer the last message again; if that fails or is stopped, the old answer stays."""
        old = self.last_exchange("retry")
        self.conversation.turns.pop()
        self.conversation.ask(old.text, old.images)

        def put_back() -> None:
            self.conversation.discard_pending()
            self.conversation.turns.append(old)

        self.respond(put_back, "answer stopped; the previous answer was kept")

    def undo(self, _: str) -> None:
        turn = self.last_exchange("undo")
        self.conversation.turns.pop()
        self.context_tokens = None
        self.io.info(f"dropped your last message (“{shorten(turn.text)}”) and its answer")
        self.autosave()

    def system(self, argument: str) -> None:
        if not argument:
            self.io.info(f"system text: {self.conversation.system}" if self.conversation.system else "no system text")
            return
        self.conversation.system = None if argument == "off" else argument
        self.context_tokens = None
        self.io.info("system text removed" if argument == "off" else "system text set; it applies from the next answer")
        self.autosave()

    def set_option(self, argument: str) -> None:
        key, _, value = argument.partition(" ")
        if not key:
            self.io.info(self.settings_text())
            return
        name = key.replace("_", "-")
        if name not in SETTABLE:
            raise InputError(f"cannot set {key}{suggestion(name, SETTABLE)} (settable: {', '.join(SETTABLE)})")
        if not value.strip():
            raise InputError(f"usage: /set {name} VALUE (now {self.setting(name)})")
        self.settings = changed_settings(self.settings, name, value.strip())
        self.io.info(f"{name} = {self.setting(name)}")
        self.autosave()

    def setting(self, name: str) -> Any:
        value = getattr(self.settings, SETTABLE[name][0])
        return "none" if value is None else value

    def settings_text(self) -> str:
        return describe_settings({key: getattr(self.settings, key) for key in SAVED_SETTINGS})

    def show(self, _: str) -> None:
        self.io.info("\n".join(f"{label:<9} {value}" for label, value in self.facts()))

    def facts(self) -> list[tuple[str, str]]:
        info = self.engine.info()
        turns = self.conversation.turns
        return [
            ("model", f"{self.settings.model} on {info.where} ({info.dtype or 'server'})"),
            ("settings", self.settings_text()),
            ("system", self.conversation.system or "(none)"),
            ("context", self.context_summary()),
            ("history", f"{len(turns)} turn(s), {len(self.conversation.images)} image(s), {len(self.attached)} waiting"),
            ("saved", self.saved_summary()),
            ("markdown", "on" if self.io.markdown else "off"),
        ]

    def context_summary(self) -> str:
        """How much of the context window the conversation fills."""
        tokens = self.context_used()
        used = "?" if tokens is None else str(tokens)
        window = self.engine.info().window(self.settings)
        if window is None:  # a server does not tell its window
            return f"{used} tokens"
        share = f" ({100 * tokens // window}%)" if tokens is not None else ""
        return f"{used} of {window} tokens{share}"

    def context_used(self) -> int | None:
        """Tokens in the conversation: from the last answer's figures, else (after /undo, /load, a
        resume, a new system text) counted once by encoding the history; None through a server."""
        if self.context_tokens is None and not self.conversation.pending:
            self.context_tokens = self.engine.prompt_tokens(self.conversation)
        return self.context_tokens

    def saved_summary(self) -> str:
        if self.recorder is None:
            return "no (--no-save)"
        if self.recorder.path is None:
            return "after the first answer"
        name = f" as {self.recorder.name}" if self.recorder.name else ""
        return f"{self.recorder.session_id}{name} in {self.recorder.path}"

    def images(self, _: str) -> None:
        lines = [
            f"turn {number}: {image.name}"
            for number, turn in enumerate(self.conversation.turns, 1)
            for image in turn.images
        ]
        lines += [f"next message: {image.name}" for image in self.attached]
        self.io.info("\n".join(lines) if lines else "no images; /image PATH attaches one")

    def save(self, argument: str) -> None:
        if self.recorder is None:
            raise InputError("this chat is not being saved (it was started with --no-save)")
        if not argument and not self.conversation.turns:
            raise InputError("nothing to save yet")
        if argument:
            self.recorder.rename(argument)
        try:
            path = self.recorder.save(self.conversation, self.settings)
        except OSError as err:
            raise LlavaError(f"could not save: {err.strerror or err}") from None
        handle = self.recorder.name or self.recorder.session_id
        self.io.info(f"saved to {path}; /load {handle} or `llava chat --resume {handle}` brings it back")

    def load(self, argument: str) -> None:
        if not argument:
            raise InputError("usage: /load NAME|ID (`llava sessions list` shows them)")
        store = self.recorder.store if self.recorder else SessionStore.default()
        saved = store.find(argument)
        conversation, _ = restore_conversation(saved, self.settings.max_image_pixels, drop_missing=False)
        self.settings = restored_settings(self.settings, saved, given=frozenset({"model"}))  # the model stays loaded
        self.conversation, self.attached, self.context_tokens = conversation, [], None
        if self.recorder is not None:
            self.recorder.switch(saved)
        self.io.info(f"loaded {saved.label}: {len(conversation.turns)} turn(s)")
        if saved.model != model_id(self.settings.model):
            self.io.info(f"note: it was held with {saved.model}; answers now come from {self.settings.model}")

    def markdown(self, argument: str) -> None:
        if argument not in ("on", "off"):
            raise InputError(f"usage: /markdown on|off (now {'on' if self.io.markdown else 'off'})")
        self.io.markdown = argument == "on"
        self.io.info(f"markdown {argument}")

    def copy(self, _: str) -> None:
        answer = self.last_exchange("copy").answer or ""
        terminal = sys.stdout if self.io.interactive and is_terminal(sys.stdout) else None
        self.io.info(copy_to_clipboard(answer, terminal))


def changed_settings(settings: Settings, name: str, text: str) -> Settings:
    """`settings` with one value changed; the new value is checked as the command-line option is."""
    field, parse, kind = SETTABLE[name]
    try:
        value = parse(text)
    except ValueError:
        raise InputError(f"{name} must be {kind} (got {text!r})") from None
    try:
        return dataclasses.replace(settings, **{field: value}, chosen=settings.chosen | {field})
    except UsageError as err:
        raise InputError(str(err).removeprefix("--")) from None
