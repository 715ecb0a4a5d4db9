"""Memory given back by `llava serve --keep-alive` (issue 27 item 3): the server's RSS before, during and after an idle unload.

    python bench/serve_keepalive.py                  # a 1024-wide, 8-layer random llava-1.5 (about 0.6 GB of fp32 weights)
    python bench/serve_keepalive.py --hidden 512 --layers 4

Starts `llava serve --keep-alive 2s` on a random benchmark checkpoint (bench_model.py), answers
one request and reads the server's resident memory (VmRSS) with the model loaded; waits until
`/health` says the model is unloaded and reads it again (the unload); sends the next request,
which loads the model again, and reads it a third time. Each figure is printed against the
loaded one of the same run, next to the size of the weights. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

import httpx
from bench_model import Shape, build_bench_checkpoint
from server_memory import ask, memory_mb, start_server

KEEP_ALIVE = "2s"


def wait_until_unloaded(url: str, timeout_s: float = 60) -> float:
    """Seconds until /health says the model is out."""
    started = time.monotonic()
    while httpx.get(f"{url}/health").json()["loaded"]:
        if time.monotonic() - started > timeout_s:
            raise SystemExit("the model was never unloaded")
        time.sleep(0.05)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = build_bench_checkpoint(Path(folder) / "model", Shape(text_hidden=args.hidden, text_layers=args.layers))
        weights_mb = sum(path.stat().st_size for path in model.glob("*.safetensors")) / 2**20
        server, url = start_server(model, Path(folder) / "run", "--keep-alive", KEEP_ALIVE)
        try:
            statuses: list[int] = []
            ask(url, str(model), None, statuses)
            loaded = memory_mb(server.pid, "VmRSS")
            unload_s = wait_until_unloaded(url)
            time.sleep(0.5)  # the unload has finished its collection and heap trim
            unloaded = memory_mb(server.pid, "VmRSS")
            started = time.perf_counter()
            ask(url, str(model), None, statuses)
            reload_s = time.perf_counter() - started
            reloaded = memory_mb(server.pid, "VmRSS")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print(f"weights on disk {weights_mb:6.0f} MiB; answers {statuses}; --keep-alive {KEEP_ALIVE}")
    print(f"loaded, idle     {loaded:8.0f} MiB RSS")
    print(
        f"after the unload {unloaded:8.0f} MiB RSS  ({unloaded / loaded:.2f}x loaded, {loaded - unloaded:.0f} MiB given back; "
        f"unloaded {unload_s:.1f} s after the answer)"
    )
    print(
        f"reloaded         {reloaded:8.0f} MiB RSS  ({reloaded / loaded:.2f}x loaded; that request took {reload_s:.1f} s with the load)"
    )


if __name__ == "__main__":
    main()
