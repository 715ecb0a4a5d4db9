"""`llava ask`: one question about one or more images, answered on stdout for shell pipelines.

stdout carries only the answer (streamed, newline-terminated) or, with --json, one JSON object;
everything else goes to stderr. Images are checked before the model loads, so a bad path fails fast.
"""

from __future__ import annotations

import json
import sys

from llava_cli.conversation import Conversation
from llava_cli.errors import InputError, UsageError
from llava_cli.images import ImageRef, image_from_bytes, load_image, looks_like_image
from llava_cli.session import start_engine
from llava_cli.settings import Settings
from llava_cli.terminal import is_terminal

STDIN = "-"


def split_images_and_prompt(args: list[str]) -> tuple[list[str], str | None]:
    """`IMAGE... [PROMPT]`: the last argument is the prompt unless it is `-` or looks like an image."""
    if not args:
        raise UsageError("give at least one image: llava ask IMAGE... [PROMPT]")
    *images, last = args
    if not images:
        return [last], None
    if last == STDIN:
        return images, None
    if looks_like_image(last):
        return args, None
    return images, last


def read_prompt_from_stdin() -> str:
    if sys.stdin is None or is_terminal(sys.stdin):
        raise UsageError("no prompt: give it after the images, or pipe it in (echo 'what is this?' | llava ask IMG)")
    prompt = sys.stdin.read().strip()
    if not prompt:
        raise InputError("the prompt read from stdin is empty")
    return prompt


def load_images(names: list[str], settings: Settings, stdin_taken: bool) -> list[ImageRef]:
    images = []
    for name in names:
        if name == STDIN:
            if stdin_taken:
                raise UsageError("stdin can carry the image or the prompt, not both; give the prompt as an argument")
            images.append(image_from_bytes(sys.stdin.buffer.read(), "<stdin>", settings.max_image_pixels))
        else:
            images.append(load_image(name, settings.max_image_pixels))
    return images


def run_ask(args: list[str], settings: Settings, as_json: bool) -> int:
    image_names, prompt = split_images_and_prompt(args)
    prompt_from_stdin = prompt is None
    images = load_images(image_names, settings, stdin_taken=prompt_from_stdin)
    if prompt_from_stdin:
        prompt = read_prompt_from_stdin()
    engine = start_engine(settings)
    conversation = Conversation(system=settings.system)
    conversation.ask(prompt, images)
    chunks = engine.generate(conversation, settings)
    if as_json:
        answer = "".join(chunks)
        record = {"answer": answer, "model": settings.model, "images": image_names, **engine.last_stats.as_dict()}
        print(json.dumps(record, ensure_ascii=False))
    else:
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
