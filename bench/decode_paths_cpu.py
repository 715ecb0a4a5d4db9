"""Decode tokens/s of llava-cli's one step, as `ask` and `chat` run it (a batch of one on the
scheduler): with exact shapes (the CPU's default: the live columns of the batch cache) and over whole
buckets (the shapes CUDA captures as graphs, run eagerly here), vs plain `model.generate`, on the
CPU with the tests' tiny model.

    python bench/decode_paths_cpu.py                  # about a minute
    python bench/decode_paths_cpu.py --answers 6 --new-tokens 200
    python bench/decode_paths_cpu.py --weights-bound float32 --answers 3 --new-tokens 48   # minutes
    python bench/decode_paths_cpu.py --weights-bound bfloat16 --answers 3 --new-tokens 48

`--weights-bound DTYPE` measures, instead of the tiny model, a random llava-1.5-shaped checkpoint
whose decoder has about 300 million parameters (`WEIGHTS_BOUND`, bench_model.py's builder), in
that dtype, on all the CPU's threads: a step there is bound by reading the weights, as on a real model.

Each path answers the same question `--answers` times (the cache emptied in between), every answer
exactly `--new-tokens` long (end-of-sequence ignored); plain `generate` gets the same prompt ids
and is clocked between its first and last token, as the engine's figures are. Medians and their
ratios come from this one run; the two step shapes must give identical answers. torch runs on one
thread (all of them with `--weights-bound`). On a GPU, bench/gpu.py measures this with the CUDA graph.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import Shape, build_bench_checkpoint, median
from compile_cpu import QUESTION, answers, bench_args, tiny_model_on_one_thread
from gpu_phases import TokenStamps, fixed_length

from llava_cli.base.settings import Settings
from llava_cli.engine.kvbudget import CHAT
from llava_cli.engine.local import Engine
from llava_cli.engine.scheduler import DecodeBatch
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation


def plain_rates(engine: Engine, tokens: int, count: int) -> list[float]:
    """Plain `model.generate` on the prompt the engine builds: decode tokens/s of `count` answers."""
    import torch
    from transformers import LogitsProcessorList

    conversation = Conversation()
    conversation.ask(QUESTION)
    ids = torch.tensor([engine.encode(conversation).ids])
    rates = []
    for _ in range(count):
        stamps: list[float] = []
        with torch.inference_mode():
            engine.model.generate(
                input_ids=ids,
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                logits_processor=LogitsProcessorList([TokenStamps("cpu", stamps)]),
            )
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return rates


WEIGHTS_BOUND = Shape(image_size=112, text_hidden=1024, text_layers=24)  # ~300M decoder parameters


@contextlib.contextmanager
def weights_bound_model(new_tokens: int, dtype: str) -> Iterator[tuple[Settings, Any]]:
    """The `WEIGHTS_BOUND` checkpoint, built in a scratch folder and loaded in `dtype` on the CPU."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = build_bench_checkpoint(Path(scratch) / "model", WEIGHTS_BOUND)
        settings = Settings(model=str(folder), device="cpu", dtype=dtype, max_new_tokens=new_tokens)
        yield settings, load_model(settings)


def model_for(args: Any) -> Any:
    """`--weights-bound DTYPE`'s model on all threads, else the tests' tiny model on one thread."""
    if args.weights_bound:
        return weights_bound_model(args.new_tokens, args.weights_bound)
    return tiny_model_on_one_thread(args.new_tokens)


def main() -> int:
    args = bench_args(__doc__, weights_bound=True)
    model = model_for(args)
    with model as (settings, loaded):
        decoder = sum(p.numel() for name, p in loaded.model.named_parameters() if "language_model" in name)
        print(f"model: {decoder / 1e6:.0f}M decoder parameters, {loaded.dtype}")
        engines = {name: fixed_length(Engine(loaded)) for name in ("exact", "bucketed")}
        for name, engine in engines.items():  # "exact": the CPU's default; "bucketed": the GPU's shapes, uncaptured
            engine.batch = DecodeBatch(engine, engine.history, holder=CHAT, captured_shapes=name == "bucketed")
        results = {name: answers(engine, settings, args.answers) for name, engine in engines.items()}
        rates = {name: rates for name, (rates, _) in results.items()} | {
            "plain": plain_rates(engines["exact"], args.new_tokens, args.answers)
        }
    for name, values in rates.items():
        print(f"{name:>8}: {', '.join(f'{rate:.0f}' for rate in values)} tokens/s (median {median(values):.0f})")
    same = len(results["exact"][1] | results["bucketed"][1]) == 1
    print(f"same answers (exact, bucketed): {'yes' if same else 'NO'}")
    print(
        f"exact (the CPU default) / plain generate: {median(rates['exact']) / median(rates['plain']):.2f}; "
        f"bucketed / plain generate: {median(rates['bucketed']) / median(rates['plain']):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
