"""Decode tokens/s of llava-cli's default path vs `--compile`, on the CPU with the tests' tiny model.

    python bench/compile_cpu.py                  # ~1 minute, most of it compiling once
    python bench/compile_cpu.py --answers 4 --new-tokens 200

Builds tests/tiny_checkpoint.py's model and, for each path, answers the same question `--answers`
times on one engine (the cache emptied in between), every answer exactly `--new-tokens` long
(end-of-sequence ignored). The first `--compile` answer compiles the decode step and is not
counted; the medians of the other answers and their ratio are printed, and the greedy answers
of both paths must be identical. torch runs on one thread. On a GPU, bench/gpu.py measures this.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import median
from gpu_phases import fixed_length
from tiny_checkpoint import build_checkpoint

from llava_cli.base.settings import Settings
from llava_cli.engine.backend import Answer
from llava_cli.engine.local import Engine
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation

QUESTION = "tell me something about the quick brown fox"


def answers(engine: Engine, settings: Settings, count: int) -> tuple[list[float], set[str]]:
    """`count` answers to the same question; each one's decode tokens/s, and the distinct answers."""
    rates, texts = [], set()
    for _ in range(count):
        engine.reset()
        conversation = Conversation()
        conversation.ask(QUESTION)
        answer = Answer(engine.generate(conversation, settings))
        texts.add("".join(answer))
        rates.append(answer.stats.tokens_per_s)
    return rates, texts


def bench_args(doc: str, weights_bound: bool = False) -> argparse.Namespace:
    """The options of the CPU decode benchmarks: answers per path, tokens per answer (and, with
    `weights_bound`, the dtype of decode_paths_cpu.py's weights-bound model)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=200)
    if weights_bound:
        parser.add_argument(
            "--weights-bound",
            choices=("float32", "bfloat16"),
            help="a ~300M-parameter decoder in this dtype instead of the tiny model",
        )
    return parser.parse_args()


@contextlib.contextmanager
def tiny_model_on_one_thread(new_tokens: int) -> Iterator[tuple[Settings, Any]]:
    """The tests' tiny model, built in a scratch folder and loaded, torch on one thread."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(model=str(build_checkpoint(Path(scratch) / "tiny")), max_new_tokens=new_tokens)
        yield settings, load_model(settings)


def main() -> int:
    args = bench_args(__doc__)
    with tiny_model_on_one_thread(args.new_tokens) as (settings, loaded):
        results = {}
        for name, compile in (("default", False), ("--compile", True)):
            engine = fixed_length(Engine(loaded))
            results[name] = answers(engine, dataclasses.replace(settings, compile=compile), args.answers)
    default, compiled = median(results["default"][0]), median(results["--compile"][0][1:])
    for name, (rates, _) in results.items():
        print(f"{name:>10}: {', '.join(f'{rate:.0f}' for rate in rates)} tokens/s")
    print(f"same answers: {'yes' if len(results['default'][1] | results['--compile'][1]) == 1 else 'NO'}")
    print(f"--compile / default (medians, first compiled answer left out): {compiled / default:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
