"""How fast llava-cli gives the shell back (issue 14: under half a second when idle).

    python bench/exit_speed.py            # medians of 5 runs each
    python bench/exit_speed.py --runs 9

Two cases, each a new process with the tests' tiny model (tests/tiny_checkpoint.py):
- `/quit` in `llava chat` at a pseudo-terminal, after one answer: from sending `/quit` to the
  process's exit;
- Ctrl-C (SIGINT) to an idle `llava serve`: from the signal to the exit.
The baseline, measured in the same run, is a plain Python process that has imported torch and
exits as soon as it reads a line: what any torch program pays to leave. Prints each median and
its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_checkpoint import build_checkpoint

TARGET_S = 0.5
TORCH_THEN_READ = "import torch, sys; torch.zeros(1); sys.stdin.readline()"


def environment(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "LLAVA_HOME": str(home / "home"),
        "LLAVA_RUNTIME_DIR": str(home / "run"),
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }


def until_eof(child: pexpect.spawn, started: float) -> float:
    child.expect(pexpect.EOF)
    seconds = time.perf_counter() - started
    child.close()
    return seconds


def baseline(env: dict[str, str]) -> float:
    child = pexpect.spawn(
        sys.executable, ["-c", f"print('ready', flush=True); {TORCH_THEN_READ}"], env=env, timeout=120
    )
    child.expect_exact("ready")
    time.sleep(3)  # torch imported by now on any machine
    started = time.perf_counter()
    child.sendline("")
    return until_eof(child, started)


def quit_chat(model: Path, env: dict[str, str]) -> float:
    args = ["-m", "llava_cli", "chat", "--model", str(model), "-n", "4", "--no-server", "--no-markdown"]
    child = pexpect.spawn(sys.executable, args, env=env, timeout=120, dimensions=(30, 100))
    child.expect_exact(">>>")
    child.send("hi\r")
    child.expect_exact(">>>")
    time.sleep(0.5)  # idle at the prompt
    started = time.perf_counter()
    child.send("/quit\r")
    return until_eof(child, started)


def stop_server(model: Path, env: dict[str, str], runtime: Path) -> float:
    command = [sys.executable, "-m", "llava_cli", "serve", "--model", str(model), "--port", "0"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list(runtime.glob("server-*.json")):
        if server.poll() is not None:
            raise SystemExit("llava serve did not start")
        time.sleep(0.02)
    time.sleep(0.5)  # idle
    started = time.perf_counter()
    server.send_signal(signal.SIGINT)
    code = server.wait(timeout=60)
    seconds = time.perf_counter() - started
    if code != 130:
        raise SystemExit(f"llava serve exited {code} on SIGINT, not 130")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        model = build_checkpoint(scratch / "tiny")
        env = environment(scratch)
        times: dict[str, list[float]] = {
            "torch process reads a line and exits": [],
            "llava chat: /quit": [],
            "llava serve: Ctrl-C": [],
        }
        for _ in range(runs):
            times["torch process reads a line and exits"].append(baseline(env))
            times["llava chat: /quit"].append(quit_chat(model, env))
            times["llava serve: Ctrl-C"].append(stop_server(model, env, scratch / "run"))
    base = statistics.median(times["torch process reads a line and exits"])
    print(f"{'case':<40} {'median s':>9} {'x baseline':>11}  under {TARGET_S} s")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<40} {median:9.3f} {median / base:11.2f}  {'yes' if median < TARGET_S else 'NO'}")


if __name__ == "__main__":
    main()
