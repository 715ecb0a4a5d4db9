"""Conversation: the history of a chat and how it is rendered into the model's prompt.

A `Conversation` is a list of turns (the user's text, the images that turn added, the answer)
plus an optional system text. It knows nothing about models: a `PromptFormat` renders it.

`Llava15Format` writes the documented llava-1.5 format exactly:
    [SYSTEM ]USER: <image>\n<prompt1> ASSISTANT: <answer1></s>USER: <prompt2> ASSISTANT:
one `<image>` line per image, in the turn that added it. Other families use the checkpoint's own
chat template (`ChatTemplateFormat`). `prompt_format_for` builds the format a family's row names
(base/families.py: chosen from the checkpoint's config, never from its name).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from llava_cli.base.errors import InputError, one_line
from llava_cli.base.families import PromptStyle
from llava_cli.media.images import ImageRef
from llava_cli.media.video import VideoRef
from llava_cli.prompt.templates import render_chat_template

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Turn:
    """One exchange: what the user said, the images (and videos) it attached, and the answer once known."""

    text: str
    images: list[ImageRef | VideoRef] = field(default_factory=list)
    answer: str | None = None
    answered_at: float | None = field(default=None, compare=False)  # epoch seconds, for saved conversations


@dataclass
class Conversation:
    """Multi-turn history; the last turn may be pending (asked, not yet answered)."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def ask(self, text: str, images: list[ImageRef] | None = None) -> Turn:
        if self.pending:
            raise ValueError("the last message has no answer yet")
        turn = Turn(text=text, images=list(images or []))
        self.turns.append(turn)
        return turn

    def answer(self, text: str) -> None:
        if not self.pending:
            raise ValueError("there is no message waiting for an answer")
        self.turns[-1].answer = text.strip()
        self.turns[-1].answered_at = time.time()

    def discard_pending(self) -> Turn | None:
        """Remove an unanswered last turn (after an error or Ctrl-C) and return it."""
        return self.turns.pop() if self.pending else None

    def clear(self) -> None:
        self.turns.clear()

    def without_oldest(self, count: int) -> Conversation:
        """A view of this conversation with its `count` oldest turns left out."""
        return Conversation(system=self.system, turns=self.turns[count:])

    def drop_oldest(self, count: int) -> None:
        del self.turns[:count]

    @property
    def pending(self) -> bool:
        return bool(self.turns) and self.turns[-1].answer is None

    @property
    def images(self) -> list[ImageRef]:
        """Every image and video in prompt order."""
        return [image for turn in self.turns for image in turn.images]

    def messages(self) -> list[dict[str, Any]]:
        """The history as Hugging Face chat messages, for `apply_chat_template`."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        for turn in self.turns:
            content = [{"type": media_type(item)} for item in turn.images] + [{"type": "text", "text": turn.text}]
            messages.append({"role": "user", "content": content})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
        return messages


def media_type(item: ImageRef | VideoRef) -> str:
    """The chat template's content type of an attachment: "image" or "video"."""
    return "video" if isinstance(item, VideoRef) else "image"


class PromptFormat(Protocol):
    def render(self, conversation: Conversation) -> str:
        """The full prompt text, ending where the model's answer begins."""
        ...


class Llava15Format:
    """The llava-1.5 conversation format, exactly as the transformers documentation gives it."""

    def render(self, conversation: Conversation) -> str:
        parts = [f"{conversation.system} "] if conversation.system else []
        for turn in conversation.turns:
            images = f"{IMAGE_PLACEHOLDER}\n" * len(turn.images)
            parts.append(f"USER: {images}{turn.text} ASSISTANT:")
            if turn.answer is not None:
                parts.append(f" {turn.answer}</s>")
        return "".join(parts)


class ChatTemplateFormat:
    """The checkpoint's own chat template: the text `processor.apply_chat_template` gives, rendered
    in a bounded sandbox (prompt/templates.py), since a template is code from the checkpoint."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def render(self, conversation: Conversation) -> str:
        """The template's text; a template that refuses the conversation (many reject a system
        message, or turns that do not alternate) or runs past its budget raises `InputError` with its reason."""
        template = self.processor.chat_template
        try:
            if isinstance(template, dict):  # named templates: apply_chat_template renders the "default" one
                template = template["default"]
            return render_chat_template(
                template, conversation.messages(), dict(self.processor.tokenizer.special_tokens_map)
            )
        except Exception as err:  # jinja2 errors, the budget's, and the template's own raise_exception(...)
            raise InputError(f"the chat template cannot render this conversation: {one_line(err)}") from None


def prompt_format_for(style: PromptStyle, processor: Any) -> PromptFormat | None:
    """The format of a family's `style`; None when that is a chat template the checkpoint lacks."""
    if style is PromptStyle.LLAVA15:
        return Llava15Format()
    if getattr(processor, "chat_template", None):
        return ChatTemplateFormat(processor)
    return None
