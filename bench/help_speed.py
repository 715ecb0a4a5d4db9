"""How fast `--help` and usage errors answer (issue 14: under 0.3 s), against `python -c pass`.

    python bench/help_speed.py            # medians of 10 runs each
    python bench/help_speed.py --runs 20

Each case is a new process (`python -m llava_cli ...`, as a user's shell starts it), timed wall
clock from start to exit; runs of all cases alternate so that a busy moment of a shared machine
hits them alike. Prints each case's median and its ratio to `python -c pass` (the interpreter's own
start-up, which no command can beat), and checks every case exits with the code it should.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.3
CASES: list[tuple[str, list[str], int]] = [
    ("python -c pass", ["-c", "pass"], 0),
    ("llava --help", ["-m", "llava_cli", "--help"], 0),
    ("llava ask --help", ["-m", "llava_cli", "ask", "--help"], 0),
    ("llava chat --help", ["-m", "llava_cli", "chat", "--help"], 0),
    ("llava ask --temprature 0.5 ...", ["-m", "llava_cli", "ask", "--temprature", "0.5", "x.png", "hi"], 2),
    ("llava ask -n lots ...", ["-m", "llava_cli", "ask", "-n", "lots", "x.png", "hi"], 2),
    ("llava frobnicate", ["-m", "llava_cli", "frobnicate"], 2),
    ("llava ask --device tpu ...", ["-m", "llava_cli", "ask", "--device", "tpu", "x.png", "hi"], 2),
    # refused by the command itself, after typer has converted every option (pydantic):
    ("llava ask ... --batch-size 4 (no --each)", ["-m", "llava_cli", "ask", "x.png", "hi", "--batch-size", "4"], 2),
]


def timed(args: list[str], expected: int, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != expected:
        raise SystemExit(f"{args} exited {result.returncode}, not {expected}: {result.stderr.decode()[-300:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    for _name, args, expected in CASES:  # warm the file cache once
        timed(args, expected, env)
    for _ in range(runs):
        for name, args, expected in CASES:
            times[name].append(timed(args, expected, env))
    baseline = statistics.median(times[CASES[0][0]])
    print(f"{'case':<42} {'median s':>9} {'x python -c pass':>17}  under {TARGET_S} s")
    for name, _, _ in CASES:
        median = statistics.median(times[name])
        print(f"{name:<42} {median:9.3f} {median / baseline:17.2f}  {'yes' if median < TARGET_S else 'NO'}")


if __name__ == "__main__":
    main()
