"""Images to model inputs for every LLaVA family: how many tokens each image takes, and its pixels.

`VisionInputs(processor, tiling)` answers, for the images of one prompt, exactly what the
checkpoint's own processor answers when `apply_chat_template` hands it the whole conversation
(`processor(text=prompt, images=[images])`):

- `token_counts(images)`: how many image tokens each image placeholder widens to, by the family's
  `Tiling` (base/families.py). llava-1.5 and llava-interleave: a fixed number; LLaVA-NeXT (and -Video):
  it depends on each image's size (anyres tiles); LLaVA-OneVision: anyres tiles when the prompt
  holds one image, only the base tile (and a newline) when it holds several. The count is the
  processor's own `replace_image_token`, so it cannot drift from what plain `transformers` does.
- `model_inputs(images, skip)`: the forward's image arguments for `images[skip:]` (the images not
  in the KV cache yet): `pixel_values` as one 4-D batch of tiles, plus `image_sizes` and
  `batch_num_images` for the families whose image processor returns them.

Each image is preprocessed once per tiling mode and memoized by its content digest.

Videos (`video.VideoRef`) travel in the same lists, in prompt order: `token_counts` gives a video
the processor's own `replace_video_token` count, `model_inputs` adds `pixel_values_videos` (frames,
3, H, W per video) for the new ones. Their frames are sampled and turned into pixels by the loaded
`VideoFrames` (media/videopixels.py: the checkpoint's own video processor, or its torch-only twin), once
per video digest. A family without a video path (`Family.takes_videos`) refuses a video in one
line. Images alone decide OneVision's tiling (`batch_num_images` counts images, not videos), as in
its processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_cli.base.errors import InputError
from llava_cli.base.families import Tiling
from llava_cli.media.images import ImageRef
from llava_cli.media.video import Sampling, VideoRef, sample_frames

Media = ImageRef | VideoRef


@dataclass(frozen=True)
class ProcessedVideo:
    """One video's sampled frames as the video processor prepared them."""

    pixel_values: Any  # (frames, 3, H, W)
    indices: list[int]  # the frames sampled, as transformers' sample_frames picks them


def is_video(item: Media) -> bool:
    return isinstance(item, VideoRef)


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the image processor prepared it."""

    pixel_values: Any  # (3, H, W), or (tiles, 3, H, W) for anyres families
    image_size: Any  # its (height, width) tensor, or None where the family does not use it


class VisionInputs:
    """The image side of prompt building for one loaded processor; see the module docstring."""

    def __init__(self, processor: Any, tiling: Tiling, video_frames: Any = None) -> None:
        self.processor = processor
        self.image_processor = processor.image_processor
        # Such a processor (OneVision's) decides per prompt whether to tile: only a lone image is tiled.
        self.tiles_per_prompt = tiling is Tiling.ANYRES_LONE_IMAGE
        self.video_frames = video_frames  # videopixels.VideoFrames, or None: this family takes no videos
        self.memo: dict[tuple[str, bool], ProcessedImage] = {}
        self.video_memo: dict[tuple[str, Sampling], ProcessedVideo] = {}

    def clear(self) -> None:
        self.memo.clear()
        self.video_memo.clear()

    def token_counts(self, media: list[Media]) -> list[int]:
        """Tokens for each image and video of `media`, in a prompt that holds exactly these."""
        images = [item for item in media if not is_video(item)]
        image_counts = iter(self.image_token_counts(images))
        video_counts = iter([self.video_token_count(self.video(item)) for item in media if is_video(item)])
        return [next(video_counts) if is_video(item) else next(image_counts) for item in media]

    def image_token_counts(self, images: list[ImageRef]) -> list[int]:
        if not images:
            return []
        layout = self.processor_layout(images)
        token = self.processor.image_token
        return [self.processor.replace_image_token(layout, image_idx=i).count(token) for i in range(len(images))]

    def video_token_count(self, video: ProcessedVideo) -> int:
        text = self.processor.replace_video_token({"pixel_values_videos": [video.pixel_values]}, video_idx=0)
        return text.count(self.processor.video_token)

    def video(self, item: VideoRef) -> ProcessedVideo:
        """`item`'s sampled frames as pixels, memoized by its content and sampling."""
        if self.video_frames is None:
            raise InputError(
                f"{item.name} is a video, and this model takes none; use a LLaVA-NeXT-Video or LLaVA-OneVision checkpoint"
            )
        key = (item.digest, item.sampling)
        if key not in self.video_memo:
            frames, indices = sample_frames(item, self.video_frames.default_frames)
            self.video_memo[key] = ProcessedVideo(self.video_frames.pixel_values(frames), indices)
        return self.video_memo[key]

    def video_report(self, media: list[Media], spans: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """Each video of a prompt: its name, the frames sampled and the tokens it fills (for --json, /show)."""
        return [
            {"name": item.name, "frames": self.video(item).indices, "video_tokens": end - start}
            for item, (start, end) in zip(media, spans)
            if is_video(item)
        ]

    def model_inputs(self, media: list[Media], skip: int) -> dict[str, Any]:
        """Keyword arguments for the forward that runs `media[skip:]`; empty when there are none."""
        images = [item for item in media if not is_video(item)]
        new_images = self.prepare(images)[len([item for item in media[:skip] if not is_video(item)]) :]
        new_videos = [self.video(item) for item in media[skip:] if is_video(item)]
        import torch

        inputs: dict[str, Any] = {}
        if len({video.pixel_values.shape for video in new_videos}) > 1:
            raise InputError("the videos of one message must give the same number of frames; pass --frames N")
        if new_videos:
            inputs["pixel_values_videos"] = torch.stack([video.pixel_values for video in new_videos])
        if not new_images:
            return inputs
        inputs["pixel_values"] = torch.cat([tiles(image.pixel_values) for image in new_images])
        if new_images[0].image_size is not None:
            inputs["image_sizes"] = torch.stack([image.image_size for image in new_images])
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
