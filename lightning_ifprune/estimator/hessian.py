"""Exact gradients and Hessian-vector products of the loss on one batch, and ``H_ww⁻¹``.

:func:`estimation_mode` puts a model in the state the estimator differentiates: norm layers
on batch statistics (running statistics untouched), dropout off, float32 (never autocast).
:class:`BatchHessian` keeps (or rebuilds, per micro-batch) one double-backward graph;
:func:`apply_inverse` applies the configured approximation of ``(H̃ + λI)⁻¹``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_ifprune.batch import Batch, batch_size, split_batch
from lightning_ifprune.estimator.options import EstimatorOptions
from lightning_ifprune.loss import LossClosure
from lightning_ifprune.structure import NORM_TYPES, ChannelStructure

Tensors = dict[str, torch.Tensor]


class _LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A SyncBatchNorm seen as a per-rank BatchNorm while estimating.

    Each rank estimates on its own batches (scores are averaged afterwards), and the
    synchronised BN's autograd function cannot be differentiated twice.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


class _ClampHardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` as ``clamp(x / 6 + 1/2, 0, 1)``, the same function: PyTorch's own
    hardsigmoid kernel cannot be differentiated twice (MobileNetV3's squeeze-excitation)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return (input / 6 + 0.5).clamp(0, 1)


def _eager_roi_align(
    input: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """torchvision's ``roi_align`` through its pure-PyTorch implementation, uncompiled: the same
    values, and twice differentiable (the C++ kernel has no double backward)."""
    from torch.nn.modules.utils import _pair
    from torchvision.ops._utils import convert_boxes_to_roi_format

    module = importlib.import_module("torchvision.ops.roi_align")  # the module: the package's name is the function

    rois = boxes if isinstance(boxes, torch.Tensor) else convert_boxes_to_roi_format(boxes)
    height, width = _pair(output_size)
    raw = getattr(module._roi_align, "__wrapped__", module._roi_align)  # skip its lazy torch.compile
    return raw(input, rois, spatial_scale, height, width, sampling_ratio, aligned)


@contextmanager
def _twice_differentiable_roi_align(model: nn.Module) -> Iterator[None]:
    """Run the RoI poolers of ``model`` (Faster/Mask R-CNN's box head) on :func:`_eager_roi_align`."""
    if not any(type(m).__name__ == "MultiScaleRoIAlign" for m in model.modules()):
        yield
        return
    from torchvision.ops import poolers

    original = poolers.roi_align
    poolers.roi_align = _eager_roi_align
    try:
        yield
    finally:
        poolers.roi_align = original


@contextmanager
def estimation_mode(model: nn.Module) -> Iterator[None]:
    """Norm layers in training behaviour without touching running stats; dropout off.

    SyncBatchNorm layers act per rank; ``nn.Hardsigmoid`` runs as a clamp and torchvision's
    RoI align on its pure-PyTorch implementation (the same values, twice differentiable).
    Restores every module's mode, class and flag on exit. Autocast is disabled inside, and
    attention runs in PyTorch's plain (twice differentiable) kernel.
    """
    modes = [(m, m.training) for m in model.modules()]
    tracked = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, NORM_TYPES)]
    synced = [(m, type(m)) for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    hard = [m for m in model.modules() if type(m) is nn.Hardsigmoid]
    try:
        for m in model.modules():
            m.training = isinstance(m, NORM_TYPES) or not isinstance(m, nn.modules.dropout._DropoutNd)
        for m, _ in tracked:
            m.track_running_stats = False
        for m, cls in synced:
            if cls is nn.SyncBatchNorm:  # subclasses (timm's SyncBatchNormAct) keep their own forward
                m.__class__ = _LocalBatchNorm
        for m in hard:
            m.__class__ = _ClampHardsigmoid
        device = next(model.parameters()).device.type
        with (
            torch.autocast(device_type=device, enabled=False) if device in ("cpu", "cuda") else nullcontext(),
            sdpa_kernel(SDPBackend.MATH),  # the fused attention kernels have no second derivatives
            _twice_differentiable_roi_align(model),
        ):
            yield
    finally:
        for m, training in modes:
            m.training = training
        for m, flag in tracked:
            m.track_running_stats = flag
        for m, cls in synced:
            m.__class__ = cls
        for m in hard:
            m.__class__ = nn.Hardsigmoid


@contextmanager
def mask_params(structure: ChannelStructure) -> Iterator[tuple[dict[str, nn.Parameter], frozenset[str]]]:
    """``(params, trainable)``: the trainable parameters plus the frozen weights that consume
    channels, and the names of the trainable ones.

    A frozen consumer still reads the masked channels, so the mask derivatives go through its
    weights; only the retraining (``H_ww``, ``H_wm``) leaves it out. Its ``requires_grad`` is
    switched on for the duration (to differentiate) and restored on exit.
    """
    model = structure.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    consumers = {slot.module for g in structure.groups.values() for slot in g.consumers}
    frozen = {}
    for name in sorted(consumers):
        weight = getattr(model.get_submodule(name), "weight", None)
        pname = f"{name}.weight" if name else "weight"
        if isinstance(weight, nn.Parameter) and not weight.requires_grad:
            frozen[pname] = weight
    try:
        for p in frozen.values():
            p.requires_grad_(True)
        yield {**trainable, **frozen}, frozenset(trainable)
    finally:
        for p in frozen.values():
            p.requires_grad_(False)


def project(t: Tensors, keep: frozenset[str] | None) -> Tensors:
    """``t`` with the entries outside ``keep`` zeroed (None keeps all)."""
    if keep is None:
        return t
    return {k: v if k in keep else torch.zeros_like(v) for k, v in t.items()}


def scalar_loss(loss: LossClosure, model: nn.Module, batch: Batch) -> torch.Tensor:
    """``loss(model, batch)``, checked to be a scalar tensor (the error names what came back)."""
    value = loss(model, batch)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        what = (
            type(value).__name__ if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
        )
        raise TypeError(f"the loss closure must return a scalar tensor, got {what}")
    return value.reshape(())


class BatchHessian:
    """Exact gradient and Hessian-vector products of the loss on one batch.

    With a single micro-batch the double-backward graph is built once and reused for every
    product; with several, each product re-runs the micro-batches (less memory). A batch
    whose size cannot be told (see :func:`~lightning_ifprune.batch.split_batch`) is not split.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        batch: Batch,
        loss: LossClosure,
        micro_batches: int = 1,
    ) -> None:
        self.model, self.params, self.loss_closure = model, dict(params), loss
        self.chunks = split_batch(batch, micro_batches)
        sizes = [batch_size(c) or 1 for c in self.chunks]
        self.weights = [s / sum(sizes) for s in sizes]
        self._graph: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None
        self.loss = 0.0
        self.grad = self._accumulate(None, keep=len(self.chunks) == 1)

    def _grads(self, chunk: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = scalar_loss(self.loss_closure, self.model, chunk)
        grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=True, allow_unused=True)
        grads = tuple(
            g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params.values(), strict=True)
        )
        return loss, grads

    def _accumulate(self, dirs: Tensors | None, keep: bool = False) -> Tensors:
        total: Tensors = {}
        for chunk, weight in zip(self.chunks, self.weights, strict=True):
            if self._graph is not None:
                loss, grads = self._graph
            else:
                loss, grads = self._grads(chunk)
                if keep:
                    self._graph = (loss, grads)
            if dirs is None:
                self.loss += float(loss.detach()) * weight
                part = {k: g.detach() for k, g in zip(self.params, grads, strict=True)}
            else:
                outs = [dirs[k] for k in self.params]
                single = outs[0].shape[0] == 1  # one direction: skip vmap's overhead
                res = torch.autograd.grad(
                    grads,
                    list(self.params.values()),
                    grad_outputs=[o[0] for o in outs] if single else outs,
                    retain_graph=True,
                    is_grads_batched=not single,
                    allow_unused=True,
                )
                if single:
                    res = tuple(None if r is None else r.unsqueeze(0) for r in res)
                part = {
                    k: (r if r is not None else torch.zeros_like(o))
                    for k, r, o in zip(self.params, res, outs, strict=True)
                }
            for k, v in part.items():
                total[k] = total[k] + weight * v if k in total else weight * v
        return total

    def hvp(self, dirs: Tensors) -> Tensors:
        """``H̃ d`` for a stack of directions (leading probe dim on every tensor)."""
        return self._accumulate(dirs)

    def release(self) -> None:
        """Drop the retained graph."""
        self._graph = None


def apply_inverse(
    hess: BatchHessian, b: Tensors, opts: EstimatorOptions, trainable: frozenset[str] | None = None
) -> Tensors:
    """Apply an approximation of H_ww⁻¹ (with H_ww = H̃ + λI) to a stack of vectors.

    With ``trainable``, ``w`` is those weights only: H_ww is their block of the Hessian, and
    the result is zero on the others.
    """
    lam = opts.decay
    b = project(b, trainable)
    if opts.inverse == "identity":
        return {k: v * opts.identity_scale for k, v in b.items()}
    shift = lam + opts.damping

    def apply(u: Tensors) -> Tensors:
        hu = project(hess.hvp(u), trainable)
        return {k: hu[k] + shift * u[k] for k in u}

    def dot(a: Tensors, c: Tensors) -> torch.Tensor:
        return sum((a[k] * c[k]).flatten(1).sum(1) for k in a)

    if opts.inverse == "neumann":
        alpha = opts.neumann_scale
        term = {k: alpha * v for k, v in b.items()}
        total = {k: v.clone() for k, v in term.items()}
        for _ in range(opts.neumann_terms - 1):
            at = apply(term)
            term = {k: term[k] - alpha * at[k] for k in term}
            total = {k: total[k] + term[k] for k in total}
        return total
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in r.items()}
    rs = dot(r, r)
    for _ in range(opts.cg_iters):
        ap = apply(p)
        pap = dot(p, ap)
        alpha = torch.where(pap > 0, rs / pap.clamp_min(1e-300), torch.zeros_like(rs))
        for k in x:
            shape = (-1, *([1] * (x[k].dim() - 1)))
            x[k] = x[k] + alpha.view(shape) * p[k]
            r[k] = r[k] - alpha.view(shape) * ap[k]
        rs_new = dot(r, r)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        for k in p:
            p[k] = r[k] + beta.view(-1, *([1] * (p[k].dim() - 1))) * p[k]
        rs = rs_new
    return x
