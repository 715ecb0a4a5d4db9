"""One memory budget for the KV cache of the whole process: `--cache-mb`.

Every holder of KV memory reports to one `KvBudget` (an engine owns it: `Engine.budget`):

- `hold(holder, nbytes)`: what `holder` holds (or has reserved) now; 0 frees it. Holders are named
  once here: `CHAT` (the row of ask's and chat's batch of one), `HISTORY` (the conversation cache
  chat keeps for its next turn), `BATCH` (the running batch's rows: serve, ask --each), `POOL`
  (serve's prefix pool of recent answers).
- `make_room(holder, nbytes) -> bool`: whether `holder` may hold `nbytes` (in place of what it
  holds now). When the others leave too little, the evictable holders (`evictable(holder, free)`:
  the pools, least recently used entries first) are asked to give back what is missing; a running
  answer's own memory is never taken. False: it does not fit even then, and nothing is reserved.
  `could_hold(holder, nbytes)`: whether it would fit once every evictable holder had given back all.
- `limit_bytes`: the cap; None when `--cache-mb 0` (device memory is the only bound, and no
  cache is kept for reuse between requests).

A running answer reserves its worst case up front (every row of the batch at the length of its
longest possible answer, `kv_bytes_per_token` each), so an admitted row never runs out of budget
midway: admission waits for room, or fails the request with one line when a row cannot fit alone.
Transient copies (a prefill merged into the batch) are not counted: the budget bounds what is held.

`budget_for(cache_mb, device)`: the cap `--cache-mb` asks for; by default (None) GPU_MEMORY_SHARE
of the GPU's free memory after loading, or CPU_MEMORY_SHARE of the RAM on a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

CHAT, BATCH, POOL, HISTORY = "chat", "batch", "pool", "history"
GPU_MEMORY_SHARE = 0.8  # of the free memory after loading; the rest for activations (prefill, logits) and the allocator
CPU_MEMORY_SHARE = 0.25  # of the RAM: the weights, the images and the other processes need the rest
FALLBACK_BYTES = 1024 * 2**20  # where the RAM cannot be read


class KvBudget:
    """The accountant of KV-cache bytes: every holder reports here, and asks before it grows."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self.held: dict[str, int] = {}
        self.evictors: dict[str, Callable[[int], None]] = {}

    @property
    def used(self) -> int:
        return sum(self.held.values())

    def hold(self, holder: str, nbytes: int) -> None:
        self.held[holder] = nbytes

    def evictable(self, holder: str, free: Callable[[int], None]) -> None:
        """Register `holder`'s `free(nbytes)`: give back at least `nbytes` if it can (least recently used first)."""
        self.evictors[holder] = free

    def room_for(self, holder: str) -> int | None:
        """Bytes `holder` may hold now without evicting anything; None: no cap."""
        if self.limit_bytes is None:
            return None
        return self.limit_bytes - (self.used - self.held.get(holder, 0))

    def make_room(self, holder: str, nbytes: int) -> bool:
        """Whether `holder` may hold `nbytes`, evicting what the evictable holders can give back (module docstring)."""
        room = self.room_for(holder)
        for free in self.evictors.values():
            if room is None or nbytes <= room:
                return True
            free(nbytes - room)
            room = self.room_for(holder)
        return room is None or nbytes <= room

    def could_hold(self, holder: str, nbytes: int) -> bool:
        """Whether `holder` could hold `nbytes` once every evictable holder had given back all it holds."""
        if self.limit_bytes is None:
            return True
        fixed = sum(size for name, size in self.held.items() if name != holder and name not in self.evictors)
        return nbytes <= self.limit_bytes - fixed


class Full(Exception):
    """No room in the budget for one more row until a running one leaves: wait, then admit again."""


def budget_for(cache_mb: int | None, device: str) -> KvBudget:
    """The budget `--cache-mb` asks for on `device` (module docstring); call it after loading the model."""
    if cache_mb is not None:
        return KvBudget(cache_mb * 2**20 if cache_mb else None)
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return KvBudget(int(free * GPU_MEMORY_SHARE))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return KvBudget(FALLBACK_BYTES)
    return KvBudget(int(ram * CPU_MEMORY_SHARE))


def kv_bytes_per_token(model: Any) -> int:
    """Keys and values of one token in every decoder layer, in the model's dtype."""
    text = model.config.text_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * model.dtype.itemsize


def over_budget(nbytes: int, budget: KvBudget) -> str:
    """The one-line refusal of an answer whose cache cannot fit the budget even alone."""
    return (
        f"this answer needs {nbytes / 2**20:.1f} MB of KV cache but --cache-mb allows {(budget.limit_bytes or 0) / 2**20:.1f} MB; "
        "raise --cache-mb, lower --max-new-tokens or --max-context, or send a shorter prompt"
    )
