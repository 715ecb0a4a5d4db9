"""Peak memory of decoding and preprocessing hostile images (issue 12, finding 3), against a photo.

Each case runs in a child process of its own: decode the image bytes, then run llava-1.5's image
processor (CLIP, shortest edge 336, centre crop 336, as the checkpoints ship it) on the result.
The child reports its peak resident memory (ru_maxrss) above what it held after the imports, so
the figures are the cost of the image alone. Two ways of decoding are compared:

- `llava-cli`: `images.image_from_bytes`, with the aspect-ratio limit and the shrink to 4096 px;
- `unguarded`: `Image.open(...).convert("RGB")` straight into the processor, as before the fix.

Cases: a photo-sized picture (1600x1200 JPEG, the baseline), the 1x100000 PNG of a few hundred
bytes, and a 7000x7000 one-colour PNG. Every child runs under an address-space limit
(RLIMIT_AS, --limit-gb) so the unguarded thin PNG fails with MemoryError instead of taking the
machine down. Run: `python bench/image_memory.py` from the repository root.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("photo 1600x1200 JPEG", "thin 1x100000 PNG", "flat 7000x7000 PNG")
MODES = ("llava-cli", "unguarded")
PROCESSOR_CONFIG = {  # llava-hf/llava-1.5-7b-hf's preprocessor_config.json
    "image_processor_type": "CLIPImageProcessor",
    "crop_size": {"height": 336, "width": 336},
    "size": {"shortest_edge": 336},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "do_rescale": True,
    "do_convert_rgb": True,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def image_bytes(case: str) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    if case.startswith("photo"):
        rng = np.random.default_rng(0)
        gradient = np.linspace(0, 255, 1600, dtype=np.float32)[None, :, None]
        pixels = np.clip(gradient + rng.normal(0, 40, (1200, 1600, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    elif case.startswith("thin"):
        Image.new("1", (1, 100_000)).save(buffer, "PNG", optimize=True)
    else:
        Image.new("RGB", (7000, 7000), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(case: str, mode: str, folder: str) -> dict:
    """Runs in the child: the peak memory of decoding + preprocessing `case` (a file in `folder`) the `mode` way."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from llava_cli.base.errors import InputError
    from llava_cli.media.images import image_from_bytes

    processor = AutoImageProcessor.from_pretrained(folder)
    data = (Path(folder) / f"{CASES.index(case)}.img").read_bytes()
    start = peak_mb()
    try:
        if mode == "llava-cli":
            image = image_from_bytes(data, case).image
        else:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        processor(images=[image], return_tensors="pt")
        outcome = "processed"
    except InputError as err:
        outcome = f"refused: {str(err).split(':')[1].strip()[:40]}"
    except MemoryError:
        outcome = "MemoryError"
    return {"bytes": len(data), "extra_mb": peak_mb() - start, "outcome": outcome}


def run_child(case: str, mode: str, folder: str, limit_gb: float) -> dict:
    limit = int(limit_gb * 2**30)
    command = [sys.executable, __file__, "--child", case, mode, folder]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    if result.returncode != 0:
        return {
            "bytes": 0,
            "extra_mb": float("nan"),
            "outcome": f"child failed ({result.stderr.strip().splitlines()[-1][:60]})",
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-gb", type=float, default=8.0, help="address-space limit of each child")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_CONFIG))
        for number, case in enumerate(CASES):  # made here, so the children's peaks are the images' alone
            (Path(folder) / f"{number}.img").write_bytes(image_bytes(case))
        rows = {(case, mode): run_child(case, mode, folder, args.limit_gb) for case in CASES for mode in MODES}
    baseline = rows[(CASES[0], "llava-cli")]["extra_mb"]
    print(
        f"peak memory of decoding + llava-1.5 preprocessing, each case in a child (address space <= {args.limit_gb:g} GB)"
    )
    print(f"{'case':<22} {'bytes':>10} {'decoded by':<10} {'extra MB':>9} {'vs photo':>9}  outcome")
    for (case, mode), row in rows.items():
        ratio = row["extra_mb"] / baseline if baseline > 0 else float("nan")
        print(f"{case:<22} {row['bytes']:>10,} {mode:<10} {row['extra_mb']:>9.0f} {ratio:>8.1f}x  {row['outcome']}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
