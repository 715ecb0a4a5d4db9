"""`llava ask` end to end vs a minimal plain-transformers script doing the same work (CPU).

    python bench/ask_overhead.py                   # ~1 minute on 2 quiet CPU cores
    python bench/ask_overhead.py --clock cpu       # CPU seconds of the child, 1 thread: for a shared machine
    python bench/ask_overhead.py --runs 7 --max-new-tokens 32

Both sides run as a fresh subprocess (so both pay for the interpreter, imports and loading the
model) on the same random llava-1.5-shaped checkpoint (576 image tokens; bench/bench_model.py),
one image, one question, greedy, the same number of new tokens (`llava ask --no-save`: the script
saves no conversation either). The plain script is what a user
would write with transformers alone: `AutoProcessor` + `LlavaForConditionalGeneration` +
`generate`. The two answers must be identical. Runs alternate between the two; the medians and
their ratio are printed. Target: llava / plain <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import Shape, build_bench_checkpoint, median, write_test_images

TARGET_RATIO = 1.10
PROMPT = "What is in this picture? Describe it."
PLAIN_SCRIPT = """\
import sys

from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folder, image_path, prompt, max_new_tokens = sys.argv[1:5]
processor = AutoProcessor.from_pretrained(folder)
model = LlavaForConditionalGeneration.from_pretrained(folder)
inputs = processor(text=f"USER: <image>\\n{prompt} ASSISTANT:", images=Image.open(image_path).convert("RGB"), return_tensors="pt")
output = model.generate(**inputs, do_sample=False, max_new_tokens=int(max_new_tokens))
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each side; the medians are compared")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: the child's CPU time, torch on 1 thread"
    )
    return parser.parse_args()


def timed_run(command: list[str], env: dict[str, str], clock: str) -> tuple[float, str]:
    """Run `command`; return its wall (or CPU) seconds and its stdout. A failure stops the benchmark."""
    before_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    after_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({result.returncode}):\n{result.stderr}")
    cpu = (after_cpu.ru_utime - before_cpu.ru_utime) + (after_cpu.ru_stime - before_cpu.ru_stime)
    return (cpu if clock == "cpu" else wall), result.stdout


def main() -> int:
    args = parse_args()
    # LLAVA_NO_SERVER: llava must load the model itself, not hand the question to a warm `llava serve`.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLAVA_NO_SERVER": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if args.clock == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # idle threads spinning for work would count as CPU time
    with tempfile.TemporaryDirectory() as scratch:
        env["LLAVA_HOME"] = scratch  # the conversation each ask saves goes here, not to the user's data folder
        folder = build_bench_checkpoint(Path(scratch) / "model", Shape())
        image = write_test_images(Path(scratch) / "images", 1)[0]
        script = Path(scratch) / "plain.py"
        script.write_text(PLAIN_SCRIPT)
        n = str(args.max_new_tokens)
        sides = {
            "llava ask": [
                sys.executable,
                "-m",
                "llava_cli",
                "ask",
                "--no-save",
                "--model",
                str(folder),
                "-n",
                n,
                str(image),
                PROMPT,
            ],
            "plain transformers": [sys.executable, str(script), str(folder), str(image), PROMPT, n],
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        answers: dict[str, set[str]] = {name: set() for name in sides}
        for run in range(args.runs + 1):  # run 0 warms the page cache and is not counted
            for name, command in sides.items():
                seconds, stdout = timed_run(command, env, args.clock)
                answers[name].add(stdout)
                if run:
                    times[name].append(seconds)
    report(times, answers, args)
    return 0


def report(times: dict[str, list[float]], answers: dict[str, set[str]], args: argparse.Namespace) -> None:
    clock = "CPU seconds of the child, 1 thread" if args.clock == "cpu" else "wall clock"
    print(f"one image (576 tokens), {args.max_new_tokens} new tokens, greedy; {clock}; {args.runs} runs each")
    for name, values in times.items():
        print(f"{name:>20}: median {median(values):.3f}s  (runs: {', '.join(f'{v:.2f}' for v in values)})")
    same = len(answers["llava ask"] | answers["plain transformers"]) == 1
    print(f"answers identical: {'yes' if same else 'NO'}")
    ratio = median(times["llava ask"]) / median(times["plain transformers"])
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"llava ask / plain transformers: {ratio:.3f}  (target <= {TARGET_RATIO}: {verdict})")


if __name__ == "__main__":
    sys.exit(main())
