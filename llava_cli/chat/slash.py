"""The chat's slash commands, by registration: each is declared once, with its name, aliases, usage,
help line and handler, and /help, Tab completion (chat/inputline.py) and "did you mean" read `COMMANDS`.

A handler is a function `(chat, argument)`; `chat` is chatio.`Chat` (chat/loop.py's `ChatLoop`), so
commands know the chat only through that protocol. To add a command, write its handler here under
`@command(name, arguments, help)`; the order of registration is /help's order. Every command
reports through the `ChatIO` and raises `InputError` with a one-line message when it cannot do what
was asked. Text from saved conversations (names, model, system text, image names) is passed on as
it is: the `ChatIO` shows it through base/terminal.py's choke point, which strips escape sequences.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llava_cli.base.errors import InputError, LlavaError, UsageError, suggestion
from llava_cli.base.options import SAVED, SETTABLE
from llava_cli.base.terminal import is_terminal, table
from llava_cli.chat.clipboard import copy_to_clipboard
from llava_cli.client.discovery import model_key
from llava_cli.frontend.arguments import split_image_command
from llava_cli.media.paste import paste_image
from llava_cli.prompt.conversation import Turn
from llava_cli.store.conversations import (
    SessionStore,
    describe_settings,
    shorten,
)
from llava_cli.store.resume import restore_conversation, restored_settings

if TYPE_CHECKING:
    from llava_cli.base.settings import Settings
    from llava_cli.chat.protocols import Chat

Handler = Callable[["Chat", str], None]
HELP_NOTES = (
    'Alt-Enter (or Esc, Enter) starts a new line; """ begins and ends a multi-line message. '
    "Tab completes commands and image paths. // sends text that begins with /. Ctrl-C stops an answer."
)


@dataclass(frozen=True)
class Command:
    name: str
    arguments: str  # as /help shows them after the name: "PATH [PATH...] [question]", or ""
    help: str
    handler: Handler | None  # None: the chat loop itself acts on it (/quit)
    aliases: tuple[str, ...] = ()
    completes_paths: bool = False  # Tab completes file paths after it

    @property
    def usage(self) -> str:
        return f"/{self.name} {self.arguments}".rstrip()

    @property
    def needs_argument(self) -> bool:
        """It takes an argument that is not optional ([...]): Tab completion adds the space before it."""
        return bool(self.arguments) and not self.arguments.startswith("[")


COMMANDS: list[Command] = []  # in /help's order


def register(entry: Command) -> None:
    COMMANDS.append(entry)


