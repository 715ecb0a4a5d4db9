"""Record tests/fixtures/video_pixels.npz: what transformers' own video processors (on torchvision) make of fixed frames.

Run once, in a separate venv that has torchvision (CPU llava-cli installs have none):
    python3 -m venv /work/tvenv && /work/tvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 transformers==5.25.0 numpy
    /work/tvenv/bin/python tests/record_video_pixels.py
tests/test_video_pixels.py compares llava_cli.media.videopixels against these values (within 1e-6), and
the frame indices against the video processor's own `sample_frames`.
"""

from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "video_pixels.npz"
SAMPLE_STRIDE = 97  # full-size outputs are stored as every 97th value, plus their sum
# (name, processor class, settings): the class defaults (the hub checkpoints' values) and the tiny checkpoints'
CASES = [
    ("next_video_default", "LlavaNextVideoVideoProcessor", {}),
    ("onevision_default", "LlavaOnevisionVideoProcessor", {}),
    (
        "next_video_small",
        "LlavaNextVideoVideoProcessor",
        dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    ),
    ("onevision_small", "LlavaOnevisionVideoProcessor", dict(size={"height": 32, "width": 32})),
    (
        "next_video_bilinear",
        "LlavaNextVideoVideoProcessor",
        dict(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 28}, resample=2),
    ),
]
SHAPES = {"landscape": (4, 40, 56), "portrait": (3, 57, 41)}
INDEX_CASES = [(total, n) for total in (1, 7, 8, 30, 31, 100, 301) for n in (1, 2, 3, 8, 16, 32) if n <= total]


def frames(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    count, height, width = shape
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def main() -> None:
    import torch  # here: the test imports CASES where transformers' video processors cannot be built
    import transformers
    from transformers.video_utils import VideoMetadata

    out: dict[str, np.ndarray] = {}
    for seed, (label, shape) in enumerate(SHAPES.items()):
        video = frames(shape, seed)
        out[f"input_{label}"] = video
        for name, class_name, settings in CASES:
            processor = getattr(transformers, class_name)(**settings)
            values = processor(videos=[video], return_tensors="pt", do_sample_frames=False)["pixel_values_videos"][0]
            key = f"{name}_{label}"
            flat = values.to(torch.float64).flatten()
            out[f"{key}_shape"] = np.array(values.shape)
            out[f"{key}_sum"] = np.array(flat.sum().item())
            if values.numel() <= 20_000:
                out[key] = values.numpy()
            else:
                out[f"{key}_strided"] = values.flatten()[::SAMPLE_STRIDE].numpy()
    sampler = transformers.LlavaNextVideoVideoProcessor()
    out["index_cases"] = np.array(INDEX_CASES)
    for total, n in INDEX_CASES:
        metadata = VideoMetadata(total_num_frames=total, fps=30.0)
        out[f"indices_{total}_{n}"] = np.asarray(sampler.sample_frames(metadata, num_frames=n))
    np.savez_compressed(FIXTURE, **out)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
