"""`llava chat`: a multi-turn conversation, typed at a terminal or piped in line by line.

`ChatLoop` holds the conversation logic and the slash commands; it talks to the user only through
a `ChatIO`. `TerminalIO` gives a prompt-toolkit input line and streams the answer with Rich;
`PipeIO` reads one message per line from stdin and writes each answer as a plain line (or a JSON
object per line with --json). A failed message leaves the conversation as it was, images attached
to it included, and the loop goes on; Ctrl-C stops an answer and returns to the prompt.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import closing
from typing import Protocol

from llava_cli.conversation import Conversation
from llava_cli.engine import Engine
from llava_cli.errors import InputError, LlavaError
from llava_cli.images import ImageRef, load_image, looks_like_image
from llava_cli.settings import Settings
from llava_cli.terminal import is_terminal, make_console, safe_for_terminal

HELP = """\
Type a message and press Enter. Commands:
  /image PATH [PATH...] [question]  attach images to the next message (or ask about them now)
  /clear                            forget the conversation and attached images
  /stats                            figures for the last answer
  /help                             this help
  /quit                             leave (Ctrl-D too)
Start a message with // to send text that begins with /. Ctrl-C stops an answer."""
# A path: "quoted", 'quoted', or unquoted with backslash-escaped spaces (as terminals drop them).
PATH_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|((?:[^\s\\]|\\.)+)')


class ChatIO(Protocol):
    interactive: bool  # a person is there: Ctrl-C stops an answer instead of the program

    def read(self) -> str | None: ...
    def stream(self, chunks: Iterator[str]) -> None: ...
    def answered(self, answer: str, stats: dict) -> None: ...
    def info(self, message: str) -> None: ...
    def error(self, message: str) -> None: ...


def split_image_command(argument: str) -> tuple[list[str], str]:
    """`/image a.png "my b.png" what is this?` -> (["a.png", "my b.png"], "what is this?")."""
    paths, position = [], 0
    while match := PATH_TOKEN.match(argument, position):
        token = next(group for group in match.groups() if group is not None)
        if paths and not looks_like_image(unescape(token)):
            break
        paths.append(unescape(token))
        position = match.end()
        while position < len(argument) and argument[position].isspace():
            position += 1
    return paths, argument[position:].strip()


def unescape(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token)


class ChatLoop:
    """The conversation, the images waiting for the next message, and the slash commands."""

    def __init__(self, engine: Engine, settings: Settings, io: ChatIO) -> None:
        self.engine = engine
        self.settings = settings
        self.io = io
        self.conversation = Conversation(system=settings.system)
        self.attached: list[ImageRef] = []
        self.failures = 0
        self.commands = {
            "image": self.attach,
            "clear": self.clear,
            "stats": self.stats,
            "help": lambda _: self.io.info(HELP),
        }

    def run(self, initial_images: list[str]) -> int:
        """Chat until /quit or end of input; return 1 if any message failed, else 0."""
        if initial_images:
            self.attach_paths(initial_images)
        while (line := self.io.read()) is not None:
            line = line.strip()
            if line in ("/quit", "/exit", "/bye"):
                break
            if line:
                self.handle(line)
        return 1 if self.failures else 0

    def handle(self, line: str) -> None:
        try:
            if line.startswith("//"):
                self.send(line[1:])
            elif line.startswith("/"):
                name, _, argument = line[1:].partition(" ")
                self.command(name, argument.strip())
            else:
                self.send(line)
        except LlavaError as err:
            self.failures += 1
            self.io.error(str(err))

    def command(self, name: str, argument: str) -> None:
        action = self.commands.get(name)
        if action is None:
            raise InputError(f"unknown command /{name}; /help lists the commands")
        action(argument)

    def attach(self, argument: str) -> None:
        paths, question = split_image_command(argument)
        if not paths:
            raise InputError("usage: /image PATH [PATH...] [question]")
        self.attach_paths(paths)
        if question:
            self.send(question)

    def attach_paths(self, paths: list[str]) -> None:
        images = [load_image(path, self.settings.max_image_pixels) for path in paths]  # all or none
        self.attached.extend(images)
        names = ", ".join(safe_for_terminal(image.name) for image in images)
        self.io.info(f"attached {names}; it goes with your next message")

    def clear(self, _: str) -> None:
        self.conversation.clear()
        self.attached.clear()
        self.engine.reset()
        self.io.info("conversation cleared")

    def stats(self, _: str) -> None:
        figures = self.engine.last_stats.as_dict()
        self.io.info("  ".join(f"{key}={value}" for key, value in figures.items()))

    def send(self, text: str) -> None:
        self.conversation.ask(text, self.attached)
        self.attached = []
        try:
            with closing(self.engine.generate(self.conversation, self.settings)) as chunks:
                self.io.stream(chunks)
        except KeyboardInterrupt:
            self.restore_pending()
            if not self.io.interactive:
                raise
            self.io.info("answer stopped; the message was not added to the conversation")
            return
        except BaseException:
            self.restore_pending()
            raise
        self.io.answered(self.conversation.turns[-1].answer or "", self.engine.last_stats.as_dict())


    def restore_pending(self) -> None:
        """Take back an unanswered message; its images wait for the next one, so nothing is lost."""
        turn = self.conversation.discard_pending()
        if turn is not None:
            self.attached = turn.images + self.attached


