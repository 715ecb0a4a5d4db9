"""A checkpoint's processor built from its image parts, for when transformers cannot build the whole one.

transformers builds the processors of some families (`processor_needs_torchvision` in base/families.py:
LLaVA-OneVision, LLaVA-NeXT-Video) only together with a video processor, and every video processor
needs torchvision, while their images need none. `image_parts_processor(folder, processor_class)`
builds the family row's processor class from the checkpoint's own files, without a video
processor: the tokenizer, transformers' PIL image processor configured by `preprocessor_config.json`
(or the `image_processor` entry of `processor_config.json`), the processor settings of
`processor_config.json` (image token, tokens per image) and the chat template (`chat_template.jinja`
or `chat_template.json`). Prompts, image-token counts and pixel values are then exactly
transformers' own: the class's `apply_chat_template` and `replace_image_token`, and the PIL image
processor's output. Its videos' pixels come from `media/videopixels.py` (the video processor's tensor path in torch).
`torchvision_installed()` says which way to go.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def image_parts_processor(folder: Path, processor_class_name: str, trust_remote_code: bool = False) -> Any:
    """The transformers processor class `processor_class_name`, built from `folder`'s files with no video processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    processor_class = without_video_processor(getattr(transformers, processor_class_name))
    parts = {
        "tokenizer": AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code),
        "image_processor": AutoImageProcessor.from_pretrained(
            folder, backend="pil", trust_remote_code=trust_remote_code
        ),
    }
    settings, _ = processor_class.get_processor_dict(folder)  # processor_config.json and the chat template
    # In the order of the class's own parts; the video processor's place stays empty.
    ordered = [parts.get(name) for name in processor_class.get_attributes()]
    return processor_class.from_args_and_dict(ordered, settings)


def without_video_processor(processor_class: type) -> type:
    """`processor_class`, accepting no video processor (transformers insists on one of the right class)."""

    class ImageOnlyProcessor(processor_class):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor
