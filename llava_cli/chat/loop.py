"""`llava chat`: a multi-turn conversation, typed at a terminal or piped in line by line.

`ChatLoop` holds the conversation logic and runs the slash commands; it talks to the user only through
a `ChatIO`. `TerminalIO` gives a prompt-toolkit input line and streams the answer with Rich;
`PipeIO` reads one message per line from stdin and writes each answer as a plain line (or a JSON
object per line with --json). A failed message leaves the conversation as it was, images attached
to it included, and the loop goes on; Ctrl-C stops an answer and returns to the prompt.

After each answer the conversation is saved through a `Recorder` (store/conversations.py); a save that fails
(disk full, read-only folder) is reported once and the chat goes on. SIGTERM ends the chat like
/quit (exit 0, what was answered is saved, no traceback, no temp file left). The slash commands
(/image, /retry, /set, /save...) are registered in chat/slash.py and see the chat through
chatio.`Chat`, which `ChatLoop` implements; `PipeIO` writes answers through frontend/output.py's writers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

from llava_cli.base.errors import EXIT_OK, LlavaError
from llava_cli.base.settings import Settings
from llava_cli.base.terminal import emit, emit_error, is_terminal, make_console, one_line_text, safe_for_terminal, shown
from llava_cli.chat.protocols import ChatIO
from llava_cli.chat.slash import context_summary, ends_chat, recap, run_command
from llava_cli.engine.backend import Answer, Backend
from llava_cli.engine.constraints import answer_value
from llava_cli.engine.streaming import Stats, stats_line
from llava_cli.frontend.output import WRITERS
from llava_cli.frontend.records import answer_record
from llava_cli.frontend.signals import Terminated, sigterm_raises
from llava_cli.media.attachments import open_local
from llava_cli.media.images import ImageRef
from llava_cli.media.pdfpages import image_or_pages
from llava_cli.prompt.conversation import Conversation
from llava_cli.store.conversations import Recorder, data_dir
from llava_cli.store.resume import SessionOptions, open_conversation


class ChatLoop:
    """The conversation, the images waiting for the next message, and the slash commands.

    `recorder` saves the conversation after each answer (None: not saved); `conversation` is
    history to continue (a resumed conversation), else a new one starts.
    """

    def __init__(
        self,
        engine: Backend,
        settings: Settings,
        io: ChatIO,
        recorder: Recorder | None = None,
        conversation: Conversation | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.io = io
        self.recorder = recorder
        self.conversation = conversation or Conversation(system=settings.system)
        self.context_tokens: int | None = None if conversation else 0  # after the last answer
        self.last_figures = Stats(load_s=engine.info().load_seconds)  # from the last answer's `Done`, for /stats
        self.attached: list[ImageRef] = []
        self.failures = 0
        self.save_problem: str | None = None  # the last save failure reported, so it is said once

    def run(self, initial_images: list[str]) -> int:
        """Chat until /quit or end of input; return 1 if a piped message failed, else 0.

        At a terminal the person saw each error and chatted on, so leaving is a success."""
        if initial_images:
            self.attach_paths(initial_images, kind="any")
        while (line := self.io.read()) is not None:
            line = line.strip()
            if line.startswith("/") and ends_chat(line[1:]):
                break
            if line:
                self.handle(line)
        return 1 if self.failures and not self.io.interactive else 0

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
        run_command(self, name, argument)

    def attach_paths(self, paths: list[str], asked_now: bool = False, kind: str = "image") -> None:
        """Attach images or videos (`kind`: media.open_local's) to the next message, or with `asked_now` to the question sent right after."""
        images, notes = [], []
        for path in paths:  # all or none: nothing is attached until every one opens
            opened, note = image_or_pages(
                path, None, self.settings.max_image_pixels, lambda one, _: open_local(one, self.settings, kind)
            )
            images += opened
            notes += [note] if note else []
        for note in notes:
            self.io.info(note)
        self.attached.extend(images)
        names = ", ".join(image.name for image in images)
        self.io.info(
            f"attached {names}; "
            + ("answering your question about it now" if asked_now else "it goes with your next message")
        )

    def send(self, text: str) -> None:
        self.conversation.ask(text, self.attached)
        self.attached = []
        self.respond(self.restore_pending, "answer stopped; the message was not added to the conversation")

    def respond(self, undo: Callable[[], None], stopped: str) -> None:
        """Answer the pending turn, then save; on failure or Ctrl-C, `undo` puts things back."""
        from llava_cli.frontend.startup import (
            show_note,  # startup loads the backend's modules: not before a chat needs them
        )

        try:
            with closing(Answer(self.engine.generate(self.conversation, self.settings), show_note)) as answer:
                self.io.stream(answer)
            answer.record_in(self.conversation)
        except KeyboardInterrupt:
            undo()
            if not self.io.interactive:
                raise
            self.io.info(stopped)
            return
        except BaseException:
            undo()
            raise
        self.last_figures = answer.stats
        figures = self.last_figures.as_dict()
        self.context_tokens = figures["prompt_tokens"] + figures["completion_tokens"]
        self.autosave()
        turn = self.conversation.turns[-1]
        images = [image.name for image in turn.images]
        self.io.answered(
            answer_record(
                answer_value(turn.answer or "", self.settings), self.settings.model, images, self.saved_id(), figures
            )
        )

    def autosave(self) -> None:
        """Save the conversation if it is recorded; a failure is reported once and the chat goes on."""
        if self.recorder is None or not (self.conversation.turns or self.recorder.path):
            return
        try:
            self.recorder.save(self.conversation, self.settings)
        except OSError as err:
            problem = f"{err.strerror or err} ({err.filename or self.recorder.store.folder})"
            if problem != self.save_problem:
                self.io.error(f"the conversation could not be saved: {problem}; the chat goes on")
            self.save_problem = problem
        else:
            self.save_problem = None

    def saved_id(self) -> str | None:
        """The id the conversation is saved under, or None (--no-save, or the last save failed)."""
        if self.recorder is None or self.recorder.path is None or self.save_problem is not None:
            return None
        return self.recorder.session_id

    def status_line(self) -> str:
        """The bottom toolbar: model, context used, temperature, and the conversation's id or name."""
        saved = self.recorder.name or self.recorder.session_id if self.recorder else None
        parts = [self.settings.model, f"context {context_summary(self)}", f"temperature {self.settings.temperature}"]
        return safe_for_terminal(" " + " · ".join(parts + ([saved] if saved else [])))  # prompt-toolkit draws it

    def restore_pending(self) -> None:
        """Take back an unanswered message; its images wait for the next one, so nothing is lost."""
        turn = self.conversation.discard_pending()
        if turn is not None:
            self.attached = turn.images + self.attached


class PipeIO:
    """Messages from stdin, one per line; answers on stdout as text lines or JSON lines."""

    interactive = False
    markdown = False  # a script gets the answer as generated; /markdown changes nothing here
    columns = 80  # infos are not shown; only for ChatIO's sake

    def __init__(self, as_json: bool, raw: bool = False, verbose: bool = False) -> None:
        self.writer = WRITERS["json" if as_json else "text"](None)  # neither depends on a schema
        self.verbose = verbose  # a stats line on stderr after each answer
        self.raw = raw  # stdout may still be a terminal (`echo hi | llava chat`)

    def read(self) -> str | None:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    def stream(self, chunks: Iterator[str]) -> None:
        self.writer.stream(chunks, self.raw)

    def answered(self, record: dict) -> None:
        self.writer.finish(record, self.raw)
        if self.verbose:
            emit(stats_line(record), sys.stderr)

    def info(self, message: str) -> None:
        pass  # chatter would corrupt the transcript a script reads

    def report(self, message: str) -> None:
        emit(message, sys.stderr)  # asked for, so shown, but off stdout: stdout stays answers only

    def error(self, message: str) -> None:
        emit_error(message)


class TerminalIO:
    """prompt-toolkit input and Rich output, for a person at a terminal."""

    interactive = True

    def __init__(self, settings: Settings, markdown: bool = True, **streams: Any) -> None:
        """`streams` (input=, output=) are prompt-toolkit's, for tests."""
        from llava_cli.chat.inputline import make_prompt_session

        self.console = make_console()
        self.settings = settings
        self.markdown = markdown and not settings.raw  # --raw: the answer exactly as generated
        self.status: Callable[[], str] = lambda: ""  # the bottom toolbar; start_chat connects it
        self.session = make_prompt_session(
            data_dir() / "input-history",
            lambda: self.status(),
            notify=lambda message: self.info(f"note: {message}"),
            **streams,
        )

    def read(self) -> str | None:
        from llava_cli.chat.inputline import message_text

        while True:
            try:
                return message_text(self.session.prompt(">>> "))
            except KeyboardInterrupt:
                continue  # like a shell: Ctrl-C clears the line
            except EOFError:
                return None

    def stream(self, chunks: Iterator[str]) -> None:
        if self.markdown:
            from llava_cli.chat.render import stream_markdown

            stream_markdown(self.console, chunks, lambda chunk: shown(chunk, self.console.file))
            return
        try:
            for chunk in chunks:
                if self.settings.raw:
                    self.console.print_raw(chunk)
                else:
                    self.console.print(chunk, end="", markup=False)
        finally:
            self.console.print()

    @property
    def columns(self) -> int:
        return self.console.width

    def answered(self, record: dict) -> None:
        if self.settings.verbose:
            self.info(stats_line(record))

    def info(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False, soft_wrap=False)  # wrapped between words

    def report(self, message: str) -> None:
        self.info(message)

    def error(self, message: str) -> None:
        self.console.print(f"error: {one_line_text(message)}", style="bold red", markup=False)


def run_chat(
    settings: Settings,
    images: list[str],
    as_json: bool,
    sessions: SessionOptions = SessionOptions(),
    markdown: bool = True,
) -> int:
    """Chat until the end; SIGTERM ends it cleanly too (exit 0): answered turns saved, no temp file left."""
    loop: ChatLoop | None = None
    try:
        with sigterm_raises(Terminated):
            loop = start_chat(settings, images, as_json, sessions, markdown)
            return loop.run(images)
    except Terminated:
        if loop is not None:
            loop.autosave()  # a save the signal cut short removed its temp file; this one completes it
        return EXIT_OK


def start_chat(
    settings: Settings, images: list[str], as_json: bool, sessions: SessionOptions, markdown: bool
) -> ChatLoop:
    from llava_cli.frontend.startup import start_engine

    for path in images:  # fail before the slow model load
        image_or_pages(path, None, settings.max_image_pixels, lambda one, _: open_local(one, settings, kind="any"))
    opened = open_conversation(settings, sessions)  # a resumed conversation is checked before loading, too
    settings = opened.settings
    for note in opened.notes:
        emit(f"note: {one_line_text(note)}", sys.stderr)
    engine = start_engine(settings)
    interactive = is_terminal(sys.stdin) and is_terminal(sys.stdout) and not as_json
    io: ChatIO = TerminalIO(settings, markdown) if interactive else PipeIO(as_json, settings.raw, settings.verbose)
    loop = ChatLoop(engine, settings, io, opened.recorder, opened.conversation)
    if isinstance(io, TerminalIO):
        io.status = loop.status_line
        io.info(f"{settings.model} on {engine.info().where}. /help for commands, /quit to leave.")
        if opened.conversation:
            recap(loop)
    return loop
