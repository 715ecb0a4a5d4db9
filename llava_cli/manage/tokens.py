"""`llava tokens IMAGE... [--model M] [--json]`: what the model sees of each image, from its processor files alone.

The model is a local folder, or a hub id: its cached snapshot (weights or not), else only its
config, tokenizer and processor files are downloaded (download.pull without weights). Images go
through the same checks as everywhere (media/images.py; a PDF gives its first page, media/pdfpages.py);
`--max-image-tokens` restricts the anyres grid as it would for an answer. One line per image on stdout (imagetokens.`ImageTokens.line`), or
a JSON list with --json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llava_cli.base.errors import ModelError
from llava_cli.base.settings import Settings
from llava_cli.base.terminal import emit, one_line_text


def run_tokens(paths: list[str], settings: Settings, as_json: bool) -> int:
    from llava_cli.base.families import family_for
    from llava_cli.media.images import load_image
    from llava_cli.media.pdfpages import image_or_pages
    from llava_cli.models.imagetokens import describe_images, restrict_pinpoints
    from llava_cli.models.loader import load_processor, read_config

    images = []
    for path in paths:
        opened, note = image_or_pages(path, None, settings.max_image_pixels, load_image)
        images += opened
        if note:
            emit(f"llava: note: {one_line_text(note)}", sys.stderr)
    folder = processor_folder(settings.model)
    config = read_config(settings.model, folder)
    family = family_for(config)
    processor = load_processor(settings, folder, family)
    if settings.max_image_tokens is not None:
        restrict_pinpoints(processor, family, settings.max_image_tokens, settings.model)
    window = (config.get("text_config") or {}).get("max_position_embeddings")
    described = describe_images(processor, family, images, window if isinstance(window, int) else None)
    if as_json:
        emit(json.dumps([image.as_dict() for image in described], ensure_ascii=False), sys.stdout)
    else:
        emit("\n".join(image.line() for image in described), sys.stdout)
    return 0


def processor_folder(name: str) -> Path:
    """A folder holding `name`'s processor files: a local folder, the cached snapshot, else those files downloaded."""
    from llava_cli.manage.info import model_folder
    from llava_cli.models.loader import looks_like_path

    try:
        return model_folder(name)[0]
    except ModelError:
        if looks_like_path(name) or Path(name).expanduser().exists():
            raise
    from huggingface_hub import constants

    from llava_cli.models.download import pull

    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; pass a local folder"
        )
    return pull(name, weights=False).folder
