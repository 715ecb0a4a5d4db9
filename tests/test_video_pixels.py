"""Video pixel values without torchvision equal the real video processors' (fixture recorded with torchvision).

tests/fixtures/video_pixels.npz was made by tests/record_video_pixels.py in a venv with torchvision:
transformers' LlavaNextVideoVideoProcessor and LlavaOnevisionVideoProcessor on fixed frames, at the
hub checkpoints' sizes and the tiny checkpoints', plus their frame indices for many (total, n).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from record_video_pixels import CASES, SAMPLE_STRIDE, SHAPES

from llava_cli.media.video import frame_indices
from llava_cli.media.videopixels import VideoPreprocess

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "video_pixels.npz")


@pytest.mark.parametrize("label", SHAPES)
@pytest.mark.parametrize("name, cls_name, settings", CASES)
def test_pixel_values_match_the_video_processor(label, name, cls_name, settings):
    ours = VideoPreprocess.from_config(settings, cls_name).pixel_values(FIXTURE[f"input_{label}"])
    key = f"{name}_{label}"
    assert tuple(ours.shape) == tuple(FIXTURE[f"{key}_shape"])
    assert ours.dtype == torch.float32
    if key in FIXTURE:
        expected = torch.from_numpy(FIXTURE[key])
    else:
        expected = torch.from_numpy(FIXTURE[f"{key}_strided"])
        ours = ours.flatten()[::SAMPLE_STRIDE]
    assert torch.max(torch.abs(ours - expected)).item() <= 1e-6
    if key in FIXTURE:
        assert abs(ours.to(torch.float64).sum().item() - float(FIXTURE[f"{key}_sum"])) < 1e-3


def test_frame_indices_match_the_video_processor():
    for total, n in FIXTURE["index_cases"]:
        assert frame_indices(int(total), int(n)) == FIXTURE[f"indices_{total}_{n}"].tolist()
