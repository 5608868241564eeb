"""Building Torch-Pruning's dependency graph: traced in training mode, failures made readable.

The trace runs the model in training mode (so branches that only run in training, such as
auxiliary heads, are part of the graph) with running-statistics norms in eval mode, every
buffer and the random generators restored afterwards: building a structure changes nothing.
Models holding a torchvision detector are traced in eval mode instead (:mod:`.detection`).
The graph's surgery keeps each parameter's memory format (``channels_last`` stays).

Torch-Pruning maps channel indices through concatenations, splits and reshapes after
tracing, and a mapping it cannot infer raises (shufflenet's channel shuffle: a division by
zero; DPN's dual-path concat: a missing width) and aborts the whole graph. Our graph maps
node by node instead and records the nodes whose mapping failed in ``unmapped``; every
group through one of them keeps all its channels (:mod:`.groups`).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as _index_mapping

from lightning_ifprune.structure.example import Example, call_model, example_device
from lightning_ifprune.structure.groups import UnsupportedModelError
from lightning_ifprune.structure.ops import UNSUPPORTED_MODULES, op_name
from lightning_ifprune.structure.tracing import OpOwners, restore_modes

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channels_last_format(p: torch.Tensor) -> torch.memory_format | None:
    """``channels_last(_3d)`` when ``p`` is laid out that way (and not also plainly contiguous)."""
    fmt = _FORMATS.get(p.dim())
    if fmt is None or p.is_contiguous() or not p.is_contiguous(memory_format=fmt):
        return None
    return fmt


class FormatKeepingGroup(tp.Group):
    """A Torch-Pruning group whose pruning gives every parameter back its memory format."""

    def prune(self, idxs: Sequence[int] | None = None, record_history: bool = True) -> None:
        """Prune as Torch-Pruning does, then restore ``channels_last`` layouts."""
        modules = {item.dep.target.module for item in self if isinstance(item.dep.target.module, nn.Module)}
        formats = [
            (m, name, fmt)
            for m in modules
            for name, p in m.named_parameters(recurse=False)
            if (fmt := _channels_last_format(p)) is not None
        ]
        super().prune(idxs=idxs, record_history=record_history)
        with torch.no_grad():
            for m, name, fmt in formats:
                p = getattr(m, name)
                if not p.is_contiguous(memory_format=fmt):
                    p.data = p.data.contiguous(memory_format=fmt)  # same Parameter object
                if p.grad is not None and not p.grad.is_contiguous(memory_format=fmt):
                    p.grad = p.grad.contiguous(memory_format=fmt)


#: Torch-Pruning's index-mapping update for each dummy-op node type (its ``update_index_mapping``).
_MAPPINGS = {
    tp.ops.OPTYPE.CONCAT: _index_mapping.update_concat_index_mapping,
    tp.ops.OPTYPE.SPLIT: _index_mapping.update_split_index_mapping,
    tp.ops.OPTYPE.RESHAPE: _index_mapping.update_reshape_index_mapping,
    tp.ops.OPTYPE.UNBIND: _index_mapping.update_unbind_index_mapping,
    tp.ops.OPTYPE.EXPAND: _index_mapping.update_expand_index_mapping,
    tp.ops.OPTYPE.SLICE: _index_mapping.update_slice_index_mapping,
}
_update_index_mapping = _index_mapping.update_index_mapping


def _tolerant_index_mapping(graph: tp.DependencyGraph) -> None:
    """Torch-Pruning's index-mapping update; for a :class:`FormatKeepingGraph` node by node,
    recording in ``graph.unmapped`` (node → error) the nodes whose mapping cannot be inferred."""
    if not isinstance(graph, FormatKeepingGraph):
        return _update_index_mapping(graph)
    for node in list(graph.module2node.values()):
        update = _MAPPINGS.get(node.type)
        if update is None or node in graph.unmapped:
            continue
        if node.type == tp.ops.OPTYPE.RESHAPE and _splits_channel_axis(node.grad_fn):
            graph.unmapped[node] = "a view that splits the channel axis into several (e.g. a channel shuffle)"
            continue
        try:
            update(graph, node)
        except Exception as err:  # noqa: BLE001 - the node's groups keep their channels instead
            graph.unmapped[node] = f"Torch-Pruning cannot map channel indices through it ({type(err).__name__}: {err})"
    return None


def _splits_channel_axis(grad_fn: object) -> bool:
    """A view or reshape to more dims whose channel axis (dim 1) differs from its input's: Torch-Pruning
    maps it as a flatten, which it is not (and, mapped so, its index lists grow huge)."""
    before = tuple(getattr(grad_fn, "_saved_self_sym_sizes", ()))
    meta = getattr(grad_fn, "_input_metadata", ())
    after = tuple(meta[0].shape) if meta else ()
    return len(before) > 1 and len(after) > len(before) and int(after[1]) != int(before[1])


_index_mapping.update_index_mapping = _tolerant_index_mapping  # other graphs: unchanged behaviour


class FormatKeepingGraph(tp.DependencyGraph):
    """A dependency graph whose pruning groups keep memory formats (:class:`FormatKeepingGroup`)
    and whose index mapping records failures per node (``unmapped``) instead of raising."""

    def __init__(self) -> None:
        super().__init__()
        self.unmapped: dict[tp.Node, str] = {}

    def get_pruning_group(self, module: nn.Module, pruning_fn: Callable, idxs: Sequence[int]) -> tp.Group:
        """Torch-Pruning's group, pruning through :class:`FormatKeepingGroup`."""
        group = super().get_pruning_group(module, pruning_fn, idxs)
        group.__class__ = FormatKeepingGroup  # same state, one overridden method
        return group


