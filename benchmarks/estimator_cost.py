"""Per-batch cost of the influence estimator against a training step and the reference scheme.

For each model (CIFAR ResNet-32/56 from the project's zoo) and batch size, on synthetic
CIFAR-shaped data (3x32x32, 10 classes), this script measures the wall time and the peak
memory of one batch of:

* ``train_step`` - forward + backward + ``SGD(momentum=0.9, weight_decay=1e-4).step()``;
* ``fd_reference`` - the reference implementation's scheme, re-implemented here: with channel
  masks applied where channels are consumed (``channel_masks``), ``v = H_wm 1`` by central
  differences of ``grad_w L`` at ``m = 1 +- R 1`` (``R = 0.01 / ||1||``), ``u = v / lambda``,
  then ``s = H_mw u`` by central differences of ``grad_m L`` at ``w +- R' u``
  (``R' = 0.01 / ||u||``): four forward+backward passes;
* ``taylor`` and ``fisher`` - the first-order baselines (one forward+backward), through
  ``lightning_ifprune.criteria.score_structure`` (what ``lip.score_channels`` runs after
  building the structure, so the build stays out of the per-batch time);
* the estimator modes of :func:`lightning_ifprune.estimator.estimate` (exact Hessian-vector
  products by double backward): ``paper/ones/{identity,cg10,neumann20}`` and
  ``retrained/rademacher/{identity,cg10}`` with 4 or 16 probes.

Every per-batch figure is divided by the train step's and the FD scheme's measured in the
same run. The structure build (one traced forward) is timed separately and excluded.

Method
------
* Isolation: every (model, batch, mode) runs in its own child process, forked from a
  ``forkserver`` that has only imported the libraries, so modes cannot inherit each other's
  allocations. The child seeds and builds the model, the batch and the ``ChannelStructure``.
* Warm-up: one full-batch call of the mode (estimator modes stop right before their first
  Hessian-vector product, except ``paper/ones/identity``, which runs one), then ``--repeats``
  timed calls; the reported time is their median. Repeats stop early once ``--mode-budget-s``
  seconds of timed work are spent (at least one call always runs).
* Long estimator calls: the child counts the calls to ``BatchHessian.hvp`` (each one exact,
  probe-batched Hessian-vector product). If a call passes ``--mode-budget-s`` it is stopped
  after the current product and the rest is extrapolated from the products it timed (they
  all have the same shape); such rows are marked ``~`` and ``"status": "extrapolated"``. A mode
  whose first product alone is predicted (from ``paper/ones/identity``'s product time in the
  same configuration and the probe-batching slowdown measured in the first configuration) to
  exceed twice the budget is not run at all in that configuration; its cost is *projected*
  as ``t_grad + n_hvp * t_hvp`` and marked ``p`` / ``"status": "projected"`` (no memory).
  In the first configuration every mode runs. Configurations run cheapest first.
* Threads: each child uses ``--threads`` intra-op threads (default 1). On a machine shared
  with other jobs, multi-threaded OpenMP regions stall whenever a sibling thread is
  descheduled (ResNet-32, batch 8: a train step took 0.06 s on 1 thread and 0.15-1.0 s on 2
  threads next to another job), which swamps the ratios this benchmark is about. Pass
  ``--threads 0`` for torch's default on a dedicated machine.
* Timing: ``time.perf_counter``; on CUDA after ``torch.cuda.synchronize()``.
* Peak memory, CPU: the peak resident-set increase of the child during the timed calls. After
  the warm-up the child runs ``gc.collect()`` and glibc's ``malloc_trim(0)``, resets the
  kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmRSS``; the
  figure is ``VmHWM - VmRSS`` after the calls. (Where ``clear_refs`` is not writable it falls
  back to ``ru_maxrss`` minus the RSS after the warm-up, which can only over-report.) It
  covers every byte the process touched (activations, graphs, gradients, probe stacks),
  including allocator fragmentation - what a user would pay. Peak memory of a stopped call
  covers the part that ran (the first products hold the largest live set, so this is close).
* Peak memory, CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation after the
  warm-up, with the peak stats reset after the warm-up.

The first configuration also checks the FD scheme against the estimator (cosine similarity of
the two ``paper`` scores) so that the baseline is known to compute the same quantity, and, unless
``--no-profile``, profiles one ``paper/ones/identity`` call with ``torch.profiler`` (split into
the gradient-with-graph pass, the Hessian-vector products, the autograd nodes of the double
backward, and ``MaskSpace`` expand/reduce).

Timings are wall-clock and sensitive to other load on the machine; the load average is
recorded with every mode. Usage::

    python benchmarks/estimator_cost.py [--models resnet32,resnet56] [--batches 128,32]
        [--device cpu|cuda] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ifprune.estimator import EstimatorOptions
from lightning_ifprune.loss import supervised

CE = supervised(F.cross_entropy)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "estimator_cost.json"
WEIGHT_DECAY = 1e-4
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    """One measured computation: ``kind`` is train, fd, criterion or estimator."""

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


def _est(score: str, probes: str, inverse: str, **extra: Any) -> dict[str, Any]:
    """Options of a measured mode: one micro-batch (one graph for all products, the fastest) unless given."""
    return {
        "score": score,
        "probes": probes,
        "inverse": inverse,
        "micro_batches": 1,
        "weight_decay": WEIGHT_DECAY,
        **extra,
    }


_DEFAULTS = EstimatorOptions()
DEFAULT_MODE = (
    f"default: {_DEFAULTS.score}/{_DEFAULTS.probes}/{_DEFAULTS.inverse}"
    f"{_DEFAULTS.cg_iters if _DEFAULTS.inverse == 'cg' else ''} mb{_DEFAULTS.micro_batches}"
)
MODES: tuple[Mode, ...] = (
    Mode("train_step", "train"),
    Mode("fd_reference", "fd"),
    Mode("taylor", "criterion", {"criterion": "taylor"}),
    Mode("fisher", "criterion", {"criterion": "fisher"}),
    Mode("paper/ones/identity", "estimator", _est("paper", "ones", "identity")),
    Mode(DEFAULT_MODE, "estimator", {"weight_decay": WEIGHT_DECAY}),
    Mode("previous default: paper/ones/cg10 mb2", "estimator", _est("paper", "ones", "cg", micro_batches=2)),
    Mode("paper/ones/cg10", "estimator", _est("paper", "ones", "cg", cg_iters=10)),
    Mode("paper/ones/neumann20", "estimator", _est("paper", "ones", "neumann", neumann_terms=20)),
    Mode(
        "retrained/rademacher/identity P16",
        "estimator",
        _est("retrained", "rademacher", "identity", num_probes=16, probe_batch=16),
    ),
    Mode(
        "retrained/rademacher/cg5 P4",
        "estimator",
        _est("retrained", "rademacher", "cg", cg_iters=5, num_probes=4),
    ),
    Mode(
        "retrained/rademacher/cg10 P4",
        "estimator",
        _est("retrained", "rademacher", "cg", cg_iters=10, num_probes=4, probe_batch=4),
    ),
    Mode(
        "retrained/rademacher/cg10 P16",
        "estimator",
        _est("retrained", "rademacher", "cg", cg_iters=10, num_probes=16, probe_batch=16),
    ),
)
PAPER = "paper/ones/identity"
MODE_BY_NAME = {m.name: m for m in MODES}


def hvp_plan(options: dict[str, Any]) -> tuple[int, int]:
    """(probe-batch width k, number of ``BatchHessian.hvp`` calls) of one estimator batch."""
    opts = EstimatorOptions(**options)
    if opts.probes == "ones":
        chunks, k = 1, 1
    else:
        chunks, k = (
            math.ceil(opts.num_probes / opts.probe_batch),
            min(opts.num_probes, opts.probe_batch),
        )
    inner = {"identity": 0, "cg": opts.cg_iters, "neumann": opts.neumann_terms - 1}[opts.inverse]
    return k, chunks * (2 + inner)


# ----------------------------------------------------------------------------- memory
_LIBC: Any = None
with contextlib.suppress(OSError):
    _LIBC = ctypes.CDLL("libc.so.6")


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory increase over a region (RSS high-water mark on CPU, allocator on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated - allocated after warm-up"
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM - VmRSS after warm-up (HWM reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "ru_maxrss - VmRSS after warm-up (HWM could not be reset)"
        self.base = (_status_kb("VmRSS") or 0) * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if "clear_refs" in self.method:
            hwm = (_status_kb("VmHWM") or 0) * 1024
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(hwm - self.base, 0)


# ----------------------------------------------------------------------------- child side
class _Stop(Exception):
    """Raised inside an estimator call to end it at a Hessian-vector-product boundary."""


class HvpMeter:
    """Times ``BatchHessian`` construction and every ``hvp`` call; can stop a long call."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.arm(None, None)

    def arm(self, deadline_s: float | None, max_hvps: int | None, total: int = 0) -> None:
        """Stop at the first product boundary after ``deadline_s`` unless all ``total`` are
        done, or before product number ``max_hvps + 1``."""
        self.deadline_s, self.max_hvps, self.total = deadline_s, max_hvps, total
        self.start = time.perf_counter()
        self.grad_s: list[float] = []
        self.hvps: list[tuple[int, float, float]] = []  # (k, duration, end since start)

    def install(self) -> None:
        from lightning_ifprune.estimator.hessian import BatchHessian

        meter = self
        orig_init, orig_hvp = BatchHessian.__init__, BatchHessian.hvp

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            orig_init(self, *args, **kwargs)
            meter.sync()
            meter.grad_s.append(time.perf_counter() - t0)

        def hvp(self: Any, dirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if meter.max_hvps is not None and len(meter.hvps) >= meter.max_hvps:
                raise _Stop
            t0 = time.perf_counter()
            out = orig_hvp(self, dirs)
            meter.sync()
            t1 = time.perf_counter()
            k = int(next(iter(dirs.values())).shape[0])
            meter.hvps.append((k, t1 - t0, t1 - meter.start))
            if meter.deadline_s is not None and t1 - meter.start >= meter.deadline_s and len(meter.hvps) < meter.total:
                raise _Stop
            return out

        BatchHessian.__init__ = init  # type: ignore[method-assign]
        BatchHessian.hvp = hvp  # type: ignore[method-assign]


@dataclass
class Spec:
    """What one child measures."""

    model: str
    batch: int
    mode: Mode
    device: str
    repeats: int
    budget_s: float
    threads: int = 1
    seed: int = 0
    check_fd: bool = False
    profile: bool = False


def _setup(spec: Spec) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.device]:
    from lightning_ifprune.models import build_model

    device = torch.device(spec.device)
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_classes=NUM_CLASSES, in_channels=3).to(device)
    model.train()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn(spec.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (spec.batch,), generator=gen).to(device)
    return model, x, y, device


