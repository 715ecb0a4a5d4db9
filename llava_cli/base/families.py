"""The LLaVA families llava-cli loads: one row per family, the only place that knows them.

`FAMILIES` holds one `Family` per config.json `model_type` (and, for `llava`, per kind of text
model: llava-1.5 and bakLlava are `llava` with a Llama or Mistral decoder, llava-interleave is
`llava` with Qwen2). A row names the transformers class that loads the weights, the label users
see (`llava models`), how prompts are written, how images are tiled, the processor class and
whether transformers needs torchvision to build that processor, whether it takes videos, and a checkpoint on the hub.
`family_for(config)` picks the row for a checkpoint's config.json, never from its name; a
`llava` checkpoint with another text model gets the llava row's class and images with its own
chat template. The loader, the prompt format, the vision inputs, the processor builder,
`llava models` and the tests' family tables all read these rows, so a new family is one row here.

A leaf: it imports nothing from llava_cli, and no torch or transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

DEFAULT_TEXT_MODEL = "llama"  # LlavaConfig's text model when config.json names none


class PromptStyle(Enum):
    """How a family's prompts are written."""

    LLAVA15 = "llava-1.5"  # the documented USER: <image>\n... ASSISTANT: format (conversation.Llava15Format)
    CHAT_TEMPLATE = "chat template"  # the checkpoint's own chat template (conversation.ChatTemplateFormat)


class Tiling(Enum):
    """How many tokens an image takes (the processor counts them; models/vision.py must know when it tiles)."""

    FIXED = "fixed"  # one base tile, the same number of tokens for every image
    ANYRES = "anyres"  # high-resolution tiles: the count depends on the image's size
    ANYRES_LONE_IMAGE = "anyres for a lone image"  # tiles only when the prompt holds one image, else the base tile


@dataclass(frozen=True)
class Family:
    """One LLaVA family: everything llava-cli needs to know to load and prompt it."""

    model_type: str  # config.json's model_type
    text_models: frozenset[str] | None  # the text_config model types this row covers; None: any
    label: str  # the family's name, as `llava models` shows it
    model_class: str  # the transformers class made for it (never chosen from the model's name)
    processor_class: str  # the transformers processor class AutoProcessor builds for it
    # transformers builds the processor only with a video processor, which needs torchvision; without
    # torchvision llava-cli builds it from the checkpoint's image parts (models/processors.py)
    processor_needs_torchvision: bool
    prompt_style: PromptStyle
    tiling: Tiling
    example: str  # a hub id of this family, as README's family table shows
    # the model has a video path (`<video>`, pixel_values_videos); the others refuse a video (README: Videos)
    takes_videos: bool = False


FAMILIES: tuple[Family, ...] = (
    Family(
        model_type="llava",
        text_models=frozenset({"llama", "mistral"}),
        label="llava-1.5",  # and bakLlava
        model_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor",
        processor_needs_torchvision=False,
        prompt_style=PromptStyle.LLAVA15,
        tiling=Tiling.FIXED,
        example="llava-hf/llava-1.5-7b-hf",
    ),
    Family(
        model_type="llava",
        text_models=frozenset({"qwen2"}),
        label="llava-interleave",
        model_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor",
        processor_needs_torchvision=False,
        prompt_style=PromptStyle.CHAT_TEMPLATE,
        tiling=Tiling.FIXED,
        example="llava-hf/llava-interleave-qwen-0.5b-hf",
    ),
    Family(
        model_type="llava_next",
        text_models=None,
        label="llava-next",  # llava-v1.6
        model_class="LlavaNextForConditionalGeneration",
        processor_class="LlavaNextProcessor",
        processor_needs_torchvision=False,
        prompt_style=PromptStyle.CHAT_TEMPLATE,
        tiling=Tiling.ANYRES,
        example="llava-hf/llava-v1.6-mistral-7b-hf",
    ),
    Family(
        model_type="llava_onevision",
        text_models=None,
        label="llava-onevision",
        model_class="LlavaOnevisionForConditionalGeneration",
        processor_class="LlavaOnevisionProcessor",
        processor_needs_torchvision=True,
        prompt_style=PromptStyle.CHAT_TEMPLATE,
        tiling=Tiling.ANYRES_LONE_IMAGE,
        example="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        takes_videos=True,
    ),
    Family(
        model_type="llava_next_video",
        text_models=None,
        label="llava-next-video",
        model_class="LlavaNextVideoForConditionalGeneration",
        processor_class="LlavaNextVideoProcessor",
        processor_needs_torchvision=True,
        prompt_style=PromptStyle.CHAT_TEMPLATE,
        tiling=Tiling.ANYRES,
        example="llava-hf/LLaVA-NeXT-Video-7B-hf",
        takes_videos=True,
    ),
)
# config.json model types llava-cli loads, in table order (the loader's refusal lists them)
MODEL_TYPES: tuple[str, ...] = tuple(dict.fromkeys(family.model_type for family in FAMILIES))


def text_model_type(config: Mapping[str, Any]) -> str:
    """config.json's text model type; LlavaConfig's default where it names none (or no string)."""
    text_config = config.get("text_config")
    model_type = text_config.get("model_type") if isinstance(text_config, dict) else None
    return model_type if isinstance(model_type, str) else DEFAULT_TEXT_MODEL


def family_for(config: Mapping[str, Any]) -> Family:
    """The row for a config.json whose model_type is one of `MODEL_TYPES`."""
    rows = [family for family in FAMILIES if family.model_type == config["model_type"]]
    text_model = text_model_type(config)
    for family in rows:
        if family.text_models is None or text_model in family.text_models:
            return family
    # No row for this text model (a `llava` with a Gemma decoder...): the model type's class and
    # images, prompted with the checkpoint's own chat template.
    return dataclasses.replace(
        rows[0],
        text_models=frozenset({text_model}),
        label=f"{rows[0].model_type} ({text_model})",
        prompt_style=PromptStyle.CHAT_TEMPLATE,
        example="",  # no checkpoint of it is known
    )
