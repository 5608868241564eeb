"""Keep an optimizer going across a surgery: same object, new parameters, state sliced alike.

After :func:`~lightning_ifprune.surgery.prune_channels` the pruned layers hold new parameter
objects. :func:`repoint_optimizer` swaps them into the optimizer's param groups and slices
every per-parameter state tensor shaped like the old parameter (momentum, Adam moments) to
the kept entries, so training continues as if the removed channels had never existed.
Works with any ``torch.optim.Optimizer``; nothing here needs Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.optim import Optimizer

from lightning_ifprune.surgery import SurgeryResult


def slice_like(tensor: torch.Tensor, removed: Mapping[int, Sequence[int]]) -> torch.Tensor:
    """``tensor`` with the entries listed in ``removed`` ({dim: indices}) dropped."""
    for dim, idxs in removed.items():
        drop = set(idxs)
        keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in drop], device=tensor.device)
        tensor = tensor.index_select(dim, keep)
    return tensor


def repoint_optimizer(optimizer: Optimizer, result: SurgeryResult) -> None:
    """Point ``optimizer`` at the parameters ``result`` replaced; slice their state to match."""
    by_id = {id(old): (name, new) for name, (old, new) in result.replaced.items()}
    for group in optimizer.param_groups:
        for j, p in enumerate(group["params"]):
            if id(p) not in by_id:
                continue
            name, replacement = by_id[id(p)]
            state = optimizer.state.pop(p, None)
            if state is not None:
                removed = result.slices.get(name, {})
                optimizer.state[replacement] = {
                    k: slice_like(v, removed)
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0
                    else v
                    for k, v in state.items()
                }
            group["params"][j] = replacement
