"""`llava serve`'s prefix caches: the KV caches of recent answers, for clients that resend a growing history.

Contract: `PrefixPool(budget)` holds entries, each a one-row cache (engine/kvrows.py) with exactly
the token ids and image keys it holds (engine/local.py's `PrefixCache`), within what the process's
`--cache-mb` budget (engine/kvbudget.py) leaves beside the running answers, least recently used out:
it reports its bytes there as `POOL`, and gives entries back, oldest first, when a running answer
needs the room. `PrefixPool(None)`, or a budget without a cap (`--cache-mb 0`), keeps nothing.

- `start(prompt) -> (cache, keep, source)`: a new cache holding the first `keep` tokens of
  `prompt`, copied from the entry that holds the longest reusable prefix
  (`PrefixCache.reusable_prefix`: never splitting an image, never trusting an image whose content
  changed, always leaving a token to run); or an empty cache and 0. The entry itself is never
  handed out, so what one answer does to its cache cannot change another's. `source` is that
  entry's key when `prompt` continues its conversation (holds all of the entry's prompt: a chat's
  next turn), else None.
- `keep(entry, prompt_tokens, replaces)`: store a finished answer's cache (its `prompt_tokens`
  prompt tokens then its answer's, no padding) in place of the entry with key `replaces` and of
  the entries whose tokens and images it extends, so a chat holds one entry, not one per turn.
  Chats that only share a beginning (the prompt format, a system prompt) keep their own entries.
- `PrefixPool(budget, history=True)` is a chat's own history (engine/local.py), `HISTORY` in the budget:
  one entry, kept whatever the budget's cap (`--cache-mb 0` included), given back when a running answer
  needs the room. Only its own next turn continues it, so `start` hands the entry over instead of
  copying it (its first `keep` columns) and empties the pool: a chat never holds its conversation twice.
- Scopes (`use_scope(scope)` before `start`): an entry is reused only by prompts of the scope that
  made it (`llava serve`: the API key and the request's `cache_salt`), so cached tokens and timing
  never tell one client what another sent. `source` is opaque: it carries the scope to `keep`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from llava_cli.engine.kvbudget import HISTORY, POOL, KvBudget
from llava_cli.engine.kvrows import nbytes, new_cache, prefix_of
from llava_cli.engine.runner import PrefixCache, Prompt


@dataclass
class Held:
    entry: PrefixCache
    size: int  # bytes
    prompt_tokens: int  # the entry's tokens that were its prompt; the rest were its answer
    scope: str = ""  # who may reuse it (see use_scope)


class PrefixPool:
    def __init__(self, budget: KvBudget | None, history: bool = False) -> None:
        """`history`: a chat's own history, not serve's pool (the module docstring)."""
        self.budget = budget
        self.history = history
        self.entries: dict[int, Held] = {}  # by key, least recently used first
        self.keys = (
            itertools.count()
        )  # a key, not the entry, names a source: an answer must not keep an evicted cache alive
        self.scope = ""  # of the next `start`
        if budget is not None:
            budget.evictable(self.holder, self.evict)

    @property
    def holder(self) -> str:
        """The name its bytes have in the budget."""
        return HISTORY if self.history else POOL

    @property
    def keeps(self) -> bool:
        """Whether this pool keeps anything: a chat's history, or serve's pool under a capped budget."""
        return self.budget is not None and (self.budget.limit_bytes is not None or self.history)

    def use_scope(self, scope: str) -> None:
        self.scope = scope

    @property
    def held_bytes(self) -> int:
        return sum(held.size for held in self.entries.values())

    def start(self, prompt: Prompt) -> tuple[Any, int, tuple[str, int | None]]:
        best, keep = None, 0
        for key, held in self.entries.items():
            if held.scope == self.scope and (reusable := held.entry.reusable_prefix(prompt)) > keep:
                best, keep = key, reusable
        if self.history:
            return self.hand_over(best, keep)
        if best is None:
            return new_cache(), 0, (self.scope, None)
        held = self.entries[best] = self.entries.pop(best)  # now the most recently used
        return prefix_of(held.entry.kv, keep), keep, (self.scope, best if keep >= held.prompt_tokens else None)

    def hand_over(self, best: int | None, keep: int) -> tuple[Any, int, tuple[str, int | None]]:
        """A history's `start`: the entry's first `keep` columns themselves (views: the prefill's writes make
        new tensors), and the pool emptied, since the answer's own cache replaces whatever it held."""
        held = self.entries.get(best) if best is not None else None
        self.clear()
        if held is None:
            return new_cache(), 0, (self.scope, None)
        kv = new_cache([(layer.keys[:, :, :keep], layer.values[:, :, :keep]) for layer in held.entry.kv.layers])
        return kv, keep, (self.scope, None)

    def keep(self, entry: PrefixCache, prompt_tokens: int, source: tuple[str, int | None] | None = None) -> None:
        if not self.keeps:
            return
        size = nbytes(entry.kv)
        if size > self.room():  # more than the running answers leave it: not kept, nothing evicted for it
            return
        scope, replaces = source or ("", None)
        self.entries = {
            key: held
            for key, held in self.entries.items()
            if key != replaces and not (held.scope == scope and extends(entry, held.entry))
        }
        self.entries[next(self.keys)] = Held(entry, size, prompt_tokens, scope)
        while self.history and len(self.entries) > 1:
            del self.entries[next(iter(self.entries))]
        self.within(self.room())

    def room(self) -> float:
        """What the budget leaves the pool (no cap: no bound); asked only while the pool keeps entries."""
        room = self.budget.room_for(self.holder) if self.budget is not None else 0
        return math.inf if room is None else room

    def evict(self, wanted: int) -> None:
        """Give back at least `wanted` bytes (the budget asks, for a running answer), least recently used first."""
        self.within(self.held_bytes - wanted)

    def within(self, room: float) -> None:
        """Drop the least recently used entries until the pool holds at most `room` bytes; report what it holds."""
        while self.entries and self.held_bytes > room:
            del self.entries[next(iter(self.entries))]
        self.report()

    def report(self) -> None:
        if self.budget is not None:
            self.budget.hold(self.holder, self.held_bytes)

    def clear(self) -> None:
        self.entries.clear()
        self.report()


def extends(new: PrefixCache, old: PrefixCache) -> bool:
    """Whether `new` holds all that `old` holds: its tokens and images first."""
    return new.ids[: len(old.ids)] == old.ids and new.images[: len(old.images)] == old.images
