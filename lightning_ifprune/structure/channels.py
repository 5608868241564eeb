"""``ChannelStructure``: the prunable channel groups of a network, at its current widths."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch_pruning as tp
from torch import nn

from lightning_ifprune.structure.attention import AttentionHeads, find_attention
from lightning_ifprune.structure.cost import CostModel
from lightning_ifprune.structure.detection import output_layers, traces_in_eval
from lightning_ifprune.structure.example import Example, validate_example_inputs
from lightning_ifprune.structure.graph import all_groups, refuse_compiled, refuse_unsupported_modules, trace_graph
from lightning_ifprune.structure.groups import (
    ChannelGroup,
    CostCoef,
    GroupParser,
    NotPrunable,
    RefusedGroup,
    UnsupportedModelError,
)
from lightning_ifprune.structure.ops import DROPOUT_TYPES, SUPPORTED_TYPES, WEIGHTED_TYPES, op_name
from lightning_ifprune.structure.tracing import (
    OpOwners,
    as_name_set,
    module_order,
    reached_in_eval,
    resolve_min_keep,
)

#: How ``skipped`` starts the reason of a group that keeps its channels because removing them is unsafe.
UNSAFE = "unsafe to prune: "
#: Parsed groups: (prunable groups, skipped group → reason, cost coefficients, module → refusal).
Parsed = tuple[dict[str, ChannelGroup], dict[str, str], list[CostCoef], dict[str, str]]


class ChannelStructure:
    """The prunable channel groups of ``model`` at its current widths.

    Build one with :meth:`build`. The structure describes the model as it is now; after
    the model is pruned, build a new one (cheap: one traced forward pass).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Example,
        graph: tp.DependencyGraph,
        groups: dict[str, ChannelGroup],
        skipped: dict[str, str],
        costs: CostModel,
        heads: Mapping[str, AttentionHeads] | None = None,
    ) -> None:
        self.model = model
        #: Head groups (attention layer name → its head layout); removed by :mod:`.attention`, not Torch-Pruning.
        self.heads = dict(heads or {})
        self.example_inputs = example_inputs
        self.graph = graph
        self.groups = groups
        self.skipped = skipped
        self.costs = costs

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: Example,
        ignored_layers: Iterable[str | nn.Module] = (),
        min_channels: int | float = 1,
        original_sizes: Mapping[str, int] | None = None,
        strict: bool = False,
    ) -> ChannelStructure:
        """Trace ``model`` on ``example_inputs`` and collect its prunable groups.

        ``example_inputs`` is what ``model`` is called with (:mod:`.example`): a batched
        tensor, a tuple of positional arguments, a dict of keyword arguments, or a list of
        samples (the images of a torchvision detector).
        ``ignored_layers`` (modules or qualified names) keep every channel they touch; so do
        the output layers of torchvision detectors (:func:`.detection.output_layers`), which
        are listed in ``skipped``.
        ``min_channels`` is the least each group keeps: a count, or a fraction of the
        group's size in ``original_sizes`` (default: its current size).

        The model is traced in training mode (every branch that runs in training, such as
        auxiliary heads, is seen), or in eval mode when it holds a torchvision detector;
        buffers, modes and random generators are left as they were.

        A group whose channels cannot be removed safely (an unknown channel-mixing op, an
        option-A zero-pad shortcut, split channels in a residual sum, a mapping Torch-Pruning
        cannot infer, a frozen norm's buffers) keeps all its channels and is listed in
        ``skipped`` with the module and op; the rest of the model prunes. With ``strict`` such
        a group refuses the model instead, and so it does when no other group is left.

        Raises :class:`UnsupportedModelError` before anything changes, listing at once every
        module whose channels cannot be accounted for (custom layers with parameters, layers
        no forward pass reaches; with ``strict`` also the unsafe groups' modules) and whether
        ignoring them leaves anything prunable; also for ``torch.compile`` wrappers (prune the
        uncompiled module, then compile it) and for failures of Torch-Pruning's tracer.
        """
        refuse_compiled(model)
        refuse_unsupported_modules(model)
        example_inputs = validate_example_inputs(example_inputs)
        outputs = output_layers(model)
        kept_outputs = {n: m for n, m in model.named_modules() if n in as_name_set(model, outputs)}
        ignored = as_name_set(model, ignored_layers)
        resolve_min_keep(min_channels, 1)  # validates the value early
        graph, owners = trace_graph(
            model, example_inputs, eval_mode=traces_in_eval(model), outputs=list(kept_outputs.values())
        )
        order = module_order(model)
        slices = _slice_ops(model, graph, owners, ignored | set(kept_outputs))
        partial = "a partial-channel mapping lightning_ifprune does not support"
        if slices and strict:
            found = dict.fromkeys(f"{who} {what}" for who, what in slices.values())
            raise UnsupportedModelError(
                f"{type(model).__name__}: {'; '.join(found)}: {partial}; it cannot prune this model"
            )
        graph.unmapped.update({node: f"it {what}, {partial}" for node, (_, what) in slices.items()})
        # groups of output layers are not built: they map through the detector's post-processing
        not_roots = [*kept_outputs.values(), *graph.IGNORED_LAYERS_IN_TRACING]
        tp_groups, failed = all_groups(graph, not_roots, WEIGHTED_TYPES)

        attention = {n: a for n, a in find_attention(model, owners.reached).items() if n not in ignored}
        qkv_roots = {model.get_submodule(a.qkv) for a in attention.values() if not a.packed}
        tp_groups = [g for g in tp_groups if g[0].dep.target.module not in qkv_roots]  # heads instead

        def parse(skip: set[str]) -> Parsed:
            parsed = _parse_groups(
                GroupParser(model, graph, order, skip, owners), tp_groups, min_channels, original_sizes
            )
            for name, layout in attention.items():
                if name not in skip:
                    size0 = (original_sizes or {}).get(name, layout.heads)
                    parsed[0][name] = layout.group(resolve_min_keep(min_channels, size0))
                    parsed[2].extend(layout.coefs())
            return parsed

        groups, skipped, coefs, issues = parse(ignored)
        for module, err in failed.items():
            if (name := order[module][1]) not in ignored:
                why = f"Torch-Pruning cannot build the channel group of {type(module).__name__} '{name}' ({err})"
                skipped[name] = UNSAFE + why
                issues.setdefault(name, why)
        if not strict and groups:
            issues = {}  # the unsafe groups keep their channels, listed in skipped
        for name, module in kept_outputs.items():
            if isinstance(module, WEIGHTED_TYPES):
                skipped[name] = next(w for o, w in outputs.items() if name == o or name.startswith(o + "."))
        for name, why in _unseen_layers(model, example_inputs, graph, owners, ignored).items():
            issues.setdefault(name, why)
        if issues:
            remaining = parse(ignored | as_name_set(model, issues))[0]
            raise UnsupportedModelError(_refusal(model, order, issues, len(remaining)))
        costs = CostModel.measure(model, example_inputs, coefs)
        ordered = dict(sorted(groups.items(), key=lambda kv: order[model.get_submodule(kv[0])][0]))
        heads = {n: a for n, a in attention.items() if n in ordered}
        return cls(model, example_inputs, graph, ordered, skipped, costs, heads)

    @property
    def unsafe(self) -> dict[str, str]:
        """The groups kept whole because removing their channels is not safe: name → the modules and ops why."""
        return {n: why.removeprefix(UNSAFE) for n, why in self.skipped.items() if why.startswith(UNSAFE)}

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