def fd_reference(
    structure: Any, x: torch.Tensor, y: torch.Tensor, weight_decay: float = WEIGHT_DECAY
) -> dict[str, torch.Tensor]:
    """The reference scheme: |H_mw H_ww^-1 H_wm 1| with H_ww ~ lambda I, by two central
    finite-difference Hessian-vector products (4 forward+backward passes)."""
    from lightning_ifprune.estimator import estimation_mode
    from lightning_ifprune.structure import channel_masks

    model = structure.model
    params = [p for p in model.parameters() if p.requires_grad]
    ref = params[0]
    sizes = {n: g.size for n, g in structure.groups.items()}
    r = 0.01 / math.sqrt(sum(sizes.values()))  # 0.01 / ||1||

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def zeros_for_unused(grads: tuple[torch.Tensor | None, ...], like: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, like, strict=True)]

    saved = [p.detach().clone() for p in params]
    with estimation_mode(model), channel_masks(structure) as masks:
        try:
            grads = []
            for sign in (1.0, -1.0):  # v = H_wm 1: grad_w L at m = 1 +- R 1
                for n, size in sizes.items():
                    masks[n] = torch.full((size,), 1.0 + sign * r, dtype=ref.dtype, device=ref.device)
                grads.append(zeros_for_unused(torch.autograd.grad(loss(), params, allow_unused=True), params))
            u = [(gp - gm) / (2 * r) / weight_decay for gp, gm in zip(*grads, strict=True)]
            r2 = 0.01 / float(torch.sqrt(sum((t.double() ** 2).sum() for t in u)))
            mask_vars = {
                n: torch.ones(size, dtype=ref.dtype, device=ref.device, requires_grad=True) for n, size in sizes.items()
            }
            masks.update(mask_vars)
            mask_list = list(mask_vars.values())
            mgrads = []
            for sign in (1.0, -1.0):  # s = H_mw u: grad_m L at w +- R' u
                with torch.no_grad():
                    for p, p0, d in zip(params, saved, u, strict=True):
                        p.copy_(p0 + sign * r2 * d)
                mgrads.append(zeros_for_unused(torch.autograd.grad(loss(), mask_list, allow_unused=True), mask_list))
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, saved, strict=True):
                    p.copy_(p0)
    return {n: ((a - b) / (2 * r2)).abs().detach() for n, a, b in zip(sizes, *mgrads, strict=True)}


