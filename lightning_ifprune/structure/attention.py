"""Attention heads as channel groups (spec §10): one channel per whole head.

A head owns ``head_dim`` rows of each of the packed query, key and value projections and the
same ``head_dim`` input columns of the output projection; removing it leaves the other heads'
outputs unchanged, so masking the head's columns where the output projection reads them is
the same as removing it. Recognised layers: ``nn.MultiheadAttention`` with packed projections
(torchvision's ViT) and timm's ``Attention`` (``qkv``/``proj`` Linears). The embedding width is
not a head channel and stays. Torch-Pruning does not see heads; they are read and removed here.

``nn.MultiheadAttention`` cannot run with fewer heads than ``embed_dim / head_dim``, so a pruned
one becomes a :class:`PrunedMultiheadAttention` (same parameters, same math, fewer heads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ifprune.structure.groups import ChannelGroup, ConsumerSlot, CostCoef


@dataclass(frozen=True)
class AttentionHeads:
    """The head layout of one attention layer; its group is named after the layer."""

    module: str
    heads: int
    head_dim: int
    qkv: str  # module holding the packed q, k, v rows: the MHA itself, or timm's ``qkv`` Linear
    out: str  # the output projection (Linear)

    @property
    def packed(self) -> bool:
        """``nn.MultiheadAttention`` (``in_proj_weight``) rather than a ``qkv`` Linear."""
        return self.qkv == self.module

    def rows(self, heads: Sequence[int]) -> list[int]:
        """Rows of the packed q, k, v projection that belong to ``heads``."""
        width = self.heads * self.head_dim
        return [b * width + h * self.head_dim + i for b in range(3) for h in heads for i in range(self.head_dim)]

    def cols(self, heads: Sequence[int]) -> list[int]:
        """Input columns of the output projection that belong to ``heads``."""
        return [h * self.head_dim + i for h in heads for i in range(self.head_dim)]

    def group(self, min_keep: int) -> ChannelGroup:
        """The head group: one channel per head, consumed by the output projection's columns.

        It lists no producer layer (a head is ``3·head_dim`` rows of the packed projection, not one).
        """
        positions = torch.arange(self.heads * self.head_dim)
        slot = ConsumerSlot(self.out, positions, positions // self.head_dim)
        return ChannelGroup(self.module, self.heads, (), (), (slot,), min(min_keep, self.heads))

    def coefs(self) -> list[CostCoef]:
        """Cost coefficients: ``3·head_dim`` q/k/v outputs and ``head_dim`` output-projection inputs per head."""
        return [(self.module, self.qkv, "out", 3 * self.head_dim), (self.module, self.out, "in", self.head_dim)]


def _mha_heads(name: str, m: nn.MultiheadAttention) -> AttentionHeads | None:
    """Heads of a packed-projection ``nn.MultiheadAttention`` without key/value biases or zero attention."""
    if not m._qkv_same_embed_dim or m.in_proj_weight is None or m.bias_k is not None or m.add_zero_attn:
        return None
    head_dim = getattr(m, "head_dim", m.embed_dim // m.num_heads)
    if m.in_proj_weight.shape[0] != 3 * m.num_heads * head_dim:
        return None
    return AttentionHeads(name, m.num_heads, head_dim, name, f"{name}.out_proj" if name else "out_proj")


def _timm_heads(name: str, m: nn.Module) -> AttentionHeads | None:
    """Heads of timm's ``Attention`` (no gate, no norm over the concatenated heads)."""
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    heads, head_dim, width = (getattr(m, a, None) for a in ("num_heads", "head_dim", "attn_dim"))
    if not (type(m).__module__.startswith("timm.") and type(m).__name__ == "Attention"):
        return None
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)):
        return None
    if getattr(m, "gate", None) is not None or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return None
    if width != heads * head_dim or qkv.out_features != 3 * width or proj.in_features != width:
        return None
    prefix = f"{name}." if name else ""
    return AttentionHeads(name, heads, head_dim, f"{prefix}qkv", f"{prefix}proj")


def find_attention(model: nn.Module, reached: set[nn.Module]) -> dict[str, AttentionHeads]:
    """The recognised attention layers a forward pass reaches, by qualified name."""
    out = {}
    for name, m in model.named_modules():
        if m not in reached:
            continue
        found = _mha_heads(name, m) if isinstance(m, nn.MultiheadAttention) else _timm_heads(name, m)
        if found is not None and found.heads > 0:
            out[name] = found
    return out