def _parse_groups(
    parser: GroupParser,
    tp_groups: list[tp.Group],
    min_channels: int | float,
    original_sizes: Mapping[str, int] | None,
) -> Parsed:
    """Every Torch-Pruning group parsed; refusals collected (not raised) per module."""
    groups: dict[str, ChannelGroup] = {}
    skipped: dict[str, str] = {}
    coefs: list[CostCoef] = []
    issues: dict[str, str] = {}
    for group in tp_groups:
        try:
            grp, group_coefs = parser.parse(group)
        except NotPrunable as skip:
            skipped[skip.group] = skip.reason
            continue
        except RefusedGroup as refused:
            for name, why in refused.issues.items():
                issues.setdefault(name, why)
            skipped[refused.group] = UNSAFE + "; ".join(refused.issues.values())
            continue
        size0 = (original_sizes or {}).get(grp.name, grp.size)
        min_keep = min(grp.size, resolve_min_keep(min_channels, size0))
        groups[grp.name] = ChannelGroup(grp.name, grp.size, grp.producers, grp.norms, grp.consumers, min_keep)
        coefs.extend(group_coefs)
    for name in parser.ignored:
        groups.pop(name, None)
    return groups, skipped, coefs, issues


def _channel_slice(node: tp.Node) -> bool:
    """A slice of part of the channel axis (``x[:, a:b]``)."""
    module = node.module
    if node.type != tp.ops.OPTYPE.SLICE or getattr(module, "dim", None) != 1:
        return False
    sizes = tuple(getattr(module.grad_fn, "_saved_self_sym_sizes", ()))
    width = int(sizes[1]) if len(sizes) > 1 else None
    start, end, step = module.start or 0, module.end, module.step or 1
    return width is None or step != 1 or int(start) != 0 or end is None or int(end) < width