def all_groups(
    graph: FormatKeepingGraph, ignored: Sequence[nn.Module], root_types: tuple[type, ...]
) -> tuple[list[tp.Group], dict[nn.Module, str]]:
    """Torch-Pruning's groups, one per root layer's output channels (``get_all_groups``), and
    the roots whose group it cannot build (root → error), instead of one error for the model.

    The dependencies out of an ``unmapped`` node are cut first: every group that reaches it keeps
    its channels anyway, and one that would cross it reaches it from its own side (dependencies
    come in pairs), so nothing beyond it is needed; following them through an unchecked mapping
    can take hours (DPN, ReXNet).
    """
    for node in graph.unmapped:
        node.dependencies = []
    groups, failed, visited = [], {}, set()
    for module in list(graph.module2node):
        if module in ignored or module in visited or not isinstance(module, root_types):
            continue
        pruner = graph.get_pruner_of_module(module)
        width = None if pruner is None else pruner.get_out_channels(module)
        if width is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
        except Exception as err:  # noqa: BLE001 - this root keeps its channels instead
            failed[module] = f"{type(err).__name__}: {err}"
            continue
        outs = [item.dep.target.module for item in group if graph.is_out_channel_pruning_fn(item.dep.handler)]
        visited.update(outs)
        if not any(m in ignored for m in outs):
            groups.append(group)
    return groups, failed


@contextmanager
def trace_mode(model: nn.Module, device: torch.device, eval_mode: bool = False) -> Iterator[None]:
    """Training mode, norms with running statistics in eval mode (everything in eval mode with
    ``eval_mode``); modes, buffers and RNG restored."""
    saved = [
        (m, name, buf, buf.detach().clone())
        for m in model.modules()
        for name, buf in m._buffers.items()
        if buf is not None
    ]
    devices = [device] if device.type == "cuda" else []
    with restore_modes(model), torch.random.fork_rng(devices=devices):
        try:
            model.train(not eval_mode)
            for m in model.modules():
                if getattr(m, "track_running_stats", False):
                    m.eval()  # batch statistics of one example would change nothing structural
            yield
        finally:
            with torch.no_grad():
                for m, name, buf, value in saved:
                    buf.copy_(value)
                    m._buffers[name] = buf


