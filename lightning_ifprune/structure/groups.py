"""Coupled channel groups, parsed from Torch-Pruning's dependency groups.

A Torch-Pruning group lists every (node, indices) pair that removing one set of channels
touches. :class:`GroupParser` reads it with one handler per kind of node — network output,
element-wise op, bare parameter, convolution, linear layer, per-channel layer, anything
else — and either builds a :class:`ChannelGroup` (with its cost coefficients), skips the
group with a reason (:class:`NotPrunable`), or lists the modules that make it unsafe
(:class:`RefusedGroup`: the group keeps all its channels, or with ``strict`` the model is
refused, :class:`UnsupportedModelError`). A group that keeps all its channels anyway is
skipped, whatever it touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from lightning_ifprune.structure.ops import (
    BATCH_NORM_OPS,
    CONV_TYPES,
    DROPOUT_TYPES,
    LINEAR_INTERNAL_OPS,
    NORM_TYPES,
    PER_CHANNEL_TYPES,
    WEIGHTED_TYPES,
    holds_channel_buffers,
    is_depthwise,
    keeps_channels,
    op_name,
)
from lightning_ifprune.structure.tracing import OpOwners

#: ``(group, module, "in" | "out" | "norm", channels per group channel)``
CostCoef = tuple[str, str, str, int]


class UnsupportedModelError(ValueError):
    """The model contains a structure whose channels cannot be removed safely."""


class NotPrunable(Exception):
    """A group that exists but must keep all its channels (with the reason)."""

    def __init__(self, group: str, reason: str) -> None:
        super().__init__(reason)
        self.group, self.reason = group, reason


class RefusedGroup(Exception):
    """Group ``group``, whose channels cannot be removed safely: ``issues`` maps module name → why."""

    def __init__(self, group: str, issues: dict[str, str]) -> None:
        super().__init__("; ".join(issues.values()))
        self.group, self.issues = group, issues


@dataclass(frozen=True)
class ConsumerSlot:
    """Where a group's channels sit in one layer: the inputs of a consumer, or the features
    of a per-channel layer (norm, PReLU).

    ``positions[i]`` is an index of ``module`` that carries group channel ``channels[i]``
    (several positions per channel after a flatten; a slice of a norm after a concat).
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
    norms: tuple[ConsumerSlot, ...]
    consumers: tuple[ConsumerSlot, ...]
    min_keep: int


