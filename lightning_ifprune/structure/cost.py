"""The exact cost model: MACs per sample and parameters as functions of the group widths.

Every Conv/Linear/per-channel layer's input and output widths are linear in the widths of
the groups it touches, so its cost after removing channels is exact, not estimated. What no
layer term explains (other ops, other parameters) is measured once with PyTorch's FLOP
counter and kept as a constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ifprune.structure.example import Example, call_model, example_batch_size
from lightning_ifprune.structure.groups import CostCoef, per_channel_width
from lightning_ifprune.structure.ops import (
    CONV_TYPES,
    PER_CHANNEL_TYPES,
    WEIGHTED_TYPES,
    is_depthwise,
)
from lightning_ifprune.structure.tracing import restore_modes


@dataclass
class LayerCost:
    """Exact cost of one layer as a function of the group widths.

    Input/output dims are ``dim0 + Σ_g coef[g] * (width_g - width0_g)``.
    """

    kind: str  # "weighted" or "norm"
    in0: int = 0
    out0: int = 0
    in_coef: dict[str, int] = field(default_factory=dict)
    out_coef: dict[str, int] = field(default_factory=dict)
    groups: int = 1
    depthwise: bool = False
    kernel: int = 1
    positions: int = 1  # output positions per sample (spatial size, or tokens)
    bias: bool = False
    norm_params: int = 0  # per-feature parameter tensors of a norm / PReLU layer

    def dims(self, delta: Mapping[str, int]) -> tuple[int, int]:
        """(input, output) widths after the group width changes ``delta``."""
        d_in = sum(c * delta.get(g, 0) for g, c in self.in_coef.items())
        d_out = sum(c * delta.get(g, 0) for g, c in self.out_coef.items())
        return self.in0 + d_in, self.out0 + d_out

    def params(self, delta: Mapping[str, int]) -> int:
        n_in, n_out = self.dims(delta)
        if self.kind == "norm":
            return self.norm_params * n_out
        per_group_in = 1 if self.depthwise else n_in // self.groups
        return n_out * per_group_in * self.kernel + (n_out if self.bias else 0)

    def macs(self, delta: Mapping[str, int]) -> int:
        if self.kind == "norm":
            return 0
        n_in, n_out = self.dims(delta)
        per_group_in = 1 if self.depthwise else n_in // self.groups
        return n_out * per_group_in * self.kernel * self.positions


class CostModel:
    """MACs per sample and parameters of a model after removing channels from its groups."""

    def __init__(self, layers: dict[str, LayerCost], other_macs: int, other_params: int) -> None:
        self.layers, self.other_macs, self.other_params = layers, other_macs, other_params

    @classmethod
    def measure(cls, model: nn.Module, example_inputs: Example, coefs: Iterable[CostCoef]) -> CostModel:
        """Per-layer terms from the modules, positions and the constant from one counted pass.

        A layer called several times (a detection head shared by the FPN levels) counts the
        output positions of all its calls.
        """
        positions: dict[str, int] = {}
        batch = example_batch_size(example_inputs)
        names = {m: n for n, m in model.named_modules()}

        def record(module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            width = out.shape[1] if isinstance(module, CONV_TYPES) else out.shape[-1]
            count = out.numel() // batch // max(width, 1)  # any layout (sequence-first too)
            keys = [names[module]]
            if isinstance(module, nn.MultiheadAttention):  # its out_proj is read as a weight, never called
                keys.append(f"{names[module]}.out_proj" if names[module] else "out_proj")
            for key in keys:
                positions[key] = positions.get(key, 0) + count

        counted = (*WEIGHTED_TYPES, nn.MultiheadAttention)
        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, counted)]
        counter = FlopCounterMode(display=False)
        # With gradients on, nn.MultiheadAttention takes no fused fast path (whose FLOPs go uncounted).
        grad = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        try:
            with restore_modes(model), torch.set_grad_enabled(grad), counter:
                model.eval()
                call_model(model, example_inputs)
        finally:
            for h in hooks:
                h.remove()
        layers: dict[str, LayerCost] = {}
        for name, module in model.named_modules():
            if isinstance(module, CONV_TYPES):
                layers[name] = LayerCost(
                    "weighted",
                    module.in_channels,
                    module.out_channels,
                    groups=module.groups,
                    depthwise=is_depthwise(module),
                    kernel=math.prod(module.kernel_size),
                    positions=positions.get(name, 0),
                    bias=module.bias is not None,
                )
            elif isinstance(module, nn.Linear):
                layers[name] = LayerCost(
                    "weighted",
                    module.in_features,
                    module.out_features,
                    positions=positions.get(name, 0),
                    bias=module.bias is not None,
                )
            elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                layers[name] = LayerCost(  # the packed q, k, v input projection
                    "weighted",
                    module.in_proj_weight.shape[1],
                    module.in_proj_weight.shape[0],
                    positions=positions.get(name, 0),
                    bias=module.in_proj_bias is not None,
                )
            elif isinstance(module, PER_CHANNEL_TYPES):
                feats = per_channel_width(module)
                n = sum(1 for p in module.parameters(recurse=False) if p.numel() == feats)
                layers[name] = LayerCost("norm", feats, feats, norm_params=n)
        for group, mod, kind, c in coefs:
            cost = layers[mod]
            if kind in ("in", "norm"):
                cost.in_coef[group] = c
            if kind in ("out", "norm"):
                cost.out_coef[group] = c
        modelled_macs = sum(c.macs({}) for c in layers.values())
        modelled_params = sum(c.params({}) for c in layers.values())
        measured_macs = counter.get_total_flops() // 2 // batch
        measured_params = sum(p.numel() for p in model.parameters())
        return cls(layers, measured_macs - modelled_macs, measured_params - modelled_params)

    def cost(self, removed: Mapping[str, int] | None = None) -> tuple[int, int]:
        """Exact (MACs per sample, parameters) after removing ``removed[g]`` channels per group."""
        delta = {g: -int(n) for g, n in (removed or {}).items()}
        macs = self.other_macs + sum(c.macs(delta) for c in self.layers.values())
        params = self.other_params + sum(c.params(delta) for c in self.layers.values())
        return int(macs), int(params)
