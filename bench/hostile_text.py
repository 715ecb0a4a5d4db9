"""Peak memory and time of over-long text (issue 28, items 1 and 7), this checkout against another.

    python bench/hostile_text.py --baseline /work/main          # before: that checkout's llava_cli
    python bench/hostile_text.py --baseline /work/main --mb 1 5 10 60 --session-mb 10 26 --before-up-to-mb 10

Each case runs twice, once with `--baseline`'s code (PYTHONPATH) and once with this checkout's, on
the tests' tiny model (a 1024-token window):
- serve: one chat request whose user message is "word " repeated to N MB, against a fresh
  `llava serve`; the request's status and seconds, and the server's peak resident memory (VmHWM)
  against its idle memory after one small request;
- resume: `llava chat --resume --no-save` of a saved conversation with one N MB turn, and of one
  with many short turns, answering "hi"; exit code, seconds and peak resident memory (/usr/bin/time).
Linux only (it reads /proc). A case that crashed or ran out of memory shows its exit code.
`--before-up-to-mb` skips the baseline for larger texts (60 MB took the old server to 12 GB).
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

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_memory import build_checkpoint, memory_mb, start_server

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def serve_case(code: Path, model: Path, folder: Path, megabytes: float) -> str:
    os.environ["PYTHONPATH"] = str(code)
    os.chdir(code)  # `python -m` puts the working folder first on the path
    server, url = start_server(model, folder / f"run-{code.name}-{megabytes}")
    try:
        body = {"model": str(model), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        idle = memory_mb(server.pid, "VmRSS")
        body["messages"][0]["content"] = "word " * int(megabytes * 1e6 / 5)
        started = time.perf_counter()
        try:
            status = str(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S).status_code)
        except httpx.HTTPError as err:
            status = type(err).__name__
        seconds = time.perf_counter() - started
        peak = memory_mb(server.pid, "VmHWM") if server.poll() is None else float("nan")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    return f"status {status:>4}  {seconds:6.2f} s  peak {peak:7.0f} MiB (idle {idle:.0f}, +{peak - idle:.0f})"


def session(model: Path, turns: list[dict]) -> dict:
    return {
        "format": "llava-cli-conversation",
        "version": 1,
        "id": "bench",
        "name": None,
        "created": "2026-12-05T00:00:00Z",
        "updated": "2026-12-05T00:00:00Z",
        "model": str(model),
        "settings": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4, "seed": None, "max_context": None},
        "system": None,
        "turns": turns,
    }


def turn(text: str) -> dict:
    return {"user": text, "images": [], "assistant": "a", "answered_at": None}


def resume_case(code: Path, model: Path, folder: Path, turns: list[dict]) -> str:
    home = folder / f"home-{code.name}"
    (home / "sessions").mkdir(parents=True, exist_ok=True)
    (home / "sessions" / "bench.json").write_text(
        json.dumps(session(model, turns), separators=(",", ":"))
    )  # compact: 560,000 turns fit the 32 MiB cap
    env = {**os.environ, "PYTHONPATH": str(code), "LLAVA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    command = [
        "/usr/bin/time",
        "-f",
        "%e %M",
        sys.executable,
        "-m",
        "llava_cli",
        "chat",
        "--resume",
        "bench",
        "--no-save",
        "--no-server",
        "-n",
        "4",
    ]
    done = subprocess.run(command, input=b"hi\n", capture_output=True, env=env, cwd=code, timeout=TIMEOUT_S)
    seconds, kilobytes = done.stderr.decode(errors="replace").strip().splitlines()[-1].split()[-2:]
    return f"exit {done.returncode:>3}  {float(seconds):6.2f} s  peak {int(kilobytes) / 1024:7.0f} MiB"


def measured(checkouts: dict[str, Path], megabytes: float, before_up_to: float) -> list[tuple[str, Path]]:
    return [(label, code) for label, code in checkouts.items() if label == "after" or megabytes <= before_up_to]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline", type=Path, required=True, help="a checkout of the code before (its llava_cli is measured)"
    )
    parser.add_argument("--mb", type=float, nargs="*", default=[1, 5, 10, 60], help="sizes of the served user message")
    parser.add_argument(
        "--session-mb", type=float, nargs="*", default=[26], help="sizes of the saved conversation's one long turn"
    )
    parser.add_argument(
        "--before-up-to-mb", type=float, default=float("inf"), help="measure the baseline only up to this text size"
    )
    parser.add_argument("--turns", type=int, default=560_000, help="turns of the many-turn saved conversation")
    args = parser.parse_args()
    checkouts = {"before": args.baseline.resolve(), "after": ROOT}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        model = build_checkpoint(folder / "model")
        for megabytes in args.mb:
            for label, code in measured(checkouts, megabytes, args.before_up_to_mb):
                print(
                    f"serve, {megabytes:g} MB message, {label:6}: {serve_case(code, model, folder, megabytes)}",
                    flush=True,
                )
        cases = {
            f"one {mb:g} MB turn": (mb, [turn("word " * int(mb * 1e6 / 5)), turn("short")]) for mb in args.session_mb
        }
        cases[f"{args.turns} turns"] = (0, [turn("") for _ in range(args.turns)])
        for case, (megabytes, turns) in cases.items():
            for label, code in measured(checkouts, megabytes, args.before_up_to_mb):
                print(f"chat --resume, {case}, {label:6}: {resume_case(code, model, folder, turns)}", flush=True)


if __name__ == "__main__":
    main()
