"""Images per second of `llava ask --each` through a warm `llava serve`, for 1, 4 and 8 requests at once.

    python bench/each_server.py                      # the CPU benchmark model (bench_model.py)
    python bench/each_server.py --tiny               # the test suite's tiny model: overheads only
    python bench/each_server.py --model PATH --images 32 --parallel 1 4 8

Starts one `llava serve` for the model, then runs the same `llava ask --each` over the same
pictures with `--server URL --parallel N` for each N, one after the other, and once locally
(`--no-server`, the model loaded in the process, `--batch-size 1`) as the reference. Prints each
run's wall time, images per second and its ratio to `--parallel 1` measured in the same run, and
checks that every run wrote the same answers as the local one (greedy decoding: they must).

What `--parallel` gains depends on the server: one that answers a request at a time (llava serve
before continuous batching) gains only the overlap of reading, encoding and sending images with
decoding; one that batches concurrent requests (llava serve's `--max-batch`, vLLM) gains the batch.
The local run includes the model's load and torch's import; the server's start-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_loop import prepare_run, start_server

PROMPT = "what is in this image? describe the picture in detail"


def each_run(
    model: str, pictures: list[str], max_new_tokens: int, env: dict[str, str], *options: str
) -> tuple[float, list[str]]:
    """One `llava ask --each` over the pictures; (wall seconds, answers in input order)."""
    command = [
        sys.executable,
        "-m",
        "llava_cli",
        "ask",
        "--model",
        model,
        "-n",
        str(max_new_tokens),
        "--each",
        *pictures,
        "-p",
        PROMPT,
        *options,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"llava ask --each {' '.join(options)} failed ({result.returncode}): {result.stderr.strip()}")
    return seconds, [json.loads(line)["answer"] for line in result.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: build the CPU benchmark model)")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny model: answering costs ~nothing")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model, pictures, runtime, env = prepare_run(args, Path(tmp), args.images)

        local_s, local_answers = each_run(model, pictures, args.max_new_tokens, env, "--no-server")
        server, start_s = start_server(model, args.max_new_tokens, env, runtime)
        url = json.loads(next(runtime.glob("server-*.json")).read_text())["url"]
        try:
            runs = {
                n: each_run(model, pictures, args.max_new_tokens, env, "--server", url, "--parallel", str(n))
                for n in args.parallel
            }
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    name = args.model or ("tiny test model" if args.tiny else "CPU benchmark model (bench_model.py)")
    baseline_s = runs[args.parallel[0]][0]
    print(f"model: {name}; `llava ask --each` over {args.images} pictures, {args.max_new_tokens} new tokens each")
    print(f"{'':>28}  {'seconds':>8}  {'images/s':>8}  {'ratio':>6}")
    print(
        f"{'local (--no-server, load)':>28}  {local_s:>8.2f}  {args.images / local_s:>8.2f}  {baseline_s / local_s:>6.2f}"
    )
    for n, (seconds, _) in runs.items():
        print(
            f"{f'llava serve, --parallel {n}':>28}  {seconds:>8.2f}  {args.images / seconds:>8.2f}  {baseline_s / seconds:>6.2f}"
        )
    same = all(answers == local_answers for _, answers in runs.values())
    print(
        f"server start-up, once: {start_s:.2f}s (not counted); ratios against --parallel {args.parallel[0]}; same answers: {same}"
    )
    print(
        json.dumps(
            {
                "images": args.images,
                "local_s": round(local_s, 2),
                "server_start_s": round(start_s, 2),
                "parallel_s": {str(n): round(seconds, 2) for n, (seconds, _) in runs.items()},
                "same_answers": same,
            }
        )
    )
    if not same:
        raise SystemExit("the answers through the server differ from the local ones")


if __name__ == "__main__":
    main()
