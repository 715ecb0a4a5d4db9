"""`llava ask --each --batch-size 8`: continuous admission against fixed batches, answers of different lengths.

    python bench/each_continuous.py                 # 32 images, batch size 8, float32 on CPU (a few minutes on 2 cores)
    python bench/each_continuous.py --repeats 3     # the best of 3 alternated runs of each
    python bench/each_continuous.py --device cuda   # float16 on a GPU
    python bench/each_continuous.py --tiny          # the tests' tiny model, one thread (a GPU's situation in small)

Both runs answer the same prompt about the same `--images` pictures on the bench model
(bench_model.py's, shaped as `WEIGHTS_BOUND`: a decoder step bound by its weights; `END_TOKENS`
end answers too, so they end at many lengths) through ask/each.py, the code of `llava ask --each`, with up to `--batch-size` rows decoding
at once on the scheduler (engine/scheduler.py):

- fixed: the images in chunks of `--batch-size` (`answered_records` per chunk, as Ray actors do and as a local
  run did before issue 21): a chunk's rows decode together and the next chunk starts only when the
  chunk's longest answer has ended;
- continuous: every image through `answered_records` (a local `ask --each`): a row that ends is
  replaced at once by the next image.

Each is run `--repeats` times, alternated, and the best time of each is kept, on the clock and in
this process's CPU seconds (steadier on a shared machine, where other jobs stretch the clock).
Run it with another checkout's `llava_cli` first on PYTHONPATH (a copy of bench/ and
tests/tiny_checkpoint.py outside both) to compare two versions of the step.
Prints the answers' lengths, the seconds of each and the ratio (target: continuous at least 1.3x
fixed), and checks that both gave the same answers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch_throughput import write_pictures
from bench_model import Shape, build_bench_checkpoint

from llava_cli.ask.each import answered_records
from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.models.loader import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_checkpoint import build_checkpoint

PROMPT = "what is in this image? describe the picture in detail"
# The bench model's random answers rarely say end-of-sequence: a few of its tokens are declared as
# ending an answer too (generation_config.eos_token_id takes a list), so answers end at many lengths
# (picked from a run of each model: 32 answers of 2 to 64 tokens, 36 on average for WEIGHTS_BOUND,
# 5 to 64 and 32 for the tiny model).
END_TOKENS = (97, 276)
TINY_END_TOKENS = (201, 241)
# A decoder step bound by reading its weights, as on a real model (~100M decoder parameters), and
# 64 image tokens, so that 2 CPU cores measure decoding rather than prefill.
# (bench_model's default decoder is so narrow that a step costs in proportion to its rows.)
WEIGHTS_BOUND = Shape(image_size=112, text_hidden=1024, text_layers=8)


def fixed(engine: Engine, names: list[str], settings: Settings, batch_size: int) -> list[dict]:
    return [
        record
        for start in range(0, len(names), batch_size)
        for record in answered_records(engine, names[start : start + batch_size], PROMPT, settings, b"", batch_size)
    ]


def continuous(engine: Engine, names: list[str], settings: Settings, batch_size: int) -> list[dict]:
    return list(answered_records(engine, names, PROMPT, settings, b"", batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the test suite's tiny model on one thread: a step costs its fixed overhead whatever its rows, as on a GPU",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: float16 on a GPU, where a step costs what its weights cost",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if args.tiny:
            import torch

            torch.set_num_threads(1)  # as bench/serve_concurrency.py: the tiny model gains nothing from a second thread
        model = (
            build_checkpoint(folder / "model") if args.tiny else build_bench_checkpoint(folder / "model", WEIGHTS_BOUND)
        )
        dtype = "float16" if args.device == "cuda" else "float32"
        settings = Settings(model=str(model), device=args.device, dtype=dtype, max_new_tokens=args.max_new_tokens)
        loaded = load_model(settings)
        loaded.model.generation_config.eos_token_id = [
            loaded.processor.tokenizer.eos_token_id,
            *(TINY_END_TOKENS if args.tiny else END_TOKENS),
        ]
        engine = Engine(loaded)
        names = write_pictures(folder / "images", args.images)
        continuous(engine, names[: args.batch_size], settings, args.batch_size)  # warm-up
        timings: dict[str, float] = {}
        cpu_timings: dict[str, float] = {}  # this process's CPU seconds: steadier than the clock on a shared machine
        answers = {}
        runs = [("fixed", fixed), ("continuous", continuous)]
        for repeat in range(
            args.repeats
        ):  # alternated, each first in turn, the best of each: a shared machine's load comes and goes
            for name, run in runs if repeat % 2 == 0 else runs[::-1]:
                started, cpu_started = time.perf_counter(), time.process_time()
                answers[name] = run(engine, names, settings, args.batch_size)
                seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
                print(f"  run {repeat + 1}: {name} {seconds:.2f} s ({cpu_seconds:.2f} CPU s)", flush=True)
                timings[name] = min(timings.get(name, float("inf")), seconds)
                cpu_timings[name] = min(cpu_timings.get(name, float("inf")), cpu_seconds)
        lengths = [record["completion_tokens"] for record in answers["fixed"]]
        print(
            f"{args.images} images, --batch-size {args.batch_size}, up to {args.max_new_tokens} new tokens; "
            f"answer lengths {min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.1f}): {lengths}"
        )
        for name, seconds in timings.items():
            print(
                f"{name:>10}: {seconds:7.2f} s  {args.images / seconds:6.2f} images/s  {cpu_timings[name]:7.2f} CPU s"
            )
        same = [record["answer"] for record in answers["fixed"]] == [
            record["answer"] for record in answers["continuous"]
        ]
        print(
            f"continuous vs fixed: {timings['fixed'] / timings['continuous']:.2f}x "
            f"(CPU seconds: {cpu_timings['fixed'] / cpu_timings['continuous']:.2f}x)  same answers: {'yes' if same else 'NO'}"
        )


if __name__ == "__main__":
    main()
