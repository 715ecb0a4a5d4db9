"""Context trimming: `Engine.fit` on long conversations vs the old drop-one-turn-and-re-encode loop.

    python bench/trim.py                     # 250 and 1000 turns, the tests' tiny model (1024-token window)
    python bench/trim.py --turns 250 1000 4000 --old-up-to 250

Each conversation has N answered turns of a dozen words and a last, pending question; the window
holds only the last few dozen turns, so nearly all are dropped. Prints, per N: the time `fit`
takes, the time of one encode of a single turn (the baseline, measured in the same run), their
ratio, how many encodes `fit` made, and for N up to --old-up-to the old loop's time (which encodes
once per dropped turn) with a check that both give the same prompt and dropped count.
Target (issue 12): 1000 turns well under a second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_checkpoint import build_checkpoint

from llava_cli.base.settings import Settings
from llava_cli.engine.local import Engine
from llava_cli.models.loader import load_model
from llava_cli.prompt.conversation import Conversation, Turn

MAX_NEW = 64


def conversation(turns: int) -> Conversation:
    history = [
        Turn(text=f"question {i}: what is on the left of the picture, and why?", answer=f"answer {i}: a cat on a mat.")
        for i in range(turns)
    ]
    return Conversation(system="Be brief.", turns=history + [Turn(text="and now?")])


def old_fit(engine: Engine, talk: Conversation, settings: Settings) -> tuple[list[int], int]:
    """What `Engine.fit` did before issue 12: encode again after every dropped turn."""
    window = engine.context_window(settings)
    for dropped in range(len(talk.turns)):
        prompt = engine.encode(talk.without_oldest(dropped))
        if len(prompt.ids) + min(settings.max_new_tokens, window // 2) <= window:
            break
    return prompt.ids, dropped


def timed(action, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[250, 1000])
    parser.add_argument("--old-up-to", type=int, default=250, help="also time the old loop for N up to this")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(model=str(build_checkpoint(Path(folder))), max_new_tokens=MAX_NEW)
        engine = Engine(load_model(settings))
        one_turn, _ = timed(lambda: engine.encode(Conversation(turns=[Turn(text="and now?")])), args.repeats * 20)
        print(f"one encode of a single turn: {one_turn * 1000:.2f} ms (the baseline)")
        for turns in args.turns:
            talk = conversation(turns)
            counted = count_encodes(engine)
            fit_s, (prompt, dropped) = timed(lambda: engine.fit(conversation(turns), settings), args.repeats)
            line = (
                f"{turns:5d} turns: fit {fit_s * 1000:8.1f} ms = {fit_s / one_turn:7.0f}x one turn's encode, "
                f"{len(counted) // args.repeats} encodes, {dropped} turns dropped"
            )
            engine.encode = type(engine).encode.__get__(engine)
            if turns <= args.old_up_to:
                old_s, old = timed(lambda: old_fit(engine, talk, settings), 1)
                assert old == (prompt.ids, dropped), "the old and new trimming disagree"
                line += f"; old loop {old_s:7.2f} s ({old_s / fit_s:.0f}x slower, same prompt)"
            print(line)


def count_encodes(engine: Engine) -> list[None]:
    calls: list[None] = []
    encode = engine.encode

    def counted(talk: Conversation):
        calls.append(None)
        return encode(talk)

    engine.encode = counted
    return calls


if __name__ == "__main__":
    main()