def command(name: str, arguments: str, help: str, completes_paths: bool = False) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of /`name`."""

    def registered(handler: Handler) -> Handler:
        register(Command(name, arguments, help, handler, completes_paths=completes_paths))
        return handler

    return registered


def find(name: str) -> Command | None:
    """The command called `name` (or one of its aliases), if any."""
    return next((entry for entry in COMMANDS if name == entry.name or name in entry.aliases), None)


def command_names() -> list[str]:
    """Every name and alias, for Tab completion and "did you mean"."""
    return [name for entry in COMMANDS for name in (entry.name, *entry.aliases)]


def ends_chat(name: str) -> bool:
    entry = find(name)
    return entry is not None and entry.handler is None


def run_command(chat: Chat, name: str, argument: str) -> None:
    entry = find(name)
    if entry is None or entry.handler is None:
        raise InputError(
            f"unknown command /{name}{suggestion(name, command_names(), prefix='/')} (/help lists the commands)"
        )
    entry.handler(chat, argument)


def help_text(columns: int) -> str:
    """/help laid out for a terminal `columns` wide: commands in a table, notes wrapped between words."""
    rows = [(entry.usage, entry.help) for entry in COMMANDS]
    notes = textwrap.wrap(HELP_NOTES, columns, break_long_words=False, break_on_hyphens=False)
    return "\n".join(["Type a message and press Enter. Commands:", *table(rows, columns), *notes])


@command(
    "image",
    "PATH [PATH...] [question]",
    "attach images to the next message (or ask about them now)",
    completes_paths=True,
)
def attach(chat: Chat, argument: str) -> None:
    paths, question = split_image_command(argument)
    if not paths:
        raise InputError("usage: /image PATH [PATH...] [question]")
    chat.attach_paths(paths, asked_now=bool(question))
    if question:
        chat.send(question)


@command("video", "PATH [question]", "attach a video to the next message (or ask about it now)", completes_paths=True)
def attach_video(chat: Chat, argument: str) -> None:
    paths, question = split_image_command(argument)
    if not paths:
        raise InputError("usage: /video PATH [question]")
    chat.attach_paths(paths, asked_now=bool(question), kind="video")
    if question:
        chat.send(question)


def recap(chat: Chat) -> None:
    """After --resume: which conversation this is, and its last exchange to pick up from."""
    turns = chat.conversation.turns
    label = (chat.recorder.name or chat.recorder.session_id) if chat.recorder else "the conversation"
    chat.io.info(f"resumed {label}: {len(turns)} turn(s)")
    if turns:
        chat.io.info(f">>> {shorten(turns[-1].text, 200)}\n{shorten(turns[-1].answer or '', 400)}")


def last_exchange(chat: Chat, action: str) -> Turn:
    if not chat.conversation.turns:
        raise InputError(f"nothing to {action} yet")
    return chat.conversation.turns[-1]


@command("paste", "[question]", "attach the image on the system clipboard (or ask about it now)")
def paste(chat: Chat, argument: str) -> None:
    image = paste_image(chat.settings.max_image_pixels)
    chat.attached.append(image)
    width, height = image.image.size
    chat.io.info(f"attached the clipboard's image ({width}x{height}); it goes with your next message")
    if argument.strip():
        chat.send(argument.strip())


@command("retry", "", "answer the last message again")
def retry(chat: Chat, _: str) -> None:
    """Answer the last message again; if that fails or is stopped, the old answer stays."""
    old = last_exchange(chat, "retry")
    if chat.settings.temperature == 0:
        chat.io.info("temperature is 0 (greedy), so the answer will be the same; /set temperature 0.7 to vary it")
    chat.conversation.turns.pop()
    chat.conversation.ask(old.text, old.images)

    def put_back() -> None:
        chat.conversation.discard_pending()
        chat.conversation.turns.append(old)

    chat.respond(put_back, "answer stopped; the previous answer was kept")


@command("undo", "", "drop the last message and its answer")
def undo(chat: Chat, _: str) -> None:
    turn = last_exchange(chat, "undo")
    chat.conversation.turns.pop()
    chat.context_tokens = None
    chat.io.info(f"dropped your last message (“{shorten(turn.text)}”) and its answer")
    chat.autosave()


@command("system", "[TEXT|off]", "show, set or remove the system text (applies to the whole conversation)")
def system(chat: Chat, argument: str) -> None:
    if not argument:
        chat.io.report(f"system text: {chat.conversation.system}" if chat.conversation.system else "no system text")
        return
    chat.conversation.system = None if argument == "off" else argument
    chat.context_tokens = None
    chat.io.info("system text removed" if argument == "off" else "system text set; it applies from the next answer")
    chat.autosave()


@command(
    "schema", "[FILE|JSON|FIELDS|off]", "show, set or remove the JSON schema answers follow (what ask --schema takes)"
)
def schema(chat: Chat, argument: str) -> None:
    if not argument:
        chat.io.report(
            f"schema: {chat.settings.constraint}" if chat.settings.constraint else "no schema: answers are free text"
        )
        return
    if argument == "off":
        chat.settings = dataclasses.replace(chat.settings, constraint=None)
        chat.io.info("schema removed: answers are free text again")
        return
    from llava_cli.engine.constraints import schema_text

    constraint = schema_text(argument, "/schema")  # a bad schema: one line, and the old one stays
    chat.settings = dataclasses.replace(chat.settings, constraint=constraint)
    chat.io.info("schema set: every answer is now JSON following it (/schema off to stop)")


@command("set", "[KEY VALUE]", f"show or change {', '.join(SETTABLE)}")
def set_option(chat: Chat, argument: str) -> None:
    key, _, value = argument.partition(" ")
    if not key:
        chat.io.report(settings_text(chat))
        return
    name = key.replace("_", "-")
    if name not in SETTABLE:
        raise InputError(f"cannot set {key}{suggestion(name, SETTABLE)} (settable: {', '.join(SETTABLE)})")
    if not value.strip():
        raise InputError(f"usage: /set {name} VALUE (now {setting(chat, name)})")
    chat.settings = changed_settings(chat.settings, name, value.strip())
    chat.io.info(f"{name} = {setting(chat, name)}")
    chat.autosave()


def setting(chat: Chat, name: str) -> Any:
    value = getattr(chat.settings, SETTABLE[name].name)
    return "none" if value is None else value


def settings_text(chat: Chat) -> str:
    return describe_settings({key: getattr(chat.settings, key) for key in SAVED})


@command(
    "show",
    "",
    "model, device, settings, context used, where the conversation is saved, what the model sees of each image",
)
def show(chat: Chat, _: str) -> None:
    chat.io.report("\n".join([f"{label:<9} {value}" for label, value in facts(chat)] + image_lines(chat)))


def image_lines(chat: Chat) -> list[str]:
    """Each image of the conversation (and those waiting) as the model sees it: sizes, grid, tokens, share.
    Only a model loaded here has a processor to ask; a server does not say."""
    loaded = getattr(chat.engine, "loaded", None)  # engine.Engine's LoadedModel; a server backend has none
    from llava_cli.media.images import ImageRef

    pictures = [
        item for item in (*chat.conversation.images, *chat.attached) if isinstance(item, ImageRef)
    ]  # videos have lines of their own
    if loaded is None or not pictures:
        return []
    from llava_cli.models.imagetokens import describe_images

    window = chat.engine.info().window(chat.settings)
    return ["images"] + [
        f"  {image.line()}" for image in describe_images(loaded.processor, loaded.family, pictures, window)
    ]


def facts(chat: Chat) -> list[tuple[str, str]]:
    info = chat.engine.info()
    turns = chat.conversation.turns
    return [
        ("model", f"{chat.settings.model} on {info.where} ({info.dtype or 'server'})"),
        ("settings", settings_text(chat)),
        ("system", chat.conversation.system or "(none)"),
        ("context", context_summary(chat)),
        ("history", f"{len(turns)} turn(s), {len(chat.conversation.images)} image(s), {len(chat.attached)} waiting"),
        *[("video", video_summary(video)) for video in chat.last_figures.videos],
        ("saved", saved_summary(chat)),
        ("markdown", "on" if chat.io.markdown else "off"),
    ]


def video_summary(video: dict) -> str:
    """One video of the last answer's prompt: its frames and tokens."""
    return f"{video['name']}: {len(video['frames'])} frames (at {', '.join(map(str, video['frames']))}), {video['video_tokens']} tokens"


