"""``ChannelStructure``: the prunable channel groups of a network, at its current widths."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from lightning_ifprune.structure.cost import CostModel
from lightning_ifprune.structure.groups import (
    ChannelGroup,
    CostCoef,
    GroupParser,
    NotPrunable,
    UnsupportedModelError,
)
from lightning_ifprune.structure.ops import SUPPORTED_TYPES, WEIGHTED_TYPES
from lightning_ifprune.structure.tracing import (
    as_name_set,
    module_order,
    resolve_min_keep,
    restore_modes,
)


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
        costs: CostModel,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.graph = graph
        self.groups = groups
        self.skipped = skipped
        self.costs = costs

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
        ignored = as_name_set(model, ignored_layers)
        resolve_min_keep(min_channels, 1)  # validates the value early
        for name, module in model.named_modules():
            if (
                next(module.parameters(recurse=False), None) is not None
                and not isinstance(module, SUPPORTED_TYPES)
                and name not in ignored
            ):
                raise UnsupportedModelError(
                    f"module '{name}' ({type(module).__name__}) holds a layer type lightning_ifprune does "
                    f"not prune; pass ignored_layers=['{name}'] to keep the channels it touches"
                )
        with restore_modes(model), torch.enable_grad():
            try:
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
            except Exception as err:  # the tracer's own errors are rarely readable
                raise UnsupportedModelError(f"could not trace the model's channel dependencies: {err}") from err
        order = module_order(model)
        parser = GroupParser(model, example_inputs, graph, order, ignored)
        groups: dict[str, ChannelGroup] = {}
        skipped: dict[str, str] = {}
        coefs: list[CostCoef] = []
        for group in graph.get_all_groups(root_module_types=WEIGHTED_TYPES):
            try:
                grp, group_coefs = parser.parse(group)
            except NotPrunable as skip:
                skipped[skip.group] = skip.reason
                continue
            size0 = (original_sizes or {}).get(grp.name, grp.size)
            grp = ChannelGroup(
                grp.name,
                grp.size,
                grp.producers,
                grp.norms,
                grp.consumers,
                min(grp.size, resolve_min_keep(min_channels, size0)),
            )
            groups[grp.name] = grp
            coefs.extend(group_coefs)
        for name in ignored:
            groups.pop(name, None)
        costs = CostModel.measure(model, example_inputs, coefs)
        ordered = dict(sorted(groups.items(), key=lambda kv: order[model.get_submodule(kv[0])][0]))
        return cls(model, example_inputs, graph, ordered, skipped, costs)

    def widths(self) -> dict[str, int]:
        """Current channel count of every prunable group."""
        return {name: g.size for name, g in self.groups.items()}

    def cost(self, removed: Mapping[str, int] | None = None) -> tuple[int, int]:
        """Exact (MACs per sample, parameters) after removing ``removed[g]`` channels per group."""
        return self.costs.cost(removed)

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