def out_proj_mask_hooks(mha: nn.MultiheadAttention, scale: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Hooks that multiply the output projection's input columns by ``scale(weight)`` during each
    forward of ``mha`` (its ``out_proj`` is read as a weight, never called). Returns the handles;
    removing them restores the weight."""
    out = mha.out_proj

    def restore() -> None:
        out.__dict__.pop("weight", None)

    def pre(_module, _args) -> None:
        # An instance attribute shadows the registered parameter for this forward only: the
        # parameter stays in ``_parameters`` (same object, same order).
        weight = out._parameters["weight"]
        out.__dict__["weight"] = weight * scale(weight).view(1, -1)

    def post(_module, _args, _output) -> None:
        restore()

    class Restoring:
        def __init__(self, handles: list) -> None:
            self.handles = handles

        def remove(self) -> None:
            for h in self.handles:
                h.remove()
            restore()

    return [Restoring([mha.register_forward_pre_hook(pre), mha.register_forward_hook(post)])]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with fewer heads than ``embed_dim / head_dim`` (packed q, k, v).

    Same parameters and the same math per head (scale ``head_dim ** -0.5``); per-head 3-D
    ``attn_mask`` is not supported (a 2-D mask, a key padding mask and ``is_causal`` are).
    """

    def forward(  # noqa: D102 - nn.MultiheadAttention's signature
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if attn_mask is not None and attn_mask.dim() != 2:
            raise ValueError("PrunedMultiheadAttention supports a 2-D attn_mask only (its heads were pruned)")
        batched = query.dim() == 3
        q, k, v = (t if batched else t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        heads = [
            F.linear(t, wi, bi).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            for t, wi, bi in zip((q, k, v), w, b, strict=True)
        ]
        mask = _additive_mask(attn_mask, key_padding_mask, heads[0])
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = heads[0] @ heads[1].transpose(-2, -1) * self.head_dim**-0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores + torch.full(scores.shape[-2:], float("-inf"), device=scores.device).triu(1)
            attn = F.dropout(scores.softmax(-1), dropout, self.training)
            y = attn @ heads[2]
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            y = F.scaled_dot_product_attention(
                *heads, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
        y = F.linear(y.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            y = y.transpose(0, 1)
        if not batched:
            y = y.squeeze(1 if not self.batch_first else 0)
            weights = weights.squeeze(0) if weights is not None else None
        return y, weights


def _additive_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q: torch.Tensor
) -> torch.Tensor | None:
    """One float mask ``(B | 1, 1, L, S)`` from a 2-D attention mask and a key padding mask (True: masked)."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf"))
        return m.to(q.dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask).view(1, 1, *attn_mask.shape)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(key_padding_mask.shape[0], 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


def head_slices(layout: AttentionHeads, heads: Sequence[int]) -> dict[str, dict[int, list[int]]]:
    """Which entries of each parameter removing ``heads`` takes: ``{param name: {dim: indices}}``."""
    rows, cols = layout.rows(heads), layout.cols(heads)
    prefix = f"{layout.qkv}." if layout.qkv else ""
    weight, bias = ("in_proj_weight", "in_proj_bias") if layout.packed else ("weight", "bias")
    return {f"{prefix}{weight}": {0: rows}, f"{prefix}{bias}": {0: rows}, f"{layout.out}.weight": {1: cols}}


def remove_heads(model: nn.Module, layout: AttentionHeads, heads: Sequence[int]) -> None:
    """Physically remove ``heads`` from one attention layer (parameters, widths, head count)."""
    rows, cols = layout.rows(heads), layout.cols(heads)
    attn, out = model.get_submodule(layout.module), model.get_submodule(layout.out)
    owner = attn if layout.packed else model.get_submodule(layout.qkv)
    wname, bname = ("in_proj_weight", "in_proj_bias") if layout.packed else ("weight", "bias")
    _keep(owner, wname, 0, rows)
    if getattr(owner, bname, None) is not None:
        _keep(owner, bname, 0, rows)
    _keep(out, "weight", 1, cols)
    kept = layout.heads - len(heads)
    out.in_features = kept * layout.head_dim
    attn.num_heads = kept
    if layout.packed:
        attn.head_dim = layout.head_dim
        attn.__class__ = PrunedMultiheadAttention
    else:
        attn.attn_dim = kept * layout.head_dim
        owner.out_features = 3 * kept * layout.head_dim


def _keep(module: nn.Module, attr: str, dim: int, removed: Sequence[int]) -> None:
    """Replace a parameter by a new one without the ``removed`` entries along ``dim``."""
    p = getattr(module, attr)
    keep = torch.tensor(sorted(set(range(p.shape[dim])) - set(removed)), dtype=torch.long, device=p.device)
    new = nn.Parameter(p.detach().index_select(dim, keep), requires_grad=p.requires_grad)
    setattr(module, attr, new)