def context_summary(chat: Chat) -> str:
    """How much of the context window the conversation fills."""
    tokens = context_used(chat)
    used = "?" if tokens is None else str(tokens)
    window = chat.engine.info().window(chat.settings)
    if window is None:  # a server does not tell its window
        return f"{used} tokens"
    share = f" ({100 * tokens // window}%)" if tokens is not None else ""
    return f"{used} of {window} tokens{share}"


def context_used(chat: Chat) -> int | None:
    """Tokens in the conversation: from the last answer's figures, else (after /undo, /load, a
    resume, a new system text) counted once by encoding the history; None through a server."""
    if chat.context_tokens is None and not chat.conversation.pending:
        chat.context_tokens = chat.engine.prompt_tokens(chat.conversation)
    return chat.context_tokens


def saved_summary(chat: Chat) -> str:
    if chat.recorder is None:
        return "no (--no-save)"
    if chat.recorder.path is None:
        return "after the first answer"
    name = f" as {chat.recorder.name}" if chat.recorder.name else ""
    return f"{chat.recorder.session_id}{name} in {chat.recorder.path}"


@command("images", "", "the images in the conversation and the turn each belongs to")
def images(chat: Chat, _: str) -> None:
    lines = [
        f"turn {number}: {image.name}"
        for number, turn in enumerate(chat.conversation.turns, 1)
        for image in turn.images
    ]
    lines += [f"next message: {image.name}" for image in chat.attached]
    chat.io.report("\n".join(lines) if lines else "no images; /image PATH attaches one")


