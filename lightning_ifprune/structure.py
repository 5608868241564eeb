"""Channel structure: the coupled channel groups of a network, their masks and their costs.

A *group* is one set of channels that must be removed together (spec §1): the output rows of
its producer Conv/Linear layers, the matching BatchNorm entries, and the input columns of
every layer that consumes them, residual partners included. The coupling is read from
Torch-Pruning's ``DependencyGraph``; everything else here (naming, masks, the exact cost
model, which structures are refused) is ours.

Works on any ``nn.Module``; nothing here needs Lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (*_CONV, nn.Linear)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: Layers with parameters whose channels we can remove (all others are refused inside a group).
_SUPPORTED = (*_WEIGHTED, *_NORM, nn.PReLU)

# Autograd ops that keep the channel axis as it is (Torch-Pruning treats every op it does not
# know as such; we only accept the ones that really are). Names without "Backward<N>".
_CHANNEL_PRESERVING = {
    "Add", "Sub", "Mul", "Div", "Neg", "Clone", "ToCopy", "Alias", "Detach",
    "Relu", "Relu6", "Hardtanh", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Silu", "Mish",
    "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Softplus", "Threshold",
    "Clamp", "ClampMin", "ClampMax", "NativeDropout", "Dropout", "Squeeze", "Unsqueeze",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices",
    "AvgPool1D", "AvgPool2D", "AvgPool3D",
    "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
    "UpsampleNearest1D", "UpsampleNearest2D", "UpsampleNearest3D",
    "UpsampleBilinear2D", "UpsampleBicubic2D",
}
# Ops that keep channels only when they do not act on the channel axis (dim 1).
_AXIS_OPS = {"Mean", "Sum", "ConstantPadNd", "Amax", "Amin"}


class UnsupportedModelError(ValueError):
    """The model contains a structure whose channels cannot be removed safely."""


class _NotPrunable(Exception):
    """A group that exists but must keep all its channels (with the reason)."""

    def __init__(self, group: str, reason: str) -> None:
        super().__init__(reason)
        self.group, self.reason = group, reason


@dataclass(frozen=True)
class ConsumerSlot:
    """Where a group's channels enter one consuming layer.

    ``positions[i]`` is an input index of ``module`` that carries group channel
    ``channels[i]`` (several positions per channel after a flatten).
    """

    module: str
    positions: torch.Tensor
    channels: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable group of coupled channels."""

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[ConsumerSlot, ...]
    min_keep: int


@dataclass
class _LayerCost:
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


def _op_name(grad_fn: object) -> str:
    name = grad_fn.name() if hasattr(grad_fn, "name") else "Unknown"
    return re.sub(r"Backward\d*$", "", name)


def _acts_on_channels(grad_fn: object, name: str) -> bool:
    """Whether a reduction/pad op touches the channel axis (dim 1)."""
    if name == "ConstantPadNd":
        pad = list(getattr(grad_fn, "_saved_pad", ()))
        ndim = len(getattr(grad_fn, "_saved_self_sym_sizes", ())) or 4
        channel_pad = pad[2 * (ndim - 2) : 2 * (ndim - 1)]  # pads are listed last dim first
        return any(int(p) != 0 for p in channel_pad)
    dims = getattr(grad_fn, "_saved_dim", None)
    if dims is None:
        return True  # full reduction
    dims = [dims] if isinstance(dims, int) else list(dims)
    ndim = len(getattr(grad_fn, "_saved_self_sym_sizes", ())) or 4
    return any(int(d) % ndim == 1 for d in dims)


def _module_order(model: nn.Module) -> dict[nn.Module, tuple[int, str]]:
    return {m: (i, n) for i, (n, m) in enumerate(model.named_modules())}


