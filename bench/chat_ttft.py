"""Chat time to first token, turn by turn: llava-cli's KV-cache reuse vs full recompute (CPU).

    python bench/chat_ttft.py                      # ~1-2 minutes on 2 quiet CPU cores
    python bench/chat_ttft.py --clock cpu          # CPU seconds on 1 thread: for a machine shared with other jobs
    python bench/chat_ttft.py --turns 10 --image-turns 1,5 --max-new-tokens 24 --repeats 3 --compile

Builds a random llava-1.5-shaped model (576 tokens per image; bench/bench_model.py) and runs a
10-turn chat with new images in some turns. For each turn N it times producing the first token of
the answer (one call with max_new_tokens=1), three ways:
  - cached:  llava-cli's `Engine`, kept across the turns (reuses the KV cache of the turns before);
  - fresh:   a new `Engine` for the same prompt (llava-cli without reuse: the whole history again);
  - plain:   plain transformers, `processor(...)` + `model.generate(max_new_tokens=1)` on the full prompt.
Each figure is the median of --repeats runs (`cached`: that many whole chats). It prints a table and
each column's turn-N / turn-1 ratio. Target: cached turn-10 <= 0.5x turn-1 (issue 21; issue 4 asked 1.3x).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_model import Shape, build_bench_checkpoint, median, write_test_images

from llava_cli.base.settings import Settings
from llava_cli.engine.backend import Answer
from llava_cli.engine.local import Engine
from llava_cli.engine.streaming import Stats
from llava_cli.media.images import ImageRef, load_image
from llava_cli.models.loader import LoadedModel, load_model
from llava_cli.prompt.conversation import Conversation, Turn

QUESTIONS = [
    "What is in this picture?",
    "Describe the colours in detail.",
    "How many objects are there?",
    "What is the shape in the middle?",
    "Now compare it with this one.",
    "Which one is brighter?",
    "Describe the background.",
    "Is there any text?",
    "What would you call this picture?",
    "Summarise everything so far.",
]
TARGET_RATIO = 0.5
Script = list[tuple[str, list[ImageRef]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--image-turns", default="1,5", help="turns (1-based) that attach a new image")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length per turn")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is shown")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time, torch on 1 thread"
    )
    parser.add_argument("--text-hidden", type=int, default=Shape.text_hidden)
    parser.add_argument("--text-layers", type=int, default=Shape.text_layers)
    parser.add_argument("--compile", action="store_true", help="run the cached column with --compile")
    return parser.parse_args()


class Timer:
    """Times a call on the wall clock, or on this process's CPU time (robust to other jobs on the machine)."""

    def __init__(self, clock: str) -> None:
        import torch

        if clock == "cpu":
            torch.set_num_threads(1)  # idle threads spinning for work would count as CPU time
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self, action: Callable[[], object]) -> float:
        started = self.now()
        action()
        return self.now() - started


