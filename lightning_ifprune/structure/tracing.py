"""Running a model to learn about it without changing it: modes, example inputs, op owners."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_ifprune.structure.ops import op_name


@contextmanager
def restore_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards (tracing switches to eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def module_order(model: nn.Module) -> dict[nn.Module, tuple[int, str]]:
    """Each module's position in ``named_modules`` order, and its qualified name."""
    return {m: (i, n) for i, (n, m) in enumerate(model.named_modules())}


def as_name_set(model: nn.Module, layers: Iterable[str | nn.Module]) -> set[str]:
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
    return {n for n in names.values() if any(n == r or n.startswith(r + ".") for r in roots)}


def resolve_min_keep(min_channels: int | float, size: int) -> int:
    """Channels a group must keep: an absolute count, or a fraction of ``size`` (≥ 1)."""
    if isinstance(min_channels, bool) or not isinstance(min_channels, (int, float)) or min_channels <= 0:
        raise ValueError(f"min_channels must be a positive int or a fraction in (0, 1), got {min_channels!r}")
    if isinstance(min_channels, float) and min_channels < 1:
        return max(1, math.ceil(min_channels * size))
    return max(1, int(min_channels))


def validate_example_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The single input tensor a structure is traced with (a batch of at least one sample)."""
    if isinstance(example_inputs, (list, tuple)):
        if len(example_inputs) != 1:
            raise ValueError("example_inputs must be one tensor (models with several inputs are not supported)")
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
        raise ValueError("example_inputs must be a batched tensor, e.g. shape (1, C, H, W)")
    return example_inputs


def owner_of_op(model: nn.Module, example_inputs: torch.Tensor, grad_fn: object) -> str:
    """Qualified name of the innermost module whose forward created ``grad_fn``'s op type."""
    target = op_name(grad_fn)
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
        with restore_modes(model), torch.enable_grad():
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
            found = found or op_name(fn) == target
            stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
        if found and (best_size is None or len(seen) < best_size):
            best, best_size = name, len(seen)
    return best or "<top level>"
