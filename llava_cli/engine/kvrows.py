"""Row and column operations on a `DynamicCache` that transformers does not offer: the batch's cache surgery.

A cache here is a transformers `DynamicCache` whose every layer holds keys and values of shape
`[rows, heads, columns, head_dim]`, every layer keeping every column (made with `new_cache()`: no
sliding-window layers, which would drop columns and break the column bookkeeping below).
Selecting rows is transformers' own `batch_select_indices`; what it lacks is here:

- `rows_of(cache, row, start)`: a new one-row cache holding row `row`'s columns from `start` on (copied);
- `prefix_of(cache, columns)`: a new cache holding the first `columns` columns (copied);
- `merged(left, right)`: a new cache with `right`'s rows under `left`'s, the shorter one padded on
  the left with zero columns (the attention mask hides them), so each row keeps its columns flush right;
- `drop_left(cache, columns)`: the first `columns` columns dropped, in place (copied, so the
  memory they held is freed);
- `keep_columns(cache, columns)`: every layer cut back to its first `columns` columns, in place
  (after a forward that failed halfway and grew only some layers);
- `nbytes(cache)`: the bytes its tensors hold (dynamic or static layers).

Functions that build a new cache leave their inputs as they were, even when they fail halfway (out
of memory): nothing is assigned until every layer is built. Call them under `torch.inference_mode()`,
like the forwards that filled the cache.
"""

from __future__ import annotations

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


def rows_of(cache: Any, row: int, start: int) -> Any:
    return new_cache(
        [
            (layer.keys[row : row + 1, :, start:].clone(), layer.values[row : row + 1, :, start:].clone())
            for layer in cache.layers
        ]
    )


def prefix_of(cache: Any, count: int) -> Any:
    return new_cache([(layer.keys[:, :, :count].clone(), layer.values[:, :, :count].clone()) for layer in cache.layers])


def merged(left: Any, right: Any) -> Any:
    import torch

    width = max(columns(left), columns(right))
    return new_cache(
        [
            (
                torch.cat([padded(upper.keys, width), padded(lower.keys, width)]),
                torch.cat([padded(upper.values, width), padded(lower.values, width)]),
            )
            for upper, lower in zip(left.layers, right.layers, strict=True)
        ]
    )


def padded(tensor: Any, width: int) -> Any:
    """`tensor` with zero columns before its own, `width` columns in all."""
    import torch.nn.functional as F

    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def drop_left(cache: Any, count: int) -> None:
    kept = [(layer.keys[:, :, count:].clone(), layer.values[:, :, count:].clone()) for layer in cache.layers]
    for layer, (keys, values) in zip(cache.layers, kept):
        layer.keys, layer.values = keys, values


def keep_columns(cache: Any, count: int) -> None:
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.shape[-2] > count:
            layer.keys, layer.values = layer.keys[:, :, :count], layer.values[:, :, :count]


def nbytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)
