"""Context trimming: the fewest oldest turns to drop so that a conversation fits its window.

`TrimSearch(encode, limit).fewest_drops(images_per_turn)` gives exactly the count that trying 0, 1,
2... drops in turn would give, with a few encodes instead of one per dropped turn (1000 turns:
about ten), so a long history cannot hold the engine (or a server's worker) for minutes.
`encode(dropped)` is the engine's: the prompt of the conversation without its `dropped` oldest turns,
or `TooLong` (prompt/prompting.py) for one that cannot fit, refused before tokenizing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from llava_cli.prompt.prompting import TooLong


class Encoded(Protocol):
    """What the search needs of a prompt: its token ids."""

    ids: list[int]


class TrimSearch:
    """The fewest oldest turns to drop so that a conversation's prompt fits in `limit` tokens.

    Dropping a turn never lengthens the text part of a prompt, but the image part can grow: a
    LLaVA-OneVision image is tiled only when it is the prompt's sole image. So the number of turns
    dropped is split into runs over which the prompt keeps 0, 1 or several images; within a run
    the prompt only shrinks as turns are dropped. The runs are tried oldest-first and, in the first
    whose last candidate fits, the smallest fitting candidate is found by galloping back from that
    end: every prompt encoded then is about the window's size, so the cost does not grow with the
    length of the history. The answer is the one trying 0, 1, 2... drops in turn would give.
    """

    def __init__(self, encode: Callable[[int], Encoded], limit: int) -> None:
        self.encode = encode
        self.limit = limit
        self.prompts: dict[int, Encoded] = {}

    def prompt(self, dropped: int) -> Encoded:
        if dropped not in self.prompts:
            self.prompts[dropped] = self.encode(dropped)
        return self.prompts[dropped]

    def fits(self, dropped: int) -> bool:
        try:
            return len(self.prompt(dropped).ids) <= self.limit
        except TooLong:  # refused before tokenizing: far too long
            return False

    def fewest_drops(self, images_per_turn: list[int], whole_first: bool = True) -> int:
        """The smallest count that fits; all but the last turn when none does. `whole_first` tries
        the whole conversation first (the usual case, one encode), worth it unless it is long."""
        if whole_first and self.fits(0):
            return 0
        for first, last in image_runs(images_per_turn):
            if self.fits(last):
                return self.smallest_fitting(first, last)
        return len(images_per_turn) - 1

    def smallest_fitting(self, first: int, last: int) -> int:
        """In [first, last], where `last` fits and fitting is monotone, the smallest count that fits."""
        fitting, step = last, 1
        while fitting - step >= first and self.fits(fitting - step):
            fitting -= step
            step *= 2
        low = max(first, fitting - step)  # candidates below `low` do not fit (or lie outside the run)
        if low < fitting and self.fits(low):
            return low
        while fitting - low > 1:
            middle = (low + fitting) // 2
            if self.fits(middle):
                fitting = middle
            else:
                low = middle
        return fitting


def image_runs(images_per_turn: list[int]) -> list[tuple[int, int]]:
    """Ranges [first, last] of drop counts (0 .. turns-1) over which the kept images stay 0, 1 or several."""
    kept_after: list[int] = []
    remaining = sum(images_per_turn)
    for count in images_per_turn:
        kept_after.append(min(remaining, 2))
        remaining -= count
    runs: list[tuple[int, int]] = []
    for dropped, kind in enumerate(kept_after):
        if runs and kept_after[runs[-1][0]] == kind:
            runs[-1] = (runs[-1][0], dropped)
        else:
            runs.append((dropped, dropped))
    return runs
