"""KV caches the way the scheduler and the prefix pool need them, beyond what transformers offers.

A one-row cache (a prefill's, a pool entry's) is a transformers `DynamicCache` whose every layer holds
keys and values of shape `[rows, heads, columns, head_dim]`, every layer keeping every column (made
with `new_cache()`: no sliding-window layers, which would drop columns and break the column
bookkeeping below):

- `prefix_of(cache, columns)`: a new cache holding the first `columns` columns (copied);
- `nbytes(cache)`: the bytes its tensors hold.

The decode batch's cache is `Slots` (issue 21): keys and values preallocated for a bucket of rows
and of columns, which a step writes in place (`SlotLayer`: no per-step `torch.cat` of the whole
cache, which made a dynamic-cache batch step grow with rows x columns); a row joins by one copy of
its prefill into a free slot (`put`), leaves by one row copy (`move`), and `shift` moves every row's
columns when a longer row joins or padding no row needs is dropped. See `Slots` for the layout.

Functions that build a new cache leave their inputs as they were, even when they fail halfway (out
of memory): nothing is assigned until every layer is built. Call them under `torch.inference_mode()`,
like the forwards that filled the cache.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


def new_cache(layers: Sequence[tuple[Any, Any]] = ()) -> Any:
    """An empty cache (its layers made as the forward fills them), or one holding `layers`' (keys, values)
    as they are: transformers' own constructor would copy each tensor once more."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def columns(cache: Any) -> int:
    return cache.get_seq_length()


def prefix_of(cache: Any, count: int) -> Any:
    return new_cache([(layer.keys[:, :, :count].clone(), layer.values[:, :, :count].clone()) for layer in cache.layers])


def nbytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


class SlotView:
    """What one decode step over `Slots` sees, set by the scheduler before each step: `rows` rows from
    row `first` (0 but for a row's step alone, after running out of memory) and `visible` columns of every layer, the new token written at column `width` (a Python int),
    or at the device tensor `column` when the step is captured (its shapes fixed, its column not)."""

    def __init__(self) -> None:
        self.first = 0
        self.rows = 0
        self.visible = 0
        self.width = 0
        self.column: Any = None


@functools.cache
def slot_layer_class() -> type:
    """`SlotLayer`, made on first use: transformers is imported lazily."""
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One decoder layer's preallocated keys and values: a step writes its token's in place, no copy of the rest."""

        is_sliding = False
        is_compileable = False

        def __init__(self, keys: Any, values: Any, view: SlotView) -> None:
            super().__init__()
            self.keys: Any = keys  # CacheLayerMixin types them Optional: a slot's are always there
            self.values: Any = values
            self.view = view
            self.device, self.is_initialized = keys.device, True

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            pass

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            view = self.view
            rows = slice(view.first, view.first + view.rows)
            keys, values = self.keys[rows, :, : view.visible], self.values[rows, :, : view.visible]
            if view.column is not None:
                keys.index_copy_(2, view.column, key_states)
                values.index_copy_(2, view.column, value_states)
            else:
                keys[:, :, view.width : view.width + key_states.shape[2]].copy_(key_states)
                values[:, :, view.width : view.width + value_states.shape[2]].copy_(value_states)
            return keys, values

        def get_seq_length(self) -> Any:
            return self.view.column if self.view.column is not None else self.view.width

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.view.visible, 0

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    return SlotLayer


class Slots:
    """Preallocated keys and values for up to `capacity_rows` rows of `capacity_columns` columns, every
    layer `[rows, heads, columns, head_dim]`: the scheduler's static batch cache (engine/scheduler.py).

    The scheduler keeps its live rows in rows 0..n-1 and every row flush right at one write column
    (`width`): a row of length L holds columns width-L..width-1, the columns before it are zeros that
    the attention mask hides. Every method copies on the device; `grown` builds before it is assigned,
    so running out of memory leaves the slots as they were."""

    def __init__(self, layers: list[tuple[Any, Any]]) -> None:
        self.layers = layers
        self.view = SlotView()
        layer_class = slot_layer_class()
        from transformers.cache_utils import Cache

        self.cache = Cache(layers=[layer_class(keys, values, self.view) for keys, values in layers])

    @classmethod
    def like(cls, cache: Any, rows: int, columns: int) -> Slots:
        """Empty slots shaped as the layers of `cache` (a one-row `DynamicCache`)."""
        import torch

        def empty(tensor: Any) -> Any:
            return torch.zeros(
                (rows, tensor.shape[1], columns, tensor.shape[3]), dtype=tensor.dtype, device=tensor.device
            )

        return cls([(empty(layer.keys), empty(layer.values)) for layer in cache.layers])

    @property
    def capacity_rows(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def capacity_columns(self) -> int:
        return self.layers[0][0].shape[2]

    def grown(self, rows: int, columns: int, live: int, width: int) -> Slots:
        """New slots of `rows` x `columns` holding the `live` rows' first `width` columns."""
        bigger = Slots.like(new_cache([(keys[:1], values[:1]) for keys, values in self.layers]), rows, columns)
        for (old_keys, old_values), (keys, values) in zip(self.layers, bigger.layers):
            keys[:live, :, :width].copy_(old_keys[:live, :, :width])
            values[:live, :, :width].copy_(old_values[:live, :, :width])
        return bigger

    def put(self, slot: int, cache: Any, width: int) -> None:
        """Row `slot` := the one-row `cache`, flush right at `width`, zeros elsewhere: no stale (maybe
        not finite) values under the mask, where 0 x NaN would still be NaN."""
        count = columns(cache)
        for (keys, values), layer in zip(self.layers, cache.layers):
            for target, source in ((keys, layer.keys), (values, layer.values)):
                target[slot].zero_()
                target[slot, :, width - count : width].copy_(source[0])

    def move(self, source: int, target: int) -> None:
        """Row `target` := row `source`, every column."""
        for keys, values in self.layers:
            keys[target].copy_(keys[source])
            values[target].copy_(values[source])

    def shift(self, live: int, width: int, by: int) -> None:
        """Move the `live` rows' first `width` columns `by` columns right (negative: left, dropping the first ones);
        columns opened on the left are zeroed."""
        for keys, values in self.layers:
            for tensor in (keys, values):
                rows = tensor[:live]
                if by > 0:
                    rows[:, :, by : by + width].copy_(rows[:, :, :width].clone())
                    rows[:, :, :by].zero_()
                else:
                    rows[:, :, : width + by].copy_(rows[:, :, -by:width].clone())

    def row(self, slot: int, start: int, stop: int) -> Any:
        """A new one-row `DynamicCache` holding row `slot`'s columns start..stop-1 (copied)."""
        return new_cache(
            [
                (keys[slot : slot + 1, :, start:stop].clone(), values[slot : slot + 1, :, start:stop].clone())
                for keys, values in self.layers
            ]
        )