def refuse_unsupported_modules(model: nn.Module) -> None:
    """Refuse, by name and before tracing, the module types of :data:`UNSUPPORTED_MODULES`."""
    found = [(n, type(m).__name__) for n, m in model.named_modules() if type(m).__name__ in UNSUPPORTED_MODULES]
    if found:
        listed = ", ".join(f"'{n}' ({t})" for n, t in found[:3]) + (
            f" and {len(found) - 3} more" if len(found) > 3 else ""
        )
        why = "; ".join(f"{t} {UNSUPPORTED_MODULES[t]}" for t in dict.fromkeys(t for _, t in found))
        raise UnsupportedModelError(
            f"{type(model).__name__}: module(s) {listed}: {why}; lightning_ifprune does not support "
            "this channel mapping and cannot prune this model"
        )


def refuse_compiled(model: nn.Module) -> None:
    """Refuse ``torch.compile`` wrappers: their structure is the uncompiled module's."""
    for name, m in model.named_modules():
        if type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module):
            where = "the model" if not name else f"module '{name}'"
            raise UnsupportedModelError(
                f"{where} is a torch.compile wrapper ({type(m).__name__} of "
                f"{type(m._orig_mod).__name__}); build the structure on the uncompiled module "
                f"(its `_orig_mod`), prune it, then compile the pruned module again"
            )


def trace_graph(
    model: nn.Module,
    example_inputs: Example,
    eval_mode: bool = False,
    outputs: Sequence[nn.Module] = (),
) -> tuple[FormatKeepingGraph, OpOwners]:
    """The dependency graph of one training-mode (or eval-mode) forward, and who owns each of its ops.

    What the modules in ``outputs`` return counts as output of the model too (a detector's RPN
    scores, which its eval-mode detections use only through detached proposals).
    """
    owners = OpOwners(model)

    def forward(net: nn.Module, x: Example):
        seen: list = []
        hooks = [m.register_forward_hook(lambda _m, _a, out: seen.append(out)) for m in outputs]
        try:
            with trace_mode(net, example_device(x), eval_mode), owners.recording():
                out = call_model(net, x)
        finally:
            for h in hooks:
                h.remove()
        return (out, seen) if outputs else out

    graph = FormatKeepingGraph()
    with restore_modes(model), torch.enable_grad():
        try:
            graph.build_dependency(model, example_inputs=example_inputs, forward_fn=forward, verbose=False)
        except Exception as err:  # noqa: BLE001 - every tracer failure becomes a refusal
            raise UnsupportedModelError(tracer_failure(model, owners, err)) from err
    return graph, owners


def tracer_failure(model: nn.Module, owners: OpOwners, err: BaseException) -> str:
    """A readable refusal for an error inside Torch-Pruning: model type, error, and where."""
    node = _failing_node(err)
    where = ""
    if node is not None:
        module = node.module
        name = owners.names.get(module) if isinstance(module, nn.Module) else None
        if name is None and node.grad_fn is not None:
            name = owners.owner(node.grad_fn)
        op = op_name(node.grad_fn) if node.grad_fn is not None else type(module).__name__
        where = f" at op '{op}'" + (f" in module '{name}'" if name else " in the top-level forward")
    return (
        f"Torch-Pruning could not trace the channel dependencies of {type(model).__name__}{where}: "
        f"{type(err).__name__}: {err}; lightning_ifprune cannot prune this model"
    )


def _failing_node(err: BaseException) -> tp.Node | None:
    """The innermost dependency-graph node a failing Torch-Pruning frame was working on."""
    named, found = None, None
    tb: types.TracebackType | None = err.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if isinstance(local.get("node"), tp.Node):
            named = local["node"]
        found = next((v for v in local.values() if isinstance(v, tp.Node)), found)
        tb = tb.tb_next
    return named or found
