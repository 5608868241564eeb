"""A measured latency cost model (spec §11): FLOPs are not time.

Every prunable layer of a :class:`~lightning_ifprune.structure.ChannelStructure` (each
Conv/Linear term of its exact cost model, and each BatchNorm with the activation that
usually follows it) is timed alone, on the model's device, at the run's batch size and the
layer's own input shape, over a small grid of its input/output widths; between grid points
the latency is interpolated bilinearly. What no layer term explains (residual additions,
activations, pooling, the framework's overhead: the whole model's measured latency less the
sum of the layer terms at full width) is carried by the norm terms (``norm_scale``): those ops
run elementwise on the tensors the norms see, so they shrink with the same widths. A single
factor on all layers instead overpredicted a ResNet-18 whose stem was pruned to one channel by
25 % (its maxpool and first-stage additions at 56×56 all but vanish), and a constant
overpredicted heavily pruned ResNet-56s by up to 50 %. Without norm layers (or when the whole
model runs faster than its convolutions alone) one factor ``scale`` on all layers remains.
:meth:`LatencyModel.calibrated` refits the norm weight and a constant to measured pruned
versions of the model (``prune_to_target(latency_checks=N)`` measures its plans:
``lightning_ifprune.calibration``).

Convolution latency is a step function of the widths: the kernels work on blocks of channels
(oneDNN: 16 with AVX-512, 8 with AVX2; tensor cores: 8), and a width just below a multiple
runs no faster than the multiple (measured here: 62 or 50 output channels slower than 64).
Convolution grids are therefore measured at multiples of the block (:func:`channel_block`),
plus 1 and half a block (a layer one block wide can still get cheaper), and a width above the
first block is priced as the next multiple; ``round_to="auto"`` keeps latency-targeted widths
at multiples, where the prediction is a measured point or between two.

Measurements are cached on disk (JSON, one file per environment: device, torch version, CPU
threads), one entry per layer signature (op, kernel, stride, padding, groups, input spatial
shape, batch size, dtype) and widths, so a second build on the same machine times only the
whole model (:mod:`lightning_ifprune.latency_env`: the key, the cache, the allocator).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark
from tqdm import tqdm

from lightning_ifprune.latency_env import LatencyCache, LatencyEnv, channel_block
from lightning_ifprune.structure import CONV_TYPES, NORM_TYPES, WEIGHTED_TYPES, ChannelStructure
from lightning_ifprune.structure.tracing import restore_modes

#: ``measure(module, inputs) -> seconds``: one robust time (a median) of ``module(inputs)``.
Measure = Callable[[nn.Module, torch.Tensor], float]

GRID_POINTS = 5
BATCH_NORMS = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def timer_measure(module: nn.Module, inputs: torch.Tensor, min_run_time: float = 0.1, warmup: int = 3) -> float:
    """Median seconds of ``module(inputs)`` under ``no_grad`` (``torch.utils.benchmark``, at the
    current CPU thread count, CUDA synchronised), after ``warmup`` untimed calls (kernel and
    primitive caches, allocator)."""
    timer = benchmark.Timer("m(x)", globals={"m": module, "x": inputs}, num_threads=torch.get_num_threads())
    with torch.no_grad():
        timer.timeit(warmup)
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)


@dataclass
class LayerGrid:
    """Latency (ms) of one layer on a grid of (input, output) widths; one point on an axis
    means the layer does not depend on it (a fixed width, or an input tied to the output)."""

    signature: str
    ins: list[int]
    outs: list[int]
    table: list[list[float]]  # table[i][j]: ins[i] inputs, outs[j] outputs
    block: int = 1  # widths above one block cost what the next multiple costs (at most the full width)

    def __call__(self, n_in: int, n_out: int) -> float:
        i, a = _segment(self.ins, _padded(n_in, self.block, self.ins[-1]))
        j, b = _segment(self.outs, _padded(n_out, self.block, self.outs[-1]))
        t = self.table
        i1, j1 = min(i + 1, len(self.ins) - 1), min(j + 1, len(self.outs) - 1)
        return (1 - a) * ((1 - b) * t[i][j] + b * t[i][j1]) + a * ((1 - b) * t[i1][j] + b * t[i1][j1])


def _padded(width: int, block: int, full: int) -> int:
    """``width`` rounded up to a multiple of ``block``, at most ``full``; widths within the
    first block stay as they are (they are measured: :func:`grid_axis`)."""
    return min(full, -(-width // block) * block) if width > block else width


def _segment(points: list[int], x: int) -> tuple[int, float]:
    """(index of the grid segment holding ``x``, position in it in [0, 1]); clamped at the ends."""
    if len(points) == 1 or x <= points[0]:
        return 0, 0.0
    if x >= points[-1]:
        return len(points) - 1, 0.0
    i = bisect.bisect_right(points, x) - 1
    return i, (x - points[i]) / (points[i + 1] - points[i])


def grid_axis(full: int, varies: bool, multiple: int = 1, points: int = GRID_POINTS) -> list[int]:
    """Widths to measure an axis at: up to ``points`` multiples of ``multiple`` spread over
    ``multiple``..``full``, and ``full`` itself; with a block (``multiple`` > 1) also 1 and
    half a block, so that a layer narrower than two blocks still has measured savings."""
    if not varies:
        return [full]
    small = {w for w in (1, multiple // 2) if w < full} if multiple > 1 else set()
    if full <= multiple:
        return sorted(small | {full})
    steps = full // multiple
    raw = {round(1 + (steps - 1) * k / (points - 1)) for k in range(points)}
    return sorted(small | {k * multiple for k in raw} | {full})


@dataclass
class _LayerSpec:
    """How to build and feed a stand-alone copy of one layer at other widths."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]  # the module's input per sample
    tied: bool  # input width follows the output width (depthwise conv, norm)

    def signature(self, batch_size: int, dtype: torch.dtype) -> str:
        m = self.module
        if isinstance(m, CONV_TYPES):
            groups = "dw" if self.tied else m.groups
            op = f"{type(m).__name__}|k{m.kernel_size}|s{m.stride}|p{m.padding}|d{m.dilation}|g{groups}"
            op += f"|b{m.bias is not None}|{m.padding_mode}"
            spatial = self.shape[1:]
        elif isinstance(m, nn.Linear):
            op, spatial = f"Linear|b{m.bias is not None}", self.shape[:-1]
        else:
            op, spatial = "BatchNorm+ReLU", self.shape[1:]
        return f"{op}|x{tuple(spatial)}|n{batch_size}|{str(dtype).removeprefix('torch.')}"

    def instance(self, n_in: int, n_out: int, batch_size: int, like: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """A fresh layer with ``n_in`` → ``n_out`` channels and a random input batch for it."""
        m = self.module
        if isinstance(m, CONV_TYPES):
            groups = n_out if self.tied else m.groups
            n_in = n_out if self.tied else n_in
            layer: nn.Module = type(m)(n_in, n_out, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                                       m.bias is not None, m.padding_mode)  # fmt: skip
            shape = (n_in, *self.shape[1:])
        elif isinstance(m, nn.Linear):
            layer, shape = nn.Linear(n_in, n_out, bias=m.bias is not None), (*self.shape[:-1], n_in)
        else:
            layer = nn.Sequential(BATCH_NORMS[len(self.shape) - 1](n_out), nn.ReLU())
            shape = (n_out, *self.shape[1:])
        layer = layer.to(like.device, like.dtype).eval()
        return layer, torch.randn(batch_size, *shape, device=like.device, dtype=like.dtype)


@dataclass
class LatencyModel:
    """Predicted latency (ms per batch of ``batch_size``) of a model after removing channels.

    Built by :meth:`build` for one model; predictions work for later, pruned versions of the
    same model (its layers keep their names), widths within those it was built at.
    """

    layers: dict[str, LayerGrid]
    scale: float
    measured_ms: float
    batch_size: int
    env: LatencyEnv
    block: int = 1  # the device's channel block (:func:`channel_block`): ``round_to="auto"``
    #: Weight of the norm(+activation) terms: they carry the time no layer explains (residual
    #: additions, activations, pooling run on the same tensors and shrink with the same widths).
    norm_scale: float = 1.0
    offset: float = 0.0  # constant ms (fitted by :meth:`calibrated`; 0 until then)
    low: float = 0.0  # the smallest calibrated layer sum: below it, with offset < 0, predictions shrink in proportion
    #: The measured points the calibration was fitted to: (removed channels per group, measured ms).
    calibration: tuple[tuple[dict[str, int], float], ...] = ()

    @classmethod
    def build(
        cls,
        structure: ChannelStructure,
        batch_size: int = 64,
        *,
        cache_dir: str | Path | None = None,
        measure: Measure | None = None,
        env: LatencyEnv | None = None,
        block: int | None = None,
        progress: bool = True,
    ) -> LatencyModel:
        """Measure (or read from the cache) every layer's grid, then the whole model once.

        Runs on the device and dtype of ``structure.example_inputs`` with the model in eval
        mode and no gradients; the model's weights, buffers and modes are left as they were.
        ``env`` (default: the current one) keys the cache; ``measure`` replaces the timer;
        ``block`` (default: :func:`channel_block` of the device) aligns the convolutions' grids.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"latency batch_size must be a positive int, got {batch_size!r}")
        like = structure.example_inputs
        measure = measure or timer_measure
        block = channel_block(like.device) if block is None else block
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"latency block must be a positive int, got {block!r}")
        cache = LatencyCache(env or LatencyEnv.current(like.device), cache_dir)
        specs = _layer_specs(structure)
        plans = {}
        for spec in specs:
            cost = structure.costs.layers[spec.name]
            multiple = _multiple(spec, block)
            ins = [1] if spec.tied else grid_axis(cost.in0, bool(cost.in_coef), multiple)
            plans[spec.name] = (spec, ins, grid_axis(cost.out0, bool(cost.out_coef), multiple), multiple)
        todo = {}
        for spec, ins, outs, _ in plans.values():
            sig = spec.signature(batch_size, like.dtype)
            for n_in in ins:
                for n_out in outs:
                    key = f"{sig}|{n_in}x{n_out}"
                    if key not in cache.points:
                        todo.setdefault(key, (spec, n_in, n_out))
        for key, (spec, n_in, n_out) in tqdm(todo.items(), desc="latency grid", disable=not progress or not todo):
            layer, x = spec.instance(n_in, n_out, batch_size, like)
            cache.points[key] = 1000 * measure(layer, x)
        if todo:
            cache.save()
        layers = {}
        for name, (spec, ins, outs, multiple) in plans.items():
            sig = spec.signature(batch_size, like.dtype)
            table = [[cache.points[f"{sig}|{i}x{o}"] for o in outs] for i in ins]
            layers[name] = LayerGrid(sig, ins, outs, table, multiple)
        measured = 1000 * _measure_model(structure, batch_size, measure)
        model = cls(layers, 1.0, measured, batch_size, cache.env, block)
        weighted, norms = model.sums(structure)
        if norms > 0 and measured > weighted:  # what no layer explains goes with the elementwise terms
            model.norm_scale = (measured - weighted) / norms
        else:
            model.scale = measured / max(weighted + norms, 1e-12)
        return model

    def sums(self, structure: ChannelStructure, removed: Mapping[str, int] | None = None) -> tuple[float, float]:
        """Stand-alone timings (ms) at the widths left after ``removed``, summed: (Conv/Linear
        layers, norm layers with their activation)."""
        delta = {g: -int(n) for g, n in (removed or {}).items()}
        weighted = norms = 0.0
        for name, cost in structure.costs.layers.items():
            if name in self.layers:
                t = self.layers[name](*cost.dims(delta))
                if cost.kind == "norm":
                    norms += t
                else:
                    weighted += t
        return weighted, norms

    def layer_sum(self, structure: ChannelStructure, removed: Mapping[str, int] | None = None) -> float:
        """The stand-alone layer timings summed, the norm terms weighted by ``norm_scale`` (ms)."""
        weighted, norms = self.sums(structure, removed)
        return weighted + self.norm_scale * norms

    def predict(self, structure: ChannelStructure, removed: Mapping[str, int] | None = None) -> float:
        """Milliseconds per batch of the structure's model after removing ``removed[g]`` channels per group."""
        total = self.layer_sum(structure, removed)
        if self.offset < 0 and total < self.low:  # beyond the measured points a negative offset
            return (self.scale * self.low + self.offset) * total / self.low  # would reach 0: shrink in proportion
        return self.scale * total + self.offset

    def calibrated(
        self, structure: ChannelStructure, points: Sequence[tuple[Mapping[str, int], float]]
    ) -> LatencyModel:
        """A copy fitted to measured latencies of pruned versions of ``structure``'s model.

        ``points`` are (channels removed per group, measured ms); with the full model's
        measurement (``measured_ms``) they fix ``norm_scale`` and a constant ``offset`` by least
        squares, so predictions near a measured point are as good as the measurement. Where the
        points do not tell the norm weight apart (equal norm widths) or give it below 0, only
        the offset is fitted. A negative offset is not extrapolated: below the smallest measured
        layer sum predictions shrink in proportion. Earlier points of this model count too.
        """
        merged = [*self.calibration, *((dict(r), float(ms)) for r, ms in points)]
        for removed, ms in merged:
            if not (math.isfinite(ms) and ms > 0):
                raise ValueError(f"a calibration point needs a positive measured latency, got {ms!r} ms")
            unknown = set(removed) - set(structure.groups)
            if unknown:
                raise ValueError(f"calibration point removes channels of unknown groups {sorted(unknown)}")
        feats = [self.sums(structure)] + [self.sums(structure, r) for r, _ in merged]
        ys = [self.measured_ms] + [ms for _, ms in merged]
        zs = [y / self.scale - w for (w, _), y in zip(feats, ys, strict=True)]  # what the norm terms must explain
        ns = [n for _, n in feats]
        mn, mz = sum(ns) / len(ns), sum(zs) / len(zs)
        var = sum((n - mn) ** 2 for n in ns)
        weight = self.norm_scale  # kept where the points cannot tell it or put it below 0
        if var > 1e-12 * mn**2:
            fitted = sum((n - mn) * (z - mz) for n, z in zip(ns, zs, strict=True)) / var
            if fitted > 0:
                weight = fitted
        offset = self.scale * (mz - weight * mn)
        low = min(w + weight * n for w, n in feats)
        return replace(self, norm_scale=weight, offset=offset, low=low, calibration=tuple(merged))

    def channel_savings(self, structure: ChannelStructure) -> dict[str, float]:
        """Per group, the milliseconds one removed channel saves: the mean over its removable
        range (robust to the steps of measured latency), at least a tiny positive value."""
        now = self.predict(structure)
        out = {}
        for name, group in structure.groups.items():
            k = group.size - group.min_keep
            saving = (now - self.predict(structure, {name: k})) / k if k else 0.0
            out[name] = max(saving, 1e-9 * abs(now), 1e-12)
        return out


def _multiple(spec: _LayerSpec, block: int) -> int:
    """Grid widths of a convolution: multiples of the channel block (and of its groups, which a
    grouped, not depthwise, convolution's widths must be); other layers: any width."""
    m = spec.module
    if not isinstance(m, CONV_TYPES):
        return 1
    return math.lcm(block, 1 if spec.tied else m.groups)


def _layer_specs(structure: ChannelStructure) -> list[_LayerSpec]:
    """Every modelled layer of the structure with the input shape it sees (one traced pass).

    Conv/Linear layers and BatchNorms only: others (attention's packed projections, PReLU)
    and layers no forward call reaches are not timed alone; they count through ``norm_scale`` (or ``scale``)."""
    model = structure.model
    wanted = {}
    for name, cost in structure.costs.layers.items():
        module = model.get_submodule(name)
        if (cost.kind == "weighted" and isinstance(module, WEIGHTED_TYPES)) or isinstance(module, NORM_TYPES):
            wanted[module] = name
    shapes: dict[str, tuple[int, ...]] = {}

    def record(module: nn.Module, inputs: tuple, _output: object) -> None:
        shapes.setdefault(wanted[module], tuple(inputs[0].shape[1:]))

    hooks = [m.register_forward_hook(record) for m in wanted]
    try:
        with restore_modes(model), torch.no_grad():
            model.eval()(structure.example_inputs)
    finally:
        for h in hooks:
            h.remove()
    specs = []
    for module, name in wanted.items():
        if name in shapes:
            cost = structure.costs.layers[name]
            tied = cost.kind == "norm" or cost.depthwise
            specs.append(_LayerSpec(name, module, shapes[name], tied))
    return specs


def _measure_model(structure: ChannelStructure, batch_size: int, measure: Measure) -> float:
    """Seconds of the whole model (eval mode) on a random batch of ``batch_size``."""
    model, like = structure.model, structure.example_inputs
    x = torch.randn(batch_size, *like.shape[1:], device=like.device, dtype=like.dtype)
    with restore_modes(model):
        return measure(model.eval(), x)
