"""Decode tokens/s of llava-cli's default path (static bucketed cache, the next token chosen on the
device, one step of look-ahead; uncaptured on a CPU) vs the eager dynamic-cache path vs plain
`model.generate`, on the CPU with the tests' tiny model.

    python bench/decode_paths_cpu.py                  # about a minute
    python bench/decode_paths_cpu.py --answers 6 --new-tokens 200

Each path answers the same question `--answers` times (the cache emptied in between), every answer
exactly `--new-tokens` long (end-of-sequence ignored); plain `generate` gets the same prompt ids
and is clocked between its first and last token, as the engine's figures are. Medians and their
ratios come from this one run; the two engine paths must give identical answers. torch runs on one
thread. On a GPU, bench/gpu.py measures this with the CUDA graph.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import median  # noqa: E402
from compile_cpu import QUESTION, answers, bench_args, tiny_model_on_one_thread  # noqa: E402
from gpu_phases import TokenStamps, fixed_length  # noqa: E402
from llava_cli.conversation import Conversation  # noqa: E402
from llava_cli.engine import Engine  # noqa: E402
from llava_cli.forward import EagerPath  # noqa: E402


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
            engine.model.generate(input_ids=ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                  logits_processor=LogitsProcessorList([TokenStamps("cpu", stamps)]))
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return rates


def main() -> int:
    args = bench_args(__doc__)
    with tiny_model_on_one_thread(args.new_tokens) as (settings, loaded):
        default, eager = fixed_length(Engine(loaded)), fixed_length(Engine(loaded))
        eager.path = EagerPath(loaded.model)
        results = {name: answers(engine, settings, args.answers) for name, engine in (("default", default), ("eager", eager))}
        rates = {name: rates for name, (rates, _) in results.items()} | {"plain": plain_rates(default, args.new_tokens, args.answers)}
    for name, values in rates.items():
        print(f"{name:>8}: {', '.join(f'{rate:.0f}' for rate in values)} tokens/s (median {median(values):.0f})")
    print(f"same answers (default, eager): {'yes' if len(results['default'][1] | results['eager'][1]) == 1 else 'NO'}")
    print(f"default / eager: {median(rates['default']) / median(rates['eager']):.2f}; "
          f"default / plain generate: {median(rates['default']) / median(rates['plain']):.2f}; "
          f"eager / plain generate: {median(rates['eager']) / median(rates['plain']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