class PipeIO:
    """Messages from stdin, one per line; answers on stdout as text lines or JSON lines."""

    interactive = False

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def read(self) -> str | None:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    def stream(self, chunks: Iterator[str]) -> None:
        if self.as_json:
            for _ in chunks:  # the whole answer is written by `answered`
                pass
            return
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()

    def answered(self, answer: str, stats: dict) -> None:
        sys.stdout.write(json.dumps({"answer": answer, **stats}, ensure_ascii=False) + "\n" if self.as_json else "\n")
        sys.stdout.flush()

    def info(self, message: str) -> None:
        pass  # chatter would corrupt the transcript a script reads

    def error(self, message: str) -> None:
        print(f"llava: error: {message}", file=sys.stderr)


class TerminalIO:
    """prompt-toolkit input and Rich output, for a person at a terminal."""

    interactive = True

    def __init__(self, settings: Settings) -> None:
        from prompt_toolkit import PromptSession

        self.console = make_console()
        self.settings = settings
        self.session: PromptSession = PromptSession()

    def read(self) -> str | None:
        while True:
            try:
                return self.session.prompt(">>> ")
            except KeyboardInterrupt:
                continue  # like a shell: Ctrl-C clears the line
            except EOFError:
                return None

    def stream(self, chunks: Iterator[str]) -> None:
        try:
            for chunk in chunks:
                self.console.print(safe_for_terminal(chunk), end="", markup=False)
        finally:
            self.console.print()

    def answered(self, answer: str, stats: dict) -> None:
        if self.settings.verbose:
            self.info(f"{stats['completion_tokens']} tokens, {stats['tokens_per_s']} tok/s, ttft {stats['ttft_s']}s")

    def info(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False)

    def error(self, message: str) -> None:
        self.console.print(f"error: {message}", style="bold red", markup=False)


def run_chat(settings: Settings, images: list[str], as_json: bool) -> int:
    from llava_cli.session import start_engine

    for path in images:  # fail before the slow model load
        load_image(path, settings.max_image_pixels)
    engine = start_engine(settings)
    interactive = is_terminal(sys.stdin) and is_terminal(sys.stdout) and not as_json
    io: ChatIO = TerminalIO(settings) if interactive else PipeIO(as_json)
    if interactive:
        io.info(f"{settings.model} on {engine.loaded.device}. /help for commands, /quit to leave.")
    return ChatLoop(engine, settings, io).run(images)
