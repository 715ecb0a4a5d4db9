"""`llava serve`'s prefix caches: the KV caches of recent answers, for clients that resend a growing history.

Contract: `PrefixPool(budget_bytes)` holds entries, each a one-row cache (kvrows.py) with exactly
the token ids and image keys it holds (engine.py's `PrefixCache`), within `budget_bytes` (the
`--cache-mb` budget; 0 keeps nothing), least recently used out.

- `start(prompt) -> (cache, keep)`: a new cache holding the first `keep` tokens of `prompt`, copied
  from the entry that holds the longest reusable prefix (`PrefixCache.reusable_prefix`: never
  splitting an image, never trusting an image whose content changed, always leaving a token to
  run), or an empty cache and 0. The entry itself is never handed out, so what one answer does to
  its cache cannot change another's.
- `keep(entry)`: store a finished answer's cache (prompt and answer tokens, no padding); entries
  whose tokens and images it extends are dropped (it serves every prompt they served, further).
"""

from __future__ import annotations

from typing import Any

from llava_cli.engine import Prompt, PrefixCache
from llava_cli.kvrows import nbytes, new_cache, prefix_of


class PrefixPool:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.entries: list[tuple[PrefixCache, int]] = []  # (entry, its bytes), least recently used first

    @property
    def held_bytes(self) -> int:
        return sum(size for _, size in self.entries)

    def start(self, prompt: Prompt) -> tuple[Any, int]:
        best, keep = None, 0
        for place, (entry, _) in enumerate(self.entries):
            if (reusable := entry.reusable_prefix(prompt)) > keep:
                best, keep = place, reusable
        if best is None:
            return new_cache(), 0
        self.entries.append(self.entries.pop(best))  # now the most recently used
        return prefix_of(self.entries[-1][0].kv, keep), keep

    def keep(self, entry: PrefixCache) -> None:
        size = nbytes(entry.kv)
        if size > self.budget_bytes:
            return
        self.entries = [(old, old_size) for old, old_size in self.entries if not extends(entry, old)]
        self.entries.append((entry, size))
        while self.held_bytes > self.budget_bytes:
            del self.entries[0]

    def clear(self) -> None:
        self.entries.clear()


def extends(new: PrefixCache, old: PrefixCache) -> bool:
    """Whether `new` holds all that `old` holds: its tokens and images first."""
    return new.ids[: len(old.ids)] == old.ids and new.images[: len(old.images)] == old.images
