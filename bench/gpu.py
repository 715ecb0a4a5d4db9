"""GPU benchmark: a llava-1.5-7b-shaped model with random fp16 weights, built on the GPU (no download).

    python bench/gpu.py                       # one prepared command for a lent GPU: ~20 GB free, < 8 minutes
    OUT=/some/folder python bench/gpu.py      # also writes $OUT/gpu.json, rewritten after every phase
    python bench/gpu.py --smoke               # every phase on a small model (CPU allowed): checks the script
    python bench/gpu.py --smoke --fail-phase default   # self-test: that phase raises, the rest still run

Without a CUDA device (and without --smoke) it says so and exits 0.

The model is `LlavaForConditionalGeneration(config)` with llava-1.5-7b-hf's numbers: CLIP ViT-L/14 at
336 pixels (576 image tokens), a Llama decoder with 4096 hidden, 32 layers, 32 heads, 11008 MLP,
a 32064-token vocabulary, a 4096-token context, loaded with the attention `--attn auto` picks
(SDPA, which masks the empty columns of the bucketed step and --compile's); every path runs it so.
The phases (bench/gpu_phases.py), each printed and saved as soon as it ends:
  - bandwidth: bytes of weights read per decoded token; the bound in tokens/s from a measured
    device-to-device copy and, where the card is known, from its data sheet;
  - plain, default, no_cuda_graph, compile: decode tokens/s of plain `model.generate` and of
    llava-cli's step as ask and chat run it (a batch of one on the scheduler): the default (whole
    row and column buckets, replayed as a CUDA graph), --no-cuda-graph (exact shapes, uncaptured)
    and --compile (fixed-length answers, EOS ignored), from the answer's `Done` figures; time to first
    token for a 576-token image prompt (GPU synced before the clock is read); peak memory; whether a
    CUDA graph was replayed (and the path's --verbose notes, printed); compile adds dynamo's counts
    of graphs, graph breaks and recompiles (and logs each one);
  - crop_chat: a chat on each path whose history diverges inside the cached tokens every turn,
    each answer checked against plain greedy `generate`;
  - buckets: peak memory of the default path in each column bucket of its batch cache that the
    answer fits (up to 2048 and 4096 columns);
  - memory: peak fp16 memory of the default path (and of all paths) and an analytic 4-bit estimate
    (bitsandbytes is not on the GPU machine);
  - batch: decode tokens/s of the scheduler of `llava serve` and `ask --each` at batch 1, 8 and 32
    (smoke: 1 and 4), its step replayed as a CUDA graph per (rows, columns) bucket and uncaptured
    (--no-cuda-graph), and each as a ratio to the batch-of-one default path with and without its
    CUDA graph.
A failing phase is reported in one line and the next one runs; the exit code is 1 if any failed.
Pass marks (not judged with --smoke): default >= 1.5x plain; best path >= 75% of the bound (the
data-sheet bound where the card is known); the default path's peak <= 15 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_phases import FAIL_ON_PURPOSE, PATHS, PHASES, SMOKE, Bench, Shape, build_loaded, card_name, image_ref, picture

DEFAULT_OVER_PLAIN_MARK = 1.5
BOUND_FRACTION_MARK = 0.75
PEAK_GB_MARK = 15.0
SMOKE_TOKENS, SMOKE_TURNS, SMOKE_BATCH = 8, 3, 4  # a smoke run checks the script in well under a minute
BATCH, TTFT_REPEATS = 32, 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="answer length for the decode figures")
    parser.add_argument("--turns", type=int, default=6, help="turns of the cache-cropping chat")
    parser.add_argument("--smoke", action="store_true", help="small model, any device: check that the script runs")
    parser.add_argument(
        "--fail-phase", choices=sorted(PHASES), help="self-test: make this phase raise, to check the others still run"
    )
    return parser.parse_args()


class Report:
    """The figures of each phase, printed and flushed as it ends and rewritten to $OUT/gpu.json."""

    def __init__(self, header: dict[str, Any]) -> None:
        self.data: dict[str, Any] = header | {"phases": {}}
        out = os.environ.get("OUT")
        self.path = Path(out) / "gpu.json" if out else None
        self.save()

    def phase(self, name: str, entry: dict[str, Any]) -> None:
        self.data["phases"][name] = entry
        if entry["status"] == "ok":
            print(
                f"{name}: " + ", ".join(f"{key} {show(value)}" for key, value in entry["figures"].items()), flush=True
            )
        else:
            print(f"{name}: FAILED after {entry['seconds']:.1f}s: {entry['error']}", flush=True)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.data, indent=1))
        partial.replace(self.path)  # whole or not at all, even if the run is killed mid-write


def show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_phase(name: str, bench: Bench, fail_phase: str | None) -> dict[str, Any]:
    """One phase's entry for the report: its figures, or the one-line exception that stopped it."""
    started = time.perf_counter()
    try:
        if name == fail_phase:
            raise RuntimeError(FAIL_ON_PURPOSE)
        figures = PHASES[name](bench)
    except Exception as err:  # a phase's failure must not cost the phases after it their run
        first_line = (str(err).strip().splitlines() or [""])[0]
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {first_line}",
            "seconds": time.perf_counter() - started,
        }
    bench.found[name] = figures
    return {"status": "ok", "figures": figures, "seconds": time.perf_counter() - started}


