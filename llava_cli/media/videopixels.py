"""A checkpoint's video processor without torchvision: sampled frames -> `pixel_values_videos`.

transformers' video processors (LLaVA-NeXT-Video, LLaVA-OneVision) run on torchvision, which a CPU
install often lacks. `VideoPreprocess.from_config(config, processor_type)` reads the checkpoint's
`video_preprocessor_config.json` (or the `video_processor` entry of `processor_config.json`) over
the class defaults transformers gives that processor type (`video_frames_for` picks it or the
checkpoint's own video processor, where torchvision is installed), and `pixel_values(frames)` repeats the
video processor's tensor path with torch operations, in its order and dtypes:

1. uint8 (frames, 3, H, W); resize, where the size changes, with `torch.nn.functional.interpolate`
   (`antialias=True`, `align_corners=False`) on the uint8 tensor itself for bicubic, as
   torchvision does on a CPU (bilinear too where the CPU has AVX2; elsewhere in float32, rounded);
   `shortest_edge` sizes keep the aspect as transformers' `get_resize_output_image_size`;
2. center crop (transformers' offsets: int((H - h) / 2)), zero-padding a smaller frame;
3. the fused rescale and normalize: (x - mean/scale) / (std/scale) in float32.

tests/test_video_pixels.py checks the result against values the real video processor produced
(tests/fixtures/video_pixels.npz, recorded by tests/record_video_pixels.py with torchvision).
Where torchvision is installed the engine uses the checkpoint's own video processor instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.base.errors import ModelError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' class defaults (video_processing_llava_next_video.py, video_processing_llava_onevision.py)
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlavaNextVideoVideoProcessor": dict(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True
    ),
    "LlavaOnevisionVideoProcessor": dict(size={"height": 384, "width": 384}, crop_size=None, do_center_crop=False),
}
COMMON_DEFAULTS: dict[str, Any] = dict(
    resample=3,
    do_resize=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    num_frames=None,
    fps=None,
)
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL's numbers, as configs save them
DEFAULT_NUM_FRAMES = 8  # the model cards' examples sample 8 frames; used when the config names none


@dataclass(frozen=True)
class VideoPreprocess:
    """One checkpoint's video processor settings (see the module docstring)."""

    size: dict[str, int]
    crop_size: dict[str, int] | None
    do_center_crop: bool
    resample: int
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    num_frames: int | None

    @classmethod
    def from_config(cls, config: dict[str, Any], processor_type: str) -> VideoPreprocess:
        known = set(COMMON_DEFAULTS) | {"size", "crop_size", "do_center_crop"}
        merged = (
            COMMON_DEFAULTS | CLASS_DEFAULTS.get(processor_type, {}) | {k: v for k, v in config.items() if k in known}
        )
        if merged["resample"] not in RESAMPLE_MODES:
            raise ModelError(
                f"this checkpoint's video processor resamples with mode {merged['resample']}; install torchvision for it"
            )
        return cls(
            size=dict(merged["size"]),
            crop_size=dict(merged["crop_size"]) if merged["crop_size"] else None,
            do_center_crop=bool(merged["do_center_crop"]),
            resample=int(merged["resample"]),
            do_resize=bool(merged["do_resize"]),
            do_rescale=bool(merged["do_rescale"]),
            rescale_factor=float(merged["rescale_factor"]),
            do_normalize=bool(merged["do_normalize"]),
            image_mean=tuple(as_list(merged["image_mean"])),
            image_std=tuple(as_list(merged["image_std"])),
            num_frames=merged["num_frames"],
        )

    @property
    def default_frames(self) -> int:
        return int(self.num_frames) if self.num_frames else DEFAULT_NUM_FRAMES

    def pixel_values(self, frames: Any) -> Any:
        """uint8 (frames, H, W, 3) array -> float32 (frames, 3, h, w) tensor, as the video processor makes it."""
        import torch

        video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        if self.do_resize:
            video = self.resize(video)
        if self.do_center_crop and self.crop_size:
            video = center_crop(video, self.crop_size["height"], self.crop_size["width"])
        return self.rescale_and_normalize(video)

    def resize(self, video: Any) -> Any:
        import torch

        height, width = output_size(video.shape[-2:], self.size)
        if (height, width) == tuple(video.shape[-2:]):
            return video
        mode = RESAMPLE_MODES[self.resample]
        native = mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        source = video if native else video.to(torch.float32)
        resized = torch.nn.functional.interpolate(
            source, size=[height, width], mode=mode, align_corners=False, antialias=True
        )
        return resized if native else resized.round_().to(torch.uint8)

    def rescale_and_normalize(self, video: Any) -> Any:
        import torch

        if self.do_rescale and self.do_normalize:  # fused, as transformers does it
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        if self.do_normalize:
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
            return video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        if self.do_rescale:
            return video * self.rescale_factor
        return video


class OwnVideoProcessor:
    """The checkpoint's own transformers video processor (torchvision installed), as `VideoPreprocess` is used."""

    def __init__(self, video_processor: Any) -> None:
        self.video_processor = video_processor
        self.default_frames = int(getattr(video_processor, "num_frames", None) or DEFAULT_NUM_FRAMES)

    def pixel_values(self, frames: Any) -> Any:
        output = self.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
        return output["pixel_values_videos"][0]


def video_frames_for(processor: Any, folder: Path) -> OwnVideoProcessor | VideoPreprocess:
    """What turns a checkpoint's sampled frames into pixels: its own video processor, else the torch-only twin."""
    own = getattr(processor, "video_processor", None)
    if own is not None:
        return OwnVideoProcessor(own)
    config = video_config(folder)
    return VideoPreprocess.from_config(config, str(config.get("video_processor_type", "")))


def as_list(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


def output_size(shape: Any, size: dict[str, int]) -> tuple[int, int]:
    """transformers' target (height, width) for `size` (height+width, or shortest_edge keeping the aspect)."""
    height, width = int(shape[0]), int(shape[1])
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    if size.get("shortest_edge"):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    raise ModelError(f"this checkpoint's video processor has a size llava-cli cannot use without torchvision: {size}")


def center_crop(video: Any, crop_height: int, crop_width: int) -> Any:
    import torch

    height, width = video.shape[-2:]
    if crop_width > width or crop_height > height:
        pad_left, pad_top = max(crop_width - width, 0) // 2, max(crop_height - height, 0) // 2
        pad_right, pad_bottom = (max(crop_width - width, 0) + 1) // 2, (max(crop_height - height, 0) + 1) // 2
        video = torch.nn.functional.pad(video, (pad_left, pad_right, pad_top, pad_bottom), value=0)
        height, width = video.shape[-2:]
    top, left = int((height - crop_height) / 2.0), int((width - crop_width) / 2.0)
    return video[..., top : top + crop_height, left : left + crop_width]


def video_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's video processor settings: video_preprocessor_config.json, else processor_config.json's entry."""
    own = folder / "video_preprocessor_config.json"
    if own.is_file():
        return json.loads(own.read_text(encoding="utf-8"))
    combined = folder / "processor_config.json"
    if combined.is_file():
        entry = json.loads(combined.read_text(encoding="utf-8")).get("video_processor")
        if isinstance(entry, dict):
            return entry
    return {}
