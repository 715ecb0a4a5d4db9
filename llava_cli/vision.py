"""Images to model inputs for every LLaVA family: how many tokens each image takes, and its pixels.

`VisionInputs(processor, tiling)` answers, for the images of one prompt, exactly what the
checkpoint's own processor answers when `apply_chat_template` hands it the whole conversation
(`processor(text=prompt, images=[images])`):

- `token_counts(images)`: how many image tokens each image placeholder widens to, by the family's
  `Tiling` (families.py). llava-1.5 and llava-interleave: a fixed number; LLaVA-NeXT (and -Video):
  it depends on each image's size (anyres tiles); LLaVA-OneVision: anyres tiles when the prompt
  holds one image, only the base tile (and a newline) when it holds several. The count is the
  processor's own `replace_image_token`, so it cannot drift from what plain `transformers` does.
- `model_inputs(images, skip)`: the forward's image arguments for `images[skip:]` (the images not
  in the KV cache yet): `pixel_values` as one 4-D batch of tiles, plus `image_sizes` and
  `batch_num_images` for the families whose image processor returns them.

Each image is preprocessed once per tiling mode and memoized by its content digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_cli.families import Tiling
from llava_cli.images import ImageRef


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the image processor prepared it."""

    pixel_values: Any  # (3, H, W), or (tiles, 3, H, W) for anyres families
    image_size: Any  # its (height, width) tensor, or None where the family does not use it


class VisionInputs:
    """The image side of prompt building for one loaded processor; see the module docstring."""

    def __init__(self, processor: Any, tiling: Tiling) -> None:
        self.processor = processor
        self.image_processor = processor.image_processor
        # Such a processor (OneVision's) decides per prompt whether to tile: only a lone image is tiled.
        self.tiles_per_prompt = tiling is Tiling.ANYRES_LONE_IMAGE
        self.memo: dict[tuple[str, bool], ProcessedImage] = {}

    def clear(self) -> None:
        self.memo.clear()

    def token_counts(self, images: list[ImageRef]) -> list[int]:
        """Image tokens for each of `images`, in a prompt that holds exactly these images."""
        if not images:
            return []
        layout = self.processor_layout(images)
        token = self.processor.image_token
        return [self.processor.replace_image_token(layout, image_idx=i).count(token) for i in range(len(images))]

    def model_inputs(self, images: list[ImageRef], skip: int) -> dict[str, Any]:
        """Keyword arguments for the forward that runs `images[skip:]`; empty when there are none."""
        new = self.prepare(images)[skip:]
        if not new:
            return {}
        import torch

        inputs: dict[str, Any] = {"pixel_values": torch.cat([tiles(image.pixel_values) for image in new])}
        if new[0].image_size is not None:
            inputs["image_sizes"] = torch.stack([image.image_size for image in new])
        if self.tiles_per_prompt:
            # The images already cached count: with several in the prompt none is tiled. The model
            # reads one entry per new image from this, so naming the whole prompt's count is exact.
            inputs["batch_num_images"] = torch.tensor([len(images)])
        return inputs

    def prepare(self, images: list[ImageRef]) -> list[ProcessedImage]:
        untiled = self.tiles_per_prompt and len(images) > 1
        return [self.processed(image, untiled) for image in images]

    def processed(self, image: ImageRef, untiled: bool) -> ProcessedImage:
        key = (image.digest, untiled)
        if key not in self.memo:
            # One prompt per call, as apply_chat_template nests them. OneVision leaves an image untiled
            # only in a prompt of several, so the untiled form is asked for with the image twice.
            sample = [image.image, image.image] if untiled else [image.image]
            output = self.image_processor(images=[sample], return_tensors="pt")
            size = output["image_sizes"][0] if "image_sizes" in output else None
            self.memo[key] = ProcessedImage(pixel_values=output["pixel_values"][0], image_size=size)
        return self.memo[key]

    def processor_layout(self, images: list[ImageRef]) -> dict[str, Any]:
        """The image processor's output for a prompt of `images`, in the layout `replace_image_token` reads."""
        prepared = self.prepare(images)
        return {
            "pixel_values": [image.pixel_values for image in prepared],
            "image_sizes": [image.image_size for image in prepared],
            "batch_num_images": [len(images)] if self.tiles_per_prompt else [1] * len(images),
        }


def tiles(pixel_values: Any) -> Any:
    """One image's pixels as a 4-D batch of tiles: (3, H, W) -> (1, 3, H, W); (tiles, 3, H, W) as is."""
    return pixel_values.reshape(-1, *pixel_values.shape[-3:])
