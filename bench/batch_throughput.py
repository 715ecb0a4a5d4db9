"""Throughput of `llava ask --each --batch-size N`: images per second at batch sizes 1, 4 and 16.

    python bench/batch_throughput.py              # the test suite's tiny model, float32 on CPU (~1-2 min)
    python bench/batch_throughput.py --gpu-7b     # a random llava-1.5-7b-shaped model, float16 on CUDA
    python bench/batch_throughput.py --smoke-7b   # the --gpu-7b steps on a small model on the CPU

Answers the same prompt for `--images` distinct pictures through `batch.answered_records` a batch at a time, the code
path of `llava ask --each` (image loading, prompt encoding, batched greedy generation), once per
batch size, after one warm-up batch. Prints images/second for each batch size as a ratio to batch
size 1 measured in the same run, and checks that every batch size gave the same answers as batch
size 1 (greedy decoding must not depend on the batch; in float16 on a GPU, kernels chosen per
batch shape may break near-ties differently, which this column would show). The 7B-shaped model
is bench/gpu.py's: llava-1.5-7b's layer sizes (CLIP ViT-L/336, 576 tokens per image, 32 decoder
layers of width 4096) with random float16 weights made on the GPU; it needs about 16 GB free.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_phases import SMOKE, Shape, build_loaded

from llava_cli.ask.each import answered_records
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.models.loader import LoadedModel, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_checkpoint import build_checkpoint

BATCH_SIZES = (1, 4, 16)
PROMPT = "what is in this image? describe the picture in detail"


def write_pictures(folder: Path, count: int) -> list[str]:
    """`count` distinct 400x300 PNG pictures: a disc whose colour and place vary with the index."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    names = []
    for index in range(count):
        image = Image.new("RGB", (400, 300), (37 * index % 256, 200, 255 - 23 * index % 256))
        left = 10 * (index % 16)
        ImageDraw.Draw(image).ellipse((left, 40, left + 200, 240), fill=(255, 255, 255))
        names.append(str(folder / f"picture-{index:03d}.png"))
        image.save(names[-1])
    return names


def answer_all(engine: Engine, names: list[str], settings: Settings, batch_size: int) -> tuple[float, list[str]]:
    """Seconds to answer every image in batches of `batch_size`, and the answers in order."""
    started = time.perf_counter()
    answers = []
    for start in range(0, len(names), batch_size):
        for record in answered_records(engine, names[start : start + batch_size], PROMPT, settings, b"", batch_size):
            answers.append(record["answer"])
    if engine.loaded.device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - started, answers


def load(args: argparse.Namespace, folder: Path) -> LoadedModel:
    """The model to measure: the 7B-shaped one made in memory, or the test suite's tiny checkpoint."""
    import torch

    if args.gpu_7b or args.smoke_7b:
        if args.gpu_7b and not torch.cuda.is_available():
            raise SystemExit("--gpu-7b needs a CUDA GPU; --smoke-7b runs the same steps on the CPU")
        return build_loaded(
            Shape() if args.gpu_7b else SMOKE,
            "cuda" if args.gpu_7b else "cpu",
            torch.float16 if args.gpu_7b else torch.float32,
        )
    return load_model(Settings(model=str(build_checkpoint(folder / "model")), device="cpu", dtype="float32"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-7b", action="store_true", help="random llava-1.5-7b-shaped model, float16 on CUDA")
    parser.add_argument("--smoke-7b", action="store_true", help="the --gpu-7b steps with a small model on the CPU")
    parser.add_argument("--images", type=int, default=32, help="pictures to answer per batch size")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        loaded = load(args, folder)
        settings = Settings(model=loaded.name, max_new_tokens=args.max_new_tokens)
        names = write_pictures(folder / "images", args.images)
        engine = Engine(loaded)
        answer_all(engine, names[: max(BATCH_SIZES)], settings, max(BATCH_SIZES))  # warm-up: allocations, kernels
        print(
            f"model: {loaded.name}, {loaded.dtype} on {loaded.device}; "
            f"{len(names)} images, up to {args.max_new_tokens} new tokens each"
        )
        print(f"{'batch size':>10}  {'seconds':>8}  {'images/s':>9}  {'vs batch 1':>10}  same answers")
        baseline_rate, baseline_answers = 0.0, None
        for batch_size in BATCH_SIZES:
            seconds, answers = answer_all(engine, names, settings, batch_size)
            rate = len(names) / seconds
            baseline_rate = baseline_rate or rate
            baseline_answers = baseline_answers or answers
            same = "yes" if answers == baseline_answers else "NO"
            print(f"{batch_size:>10}  {seconds:>8.2f}  {rate:>9.2f}  {rate / baseline_rate:>9.2f}x  {same}")


if __name__ == "__main__":
    main()
