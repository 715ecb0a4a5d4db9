"""Schema-constrained decoding on the CPU (issue 23): what the grammar's token mask costs per decode
step, and xgrammar against llguidance on the same schemas.

    python bench/schema_mask_cpu.py --answers 3 --new-tokens 24     # both parts: minutes
    python bench/schema_mask_cpu.py --engines-only                   # part 2 only: about a minute

Part 1, the engine: decode_paths_cpu.py's weights-bound model (a ~300M-parameter decoder, float32,
all the CPU's threads; a step is bound by reading the weights, as on a real model). Unconstrained
answers of exactly `--new-tokens` give the decode step time (the quickest answer's tokens/s: on a
shared machine a slow step would flatter the mask); then each schema is
answered under it while every `GrammarHook` call (the mask on the row's logits, the matcher taking
the token) is clocked. The figure is hook seconds per token / step seconds: the target is <= 0.10.

Part 2, the grammar engines alone, at a Llama-sized vocabulary: a 32,000-token byte-level BPE
tokenizer trained here (the test models have 384 tokens, which flatters any mask). Per schema:
compile time (xgrammar's compiler with its cache cleared; llguidance's matcher creation, which
compiles lazily, so its first mask is reported too) and the mean time per token of one step's mask
work (fill the bitmask, apply it to float32 logits, take the token) over up to 64 tokens chosen by
argmax over seeded random logits (the same logits for both engines). llguidance is optional: install
it for the benchmark only (`pip install llguidance`); it is not a dependency of llava-cli.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import median

# The exactness tests' three (tests/test_schema.py), and a free string that runs to the budget. Objects
# say additionalProperties false: xgrammar assumes it (strict mode, llava-cli's), llguidance follows
# JSON Schema and would otherwise let the answer go on with more keys, a different language to match.
CLOSED = {"additionalProperties": False}
SCHEMAS = {
    "enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        **CLOSED,
    },
    "nested object": {
        "type": "object",
        "required": ["item"],
        **CLOSED,
        "properties": {
            "item": {
                "type": "object",
                "required": ["name", "count"],
                **CLOSED,
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "count": {"type": "integer", "minimum": 0, "maximum": 99},
                },
            }
        },
    },
    "array of numbers": {
        "type": "object",
        "required": ["values"],
        **CLOSED,
        "properties": {"values": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
    },
    "free string": {"type": "object", "required": ["caption"], **CLOSED, "properties": {"caption": {"type": "string"}}},
}
VOCAB = 32000
MASK_TOKENS = 64
COMPILE_REPEATS = 5


# --- part 1: the engine ---------------------------------------------------------------------------------


def engine_part(answers: int, new_tokens: int) -> float:
    """Print the hook's share of a decode step per schema; return the decode step in seconds."""
    from compile_cpu import QUESTION
    from compile_cpu import answers as timed_answers
    from decode_paths_cpu import weights_bound_model
    from gpu_phases import fixed_length

    from llava_cli.engine import constraints
    from llava_cli.engine.backend import Answer
    from llava_cli.engine.constraints import schema_text
    from llava_cli.engine.local import Engine
    from llava_cli.prompt.conversation import Conversation

    spent = [0.0]
    for name in ("constrain", "accepted"):
        setattr(constraints.GrammarHook, name, clocked(getattr(constraints.GrammarHook, name), spent))
    with weights_bound_model(new_tokens, "float32") as (settings, loaded):
        rates, _ = timed_answers(fixed_length(Engine(loaded)), settings, answers)
        step = 1 / max(rates)  # the quickest step seen: on a shared machine the conservative denominator
        print(
            f"part 1: weights-bound model, vocab {loaded.model.config.get_text_config().vocab_size}; "
            f"unconstrained decode {', '.join(f'{rate:.1f}' for rate in rates)} tokens/s: quickest step {step * 1000:.1f} ms"
        )
        engine = Engine(loaded)
        for name, schema in SCHEMAS.items():
            constrained = dataclasses.replace(settings, constraint=schema_text(json.dumps(schema)))
            shares, speeds = [], []
            for _ in range(answers):
                engine.reset()
                conversation = Conversation()
                conversation.ask(QUESTION)
                spent[0] = 0.0
                answer = Answer(engine.generate(conversation, constrained))
                "".join(answer)
                tokens = answer.stats.completion_tokens
                shares.append(spent[0] / tokens / step)
                speeds.append(answer.stats.tokens_per_s)
            print(
                f"  {name:>16}: hook {median(shares) * step * 1000:.3f} ms/token = {median(shares):.4f} of a step "
                f"({tokens} tokens; decode {median(speeds):.1f} tokens/s)"
            )
    return step