def marks(found: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """Each pass mark: met, missed, or None when the phases it needs did not run."""
    plain, default = (found.get(name, {}).get("tokens_per_s") for name in ("plain", "default"))
    bandwidth = found.get("bandwidth", {})
    bound = bandwidth.get("datasheet_bound_tok_s") or bandwidth.get("copy_bound_tok_s")
    best = max((found.get(name, {}).get("tokens_per_s") or 0.0 for name in PATHS), default=0.0) or None
    peak = found.get("memory", {}).get("peak_fp16_gb")
    return {
        f"default >= {DEFAULT_OVER_PLAIN_MARK}x plain": default / plain >= DEFAULT_OVER_PLAIN_MARK
        if plain and default
        else None,
        f"best path >= {BOUND_FRACTION_MARK:.0%} of the bound": best / bound >= BOUND_FRACTION_MARK
        if best and bound
        else None,
        f"peak <= {PEAK_GB_MARK:g} GB": peak <= PEAK_GB_MARK if peak is not None else None,
    }


def print_marks(found: dict[str, dict[str, Any]], smoke: bool) -> None:
    for mark, met in marks(found).items():
        verdict = "not judged (smoke run)" if smoke else {True: "met", False: "MISSED", None: "not measured"}[met]
        print(f"pass mark {mark}: {verdict}", flush=True)


def prepare(args: argparse.Namespace) -> Bench:
    import torch

    from llava_cli.base.settings import Settings
    from llava_cli.models.loader import pick_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    loaded = build_loaded(SMOKE if args.smoke else Shape(), device, dtype, attention=pick_attention("auto"))
    tokens, turns, batch, repeats = (
        (SMOKE_TOKENS, SMOKE_TURNS, SMOKE_BATCH, 1)
        if args.smoke
        else (args.new_tokens, args.turns, BATCH, TTFT_REPEATS)
    )
    default = Settings(
        model=loaded.name, max_new_tokens=tokens, device=device, attn=loaded.model.config._attn_implementation
    )
    paths = {
        "default": default,
        "no_cuda_graph": dataclasses.replace(default, no_cuda_graph=True),
        "compile": dataclasses.replace(default, compile=True),
    }
    image = picture()
    return Bench(loaded, image, image_ref(image), paths, tokens, turns, repeats, batch)


def main() -> int:
    args = parse_args()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print(
            "bench/gpu.py: no CUDA device here; nothing measured (run it on a GPU machine, or --smoke to check the script)"
        )
        return 0
    bench = prepare(args)
    card = card_name(bench.device)
    loaded = bench.loaded
    report = Report(
        {
            "card": card,
            "smoke": args.smoke,
            "model": loaded.name,
            "dtype": loaded.dtype,
            "attention": loaded.model.config._attn_implementation,
            "new_tokens": bench.tokens,
            "built_s": loaded.load_seconds,
        }
    )
    print(
        f"card: {card}; model: {loaded.name}{' (SMOKE: small shape, figures judge nothing)' if args.smoke else ''}, "
        f"{loaded.dtype}, attention {report.data['attention']}; built in {loaded.load_seconds:.1f}s",
        flush=True,
    )
    for name in PHASES:
        report.phase(name, run_phase(name, bench, args.fail_phase))
    report.data["marks"] = dict(marks(bench.found))
    report.save()
    print_marks(bench.found, args.smoke)
    failed = [name for name, entry in report.data["phases"].items() if entry["status"] != "ok"]
    if failed:
        print(f"failed phases: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
