"""`llava serve` under concurrent clients: aggregate answers per second with continuous batching.

    python bench/serve_concurrency.py                     # the test suite's tiny model, float32 on CPU (~1-2 min)
    python bench/serve_concurrency.py --model PATH_OR_ID  # a real checkpoint (on a GPU when there is one)

Starts two `llava serve` processes on the same model: one answering one request at a time
(`--max-batch 1`, the baseline), one batching (`--max-batch 8`). The same `--requests` requests
(distinct pictures, the same question, `--max-new-tokens` tokens each: greedy, so every run must
give the same answers) are sent by 1, 4 and 8 concurrent clients, each client sending its share one
after the other, after one warm-up round. Prints answers per second for each, as a ratio to the
one-at-a-time server measured in the same run, and whether every run gave the same answers.

Why the tiny model (hidden size 64, 2 decoder layers, 16 image tokens per image): on a CPU a step
of a real model costs in proportion to its rows, so batching gains little there; on a GPU a
decode step is bound by reading the weights once, whatever the rows. The tiny model's steps cost
their fixed overhead (Python, kernel launches) whatever the rows, which is the GPU's situation
in small: it shows what the scheduler gains or loses (HTTP, prefill alone, merges, trims). Its
servers run torch on one thread: the tiny model's operations gain nothing from a second one, and
on a shared machine two threads spin-waiting for each other made every step ten times slower.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_throughput import write_pictures
from server_loop import PROMPT, start_server
from tiny_checkpoint import build_checkpoint

CLIENTS = (1, 4, 8)
BATCHING_MAX_BATCH = 8


def body(model: str, picture: str, max_new_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(Path(picture).read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_new_tokens}


def answer_all(url: str, bodies: list[dict], clients: int) -> tuple[float, list[str]]:
    """Seconds for `clients` concurrent clients to get every answer (client k sends bodies k, k+clients, ...)."""
    answers: list[str] = [""] * len(bodies)

    def client(first: int) -> None:
        with httpx.Client(timeout=600) as http:
            for index in range(first, len(bodies), clients):
                reply = http.post(f"{url}/v1/chat/completions", json=bodies[index])
                reply.raise_for_status()
                answers[index] = reply.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(first,)) for first in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, answers


def server_url(runtime: Path) -> str:
    return json.loads(next(runtime.glob("server-*.json")).read_text())["url"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: build the test suite's tiny model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or str(build_checkpoint(folder / "model"))
        bodies = [
            body(model, picture, args.max_new_tokens) for picture in write_pictures(folder / "pictures", args.requests)
        ]
        rows, answers = [], []
        for label, max_batch, counts in (
            ("one at a time (--max-batch 1)", 1, (1,)),
            (f"batching (--max-batch {BATCHING_MAX_BATCH})", BATCHING_MAX_BATCH, CLIENTS),
        ):
            runtime = folder / f"run-{max_batch}"
            env = {
                **os.environ,
                "LLAVA_RUNTIME_DIR": str(runtime),
                "LLAVA_HOME": tmp,
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                **({} if args.model else {"OMP_NUM_THREADS": "1"}),
            }
            server, _ = start_server(
                model, args.max_new_tokens, env, runtime, ("--max-batch", str(max_batch), "--cache-mb", "0")
            )
            try:
                url = server_url(runtime)
                answer_all(url, bodies[: max(counts)], max(counts))  # warm-up
                for clients in counts:
                    seconds, got = answer_all(url, bodies, clients)
                    rows.append((label, clients, seconds))
                    answers.append(got)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)

    baseline = args.requests / rows[0][2]
    same = all(got == answers[0] for got in answers)
    print(
        f"model: {args.model or 'the test suite tiny model (hidden 64, 2 layers), float32'}; "
        f"{args.requests} requests (one image each), {args.max_new_tokens} new tokens each"
    )
    print(f"{'server':>32}  {'clients':>7}  {'seconds':>8}  {'answers/s':>9}  {'vs one at a time':>16}")
    for label, clients, seconds in rows:
        rate = args.requests / seconds
        print(f"{label:>32}  {clients:>7}  {seconds:>8.2f}  {rate:>9.2f}  {rate / baseline:>15.2f}x")
    print(f"same answers in every run: {same}")
    print(
        json.dumps(
            {
                "requests": args.requests,
                "max_new_tokens": args.max_new_tokens,
                "same_answers": same,
                "rates": {
                    f"{max_batch}/{clients}": round(args.requests / seconds, 3)
                    for (label, clients, seconds), max_batch in zip(rows, (1, *[BATCHING_MAX_BATCH] * len(CLIENTS)))
                },
            }
        )
    )
    if not same:
        raise SystemExit("the answers differ between runs")


if __name__ == "__main__":
    main()
