"""`llava ask`: one question about one or more images, answered on stdout for shell pipelines.

stdout carries only the answer (streamed, newline-terminated) or, with --json, one JSON object;
everything else goes to stderr. Images are checked before the model loads, so a bad path fails fast.
With --each or --from-file, `batch.py` answers the question for every image separately instead.
A single answer is saved as a conversation (store.py); `-c` continues the last saved one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from llava_cli.backend import Answer
from llava_cli.conversation import Conversation
from llava_cli.streaming import stats_line
from llava_cli.errors import InputError, UsageError
from llava_cli.images import ImageRef, image_from_bytes, looks_like_image, read_stream
from llava_cli.records import answer_record
from llava_cli.settings import Settings
from llava_cli.store import Recorder, SessionOptions, open_conversation
from llava_cli.terminal import emit, is_terminal, one_line_text
from llava_cli.urls import is_url, open_image

if TYPE_CHECKING:
    from llava_cli.batch import AskOptions

STDIN = "-"
SHELL_SAFE_IN_DOUBLE_QUOTES = re.compile(r'[^"$`\\!]*')


def split_images_and_prompt(
    args: list[str], prompt: str | None = None, images_optional: bool = False
) -> tuple[list[str], str | None]:
    """`IMAGE... [PROMPT]`: the last argument is the prompt unless it is `-` or looks like an image
    (with -p/--prompt, every argument is an image). `images_optional` (-c): `[IMAGE...] [PROMPT]`."""
    if not args:
        if images_optional:
            return [], prompt
        raise UsageError("give at least one image: llava ask IMAGE... [PROMPT]")
    if prompt is not None:
        return args, prompt
    *images, last = args
    if not images and not images_optional:
        return [last], None
    if last == STDIN:
        return images, None
    if looks_like_image(last):
        return args, None
    return images, last


def read_prompt_from_stdin() -> str:
    if sys.stdin is None or is_terminal(sys.stdin):
        raise UsageError("no prompt: give it after the images, or pipe it in (echo 'what is this?' | llava ask IMG)")
    return checked_prompt(sys.stdin.read().strip(), "the prompt read from stdin")


def checked_prompt(prompt: str, source: str = "the prompt") -> str:
    """`prompt`, unless it is empty or blank: a question about nothing gets an answer about nothing."""
    if not prompt.strip():
        raise InputError(f'{source} is empty: ask something, e.g. llava ask IMAGE "what is in this picture?"')
    return prompt


def refuse_unquoted_prompt(images: list[str], prompt: str | None, command: str = "llava ask") -> None:
    """`llava ask img.png what is this`: the words before the prompt are no files but the rest of a
    sentence the shell split; say how to quote it rather than 'image not found: what'."""
    words: list[str] = []
    for name in reversed(images):
        if name == STDIN or is_url(name) or looks_like_image(name) or "/" in name or os.path.lexists(name):
            break
        words.insert(0, name)
    if prompt is None or not words:
        return
    kept = [shlex.quote(name) for name in images[: len(images) - len(words)]]
    sentence = " ".join([*words, prompt])
    quoted = f'"{sentence}"' if SHELL_SAFE_IN_DOUBLE_QUOTES.fullmatch(sentence) else shlex.quote(sentence)
    raise UsageError(f"the prompt must be one argument; quote it: {' '.join([command, *kept, quoted])}")


def load_images(names: list[str], settings: Settings, stdin_taken: bool) -> list[ImageRef]:
    images = []
    for name in names:
        if name == STDIN:
            if stdin_taken:
                raise UsageError("stdin can carry the image or the prompt, not both; give the prompt as an argument")
            images.append(image_from_bytes(read_image_from_stdin(), "<stdin>", settings.max_image_pixels))
        else:
            images.append(open_image(name, settings.max_image_pixels))
    return images


def read_image_from_stdin() -> bytes:
    if is_terminal(sys.stdin):
        raise UsageError("'-' reads the image from stdin, but stdin is a terminal: pipe the image in")
    return read_stream(sys.stdin.buffer, "<stdin>")


def run_ask(
    args: list[str],
    settings: Settings,
    as_json: bool,
    options: AskOptions | None = None,
    sessions: SessionOptions = SessionOptions(),
) -> int:
    """One question about the images; with --each or --from-file, one answer per image (batch.py)."""
    from llava_cli.batch import AskOptions, run_batch, sigterm_as_interrupt

    options = options or AskOptions(json=as_json)
    with sigterm_as_interrupt():
        if options.is_batch:
            if sessions.resume:
                raise UsageError("-c continues one conversation; it does not go with --each or --from-file")
            return run_batch(args, settings, options)  # many separate answers are not saved as conversations
        return answer_once(args, settings, options, sessions)


def answer_once(args: list[str], settings: Settings, options: AskOptions, sessions: SessionOptions = SessionOptions()) -> int:
    opened = open_conversation(settings, sessions)
    settings = opened.settings
    for note in opened.notes:
        emit(f"llava: note: {one_line_text(note)}", sys.stderr)
    image_names, prompt = split_images_and_prompt(args, options.prompt, images_optional=sessions.resume)
    if options.prompt is None:
        refuse_unquoted_prompt(image_names, prompt, "llava ask -c" if sessions.resume else "llava ask")
    prompt_from_stdin = prompt is None
    if prompt is not None:
        checked_prompt(prompt)
    images = load_images(image_names, settings, stdin_taken=prompt_from_stdin)
    if prompt_from_stdin:
        prompt = read_prompt_from_stdin()
    from llava_cli.session import start_engine  # looked up here, so a test replaces the backend in one place

    engine = start_engine(settings)
    conversation = opened.conversation or Conversation(system=settings.system)
    conversation.ask(prompt, images)
    answer = Answer(engine.generate(conversation, settings))
    if options.format != "text":  # json and jsonl: one answer is one JSON object on one line
        text = "".join(answer)
        session = save_answer(opened.recorder, conversation, settings)
        record = answer_record(text, settings.model, image_names, session, answer.stats.as_dict())
        emit(json.dumps(record, ensure_ascii=False), sys.stdout, settings.raw)
    else:
        stream_answer(answer, settings.raw)
        save_answer(opened.recorder, conversation, settings)
    sys.stdout.flush()
    if settings.verbose:
        emit(stats_line(answer.stats.as_dict()), sys.stderr)
    return 0


def stream_answer(chunks: Iterator[str], raw: bool) -> None:
    """The answer on stdout as it comes, ended by a newline even when it is stopped (Ctrl-C) midway."""
    started = False
    try:
        for chunk in chunks:  # on a terminal, escape sequences in the answer are removed unless --raw
            emit(chunk, sys.stdout, raw, end="", flush=True)
            started = True
    except BaseException:
        if started:
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")


def save_answer(recorder: Recorder | None, conversation: Conversation, settings: Settings) -> str | None:
    """Save the conversation; its id, or None when not saved (--no-save, or a warning on stderr)."""
    if recorder is None:
        return None
    try:
        recorder.save(conversation, settings)
    except OSError as err:
        emit(f"llava: warning: the conversation could not be saved: {err.strerror or err}", sys.stderr)
        return None
    return recorder.session_id