def clocked(method: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            spent[0] += time.perf_counter() - start

    return timed


# --- part 2: the grammar engines ------------------------------------------------------------------------


def llama_sized_tokenizer() -> Any:
    """A byte-level BPE tokenizer of VOCAB tokens, trained on the Python standard library's source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    tok.train_from_iterator((path.read_text(errors="replace") for path in sources), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB), max_threads=1
        )

    def compile(self, schema: str) -> Any:
        self.compiler.clear_cache()
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def stepper(self, compiled: Any) -> Stepper:
        matcher, bitmask = self.xgr.GrammarMatcher(compiled), self.xgr.allocate_token_bitmask(1, VOCAB)

        def fill(logits: Any) -> None:
            matcher.fill_next_token_bitmask(bitmask)
            self.xgr.apply_token_bitmask_inplace(logits, bitmask)

        return Stepper(fill, lambda token: matcher.accept_token(token), matcher.is_terminated)


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.lltorch = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB)

    def compile(self, schema: str) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return self.ll.LLMatcher(self.tokenizer, grammar)

    def stepper(self, matcher: Any) -> Stepper:
        bitmask = self.lltorch.allocate_token_bitmask(1, VOCAB)

        def fill(logits: Any) -> None:
            self.lltorch.fill_next_token_bitmask(matcher, bitmask, 0)
            self.lltorch.apply_token_bitmask_inplace(logits, bitmask)

        return Stepper(
            fill, lambda token: matcher.consume_token(token), lambda: matcher.is_stopped() or matcher.is_error()
        )


class Stepper:
    def __init__(self, fill: Callable[[Any], None], take: Callable[[int], Any], done: Callable[[], bool]) -> None:
        self.fill, self.take, self.done = fill, take, done


def warm_up(engine: Xgrammar | Llguidance) -> None:
    import torch

    engine.stepper(engine.compile(json.dumps({"type": "object"}))).fill(torch.zeros(1, VOCAB))


def mask_times(engine: Xgrammar | Llguidance, schema: str) -> tuple[float, float, float, int]:
    """(best compile s, first mask s, mean s per later token, tokens) for one schema."""
    import torch

    compile_s = []
    for _ in range(COMPILE_REPEATS):
        start = time.perf_counter()
        compiled = engine.compile(schema)
        compile_s.append(time.perf_counter() - start)
    stepper = engine.stepper(compiled)
    generator = torch.Generator().manual_seed(0)
    per_token = []
    while len(per_token) < MASK_TOKENS and not stepper.done():
        logits = torch.randn(1, VOCAB, generator=generator)
        start = time.perf_counter()
        stepper.fill(logits)
        token = int(logits.argmax())
        stepper.take(token)
        per_token.append(time.perf_counter() - start)
    return min(compile_s), per_token[0], statistics.fmean(per_token[1:] or per_token), len(per_token)


def engines_part(step: float | None) -> None:
    start = time.perf_counter()
    tokenizer = llama_sized_tokenizer()
    print(
        f"part 2: grammar engines, a {len(tokenizer)}-token tokenizer (trained in {time.perf_counter() - start:.0f} s)"
    )
    engines: list[Xgrammar | Llguidance] = []
    for kind in (Xgrammar, Llguidance):
        start = time.perf_counter()
        try:
            engines.append(kind(tokenizer))
        except ImportError:
            print(f"  {kind.name}: not installed, skipped")
            continue
        warm_up(
            engines[-1]
        )  # llguidance builds its token tables at the first mask: a cost per tokenizer, not per schema
        print(
            f"  {kind.name}: tokenizer set up once (first mask included) in {(time.perf_counter() - start) * 1000:.0f} ms"
        )
    for name, schema in SCHEMAS.items():
        for engine in engines:
            compile_s, first_s, token_s, tokens = mask_times(engine, json.dumps(schema))
            share = f" = {token_s / step:.4f} of the part-1 step" if step else ""
            print(
                f"  {name:>16} {engine.name:>10}: compile {compile_s * 1000:7.2f} ms, first mask {first_s * 1000:6.3f} ms, "
                f"then {token_s * 1000:.3f} ms/token over {tokens} tokens{share}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--engines-only", action="store_true", help="part 2 only (no model is built)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    step = None if args.engines_only else engine_part(args.answers, args.new_tokens)
    engines_part(step)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