@contextmanager
def _restore_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards (tracing switches to eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _as_name_set(model: nn.Module, layers: Iterable[str | nn.Module]) -> set[str]:
    """Qualified names of the given layers and all their submodules."""
    names = {m: n for n, m in model.named_modules()}
    roots: list[str] = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            if layer not in names:
                raise ValueError(f"ignored layer {type(layer).__name__} is not part of the model")
            roots.append(names[layer])
        else:
            if layer not in dict(model.named_modules()):
                raise ValueError(f"ignored layer {layer!r} is not a module of the model")
            roots.append(layer)
    out: set[str] = set()
    for n in names.values():
        if any(n == r or n.startswith(r + ".") for r in roots):
            out.add(n)
    return out


def resolve_min_keep(min_channels: int | float, size: int) -> int:
    """Channels a group must keep: an absolute count, or a fraction of ``size`` (≥ 1)."""
    if isinstance(min_channels, bool) or min_channels <= 0:
        raise ValueError(f"min_channels must be a positive int or a fraction in (0, 1), got {min_channels!r}")
    if isinstance(min_channels, float) and min_channels < 1:
        return max(1, math.ceil(min_channels * size))
    return max(1, int(min_channels))


class ChannelStructure:
    """The prunable channel groups of ``model`` at its current widths.

    Build one with :meth:`build`. The structure describes the model as it is now; after
    the model is pruned, build a new one (cheap: one traced forward pass).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        graph: tp.DependencyGraph,
        groups: dict[str, ChannelGroup],
        skipped: dict[str, str],
        layers: dict[str, _LayerCost],
        other_macs: int,
        other_params: int,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.graph = graph
        self.groups = groups
        self.skipped = skipped
        self._layers = layers
        self._other_macs = other_macs
        self._other_params = other_params

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: torch.Tensor,
        ignored_layers: Iterable[str | nn.Module] = (),
        min_channels: int | float = 1,
        original_sizes: Mapping[str, int] | None = None,
    ) -> ChannelStructure:
        """Trace ``model`` on ``example_inputs`` and collect its prunable groups.

        ``ignored_layers`` (modules or qualified names) keep every channel they touch.
        ``min_channels`` is the least each group keeps: a count, or a fraction of the
        group's size in ``original_sizes`` (default: its current size).

        Raises :class:`UnsupportedModelError`, naming the module, for structures whose
        channels cannot be removed safely (unknown channel-mixing ops, option-A zero-pad
        shortcuts, layers with parameters the graph cannot see).
        """
        ignored = _as_name_set(model, ignored_layers)
        resolve_min_keep(min_channels, 1)  # validates the value early
        names = {m: n for n, m in model.named_modules()}
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False)]
            if own and not isinstance(module, _SUPPORTED) and name not in ignored:
                known = tp.DependencyGraph().get_pruner_of_module(module) is not None
                what = "a layer type lightning_ifprune does not prune" if known else "parameters the dependency graph cannot see"
                raise UnsupportedModelError(
                    f"module '{name}' ({type(module).__name__}) holds {what}; "
                    f"pass ignored_layers=['{name}'] to keep the channels it touches"
                )
        with _restore_modes(model), torch.enable_grad():
            try:
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
            except Exception as err:  # the tracer's own errors are rarely readable
                raise UnsupportedModelError(f"could not trace the model's channel dependencies: {err}") from err
        order = _module_order(model)
        groups: dict[str, ChannelGroup] = {}
        skipped: dict[str, str] = {}
        coefs: list[tuple[str, str, str, int]] = []  # (group, module, "in"/"out"/"norm", coef)
        for group in graph.get_all_groups(root_module_types=_WEIGHTED):
            try:
                grp, group_coefs = cls._parse_group(model, example_inputs, graph, group, names, order, ignored)
            except _NotPrunable as skip:
                skipped[skip.group] = skip.reason
                continue
            size0 = (original_sizes or {}).get(grp.name, grp.size)
            grp = ChannelGroup(grp.name, grp.size, grp.producers, grp.norms, grp.consumers,
                               min(grp.size, resolve_min_keep(min_channels, size0)))
            groups[grp.name] = grp
            coefs.extend(group_coefs)
        for name in ignored:
            groups.pop(name, None)
        layers, other_macs, other_params = cls._cost_model(model, example_inputs, coefs)
        ordered = dict(sorted(groups.items(), key=lambda kv: order[model.get_submodule(kv[0])][0]))
        return cls(model, example_inputs, graph, ordered, skipped, layers, other_macs, other_params)

    @staticmethod
    def _parse_group(model, example_inputs, graph, group, names, order, ignored):
        """Turn one Torch-Pruning group into a ChannelGroup and its cost coefficients."""
        producers: list[nn.Module] = []
        norms: list[nn.Module] = []
        slots: dict[str, tuple[list[int], list[int]]] = {}
        coefs: list[tuple[str, str, int]] = []
        size = len(group[0].idxs)
        root_name = names.get(group[0].dep.target.module, "?")
        reason = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            node, module, handler = dep.target, dep.target.module, dep.handler
            per_channel = len(idxs) // max(len(set(item.root_idxs)), 1)
            if node.type == tp.ops.OPTYPE.OUTPUT:
                reason = reason or "its channels are outputs of the network"
                continue
            if node.type == tp.ops.OPTYPE.ELEMENTWISE:
                op = _op_name(node.grad_fn)
                if not node.inputs or op in _CHANNEL_PRESERVING:  # no inputs: on a weight path
                    continue
                if op in _AXIS_OPS and not _acts_on_channels(node.grad_fn, op):
                    continue
                where = _owner_of_op(model, example_inputs, node.grad_fn)
                if where in ignored:
                    reason = reason or f"it passes through ignored layer '{where}'"
                    continue
                hint = " (an option-A zero-pad shortcut? use 1x1-conv shortcuts)" if op == "ConstantPadNd" else ""
                raise UnsupportedModelError(
                    f"module '{where}' applies '{op}' to the channels of group '{root_name}', "
                    f"an op whose channel mapping is unknown{hint}; "
                    f"pass ignored_layers=['{where}'] to keep those channels"
                )
            if node.type == tp.ops.OPTYPE.PARAMETER:
                reason = reason or "it touches a bare nn.Parameter"
                continue
            if not isinstance(module, nn.Module) or module not in names:
                continue  # other dummy ops (concat, split, reshape): index maps only
            name = names[module]
            if name in ignored:
                reason = reason or f"it touches ignored layer '{name}'"
                continue
            if isinstance(module, _CONV):
                if module.transposed:
                    raise UnsupportedModelError(f"module '{name}' is a transposed convolution, which is not supported")
                depthwise = module.groups == module.out_channels == module.in_channels and module.groups > 1
                if module.groups > 1 and not depthwise:
                    reason = reason or f"grouped convolution '{name}' (groups={module.groups})"
                    continue
                if depthwise:
                    producers.append(module)
                    slots.setdefault(name, ([], []))
                    slots[name][0].extend(idxs)
                    slots[name][1].extend(item.root_idxs)
                    coefs += [(name, "in", per_channel), (name, "out", per_channel)]
                    continue
            if isinstance(module, _WEIGHTED):
                if graph.is_out_channel_pruning_fn(handler):
                    producers.append(module)
                    coefs.append((name, "out", per_channel))
                else:
                    slots.setdefault(name, ([], []))
                    slots[name][0].extend(idxs)
                    slots[name][1].extend(item.root_idxs)
                    coefs.append((name, "in", per_channel))
            elif isinstance(module, (*_NORM, nn.PReLU)):
                if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                    continue
                norms.append(module)
                coefs.append((name, "norm", per_channel))
            else:
                raise UnsupportedModelError(
                    f"module '{name}' ({type(module).__name__}) mixes or normalises the channels of "
                    f"group '{root_name}' in a way lightning_ifprune does not prune; "
                    f"pass ignored_layers=['{name}'] to keep those channels"
                )
        if not producers:
            raise _NotPrunable(root_name, "no producer layer")
        producers.sort(key=lambda m: order[m][0])
        gname = names[producers[0]]
        if reason:
            raise _NotPrunable(gname, reason)
        consumers = tuple(
            ConsumerSlot(n, torch.as_tensor(pos, dtype=torch.long), torch.as_tensor(ch, dtype=torch.long))
            for n, (pos, ch) in sorted(slots.items(), key=lambda kv: order[model.get_submodule(kv[0])][0])
        )
        if not consumers:
            raise _NotPrunable(gname, "its channels are outputs of the network (no consuming layer)")
        grp = ChannelGroup(
            name=gname,
            size=size,
            producers=tuple(names[m] for m in producers),
            norms=tuple(names[m] for m in sorted(norms, key=lambda m: order[m][0])),
            consumers=consumers,
            min_keep=1,
        )
        return grp, [(gname, mod, kind, c) for mod, kind, c in coefs]

    @staticmethod
    def _cost_model(model, example_inputs, coefs):
        """Per-layer cost terms, plus the measured MACs/params no layer term explains."""
        positions: dict[str, int] = {}
        names = {m: n for n, m in model.named_modules()}

        def record(module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            width = out.shape[1] if isinstance(module, _CONV) else out.shape[-1]
            positions[names[module]] = out.numel() // max(out.shape[0], 1) // max(width, 1)

        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, _WEIGHTED)]
        counter = FlopCounterMode(display=False)
        try:
            with _restore_modes(model), torch.no_grad(), counter:
                model.eval()
                model(example_inputs)
        finally:
            for h in hooks:
                h.remove()
        batch = max(int(example_inputs.shape[0]), 1)
        layers: dict[str, _LayerCost] = {}
        for name, module in model.named_modules():
            if isinstance(module, _CONV):
                layers[name] = _LayerCost(
                    "weighted", module.in_channels, module.out_channels, groups=module.groups,
                    depthwise=module.groups > 1 and module.groups == module.in_channels == module.out_channels,
                    kernel=math.prod(module.kernel_size), positions=positions.get(name, 0),
                    bias=module.bias is not None,
                )
            elif isinstance(module, nn.Linear):
                layers[name] = _LayerCost(
                    "weighted", module.in_features, module.out_features,
                    positions=positions.get(name, 0), bias=module.bias is not None,
                )
            elif isinstance(module, (*_NORM, nn.PReLU)):
                feats = module.num_features if isinstance(module, _NORM) else module.num_parameters
                n = sum(1 for p in module.parameters(recurse=False) if p.numel() == feats)
                layers[name] = _LayerCost("norm", feats, feats, norm_params=n)
        for group, mod, kind, c in coefs:
            cost = layers[mod]
            if kind in ("in", "norm"):
                cost.in_coef[group] = c
            if kind in ("out", "norm"):
                cost.out_coef[group] = c
        modelled_macs = sum(_layer_macs(c, {}) for c in layers.values())
        modelled_params = sum(_layer_params(c, {}) for c in layers.values())
        measured_macs = counter.get_total_flops() // 2 // batch
        measured_params = sum(p.numel() for p in model.parameters())
        return layers, measured_macs - modelled_macs, measured_params - modelled_params

    # ------------------------------------------------------------------ queries
    def widths(self) -> dict[str, int]:
        """Current channel count of every prunable group."""
        return {name: g.size for name, g in self.groups.items()}

    def cost(self, removed: Mapping[str, int] | None = None) -> tuple[int, int]:
        """Exact (MACs per sample, parameters) after removing ``removed[g]`` channels per group."""
        delta = {g: -int(n) for g, n in (removed or {}).items()}
        macs = self._other_macs + sum(_layer_macs(c, delta) for c in self._layers.values())
        params = self._other_params + sum(_layer_params(c, delta) for c in self._layers.values())
        return int(macs), int(params)

    def channel_costs(self) -> dict[str, tuple[int, int]]:
        """(MACs, params) removed by dropping one channel of each group, at current widths."""
        macs0, params0 = self.cost()
        out = {}
        for name in self.groups:
            macs1, params1 = self.cost({name: 1})
            out[name] = (macs0 - macs1, params0 - params1)
        return out

    def __repr__(self) -> str:
        return f"ChannelStructure({len(self.groups)} groups, {sum(self.widths().values())} channels)"


def _dims(cost: _LayerCost, delta: Mapping[str, int]) -> tuple[int, int]:
    d_in = sum(c * delta.get(g, 0) for g, c in cost.in_coef.items())
    d_out = sum(c * delta.get(g, 0) for g, c in cost.out_coef.items())
    return cost.in0 + d_in, cost.out0 + d_out


def _layer_params(cost: _LayerCost, delta: Mapping[str, int]) -> int:
    n_in, n_out = _dims(cost, delta)
    if cost.kind == "norm":
        return cost.norm_params * n_out
    per_group_in = 1 if cost.depthwise else n_in // cost.groups
    return n_out * per_group_in * cost.kernel + (n_out if cost.bias else 0)


def _layer_macs(cost: _LayerCost, delta: Mapping[str, int]) -> int:
    if cost.kind == "norm":
        return 0
    n_in, n_out = _dims(cost, delta)
    per_group_in = 1 if cost.depthwise else n_in // cost.groups
    return n_out * per_group_in * cost.kernel * cost.positions


def _owner_of_op(model: nn.Module, example_inputs: torch.Tensor, grad_fn: object) -> str:
    """Qualified name of the innermost module whose forward created ``grad_fn``'s op type."""
    target = _op_name(grad_fn)
    spans: dict[str, tuple[set, object]] = {}
    starts: dict[str, list] = {}

    def pre(name):
        def hook(_m, args):
            starts[name] = [a.grad_fn for a in args if isinstance(a, torch.Tensor)]
        return hook

    def post(name):
        def hook(_m, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor):
                spans[name] = (set(starts.get(name, [])), out.grad_fn)
        return hook

    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(pre(name)))
        hooks.append(m.register_forward_hook(post(name)))
    try:
        with _restore_modes(model), torch.enable_grad():
            model.eval()
            model(example_inputs.detach().requires_grad_(True))
    finally:
        for h in hooks:
            h.remove()
    best, best_size = "", None
    for name, (stops, root) in spans.items():
        seen, stack, found = set(), [root], False
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen or fn in stops:
                continue
            seen.add(fn)
            found = found or _op_name(fn) == target
            stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
        if found and (best_size is None or len(seen) < best_size):
            best, best_size = name, len(seen)
    return best or "<top level>"


# ---------------------------------------------------------------------- masks
@contextmanager
def channel_masks(
    structure: ChannelStructure, masks: dict[str, torch.Tensor] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Multiply every group channel by a mask where it is consumed (spec §1).

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

    handles = []
    try:
        for mname, entries in by_module.items():
            module = model.get_submodule(mname)
            handles.append(module.register_forward_pre_hook(make_hook(entries, isinstance(module, _CONV))))
        yield masks
    finally:
        for h in handles:
            h.remove()


def validate_example_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The single input tensor a structure is traced with (a batch of at least one sample)."""
    if isinstance(example_inputs, (list, tuple)):
        if len(example_inputs) != 1:
            raise ValueError("example_inputs must be one tensor (models with several inputs are not supported)")
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
        raise ValueError("example_inputs must be a batched tensor, e.g. shape (1, C, H, W)")
    return example_inputs
