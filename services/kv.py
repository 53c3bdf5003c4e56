"""Row operations on transformers' DynamicCache, so many sequences can share one batched step.

Rows are right-aligned (left padding masked out); a row's share of a sliding-window layer is
its last `min(length, columns)` columns. Slicing a row out returns views; stacking copies.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def _with_tensors(layer, keys: torch.Tensor, values: torch.Tensor, length: int):
    new = copy.copy(layer)  # keeps the layer's type and settings (sliding window, dtype, device)
    new.keys, new.values = keys, values
    if hasattr(new, "cumulative_length"):
        new.cumulative_length = length
    return new


def _cache_of(layers: list) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    if hasattr(cache, "layer_class_to_replicate"):
        cache.layer_class_to_replicate = None  # all layers exist already; never append new ones
    return cache


def slice_row(cache: DynamicCache, row: int, length: int) -> DynamicCache:
    """A batch-1 cache holding row `row` of a batched cache (views, no copy)."""
    layers = []
    for layer in cache.layers:
        n = min(length, layer.keys.shape[-2])
        layers.append(
            _with_tensors(
                layer,
                layer.keys[row : row + 1, :, layer.keys.shape[-2] - n :, :],
                layer.values[row : row + 1, :, layer.values.shape[-2] - n :, :],
                length,
            )
        )
    return _cache_of(layers)


def _left_pad(t: torch.Tensor, columns: int) -> torch.Tensor:
    missing = columns - t.shape[-2]
    if missing == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3])
    return torch.cat([pad, t], dim=-2)


def stack_rows(caches: list[DynamicCache], lengths: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """One right-aligned batched cache from batch-1 caches, and its 2D attention mask."""
    columns = max(lengths)
    layers = []
    for per_row in zip(*(c.layers for c in caches), strict=True):
        width = max(layer.keys.shape[-2] for layer in per_row)
        keys = torch.cat([_left_pad(layer.keys, width) for layer in per_row], dim=0)
        values = torch.cat([_left_pad(layer.values, width) for layer in per_row], dim=0)
        layers.append(_with_tensors(per_row[0], keys, values, columns))
    mask = torch.zeros(len(caches), columns, dtype=torch.long, device=keys.device)
    for row, length in enumerate(lengths):
        mask[row, columns - length :] = 1
    return _cache_of(layers), mask


def expand_row(cache: DynamicCache, k: int) -> DynamicCache:
    """k copies of a batch-1 cache as expanded views: the stored cache is never written."""
    return _cache_of(
        [
            _with_tensors(
                layer,
                layer.keys.expand(k, -1, -1, -1),
                layer.values.expand(k, -1, -1, -1),
                getattr(layer, "cumulative_length", layer.keys.shape[-2]),
            )
            for layer in cache.layers
        ]
    )


def checkpoint(cache: DynamicCache) -> list[tuple]:
    """What a forward pass changes in a cache: each layer's tensors and length (references).

    Layers replace their tensors on update (`torch.cat`), never write them in place, so
    keeping the references is enough to undo a forward that failed halfway through.
    """
    return [
        (layer, getattr(layer, "is_initialized", None), layer.keys, layer.values,
         getattr(layer, "cumulative_length", None))
        for layer in cache.layers
    ]


def rollback(cache: DynamicCache, saved: list[tuple]) -> None:
    """Put a cache back as it was at `checkpoint` (layers added since are dropped)."""
    cache.layers = [layer for layer, *_ in saved]
    for layer, initialized, keys, values, length in saved:
        layer.keys, layer.values = keys, values
        if initialized is not None:
            layer.is_initialized = initialized
        if length is not None:
            layer.cumulative_length = length
