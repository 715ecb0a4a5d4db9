"""What `logprobs` costs a decode step: tokens/s of greedy answers with no logprobs, with the chosen
token's (`--logprobs 0`) and with the 20 most likely tokens (`--logprobs 20`), on the CPU.

    python bench/logprobs_cost.py                                        # the tests' tiny model, one thread
    python bench/logprobs_cost.py --weights-bound float32 --answers 3 --new-tokens 48   # minutes

`--weights-bound DTYPE` measures decode_paths_cpu.py's ~300M-parameter decoder instead, on all the
CPU's threads: a step there is bound by reading the weights, as on a real model. The three settings
answer in turn (alternated, `--answers` rounds, end-of-sequence ignored); the best rate of each and
their ratios come from this one run (best of: other work on a shared machine only slows a round), and the answers must be the same (logprobs never change a token).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_cpu import answers, bench_args
from decode_paths_cpu import model_for
from gpu_phases import fixed_length

from llava_cli.engine.local import Engine

CASES = {"none": None, "logprobs 0": 0, "logprobs 20": 20}


def main() -> int:
    args = bench_args(__doc__, weights_bound=True)
    model = model_for(args)
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    texts: set[str] = set()
    with model as (settings, loaded):
        engine = fixed_length(Engine(loaded))
        for _ in range(args.answers):  # alternated, so load on a shared machine falls on every case alike
            for name, top in CASES.items():
                case_rates, case_texts = answers(engine, dataclasses.replace(settings, logprobs=top), 1)
                rates[name] += case_rates
                texts |= case_texts
    for name, values in rates.items():
        print(f"{name:>12}: {', '.join(f'{rate:.1f}' for rate in values)} tokens/s (best {max(values):.1f})")
    print(f"same answers: {'yes' if len(texts) == 1 else 'NO'}")
    base = max(rates["none"])
    print(
        f"logprobs 0 / none: {max(rates['logprobs 0']) / base:.2f}; logprobs 20 / none: {max(rates['logprobs 20']) / base:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
