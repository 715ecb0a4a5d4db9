"""`llava ask`: one question about one or more images, answered on stdout for shell pipelines.

stdout carries only the answer (streamed, newline-terminated) or, with --json, one JSON object;
everything else goes to stderr. Images are checked before the model loads, so a bad path fails fast.
With --each or --from-file, `ask/each.py` answers the question for every image separately instead.
The arguments are read by frontend/arguments.py, and the answer written by frontend/output.py's writer for the format.
A single answer is saved as a conversation (store/conversations.py); `-c` continues the last saved one.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager

from llava_cli.ask.each import run_batch
from llava_cli.base.errors import UsageError
from llava_cli.base.settings import Settings
from llava_cli.base.terminal import emit, emit_error, one_line_text
from llava_cli.engine.backend import Answer
from llava_cli.engine.constraints import answer_value
from llava_cli.engine.logprobs import as_openai
from llava_cli.engine.streaming import stats_line
from llava_cli.frontend.arguments import (
    STDIN,
    AskOptions,
    image_argument,
    images_and_prompt,
    read_image_from_stdin,
    read_prompt_from_stdin,
)
from llava_cli.frontend.output import WRITERS
from llava_cli.frontend.records import answer_record
from llava_cli.frontend.signals import sigterm_raises
from llava_cli.media.attachments import Media
from llava_cli.media.paste import PASTED_NAME, paste_image
from llava_cli.media.pdfpages import image_or_pages, is_pdf
from llava_cli.prompt.conversation import Conversation
from llava_cli.store.conversations import Recorder
from llava_cli.store.resume import SessionOptions, open_conversation


def sigterm_as_interrupt() -> AbstractContextManager[None]:
    """Let SIGTERM stop the run as Ctrl-C does: finished lines written, exit 130."""
    return sigterm_raises(KeyboardInterrupt)


def load_images(names: list[str], settings: Settings, stdin_taken: bool, pages: str | None = None) -> list[Media]:
    """The images and videos the arguments name (media/attachments.py tells them apart); a PDF gives its `pages`
    (--pages), with a note on stderr when only page 1 is taken."""
    if pages is not None and not any(is_pdf(name) for name in names):
        raise UsageError("--pages selects pages of a PDF, and no PDF was given")
    if STDIN in names and stdin_taken:
        raise UsageError("stdin can carry the image or the prompt, not both; give the prompt as an argument")
    stdin_data = read_image_from_stdin() if STDIN in names else b""
    media: list[Media] = []
    for name in names:
        opened, note = image_or_pages(
            name, pages, settings.max_image_pixels, lambda one, _: image_argument(one, stdin_data, settings)
        )
        media += opened
        if note:
            emit(f"llava: note: {one_line_text(note)}", sys.stderr)
    return media


def run_ask(
    args: list[str],
    settings: Settings,
    as_json: bool,
    options: AskOptions | None = None,
    sessions: SessionOptions = SessionOptions(),
) -> int:
    """One question about the images; with --each or --from-file, one answer per image (ask/each.py)."""
    options = options or AskOptions(json=as_json)
    with sigterm_as_interrupt():
        if options.is_batch:
            if sessions.resume:
                raise UsageError("-c continues one conversation; it does not go with --each or --from-file")
            return run_batch(args, settings, options)  # many separate answers are not saved as conversations
        return answer_once(args, settings, options, sessions)


def answer_once(
    args: list[str], settings: Settings, options: AskOptions, sessions: SessionOptions = SessionOptions()
) -> int:
    opened = open_conversation(settings, sessions)
    settings = opened.settings
    for note in opened.notes:
        emit(f"llava: note: {one_line_text(note)}", sys.stderr)
    command = "llava ask -c" if sessions.resume else "llava ask"
    image_names, prompt = images_and_prompt(
        args, options.prompt, command, images_optional=sessions.resume or options.clipboard
    )
    prompt_from_stdin = prompt is None
    images = load_images(image_names, settings, stdin_taken=prompt_from_stdin, pages=options.pages)
    if options.clipboard:
        images.append(paste_image(settings.max_image_pixels))
        image_names = [*image_names, PASTED_NAME]
    if prompt_from_stdin:
        prompt = read_prompt_from_stdin()
    writer = WRITERS[options.format](settings.constraint)  # before the model loads: csv checks the schema's columns
    from llava_cli.frontend.startup import (  # looked up here, so a test replaces the backend in one place
        show_note,
        start_engine,
    )

    engine = start_engine(settings)
    conversation = opened.conversation or Conversation(system=settings.system)
    conversation.ask(prompt, images)
    answer = Answer(engine.generate(conversation, settings), show_note)
    text = writer.stream(answer, settings.raw)
    answer.record_in(conversation)
    session = save_answer(opened.recorder, conversation, settings)
    record = answer_record(answer_value(text, settings), settings.model, image_names, session, answer.stats.as_dict())
    if settings.logprobs is not None:
        record["logprobs"] = as_openai(answer.done.logprobs)  # answer.done: its figures were read just above
    writer.finish(record, settings.raw)
    if settings.verbose:
        emit(stats_line(answer.stats.as_dict()), sys.stderr)
    return 0


def save_answer(recorder: Recorder | None, conversation: Conversation, settings: Settings) -> str | None:
    """Save the conversation; its id, or None when not saved (--no-save, or a warning on stderr)."""
    if recorder is None:
        return None
    try:
        recorder.save(conversation, settings)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""  # which folder was refused (a symlink, another user's)
        emit_error(f"the conversation could not be saved: {err.strerror or err}{where}", prefix="llava: warning: ")
        return None
    return recorder.session_id