def _child(spec: Spec) -> dict[str, Any]:
    """Measure one mode in this (fresh) process; returns a JSON-able dict."""
    from lightning_ifprune.criteria import resolve_criterion, score_structure
    from lightning_ifprune.estimator import estimate
    from lightning_ifprune.structure import ChannelStructure

    model, x, y, device = _setup(spec)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    structure = ChannelStructure.build(model, x[:2])
    sync()
    build_s = time.perf_counter() - t0
    mode = spec.mode
    meter = HvpMeter(sync)
    meter.install()
    result: dict[str, Any] = {
        "mode": mode.name,
        "kind": mode.kind,
        "options": mode.options,
        "structure_build_s": build_s,
        "groups": len(structure.groups),
        "threads": torch.get_num_threads(),
        "channels": sum(structure.widths().values()),
        "params": sum(p.numel() for p in model.parameters()),
    }

    if mode.kind == "train":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=WEIGHT_DECAY)

        def call() -> Any:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    elif mode.kind == "fd":

        def call() -> Any:
            return fd_reference(structure, x, y)
    elif mode.kind == "criterion":

        def call() -> Any:
            return score_structure(structure, [(x, y)], CE, resolve_criterion(mode.options["criterion"]))
    else:
        opts = EstimatorOptions(**mode.options)
        k, n_hvp = hvp_plan(mode.options)
        result.update(probe_batch_k=k, hvps_per_batch=n_hvp)

        def call() -> Any:
            return estimate(structure, [(x, y)], CE, opts)

    def run(deadline: float | None, max_hvps: int | None) -> tuple[float, bool]:
        meter.arm(deadline, max_hvps, result.get("hvps_per_batch", 0))
        t = time.perf_counter()
        stopped = False
        try:
            call()
        except _Stop:
            stopped = True
        sync()
        return time.perf_counter() - t, stopped

    # warm-up
    warm_hvps = 1 if mode.name == PAPER else 0
    run(None, warm_hvps if mode.kind == "estimator" else None)
    mem = PeakMemory(device)
    mem.start()
    result["rss_or_alloc_after_warmup_mb"] = mem.base / 2**20
    times: list[float] = []
    spent = 0.0
    status = "measured"
    for _ in range(spec.repeats):
        deadline = spec.budget_s if mode.kind == "estimator" else None
        elapsed, stopped = run(deadline, None)
        if stopped:
            done = len(meter.hvps)
            ends = [e for _, _, e in meter.hvps]
            steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
            per = statistics.median(steps) if steps else meter.hvps[-1][1]
            result.update(stopped_after_hvps=done, partial_s=elapsed)
            times.append(elapsed + (result["hvps_per_batch"] - done) * per)
            status = "extrapolated"
            break
        times.append(elapsed)
        spent += elapsed
        if spent >= spec.budget_s:
            break
    result["peak_mem_mb"] = mem.peak_bytes() / 2**20
    result["mem_method"] = mem.method
    result.update(status=status, times_s=times, repeats=len(times), s_per_batch=statistics.median(times))
    if mode.kind == "estimator":
        result["grad_s"] = statistics.median(meter.grad_s) if meter.grad_s else None
        result["hvp_s"] = statistics.median([d for _, d, _ in meter.hvps]) if meter.hvps else None
        result["hvps_in_last_call"] = len(meter.hvps)
    meter.arm(None, None)
    if spec.check_fd and mode.kind == "fd":
        result["fd_check"] = _fd_check(structure, x, y)
    if spec.profile and mode.name == PAPER:
        result["profile"] = _profile(structure, x, y, EstimatorOptions(**mode.options))
    return result