class GroupParser:
    """Turns one Torch-Pruning group into a :class:`ChannelGroup` and its cost coefficients."""

    def __init__(
        self,
        model: nn.Module,
        graph: tp.DependencyGraph,
        order: dict[nn.Module, tuple[int, str]],
        ignored: set[str],
        owners: OpOwners,
    ) -> None:
        self.model, self.graph, self.owners = model, graph, owners
        self.order, self.ignored = order, ignored
        self.names = {m: n for m, (_, n) in order.items()}
        #: Layers we do not slice whose own buffers may act on channels (frozen norms, …).
        self.buffered = {n for m, n in self.names.items() if holds_channel_buffers(m)}

    def parse(self, group: tp.Group) -> tuple[ChannelGroup, list[CostCoef]]:
        """The group, or :class:`NotPrunable` / :class:`RefusedGroup`."""
        self.producers: list[nn.Module] = []
        self.norms: dict[str, tuple[list[int], list[int]]] = {}
        self.slots: dict[str, tuple[list[int], list[int]]] = {}
        self.coefs: list[tuple[str, str, int]] = []
        self.reason: str | None = None
        self.issues: dict[str, str] = {}
        self.root = self.names.get(group[0].dep.target.module, "?")
        for item in group:
            self._item(item)
        if not self.producers:
            raise NotPrunable(self.root, "no producer layer")
        self.producers.sort(key=lambda m: self.order[m][0])
        gname = self.names[self.producers[0]]
        if self.reason:  # all its channels stay: nothing it touches can break
            raise NotPrunable(gname, self.reason)
        if not self.issues:  # an unknown op explains a width mismatch already
            self._check_widths(gname, len(group[0].idxs))
        if self.issues:
            raise RefusedGroup(gname, self.issues)
        consumers = self._slots(self.slots)
        if not consumers:
            raise NotPrunable(gname, "its channels are outputs of the network (no consuming layer)")
        grp = ChannelGroup(
            name=gname,
            size=len(group[0].idxs),
            producers=tuple(self.names[m] for m in self.producers),
            norms=self._slots(self.norms),
            consumers=consumers,
            min_keep=1,
        )
        return grp, [(gname, mod, kind, c) for mod, kind, c in self.coefs]

    def _position(self, name: str) -> int:
        return self.order[self.model.get_submodule(name)][0]

    def _slots(self, where: dict[str, tuple[list[int], list[int]]]) -> tuple[ConsumerSlot, ...]:
        return tuple(
            ConsumerSlot(n, torch.as_tensor(pos, dtype=torch.long), torch.as_tensor(ch, dtype=torch.long))
            for n, (pos, ch) in sorted(where.items(), key=lambda kv: self._position(kv[0]))
        )

    def _skip(self, reason: str) -> None:
        self.reason = self.reason or reason

    def _refuse(self, name: str, why: str) -> None:
        self.issues.setdefault(name, why)

    def _describe(self, name: str) -> str:
        return f"module '{name}' ({type(self.model.get_submodule(name)).__name__})"

    def _check_widths(self, gname: str, size: int) -> None:
        """Every producer of a group must have exactly the group's channels (no split halves)."""
        widths = {
            self.names[m]: m.out_channels if isinstance(m, CONV_TYPES) else m.out_features for m in self.producers
        }
        if any(w != size for w in widths.values()):
            listed = ", ".join(f"'{n}' ({w} channels)" for n, w in widths.items())
            self._refuse(
                gname,
                f"the group of '{self.root}' ({size} channels) couples producers of different widths: {listed} "
                "(part of a layer's channels, e.g. a split or chunk, feeds a residual sum); "
                "its channels cannot be mapped",
            )

    # ------------------------------------------------------------------ dispatch
    def _item(self, item: tp.dependency.GroupItem) -> None:
        node, module = item.dep.target, item.dep.target.module
        per_channel = len(item.idxs) // max(len(set(item.root_idxs)), 1)
        if node in getattr(self.graph, "unmapped", {}):
            return self._unmapped(node)
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return self._skip("its channels are outputs of the network")
        if node.type == tp.ops.OPTYPE.ELEMENTWISE:
            return self._on_elementwise(node)
        if node.type == tp.ops.OPTYPE.PARAMETER:
            return self._skip("it touches a bare nn.Parameter")
        if node.type == tp.ops.OPTYPE.SPLIT and _splits_channels(node.grad_fn):
            return self._on_split(node)
        if not isinstance(module, nn.Module) or module not in self.names:
            return None  # other dummy ops (concat, split, reshape): index maps only
        name = self.names[module]
        if name in self.ignored:
            return self._skip(f"it touches ignored layer '{name}'")
        if isinstance(module, CONV_TYPES):
            return self._on_conv(item, module, name, per_channel)
        if isinstance(module, WEIGHTED_TYPES):
            return self._on_weighted(item, module, name, per_channel)
        if isinstance(module, PER_CHANNEL_TYPES):
            return self._on_per_channel(item, module, name, per_channel)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return self._skip(
                f"{self._describe(name)} normalises over its channels: removing one changes the statistics "
                "of the others, so a channel mask cannot stand for its removal"
            )
        return self._refuse(
            name,
            f"{self._describe(name)} mixes or normalises the channels of group '{self.root}' "
            "in a way lightning_ifprune does not prune",
        )

    # ------------------------------------------------------------------ handlers
    def _on_split(self, node: tp.Node) -> None:
        where = self.owners.owner(node.grad_fn)
        who = self._describe(where) if where else f"the top-level forward of {type(self.model).__name__}"
        return self._refuse(
            where or self.root,
            f"{who} splits the channels of group '{self.root}' into parts of fixed sizes ('{op_name(node.grad_fn)}'), "
            "which removing channels would not update",
        )

    def _unmapped(self, node: tp.Node) -> None:
        op = op_name(node.grad_fn) if node.grad_fn is not None else str(node.type)
        where = self.owners.owner(node.grad_fn) if node.grad_fn is not None else None
        who = self._describe(where) if where else f"the top-level forward of {type(self.model).__name__}"
        return self._refuse(
            where or self.root,
            f"{who} applies '{op}' to the channels of group '{self.root}': {self.graph.unmapped[node]}",
        )

    def _on_elementwise(self, node: tp.Node) -> None:
        if not node.inputs:  # on a weight path
            return
        op = op_name(node.grad_fn)
        keeps = keeps_channels(node.grad_fn)
        if keeps and not self.buffered:
            return
        where = self.owners.owner(node.grad_fn)
        if keeps and where not in self.buffered:
            return None
        if where is not None and where in self.ignored:
            return self._skip(f"it passes through ignored layer '{where}'")
        if where in self.buffered:
            names = ", ".join(n for n, b in self.model.get_submodule(where).named_buffers(recurse=False) if b.dim())
            return self._refuse(
                where,
                f"{self._describe(where)} acts on the channels of group '{self.root}' with buffers ({names}) "
                "that Torch-Pruning does not slice (a frozen BatchNorm? use a BatchNorm layer, or ignore it)",
            )
        if (op in BATCH_NORM_OPS and self._in_norm(where)) or self._inplace_dropout(op, where):
            return None
        if op in LINEAR_INTERNAL_OPS and self._in_linear(where):
            return None
        hint = " (an option-A zero-pad shortcut? use 1x1-conv shortcuts)" if op == "ConstantPadNd" else ""
        who = self._describe(where) if where else f"the top-level forward of {type(self.model).__name__}"
        return self._refuse(
            where or self.root,  # ignoring the group's root keeps the channels of a top-level op
            f"{who} applies '{op}' to the channels of group '{self.root}', an op whose channel mapping is unknown{hint}",
        )

    def _in_norm(self, where: str | None) -> bool:
        """A batch-norm op run by a norm module of the graph (a BatchNorm subclass's own forward):
        the module's parameters and statistics are sliced with the group."""
        if where is None:
            return False
        module = self.model.get_submodule(where)
        return isinstance(module, NORM_TYPES) and module in self.graph.module2node

    def _in_linear(self, where: str | None) -> bool:
        """An op of a Linear layer's own forward (on an input with several leading dims)."""
        return where is not None and isinstance(self.model.get_submodule(where), nn.Linear)

    def _inplace_dropout(self, op: str, where: str | None) -> bool:
        """An in-place dropout on a view (the ``CopySlices`` and ``AsStrided`` it makes): element-wise."""
        return (
            op in ("torch::autograd::CopySlices", "AsStrided")
            and where is not None
            and isinstance(self.model.get_submodule(where), DROPOUT_TYPES)
        )

    def _consume(self, name: str, item: tp.dependency.GroupItem, into: dict | None = None) -> None:
        positions, channels = (self.slots if into is None else into).setdefault(name, ([], []))
        positions.extend(item.idxs)
        channels.extend(item.root_idxs)

    def _on_conv(self, item, module: nn.Module, name: str, per_channel: int) -> None:
        if module.transposed:
            return self._refuse(name, f"{self._describe(name)} is a transposed convolution, which is not supported")
        if is_depthwise(module):  # its input and output channels are one
            self.producers.append(module)
            self._consume(name, item)
            self.coefs += [(name, "in", per_channel), (name, "out", per_channel)]
            return None
        if module.groups > 1:
            return self._skip(f"grouped convolution '{name}' (groups={module.groups})")
        return self._on_weighted(item, module, name, per_channel)

    def _on_weighted(self, item, module: nn.Module, name: str, per_channel: int) -> None:
        if self.graph.is_out_channel_pruning_fn(item.dep.handler):
            self.producers.append(module)
            self.coefs.append((name, "out", per_channel))
        else:
            self._consume(name, item)
            self.coefs.append((name, "in", per_channel))

    def _on_per_channel(self, item, module: nn.Module, name: str, per_channel: int) -> None:
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return
        self._consume(name, item, into=self.norms)
        self.coefs.append((name, "norm", per_channel))


def _splits_channels(grad_fn: object) -> bool:
    """A split or chunk along the channel axis (dim 1)."""
    dim = getattr(grad_fn, "_saved_dim", None)
    ndim = len(getattr(grad_fn, "_saved_self_sym_sizes", ())) or 4
    return dim is None or int(dim) % ndim == 1


def per_channel_width(module: nn.Module) -> int:
    """Features of a per-channel layer (a norm's ``num_features``, PReLU's slopes)."""
    return module.num_features if isinstance(module, NORM_TYPES) else module.num_parameters