def _channel_region(graph: tp.DependencyGraph, ignored_modules: set[nn.Module]) -> set[tp.Node]:
    """The graph nodes coupled to the output channels of a prunable Conv/Linear: reached from
    one's output without crossing another weight layer (in either direction). Slices outside,
    e.g. on the input images, touch no channel that can be removed."""
    weighted = {n for m, n in graph.module2node.items() if isinstance(m, WEIGHTED_TYPES)}
    stack = [o for n in weighted if n.module not in ignored_modules for o in n.outputs]
    region: set[tp.Node] = set()
    while stack:
        node = stack.pop()
        if node in region or node in weighted:
            continue
        region.add(node)
        stack.extend(node.outputs)
        stack.extend(node.inputs)
    return region


def _slice_ops(
    model: nn.Module, graph: tp.DependencyGraph, owners: OpOwners, ignored: set[str]
) -> dict[tp.Node, tuple[str, str]]:
    """Slices of the channel axis (``x[:, :n]``) and in-place writes into a slice (``CopySlices``,
    except in-place dropout) on prunable channels: node → (who, what it does). Found before
    Torch-Pruning groups them, whose mapping through them is unchecked (and can take very
    long, e.g. ReXNet)."""
    region = _channel_region(graph, {m for n, m in model.named_modules() if n in ignored})
    found: dict[tp.Node, tuple[str, str]] = {}
    for node in graph.module2node.values():
        if node.grad_fn is None or node not in region:
            continue
        if _channel_slice(node):
            what = "takes a slice of the channels (x[:, a:b])"
        elif node.type == tp.ops.OPTYPE.ELEMENTWISE and op_name(node.grad_fn) == "torch::autograd::CopySlices":
            what = "writes in place into a slice of a tensor ('CopySlices', e.g. x[:, :n] += y)"
        else:
            continue
        where = owners.owner(node.grad_fn)
        module = model.get_submodule(where) if where else None
        if what.startswith("writes") and isinstance(module, DROPOUT_TYPES):
            continue
        who = f"module '{where}' ({type(module).__name__})" if where else "the top-level forward"
        found[node] = (who, what)
    return found


def _unseen_layers(
    model: nn.Module,
    example_inputs: Example,
    graph: tp.DependencyGraph,
    owners: OpOwners,
    ignored: set[str],
) -> dict[str, str]:
    """Layers with parameters whose channels the dependency graph cannot account for."""
    out: dict[str, str] = {}
    in_eval: set[nn.Module] | None = None
    for name, module in model.named_modules():
        if name in ignored or next(module.parameters(recurse=False), None) is None:
            continue
        if _mha_out_proj(model, name, graph):
            continue  # read as a weight by its attention layer, which is in the graph
        what = f"module '{name}' ({type(module).__name__})"
        if module not in owners.reached:
            if in_eval is None:
                in_eval = reached_in_eval(model, example_inputs)
            out[name] = (
                f"{what} runs only in eval mode, but the structure is traced in training mode"
                if module in in_eval
                else f"{what} has parameters but is not reached by any forward pass on example_inputs "
                "(training or eval mode), so the channels it reads are unknown (ignore it only if it never runs)"
            )
        elif module in graph.module2node or all(p in graph.module2node for p in module.parameters(recurse=False)):
            continue  # its channels (or its bare parameters') are in the groups, handled there
        elif isinstance(module, SUPPORTED_TYPES):
            out[name] = f"{what} runs, but its output never reaches the model's output, so the graph cannot see it"
        else:
            out[name] = (
                f"{what} holds parameters of a layer type lightning_ifprune does not prune, "
                "and the channels it touches cannot be tracked through it"
            )
    return out


def _mha_out_proj(model: nn.Module, name: str, graph: tp.DependencyGraph) -> bool:
    """The ``out_proj`` of an ``nn.MultiheadAttention`` of the graph (never called as a module)."""
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent)
    return leaf == "out_proj" and isinstance(module, nn.MultiheadAttention) and module in graph.module2node


def _refusal(model: nn.Module, order: dict[nn.Module, tuple[int, str]], issues: dict[str, str], remaining: int) -> str:
    """One message listing every offending module, the advice, and what the advice leaves."""
    names = sorted(issues, key=lambda n: order[model.get_submodule(n)][0])
    hint = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    lines = "\n".join(f"  - {issues[n]}" for n in names)
    after = (
        f"ignoring them leaves {remaining} prunable group(s)"
        if remaining
        else "ignoring them would leave nothing prunable: lightning_ifprune cannot prune this model"
    )
    return (
        f"{type(model).__name__}: {len(names)} module(s) make channel pruning unsafe:\n{lines}\n"
        f"pass ignored_layers={hint!r} to keep the channels they touch ({after})"
    )
