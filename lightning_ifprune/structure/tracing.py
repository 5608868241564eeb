"""Running a model to learn about it without changing it: modes, example inputs, op owners."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_ifprune.structure.example import Example, call_model


@contextmanager
def restore_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards (tracing switches modes)."""
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
    if min_channels != int(min_channels):
        raise ValueError(f"min_channels must be a whole count (≥ 1) or a fraction in (0, 1), got {min_channels!r}")
    return int(min_channels)


def _grad_fns(obj: object) -> list:
    """Autograd nodes of every tensor in a (nested) value."""
    if isinstance(obj, torch.Tensor):
        return [obj.grad_fn] if obj.grad_fn is not None else []
    if isinstance(obj, (list, tuple)):
        return [f for o in obj for f in _grad_fns(o)]
    if isinstance(obj, dict):
        return [f for o in obj.values() for f in _grad_fns(o)]
    return []


class OpOwners:
    """Which module's forward created an autograd node, and which modules ran at all.

    Filled by hooks around one forward (:meth:`recording`); :meth:`owner` then answers for
    any node of that forward's graph (the innermost module whose call created it).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.reached: set[nn.Module] = set()
        self.spans: list[tuple[str, set, list]] = []  # (module, its inputs' nodes, its outputs' nodes)
        self._members: list[tuple[str, set]] | None = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record module calls and their input/output nodes during the enclosed forward."""
        starts: dict[nn.Module, list[set]] = {}

        def pre(module, args, kwargs):
            self.reached.add(module)
            starts.setdefault(module, []).append(set(_grad_fns((args, kwargs))))

        def post(module, _args, _kwargs, out):
            stops = starts[module].pop() if starts.get(module) else set()
            self.spans.append((self.names[module], stops, _grad_fns(out)))

        hooks = []
        for m in self.names:
            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(m.register_forward_hook(post, with_kwargs=True))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def owner(self, grad_fn: object) -> str | None:
        """Qualified name of the innermost module that created ``grad_fn`` (None: the top level)."""
        if self._members is None:
            self._members = []
            for name, stops, roots in self.spans:
                seen, stack = set(), list(roots)
                while stack:
                    fn = stack.pop()
                    if fn is None or fn in seen or fn in stops:
                        continue
                    seen.add(fn)
                    stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
                self._members.append((name, seen))
        best, best_size = None, None
        for name, members in self._members:
            if name and grad_fn in members and (best_size is None or len(members) < best_size):
                best, best_size = name, len(members)
        return best


def reached_in_eval(model: nn.Module, example_inputs: Example) -> set[nn.Module]:
    """Modules an eval-mode forward on ``example_inputs`` calls (modes restored)."""
    reached: set[nn.Module] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _a: reached.add(mod)) for m in model.modules()]
    try:
        with restore_modes(model), torch.no_grad():
            model.eval()
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return reached
