"""Coupled channel groups, parsed from Torch-Pruning's dependency groups.

A Torch-Pruning group lists every (node, indices) pair that removing one set of channels
touches. :class:`GroupParser` reads it with one handler per kind of node — network output,
element-wise op, bare parameter, convolution, linear layer, per-channel layer, anything
else — and either builds a :class:`ChannelGroup` (with its cost coefficients), skips the
group with a reason (:class:`NotPrunable`), or refuses the model (:class:`UnsupportedModelError`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from lightning_ifprune.structure.ops import (
    CONV_TYPES,
    NORM_TYPES,
    PER_CHANNEL_TYPES,
    WEIGHTED_TYPES,
    is_depthwise,
    keeps_channels,
    op_name,
)
from lightning_ifprune.structure.tracing import owner_of_op

#: ``(group, module, "in" | "out" | "norm", channels per group channel)``
CostCoef = tuple[str, str, str, int]


class UnsupportedModelError(ValueError):
    """The model contains a structure whose channels cannot be removed safely."""


class NotPrunable(Exception):
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


class GroupParser:
    """Turns one Torch-Pruning group into a :class:`ChannelGroup` and its cost coefficients."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        graph: tp.DependencyGraph,
        order: dict[nn.Module, tuple[int, str]],
        ignored: set[str],
    ) -> None:
        self.model, self.example_inputs, self.graph = model, example_inputs, graph
        self.order, self.ignored = order, ignored
        self.names = {m: n for m, (_, n) in order.items()}

    def parse(self, group: tp.Group) -> tuple[ChannelGroup, list[CostCoef]]:
        """The group, or :class:`NotPrunable` / :class:`UnsupportedModelError`."""
        self.producers: list[nn.Module] = []
        self.norms: list[nn.Module] = []
        self.slots: dict[str, tuple[list[int], list[int]]] = {}
        self.coefs: list[tuple[str, str, int]] = []
        self.reason: str | None = None
        self.root = self.names.get(group[0].dep.target.module, "?")
        for item in group:
            self._item(item)
        if not self.producers:
            raise NotPrunable(self.root, "no producer layer")
        self.producers.sort(key=lambda m: self.order[m][0])
        gname = self.names[self.producers[0]]
        if self.reason:
            raise NotPrunable(gname, self.reason)
        consumers = tuple(
            ConsumerSlot(n, torch.as_tensor(pos, dtype=torch.long), torch.as_tensor(ch, dtype=torch.long))
            for n, (pos, ch) in sorted(self.slots.items(), key=lambda kv: self._position(kv[0]))
        )
        if not consumers:
            raise NotPrunable(gname, "its channels are outputs of the network (no consuming layer)")
        grp = ChannelGroup(
            name=gname,
            size=len(group[0].idxs),
            producers=tuple(self.names[m] for m in self.producers),
            norms=tuple(self.names[m] for m in sorted(self.norms, key=lambda m: self.order[m][0])),
            consumers=consumers,
            min_keep=1,
        )
        return grp, [(gname, mod, kind, c) for mod, kind, c in self.coefs]

    def _position(self, name: str) -> int:
        return self.order[self.model.get_submodule(name)][0]

    def _skip(self, reason: str) -> None:
        self.reason = self.reason or reason

    # ------------------------------------------------------------------ dispatch
    def _item(self, item: tp.dependency.GroupItem) -> None:
        node, module = item.dep.target, item.dep.target.module
        per_channel = len(item.idxs) // max(len(set(item.root_idxs)), 1)
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return self._skip("its channels are outputs of the network")
        if node.type == tp.ops.OPTYPE.ELEMENTWISE:
            return self._on_elementwise(node)
        if node.type == tp.ops.OPTYPE.PARAMETER:
            return self._skip("it touches a bare nn.Parameter")
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
            return self._on_per_channel(module, name, per_channel)
        raise UnsupportedModelError(
            f"module '{name}' ({type(module).__name__}) mixes or normalises the channels of "
            f"group '{self.root}' in a way lightning_ifprune does not prune; "
            f"pass ignored_layers=['{name}'] to keep those channels"
        )

    # ------------------------------------------------------------------ handlers
    def _on_elementwise(self, node: tp.Node) -> None:
        if not node.inputs or keeps_channels(node.grad_fn):  # no inputs: on a weight path
            return
        op = op_name(node.grad_fn)
        where = owner_of_op(self.model, self.example_inputs, node.grad_fn)
        if where in self.ignored:
            return self._skip(f"it passes through ignored layer '{where}'")
        hint = " (an option-A zero-pad shortcut? use 1x1-conv shortcuts)" if op == "ConstantPadNd" else ""
        raise UnsupportedModelError(
            f"module '{where}' applies '{op}' to the channels of group '{self.root}', "
            f"an op whose channel mapping is unknown{hint}; "
            f"pass ignored_layers=['{where}'] to keep those channels"
        )

    def _consume(self, name: str, item: tp.dependency.GroupItem) -> None:
        positions, channels = self.slots.setdefault(name, ([], []))
        positions.extend(item.idxs)
        channels.extend(item.root_idxs)

    def _on_conv(self, item, module: nn.Module, name: str, per_channel: int) -> None:
        if module.transposed:
            raise UnsupportedModelError(f"module '{name}' is a transposed convolution, which is not supported")
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

    def _on_per_channel(self, module: nn.Module, name: str, per_channel: int) -> None:
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return
        self.norms.append(module)
        self.coefs.append((name, "norm", per_channel))


def per_channel_width(module: nn.Module) -> int:
    """Features of a per-channel layer (a norm's ``num_features``, PReLU's slopes)."""
    return module.num_features if isinstance(module, NORM_TYPES) else module.num_parameters
