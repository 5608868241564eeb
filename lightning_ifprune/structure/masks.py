"""Channel masks (spec §1): one scalar per group channel, applied where the channel is consumed.

:func:`channel_masks` puts real masks into a forward pass (hooks on the consumers);
:class:`MaskSpace` is the same map written on the consuming weights, ``E`` and ``Eᵀ``
between mask vectors and weight-shaped tensors, which is what the estimator computes with.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_ifprune.structure.attention import out_proj_mask_hooks
from lightning_ifprune.structure.groups import ConsumerSlot
from lightning_ifprune.structure.ops import CONV_TYPES, is_depthwise

if TYPE_CHECKING:
    from lightning_ifprune.structure.channels import ChannelStructure

#: Group name → one tensor per group (a leading probe dimension where stated).
MaskVec = dict[str, torch.Tensor]


@contextmanager
def channel_masks(structure: ChannelStructure, masks: MaskVec | None = None) -> Iterator[MaskVec]:
    """Multiply every group channel by a mask where it is consumed.

    Yields the mask dictionary (group name → 1-D tensor, ones by default). The hooks read
    the dictionary at call time, so its entries may be swapped for other tensors (e.g. ones
    that require grad) inside the ``with`` block. Nothing is copied; on exit the hooks are
    removed and the model is exactly as before.
    """
    model = structure.model
    ref = next(model.parameters())
    if masks is None:
        masks = {n: torch.ones(g.size, dtype=ref.dtype, device=ref.device) for n, g in structure.groups.items()}
    by_module: dict[str, list[tuple[str, ConsumerSlot]]] = {}
    for gname, group in structure.groups.items():
        for slot in group.consumers:
            by_module.setdefault(slot.module, []).append((gname, slot))

    def make_hook(entries: list[tuple[str, ConsumerSlot]], is_conv: bool):
        def hook(_module, args):
            x = args[0]
            width = x.shape[1] if is_conv else x.shape[-1]
            scale = torch.ones(width, dtype=x.dtype, device=x.device)
            for gname, slot in entries:
                m = masks[gname].to(x.dtype)
                scale = scale.index_put((slot.positions.to(x.device),), m[slot.channels.to(x.device)])
            if is_conv:
                scale = scale.view(1, -1, *([1] * (x.dim() - 2)))
            return (x * scale, *args[1:])

        return hook

    def make_scale(entries: list[tuple[str, ConsumerSlot]]):
        hook = make_hook(entries, is_conv=False)
        return lambda weight: hook(None, (torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device),))[0]

    handles = []
    try:
        for mname, entries in by_module.items():
            module = model.get_submodule(mname)
            attention = structure.heads.get(mname.rpartition(".")[0])
            if attention is not None and attention.packed and attention.out == mname:
                handles.extend(out_proj_mask_hooks(model.get_submodule(attention.module), make_scale(entries)))
                continue
            handles.append(module.register_forward_pre_hook(make_hook(entries, isinstance(module, CONV_TYPES))))
        yield masks
    finally:
        for h in handles:
            h.remove()


class MaskSpace:
    """The expansion ``E`` between mask space and the consuming weights of a structure.

    ``params`` are the weights taking part (usually the trainable ones); consumers whose
    weight is not among them are left out of ``E``.
    """

    def __init__(self, structure: ChannelStructure, params: Mapping[str, nn.Parameter]) -> None:
        self.sizes = {n: g.size for n, g in structure.groups.items()}
        self.slots = []  # (group, param name, positions, channels, depthwise)
        for gname, group in structure.groups.items():
            for slot in group.consumers:
                module = structure.model.get_submodule(slot.module)
                pname = f"{slot.module}.weight" if slot.module else "weight"
                if pname not in params:
                    continue
                self.slots.append((gname, pname, slot.positions, slot.channels, is_depthwise(module)))

    def expand(self, v: MaskVec, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``E v``: mask vectors with a leading probe dim → weight-space tensors (same lead)."""
        out = {}
        for gname, pname, pos, ch, depthwise in self.slots:
            w = like[pname]
            vals = v[gname][..., ch.to(w.device)]  # (…, P)
            if pname not in out:
                out[pname] = torch.zeros((vals.shape[0], *w.shape), dtype=w.dtype, device=w.device)
            t = out[pname]
            dim = 1 if depthwise else 2
            extra = w.dim() - (1 if depthwise else 2)
            if depthwise:
                view = vals.reshape(*vals.shape[:-1], -1, *([1] * (w.dim() - 1)))
            else:
                view = vals.reshape(*vals.shape[:-1], 1, -1, *([1] * extra))
            t.index_add_(
                dim,
                pos.to(w.device),
                view.expand(*t.shape[:dim], len(pos), *t.shape[dim + 1 :]).to(w.dtype),
            )
        return out

    def reduce(self, t: Mapping[str, torch.Tensor], dtype: torch.dtype) -> MaskVec:
        """``Eᵀ t``: weight-space tensors with a leading probe dim → mask vectors (same lead)."""
        lead = next(iter(t.values()))
        out: MaskVec = {
            g: torch.zeros(lead.shape[0], n, dtype=dtype, device=lead.device) for g, n in self.sizes.items()
        }
        for gname, pname, pos, ch, depthwise in self.slots:
            if pname not in t:
                continue
            x = t[pname]
            dim = 1 if depthwise else 2
            cols = x.index_select(dim, pos.to(x.device)).movedim(dim, -1)  # (K, rest…, P)
            summed = cols.flatten(1, -2).sum(1)  # (K, P)
            acc = out[gname]
            acc.index_add_(acc.dim() - 1, ch.to(x.device), summed.to(dtype))
        return out
