"""Memory of `llava serve` under concurrent large images (issue 12, finding 3).

    python bench/server_memory.py                 # 20 concurrent requests, 7000x7000 one-colour PNG
    python bench/server_memory.py --clients 40 --side 5000

Starts `llava serve` on the tests' tiny model, reads its resident memory once idle (after one
small warm-up request), sends N concurrent chat requests that each carry one SIDE x SIDE
one-colour PNG as a data: URL (about 160 KB at 7000x7000, 147 MB once decoded to RGB), and
prints the server's peak resident memory (the kernel's high-water mark, VmHWM) and its resident
memory two seconds after the last answer, each against the idle figure measured in the same run.
Linux only (it reads /proc). Before issue 12 the server decoded every request's images as soon
as the request arrived (about 10 GB at the peak for 20 of these) and kept 9.45 GB afterwards.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_checkpoint import build_checkpoint

READY_TIMEOUT_S = 300


def one_colour_png(side: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of `pid`, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/{pid}/status")


def start_server(model: Path, runtime: Path, *options: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "LLAVA_RUNTIME_DIR": str(runtime), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "llava_cli", "serve", "--model", str(model), "--port", "0", "-n", "4", *options]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while not (runtime.is_dir() and list(runtime.glob("server-*.json"))):
        if server.poll() is not None or time.monotonic() - started > READY_TIMEOUT_S:
            raise SystemExit("llava serve did not start")
        time.sleep(0.1)
    return server, json.loads(next(runtime.glob("server-*.json")).read_text())["url"]


def ask(url: str, model: str, image_url: str | None, statuses: list[int]) -> None:
    content: list[dict] = [{"type": "text", "text": "What colour is this?"}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).status_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--side", type=int, default=7000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = build_checkpoint(Path(folder) / "model")
        server, url = start_server(model, Path(folder) / "run")
        try:
            statuses: list[int] = []
            ask(url, str(model), None, statuses)
            idle = memory_mb(server.pid, "VmRSS")
            picture = one_colour_png(args.side)
            print(
                f"{args.clients} concurrent requests, each one {args.side}x{args.side} one-colour PNG "
                f"({len(picture) * 3 // 4 // 1024} KB)"
            )
            clients = [
                threading.Thread(target=ask, args=(url, str(model), picture, statuses)) for _ in range(args.clients)
            ]
            started = time.perf_counter()
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            seconds = time.perf_counter() - started
            peak = memory_mb(server.pid, "VmHWM")
            time.sleep(2)
            after = memory_mb(server.pid, "VmRSS")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    answered = statuses[1:].count(200)
    print(f"answered {answered}/{args.clients} in {seconds:.1f} s")
    print(f"idle RSS {idle:8.0f} MiB")
    print(f"peak RSS {peak:8.0f} MiB  ({peak / idle:.2f}x idle, +{peak - idle:.0f} MiB)")
    print(f"after    {after:8.0f} MiB  ({after / idle:.2f}x idle, +{after - idle:.0f} MiB)")


if __name__ == "__main__":
    main()