@command("save", "[NAME]", "save now, optionally under a name for /load and --resume")
def save(chat: Chat, argument: str) -> None:
    if chat.recorder is None:
        raise InputError("this chat is not being saved (it was started with --no-save)")
    if not argument and not chat.conversation.turns:
        raise InputError("nothing to save yet")
    if argument:
        chat.recorder.rename(argument)
    try:
        path = chat.recorder.save(chat.conversation, chat.settings)
    except OSError as err:
        raise LlavaError(f"could not save: {err.strerror or err}") from None
    handle = chat.recorder.name or chat.recorder.session_id
    chat.io.info(f"saved to {path}; /load {handle} or `llava chat --resume {handle}` brings it back")


@command("load", "NAME|ID", "switch to a saved conversation")
def load(chat: Chat, argument: str) -> None:
    if not argument:
        raise InputError("usage: /load NAME|ID (`llava sessions list` shows them)")
    store = chat.recorder.store if chat.recorder else SessionStore.default()
    saved = store.find(argument)
    conversation, _ = restore_conversation(saved, chat.settings.max_image_pixels, drop_missing=False)
    chat.settings = restored_settings(chat.settings, saved, given=frozenset({"model"}))  # the model stays loaded
    chat.conversation, chat.attached, chat.context_tokens = conversation, [], None
    if chat.recorder is not None:
        chat.recorder.switch(saved)
    chat.io.info(f"loaded {saved.label}: {len(conversation.turns)} turn(s)")
    if saved.model != model_key(chat.settings.model):
        chat.io.info(f"note: it was held with {saved.model}; answers now come from {chat.settings.model}")


@command("markdown", "on|off", "render answers as Markdown (on by default at a terminal)")
def markdown(chat: Chat, argument: str) -> None:
    if argument not in ("on", "off"):
        raise InputError(f"usage: /markdown on|off (now {'on' if chat.io.markdown else 'off'})")
    chat.io.markdown = argument == "on"
    chat.io.info(f"markdown {argument}")


@command("copy", "", "copy the last answer to the clipboard")
def copy(chat: Chat, _: str) -> None:
    answer = last_exchange(chat, "copy").answer or ""
    terminal = sys.stdout if chat.io.interactive and is_terminal(sys.stdout) else None
    chat.io.info(copy_to_clipboard(answer, terminal))


@command("clear", "", "start a new conversation (the old one stays saved)")
def clear(chat: Chat, _: str) -> None:
    chat.conversation.clear()
    chat.attached.clear()
    chat.engine.reset()
    chat.context_tokens = 0
    if chat.recorder is not None:
        chat.recorder.switch(None)  # the old conversation stays saved; a new file starts
    chat.io.info("conversation cleared")


@command("stats", "", "figures for the last answer")
def stats(chat: Chat, _: str) -> None:
    figures = chat.last_figures.as_dict()
    chat.io.report("\n".join(table([(key, str(value)) for key, value in figures.items()], chat.io.columns)))


@command("help", "", "this help")
def show_help(chat: Chat, _: str) -> None:
    chat.io.report(help_text(chat.io.columns))


register(Command("quit", "", "leave (Ctrl-D too)", handler=None, aliases=("exit", "bye")))  # the chat loop ends on it


def changed_settings(settings: Settings, name: str, text: str) -> Settings:
    """`settings` with one value changed; the new value is checked as the command-line option is."""
    option = SETTABLE[name]
    try:
        value = option.parse_text(text)
    except ValueError:
        raise InputError(f"{name} must be {option.described} (got {text!r})") from None
    try:
        return dataclasses.replace(settings, **{option.name: value}, chosen=settings.chosen | {option.name})
    except UsageError as err:
        raise InputError(str(err).removeprefix("--")) from None
