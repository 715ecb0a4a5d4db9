"""Wall time of 20 sequential `llava ask` calls, each a new process, with and without a warm `llava serve`.

    python bench/server_loop.py                      # the CPU benchmark model (bench_model.py)
    python bench/server_loop.py --tiny               # the test suite's tiny model: start-up cost only
    python bench/server_loop.py --model PATH --calls 20

This is the shell loop of a new user, `for f in *.png; do llava ask "$f" "caption"; done`, run
twice over the same pictures: first with LLAVA_NO_SERVER=1, so every call imports torch and loads
the model itself; then with a `llava serve` running for the same model, which each `llava ask`
finds by itself (the discovery file) and answers through. The server's own start-up is measured
but not counted in the warm loop. Prints both wall times, the time per call and the ratio, and
checks that both loops printed the same answers (greedy decoding: they must).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_throughput import write_pictures
from bench_model import build_bench_checkpoint
from tiny_checkpoint import build_checkpoint

PROMPT = "what is in this image? describe the picture in detail"
READY_TIMEOUT_S = 300


def ask_loop(model: str, pictures: list[str], max_new_tokens: int, env: dict[str, str]) -> tuple[float, list[str]]:
    """Run `llava ask` once per picture, one after the other; (wall seconds, answers)."""
    answers = []
    started = time.perf_counter()
    for picture in pictures:
        command = [
            sys.executable,
            "-m",
            "llava_cli",
            "ask",
            "--model",
            model,
            "-n",
            str(max_new_tokens),
            str(picture),
            PROMPT,
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"llava ask failed ({result.returncode}): {result.stderr.strip()}")
        answers.append(result.stdout)
    return time.perf_counter() - started, answers


def start_server(
    model: str, max_new_tokens: int, env: dict[str, str], runtime: Path, options: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, float]:
    """Start `llava serve` on a free port; return it once its discovery file says it is ready."""
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "llava_cli",
        "serve",
        "--model",
        model,
        "--port",
        "0",
        "-n",
        str(max_new_tokens),
        *options,
    ]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list(runtime.glob("server-*.json")):
        if server.poll() is not None or time.perf_counter() - started > READY_TIMEOUT_S:
            raise SystemExit("llava serve did not start")
        time.sleep(0.05)
    return server, time.perf_counter() - started


def prepare_run(args: argparse.Namespace, folder: Path, count: int) -> tuple[str, list[Path], Path, dict[str, str]]:
    """In `folder`: the model (--model, or built: --tiny for the tests' model), `count` pictures, the
    server's runtime folder, and an environment that keeps llava-cli's files inside `folder`."""
    model = args.model or str((build_checkpoint if args.tiny else build_bench_checkpoint)(folder / "model"))
    runtime = folder / "run"
    env = {
        **os.environ,
        "LLAVA_RUNTIME_DIR": str(runtime),
        "LLAVA_HOME": str(folder),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    return model, write_pictures(folder / "pictures", count), runtime, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: build the CPU benchmark model)")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny model: answering costs ~nothing")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model, pictures, runtime, env = prepare_run(args, Path(tmp), args.calls)

        cold_s, cold_answers = ask_loop(model, pictures, args.max_new_tokens, {**env, "LLAVA_NO_SERVER": "1"})
        server, start_s = start_server(model, args.max_new_tokens, env, runtime)
        try:
            warm_s, warm_answers = ask_loop(model, pictures, args.max_new_tokens, env)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    name = args.model or ("tiny test model" if args.tiny else "CPU benchmark model (bench_model.py)")
    print(f"model: {name}; {args.calls} sequential `llava ask` calls, {args.max_new_tokens} new tokens each")
    print(f"{'':>26}  {'seconds':>8}  {'per call':>8}")
    print(f"{'no server (load per call)':>26}  {cold_s:>8.2f}  {cold_s / args.calls:>8.3f}")
    print(f"{'warm llava serve':>26}  {warm_s:>8.2f}  {warm_s / args.calls:>8.3f}")
    print(f"server start-up, once: {start_s:.2f}s (not in the warm loop)")
    print(f"speed-up with a warm server: {cold_s / warm_s:.2f}x; same answers: {cold_answers == warm_answers}")
    print(
        json.dumps(
            {
                "calls": args.calls,
                "cold_s": round(cold_s, 2),
                "warm_s": round(warm_s, 2),
                "server_start_s": round(start_s, 2),
                "ratio": round(cold_s / warm_s, 2),
                "same_answers": cold_answers == warm_answers,
            }
        )
    )
    if cold_answers != warm_answers:
        raise SystemExit("the answers through the server differ from the local ones")


if __name__ == "__main__":
    main()
