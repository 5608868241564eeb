"""Batches of any structure: tensors, tuples, lists and dicts, nested.

The criteria never look inside a batch themselves; they move it to the model's device,
split it into micro-batches and hand it to the loss closure. These helpers define how.
A *leaf* is a tensor; containers are tuples, lists and mappings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

#: A training batch: a tensor, or tuples/lists/dicts of tensors (and other values), nested.
Batch = Any


def map_tensors(batch: Batch, fn: Any) -> Batch:
    """``batch`` with ``fn`` applied to every tensor (containers rebuilt, other values kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return (
            type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})
            if isinstance(batch, dict)
            else {k: map_tensors(v, fn) for k, v in batch.items()}
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_compute(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """Move every tensor to ``device``; floating tensors also to ``dtype`` (the model's)."""
    return map_tensors(batch, lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype))


def leaves(batch: Batch) -> list[torch.Tensor]:
    """Every tensor of ``batch``, in order."""
    out: list[torch.Tensor] = []
    map_tensors(batch, lambda t: out.append(t) or t)
    return out


def batch_size(batch: Batch) -> int | None:
    """Samples in ``batch``: the length of its top-level lists of per-sample items (see
    :func:`sample_lists`), else the common leading size of its tensors; None when it cannot be told."""
    samples = sample_lists(batch)
    if samples:
        return len(samples[0])
    sizes = {t.shape[0] for t in leaves(batch) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def sample_lists(batch: Batch) -> list[list]:
    """The top-level lists of ``batch`` that hold one item per sample.

    A list holding dicts (detection targets) is one, and so are the lists of the same length
    beside it (their images: ``(C, H, W)`` tensors, whose leading size is no sample count).
    Otherwise: the lists as long as the tensors' common leading size (e.g. names beside
    images), or, when the tensors' leading sizes disagree, the lists of one common length.
    """
    lists = [v for v in _top_items(batch) if isinstance(v, list) and v]
    keyed = {len(v) for v in lists if any(isinstance(i, Mapping) for i in v)}
    if len(keyed) != 1:
        sizes = {t.shape[0] for t in leaves(batch) if t.dim() > 0}
        keyed = sizes if len(sizes) == 1 else {len(v) for v in lists}
    return [v for v in lists if len(v) in keyed] if len(keyed) == 1 else []


def _top_items(batch: Batch) -> list[Any]:
    if isinstance(batch, Mapping):
        return list(batch.values())
    if isinstance(batch, (list, tuple)):
        return list(batch)
    return [batch]


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` split into ``parts`` micro-batches along its samples (``[batch]`` if it
    cannot be split: unknown size, or fewer than two samples per part)."""
    n = batch_size(batch)
    parts = max(1, min(parts, (n or 0) // 2))
    if parts == 1:
        return [batch]
    samples = {id(v) for v in sample_lists(batch)}
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [_slice(batch, lo, hi, n, samples) for lo, hi in zip(bounds, bounds[1:], strict=False)]


def _slice(batch: Batch, lo: int, hi: int, n: int, samples: set[int]) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() > 0 and batch.shape[0] == n else batch
    if id(batch) in samples:
        return batch[lo:hi]  # a list of per-sample items
    if isinstance(batch, Mapping):
        return {k: _slice(v, lo, hi, n, samples) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, lo, hi, n, samples) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, lo, hi, n, samples) for v in batch)
    return batch