class PlainTransformers:
    """The baseline: what a script does with transformers alone, the whole prompt every turn."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = LlavaForConditionalGeneration.from_pretrained(folder).eval()

    def first_token(self, prompt: str, pictures: list) -> None:
        import torch

        inputs = self.processor(text=prompt, images=pictures or None, return_tensors="pt")
        with torch.inference_mode():
            self.model.generate(**inputs, do_sample=False, max_new_tokens=1)


def answer(engine: Engine, conversation: Conversation, settings: Settings) -> Stats:
    """Answer the pending last turn of `conversation`; its figures (the text is not needed)."""
    answer = Answer(engine.generate(conversation, settings))
    for _ in answer:
        pass
    answer.record_in(conversation)
    return answer.stats


def pending(conversation: Conversation, turn: int) -> Conversation:
    """A copy of the first `turn` turns of `conversation`, the last one waiting for its answer."""
    turns = [Turn(t.text, list(t.images), t.answer) for t in conversation.turns[:turn]]
    turns[-1].answer = None
    return Conversation(system=conversation.system, turns=turns)


def cached_chat(
    loaded: LoadedModel, script: Script, settings: Settings, timer: Timer
) -> tuple[list[tuple], Conversation]:
    """The whole chat through one engine; per turn (first-token seconds, prompt tokens, cached tokens), and the chat.

    Each turn first times a one-token answer, then answers in full; the full answer reuses all of
    the timed prompt, so the chat and its cache go on exactly as in normal use.
    """
    engine, conversation, figures = Engine(loaded), Conversation(), []
    first_token = dataclasses.replace(settings, max_new_tokens=1)
    for text, images in script:
        conversation.ask(text, images)
        stats: list[Stats] = []
        seconds = timer(
            lambda: stats.append(answer(engine, pending(conversation, len(conversation.turns)), first_token))
        )
        figures.append((seconds, stats[0].prompt_tokens, stats[0].cached_tokens))
        answer(engine, conversation, settings)
    return figures, conversation


def main() -> int:
    args = parse_args()
    timer = Timer(args.clock)
    shape = Shape(text_hidden=args.text_hidden, text_layers=args.text_layers)
    with tempfile.TemporaryDirectory() as scratch:
        folder = build_bench_checkpoint(Path(scratch) / "model", shape)
        image_turns = {int(turn) for turn in args.image_turns.split(",") if turn}
        pictures = iter(write_test_images(Path(scratch) / "images", len(image_turns)))
        script = [
            (QUESTIONS[(turn - 1) % len(QUESTIONS)], [load_image(str(next(pictures)))] if turn in image_turns else [])
            for turn in range(1, args.turns + 1)
        ]
        settings = Settings(model=str(folder), max_new_tokens=args.max_new_tokens, compile=args.compile)
        loaded = load_model(settings)
        plain = PlainTransformers(folder)
        cached_chat(loaded, script[:2], settings, timer)  # warm-up: one-time costs (and compiling) untimed
        runs = [cached_chat(loaded, script, settings, timer) for _ in range(args.repeats)]
        rows = table_rows(loaded, plain, runs, args.repeats, timer)
    report(rows, shape, args)
    return 0


def table_rows(loaded: LoadedModel, plain: PlainTransformers, runs: list, repeats: int, timer: Timer) -> list[tuple]:
    """(turn, prompt tokens, cached tokens, cached, fresh and plain first-token seconds) for each turn."""
    figures, conversation = runs[-1]  # greedy: every run gives the same answers
    first_token = Settings(model=loaded.name, max_new_tokens=1)
    rows = []
    for turn, (_, prompt_tokens, cached_tokens) in enumerate(figures, start=1):
        fresh = median(
            [timer(lambda: answer(Engine(loaded), pending(conversation, turn), first_token)) for _ in range(repeats)]
        )
        prompt = pending(conversation, turn)
        text, pictures = loaded.prompt_format.render(prompt), [ref.image for ref in prompt.images]
        plain_s = median([timer(lambda: plain.first_token(text, pictures)) for _ in range(repeats)])
        cached = median([run_figures[turn - 1][0] for run_figures, _ in runs])
        rows.append((turn, prompt_tokens, cached_tokens, cached, fresh, plain_s))
    return rows


def report(rows: list[tuple], shape: Shape, args: argparse.Namespace) -> None:
    clock = "CPU seconds, 1 thread" if args.clock == "cpu" else "wall clock"
    print(
        f"model: llava-1.5-shaped, {shape.image_tokens} tokens per image, text {shape.text_layers} layers x "
        f"{shape.text_hidden} hidden; images in turns {args.image_turns}; {args.max_new_tokens}-token answers; "
        f"{clock}; median of {args.repeats}{'; cached column with --compile' if args.compile else ''}"
    )
    print(
        f"{'turn':>4} {'prompt':>7} {'cached':>7} {'cached ttft':>12} {'fresh ttft':>11} {'plain ttft':>11} {'plain/cached':>13}"
    )
    for turn, prompt, cached_tokens, cached, fresh, plain in rows:
        print(
            f"{turn:>4} {prompt:>7} {cached_tokens:>7} {cached * 1000:>10.1f}ms {fresh * 1000:>9.1f}ms "
            f"{plain * 1000:>9.1f}ms {plain / cached:>12.1f}x"
        )
    first, last = rows[0], rows[-1]
    names = ("cached (llava-cli)", "fresh engine (no reuse)", "plain transformers")
    for name, column in zip(names, (3, 4, 5)):
        print(f"turn-{last[0]}/turn-1 TTFT, {name}: {last[column] / first[column]:.2f}")
    ratio = last[3] / first[3]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"target: cached turn-{last[0]} <= {TARGET_RATIO}x turn-1: {verdict} ({ratio:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
