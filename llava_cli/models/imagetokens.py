"""What the model sees of each image: its size before and after the processor, the anyres grid, its tokens.

`describe_images(processor, family, images, window)` returns one `ImageTokens` per image of a prompt
that holds exactly `images` (LLaVA-OneVision tiles only a lone image): the original size, the size
the processor resized or padded it to (the anyres resolution it chose, or the one input tile),
the grid of tiles (rows x columns, anyres families only), its image tokens (models/vision.py's count, the
processor's own) and their share of the context window. `llava tokens` and `/show` print these.

`--max-image-tokens N` (anyres families): `restrict_pinpoints(processor, family, n, model)` keeps
only the checkpoint's `image_grid_pinpoints` whose largest image takes at most N tokens, and sets
them on the image processor and, once loaded, on the model's config, exactly as one would restrict
them in plain transformers. `token_range(processor, family)` is the fewest and most tokens an
image can take (`llava show`). No weights are needed: only the processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_cli.base.errors import UsageError
from llava_cli.base.families import Family, Tiling
from llava_cli.media.images import ImageRef
from llava_cli.models.vision import VisionInputs

Size = tuple[int, int]  # (width, height), as Pillow and users say it


@dataclass(frozen=True)
class ImageTokens:
    """One image as the model sees it."""

    name: str
    original: Size
    resized: Size  # what the processor made of it: the anyres resolution, or the single input tile
    grid: tuple[int, int] | None  # anyres tiles (rows, columns) besides the base tile; None when not tiled
    tokens: int
    share: float | None  # of the context window; None when it is unknown

    def as_dict(self) -> dict[str, Any]:
        """The stable --json keys."""
        return {
            "image": self.name,
            "original_size": list(self.original),
            "resized_size": list(self.resized),
            "grid": list(self.grid) if self.grid else None,
            "image_tokens": self.tokens,
            "context_share": self.share,
        }

    def line(self) -> str:
        """One line for a terminal: red.png: 640x480 -> 672x672 (grid 2x2 + base), 2,144 tokens (52.3% of context)."""
        grid = f" (grid {self.grid[0]}x{self.grid[1]} + base tile)" if self.grid else ""
        share = f" ({100 * self.share:.1f}% of context)" if self.share is not None else ""
        return (
            f"{self.name}: {size_text(self.original)} -> {size_text(self.resized)}{grid}, {self.tokens:,} tokens{share}"
        )


def size_text(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def describe_images(processor: Any, family: Family, images: list[ImageRef], window: int | None) -> list[ImageTokens]:
    """`images`, as one prompt holding them shows them to the model."""
    vision = VisionInputs(processor, family.tiling)
    counts = vision.token_counts(images)
    prepared = vision.prepare(images)
    described = []
    for image, processed, tokens in zip(images, prepared, counts):
        tile = tile_size(processed.pixel_values)
        tiled = (
            family.tiling is not Tiling.FIXED
            and processed.pixel_values.ndim == 4
            and processed.pixel_values.shape[0] > 1
        )
        resized, grid = anyres_layout(processor, image.image.size, tile) if tiled else (tile, None)
        share = tokens / window if window else None
        described.append(ImageTokens(image.name, image.image.size, resized, grid, tokens, share))
    return described


def tile_size(pixel_values: Any) -> Size:
    height, width = pixel_values.shape[-2:]
    return int(width), int(height)


def anyres_layout(processor: Any, original: Size, tile: Size) -> tuple[Size, tuple[int, int]]:
    """The resolution anyres picks for an image of `original` size, and its grid of tiles (rows, columns)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution((original[1], original[0]), processor.image_processor.image_grid_pinpoints)
    return (int(width), int(height)), (int(height) // tile[1], int(width) // tile[0])


def pinpoint_tokens(processor: Any, pinpoint: list[int], tile: Size) -> int:
    """The image tokens of an image exactly `pinpoint` (height, width) in size: the most that resolution takes."""
    import numpy as np

    layout = {
        "image_sizes": [list(pinpoint)],
        "pixel_values": [np.zeros((1, 3, tile[1], tile[0]))],
        "batch_num_images": [1],
    }
    return processor.replace_image_token(layout, image_idx=0).count(processor.image_token)


def input_tile(processor: Any) -> Size:
    """The side of one input tile, from the image processor's own output for a small image."""
    from PIL import Image

    output = processor.image_processor(images=[[Image.new("RGB", (32, 32), "white")]], return_tensors="np")
    return tile_size(output["pixel_values"][0])


def token_range(processor: Any, family: Family) -> tuple[int, int]:
    """The fewest and most image tokens one image can take (the same for a fixed family)."""
    if family.tiling is Tiling.FIXED:
        from PIL import Image

        probe = ImageRef(name="probe", digest="probe", image=Image.new("RGB", (32, 32), "white"))
        count = VisionInputs(processor, family.tiling).token_counts([probe])[0]
        return count, count
    tile = input_tile(processor)
    counts = [pinpoint_tokens(processor, pinpoint, tile) for pinpoint in processor.image_processor.image_grid_pinpoints]
    return min(counts), max(counts)


def restrict_pinpoints(processor: Any, family: Family, max_tokens: int, model_name: str) -> list[list[int]]:
    """Keep the pinpoints whose images take at most `max_tokens`; `UsageError` when none does or the family does not tile."""
    option = "--max-image-tokens"
    if family.tiling is Tiling.FIXED:
        raise UsageError(
            f"{option} applies to anyres families (llava-next, llava-onevision, llava-next-video); {model_name} is {family.label}, whose images take a fixed number of tokens"
        )
    tile = input_tile(processor)
    pinpoints = processor.image_processor.image_grid_pinpoints
    tokens = {tuple(pinpoint): pinpoint_tokens(processor, pinpoint, tile) for pinpoint in pinpoints}
    kept = [list(pinpoint) for pinpoint in pinpoints if tokens[tuple(pinpoint)] <= max_tokens]
    if not kept:
        raise UsageError(
            f"{option} {max_tokens} is below {model_name}'s smallest anyres grid ({min(tokens.values()):,} tokens); raise it"
        )
    processor.image_processor.image_grid_pinpoints = kept
    return kept


def restrict_model(model: Any, pinpoints: list[list[int]]) -> None:
    """The model places image features by the same pinpoints as the processor cut the tiles."""
    model.config.image_grid_pinpoints = pinpoints
