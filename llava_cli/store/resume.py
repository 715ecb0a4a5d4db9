"""Continuing a saved conversation: what a front-end starts from (`open_conversation`).

`open_conversation(settings, options)` gives the settings, the history to continue (or None for a
new conversation), the `Recorder` that saves it, and notes for the user, before the model loads,
so a bad session fails fast. A resumed conversation takes the saved model and generation settings
except those typed on the command line (`SessionOptions.given`).

`restore_conversation` re-reads every image from its path and checks its content hash: a vanished
or changed image is refused with one message naming each and its turn (answering about a different
picture would be silently wrong), or left out with `drop_missing`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from llava_cli.base.errors import InputError, SessionError, UsageError
from llava_cli.base.settings import Settings
from llava_cli.client.discovery import model_key
from llava_cli.media.images import ImageRef, load_image
from llava_cli.media.paste import PASTED_NAME
from llava_cli.media.video import VideoRef, is_video_name, load_video
from llava_cli.prompt.conversation import Conversation, Turn
from llava_cli.store.conversations import Recorder, SavedConversation, SavedImage, SessionStore, parse_time


@dataclass(frozen=True)
class SessionOptions:
    """How a front-end uses saved conversations: save or not, and which one to continue."""

    save: bool = True
    resume: bool = False
    session: str | None = None  # with resume: id, name or id prefix; None for the last one
    drop_missing_images: bool = False
    given: frozenset[str] = frozenset()  # options typed on the command line: they beat saved values


@dataclass
class Opened:
    """What a front-end starts from: settings, history to continue (or None), where to save, notes."""

    settings: Settings
    conversation: Conversation | None
    recorder: Recorder | None
    notes: list[str]


def open_conversation(settings: Settings, options: SessionOptions) -> Opened:
    """Start a new conversation or bring back a saved one, before the model loads (so errors are fast)."""
    store = SessionStore.default()
    if not options.resume:
        return Opened(settings, None, Recorder(store) if options.save else None, [])
    saved = store.find(options.session) if options.session else store.last()
    conversation, notes = restore_conversation(saved, settings.max_image_pixels, options.drop_missing_images)
    restored = restored_settings(settings, saved, options.given)
    if "system" in options.given:
        conversation.system = settings.system
    if "model" in options.given and model_key(settings.model) != saved.model:
        notes.append(f"continuing with {settings.model}; the conversation was held with {saved.model}")
    return Opened(restored, conversation, Recorder(store, saved) if options.save else None, notes)


def restored_settings(settings: Settings, saved: SavedConversation, given: frozenset[str]) -> Settings:
    """`settings` with the saved model and generation settings, except those the user just gave."""
    values = {key: value for key, value in saved.settings.items() if key not in given}
    if "model" not in given:
        values["model"] = saved.model
    try:
        return dataclasses.replace(settings, **values)
    except UsageError as err:
        raise SessionError(f"{saved.label} holds a setting this llava-cli refuses: {err}") from None


def restore_conversation(
    saved: SavedConversation, max_pixels: int, drop_missing: bool
) -> tuple[Conversation, list[str]]:
    """The saved history with every image read again and checked against its hash.

    A vanished or changed image is refused with one message naming each; with `drop_missing` it
    is left out of its turn instead and a note says so.
    """
    problems: list[str] = []
    turns = []
    for number, saved_turn in enumerate(saved.turns, 1):
        images = []
        for image in saved_turn.images:
            try:
                images.append(reload_image(image, max_pixels))
            except InputError as err:
                problems.append(f"turn {number}: {err}")
        answered_at = parse_time(saved_turn.answered_at)
        turns.append(Turn(text=saved_turn.user, images=images, answer=saved_turn.assistant, answered_at=answered_at))
    if problems and not drop_missing:
        raise SessionError(
            f"cannot continue {saved.label}: {'; '.join(problems)}. "
            "Put the image back, or continue without it with --drop-missing-images"
        )
    return Conversation(system=saved.system, turns=turns), [
        f"continuing without an image ({problem})" for problem in problems
    ]


# Where an image saved without a path came from; any other: a URL or a PDF page (media/pdfpages.py).
NO_FILE_SOURCES = {"<stdin>": "read from stdin", PASTED_NAME: "pasted from the clipboard"}
OTHER_SOURCE = "not read from a file of its own (a URL or a PDF page)"


def reload_image(image: SavedImage, max_pixels: int) -> ImageRef | VideoRef:
    if image.path is None:
        raise InputError(f"{image.name} was {NO_FILE_SOURCES.get(image.name, OTHER_SOURCE)} and cannot be read again")
    if not os.path.exists(image.path):
        raise InputError(f"{image.name} is gone ({image.path} no longer exists)")
    ref = load_video(image.path) if is_video_name(image.path) else load_image(image.path, max_pixels)
    if ref.digest != image.sha256:
        raise InputError(f"{image.name} has changed since it was attached ({image.path} has different content now)")
    return dataclasses.replace(ref, name=image.name)