def _compare_fd(structure: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from lightning_ifprune.estimator import estimate

    fd = fd_reference(structure, x, y)
    exact = estimate(structure, [(x, y)], CE, EstimatorOptions(**MODE_BY_NAME[PAPER].options)).scores
    a = torch.cat([fd[n].double() for n in fd])
    b = torch.cat([exact[n].double() for n in fd])
    return {
        "cosine": float(a @ b / (a.norm() * b.norm())),
        "rel_l2": float((a - b).norm() / b.norm()),
    }


def _fd_check(structure: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """How close the FD scheme is to the estimator's exact ``paper/ones/identity`` score.

    ``as_measured``: the benchmarked model and batch. ``smooth_float64``: a copy of the model
    whose ReLUs are replaced by ``Softplus(beta=5)``, in float64, on 8 samples - where central
    differences must agree with the exact products, which validates this implementation of
    the scheme (with ReLUs the weight step ``R' u`` crosses activation kinks, which exact
    products do not see).
    """
    import copy

    from lightning_ifprune.structure import ChannelStructure

    smooth = copy.deepcopy(structure.model).double()
    for module in list(smooth.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Softplus(beta=5.0))
    xs = x[:8].double()
    smooth_structure = ChannelStructure.build(smooth, xs[:2])
    return {
        "as_measured": _compare_fd(structure, x, y),
        "smooth_float64": _compare_fd(smooth_structure, xs, y[:8]),
        "note": "cosine / relative L2 distance of the FD scheme's scores to the exact paper/ones/identity scores",
    }


def _profile(structure: Any, x: torch.Tensor, y: torch.Tensor, opts: Any) -> dict[str, Any]:
    """One profiled ``paper/ones/identity`` call, split by phase and by autograd node."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from lightning_ifprune.estimator import scoring as est
    from lightning_ifprune.estimator.hessian import BatchHessian
    from lightning_ifprune.structure import MaskSpace

    patched = []

    def label(owner: Any, attr: str, name: str) -> None:
        orig = getattr(owner, attr)
        patched.append((owner, attr, orig))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with record_function(name):
                return orig(*args, **kwargs)

        setattr(owner, attr, wrapper)

    label(BatchHessian, "_grads", "IF::gradient_with_graph (forward + backward)")
    label(BatchHessian, "hvp", "IF::hvp (double backward)")
    label(MaskSpace, "expand", "IF::MaskSpace.expand")
    label(MaskSpace, "reduce", "IF::MaskSpace.reduce")
    label(est, "apply_inverse", "IF::apply_inverse")
    activities = [ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            est.estimate(structure, [(x, y)], CE, opts)
        wall = time.perf_counter() - t0
    finally:
        for owner, attr, orig in reversed(patched):
            setattr(owner, attr, orig)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("IF::")}
    nodes = {
        e.key: e.cpu_time_total / 1e6
        for e in events
        if not e.key.startswith("autograd::")
        and e.key.endswith("0")
        and "Backward" in e.key
        and e.cpu_time_total / 1e6 >= 0.005 * total
    }
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]}
    return {
        "wall_s_under_profiler": wall,
        "self_cpu_total_s": total,
        "phases_s": phases,
        "autograd_nodes_total_s": dict(sorted(nodes.items(), key=lambda kv: -kv[1])),
        "top_ops_self_s": ops,
    }


def _child_entry(spec: Spec) -> dict[str, Any]:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    res = _child(spec)
    res["child_wall_s"] = time.perf_counter() - t0
    res["loadavg_1min"] = [load0, os.getloadavg()[0]]
    return res


# ----------------------------------------------------------------------------- parent side
def _config_order(models: list[str], batches: list[int]) -> list[tuple[str, int]]:
    """Cheapest first (depth x batch), so the first configuration calibrates projections."""

    def depth(name: str) -> int:
        digits = "".join(ch for ch in name if ch.isdigit())
        return int(digits) if digits else 1

    return sorted(((m, b) for m in models for b in batches), key=lambda mb: depth(mb[0]) * mb[1])


def _project(mode: Mode, rows: dict[str, dict[str, Any]], slowdown: dict[int, float]) -> dict[str, Any] | None:
    """Predicted cost of an estimator mode from this configuration's measured products."""
    paper = rows.get(PAPER)
    if not paper or not paper.get("hvp_s") or not paper.get("grad_s"):
        return None
    k, n_hvp = hvp_plan(mode.options)
    t1 = paper["hvp_s"]
    same_k = [
        r["hvp_s"]
        for r in rows.values()
        if r.get("probe_batch_k") == k and r.get("hvp_s") and r.get("status") != "projected"
    ]
    hvp = statistics.median(same_k) if same_k else t1 * k * slowdown.get(k, 1.0)
    return {
        "grad_s": paper["grad_s"],
        "hvp_s": hvp,
        "hvps_per_batch": n_hvp,
        "probe_batch_k": k,
        "first_product_s": paper["grad_s"] + hvp,
        "s_per_batch": paper["grad_s"] + n_hvp * hvp,
        "basis": (
            f"grad {paper['grad_s']:.2f}s + {n_hvp} x hvp(k={k}) {hvp:.2f}s"
            + ("" if same_k else f" [= hvp(k=1) x {k} x slowdown {slowdown.get(k, 1.0):.2f}]")
        ),
    }


def run_config(
    pool_ctx: Any,
    model: str,
    batch: int,
    args: argparse.Namespace,
    first: bool,
    slowdown: dict[int, float],
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        spec = Spec(
            model,
            batch,
            mode,
            args.device,
            args.repeats,
            args.mode_budget_s,
            threads=args.threads,
            check_fd=first,
            profile=first and not args.no_profile,
        )
        if mode.kind == "estimator" and not first and mode.name != PAPER:
            proj = _project(mode, rows, slowdown)
            if proj and proj["first_product_s"] > 2 * args.mode_budget_s:
                rows[mode.name] = {
                    "mode": mode.name,
                    "kind": mode.kind,
                    "options": mode.options,
                    "status": "projected",
                    "peak_mem_mb": None,
                    **proj,
                }
                _log(
                    f"  {model} b{batch} {mode.name}: projected {proj['s_per_batch']:.1f}s "
                    f"(not run: first product ~{proj['first_product_s']:.0f}s)"
                )
                continue
        try:
            with pool_ctx.Pool(1, maxtasksperchild=1) as pool:
                res = pool.apply(_child_entry, (spec,))
        except Exception as err:  # a crashed child (e.g. out of memory) is reported, not fatal
            rows[mode.name] = {
                "mode": mode.name,
                "kind": mode.kind,
                "options": mode.options,
                "status": "failed",
                "error": repr(err),
                "s_per_batch": None,
                "peak_mem_mb": None,
            }
            _log(f"  {model} b{batch} {mode.name}: FAILED {err!r}")
            continue
        rows[mode.name] = res
        _log(
            f"  {model} b{batch} {mode.name}: {res['s_per_batch']:.2f}s/batch "
            f"({res['status']}, {res['repeats']} call(s)), peak {res['peak_mem_mb']:.0f} MB, "
            f"child {res['child_wall_s']:.0f}s, load {res['loadavg_1min'][1]:.1f}"
        )
    # probe-batching slowdown: hvp(k) / (k * hvp(1)), calibrated in the first configuration
    t1 = rows[PAPER].get("hvp_s")
    for r in rows.values():
        k = r.get("probe_batch_k")
        if t1 and k and k > 1 and r.get("hvp_s") and r["status"] != "projected":
            slowdown.setdefault(k, r["hvp_s"] / (k * t1))
    train, fd = rows["train_step"], rows["fd_reference"]
    for r in rows.values():
        t = r["s_per_batch"]
        r["x_train_step"] = t / train["s_per_batch"] if t is not None else None
        r["x_fd_scheme"] = t / fd["s_per_batch"] if t is not None else None
        mem = r.get("peak_mem_mb")
        r["x_train_step_mem"] = mem / train["peak_mem_mb"] if mem is not None and train["peak_mem_mb"] else None
    builds = [r["structure_build_s"] for r in rows.values() if "structure_build_s" in r]
    return {
        "model": model,
        "batch": batch,
        "groups": train["groups"],
        "channels": train["channels"],
        "params": train["params"],
        "structure_build_s": {"median": statistics.median(builds), "all": builds},
        "modes": list(rows.values()),
    }


def _fmt(v: float | None, spec: str) -> str:
    width = spec.split(".")[0]
    return ("-".rjust(int(width)) if width else "-") if v is None else format(v, spec)


def table(cfg: dict[str, Any]) -> str:
    head = (
        f"{cfg['model']}  batch {cfg['batch']}  ({cfg['groups']} groups, {cfg['channels']} "
        f"channels, {cfg['params']:,} params; structure build "
        f"{cfg['structure_build_s']['median']:.2f}s, excluded)"
    )
    cols = ("mode", "s/batch", "x train step", "x FD scheme", "peak mem MB", "x train step mem")
    lines = [
        head,
        f"{cols[0]:<40} {cols[1]:>11} {cols[2]:>12} {cols[3]:>11} {cols[4]:>11} {cols[5]:>16}",
    ]
    for r in cfg["modes"]:
        mark = {"measured": "", "extrapolated": "~", "projected": "p ", "failed": "failed "}[r["status"]]
        calls = f"  n={r['repeats']}" if r["status"] in ("measured", "extrapolated") else ""
        value = mark + _fmt(r["s_per_batch"], ".3f")
        lines.append(
            f"{r['mode']:<40} {value:>11} "
            f"{_fmt(r['x_train_step'], '12.2f')} {_fmt(r['x_fd_scheme'], '11.2f')} "
            f"{_fmt(r['peak_mem_mb'], '11.1f')} {_fmt(r['x_train_step_mem'], '16.2f')}{calls}"
        )
    grads = [r["grad_s"] for r in cfg["modes"] if r.get("grad_s") and r["status"] != "projected"]
    per_k: dict[int, list[float]] = {}
    for r in cfg["modes"]:
        if r.get("hvp_s") and r["status"] != "projected":
            per_k.setdefault(r["probe_batch_k"], []).append(r["hvp_s"])
    if grads:
        parts = [f"hvp(k={k}) {statistics.median(v):.3f}s" for k, v in sorted(per_k.items())]
        lines.append(f"  estimator products: gradient with graph {statistics.median(grads):.3f}s; " + ", ".join(parts))
    return "\n".join(lines)


def acceptance(configs: list[dict[str, Any]], device: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in configs:
        rows = {r["mode"]: r for r in cfg["modes"]}
        paper, default = rows[PAPER], rows[DEFAULT_MODE]
        key = f"{cfg['model']}/b{cfg['batch']}"
        out[key] = {
            "paper_x_fd": paper["x_fd_scheme"],
            "paper_le_0.75x_fd": (
                paper["x_fd_scheme"] <= 0.75 if device == "cpu" and paper["x_fd_scheme"] is not None else None
            ),
            "default_mode_mem_x_train": default["x_train_step_mem"],
            "default_mode_mem_le_2.5x": (
                default["x_train_step_mem"] <= 2.5 if default["x_train_step_mem"] is not None else None
            ),
            "default_mode_status": default["status"],
            "every_mode_reported": all(r["s_per_batch"] is not None for r in cfg["modes"]),
        }
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default=None, help="comma list (default resnet32,resnet56)")
    p.add_argument("--batches", default=None, help="comma list (default 128,32)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: resnet32, batch 8, 1 repeat, 5 s budget per mode",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per mode (default 3)")
    p.add_argument(
        "--mode-budget-s",
        type=float,
        default=None,
        help="seconds of timed work per mode and configuration (default 20)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op CPU threads per child (default 1; 0 = torch's default)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the profiled paper call")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.models = (args.models or ("resnet32" if args.quick else "resnet32,resnet56")).split(",")
    args.batches = [int(b) for b in (args.batches or ("8" if args.quick else "128,32")).split(",")]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.mode_budget_s = args.mode_budget_s or (5.0 if args.quick else 20.0)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lightning_ifprune", "lightning_ifprune.models"])
    slowdown: dict[int, float] = {}
    done: dict[tuple[str, int], dict[str, Any]] = {}
    load_start = os.getloadavg()
    for i, (model, batch) in enumerate(_config_order(args.models, args.batches)):
        _log(f"[{time.perf_counter() - t_start:6.0f}s] {model} batch {batch}")
        done[(model, batch)] = run_config(ctx, model, batch, args, i == 0, slowdown)
    configs = [done[(m, b)] for m in args.models for b in args.batches]
    wall = time.perf_counter() - t_start
    tables = [table(cfg) for cfg in configs]
    legend = (
        "~ = call stopped at the time budget, rest extrapolated from its timed "
        "Hessian-vector products; p = projected, not run (first product alone "
        "> 2x budget); n = timed calls (median)"
    )
    print("\n\n".join(tables))
    print(legend)
    acc = acceptance(configs, args.device)
    print("acceptance:", json.dumps(acc, indent=1))
    print(f"wall time {wall:.0f}s")
    first = done[_config_order(args.models, args.batches)[0]]
    first_rows = {r["mode"]: r for r in first["modes"]}
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "device_name": _device_name(args.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": first["modes"][0]["threads"],
        "torch_default_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "mode_budget_s": args.mode_budget_s,
        "weight_decay": WEIGHT_DECAY,
        "wall_s": wall,
        "loadavg_start_end": [list(load_start), list(os.getloadavg())],
        "memory_method": next(r["mem_method"] for r in first["modes"] if "mem_method" in r),
        "method": __doc__.split("Method\n------\n", 1)[1].split("\n\nThe first", 1)[0],
        "probe_batching_slowdown": {str(k): v for k, v in slowdown.items()},
        "legend": legend,
    }
    payload = {
        "meta": meta,
        "acceptance": acc,
        "fd_check": first_rows["fd_reference"].get("fd_check"),
        "profile": first_rows[PAPER].get("profile"),
        "configs": configs,
        "tables": tables,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    _log(f"wrote {args.out}")
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Mode):
        return asdict(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
