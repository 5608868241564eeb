"""The batched influence estimator: exact second-order products in mask space (spec §2–§4).

Masks act where channels are consumed, so a mask ``m_k`` scales the input columns of every
consuming Conv/Linear weight that reads channel ``k``. Writing ``E v`` for the expansion of a
mask-space vector onto those weight columns and ``L̃`` for the unmasked data loss, the mask
derivatives at ``m = 1`` reduce to ordinary weight-space quantities:

    g_m    = Eᵀ(w ⊙ ∇L̃)
    H_wm v = ∇L̃ ⊙ Ev + H̃ (w ⊙ Ev)
    H_mw u = Eᵀ(∇L̃ ⊙ u + w ⊙ H̃u)
    H_mm v = Eᵀ(w ⊙ H̃ (w ⊙ Ev))
    H_ww u = H̃u + λu

where ``H̃`` is the Hessian of ``L̃`` and ``λ`` the weight decay. Every product is one exact
Hessian-vector product of the plain network (double backward through one retained graph,
batched over probes) — no masks in the hot path and no finite differences. The tests check
each identity against the explicit Hessian of a masked float64 model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from lightning_ifprune.batch import Batch, to_compute
from lightning_ifprune.estimator.hessian import (
    BatchHessian,
    Tensors,
    apply_inverse,
    estimation_mode,
    mask_params,
)
from lightning_ifprune.estimator.options import EstimatorOptions
from lightning_ifprune.loss import LossClosure
from lightning_ifprune.structure import ChannelStructure, MaskSpace, MaskVec


@dataclass
class EstimateResult:
    """Per-channel scores (lower = prune first) and diagnostics of one estimation."""

    scores: MaskVec
    diagnostics: dict[str, float] = field(default_factory=dict)


def compute_dtype(structure: ChannelStructure) -> torch.dtype:
    """float64 for float64 models, else float32 (never a half type)."""
    ref = next(structure.model.parameters())
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def probe_stack(
    sizes: dict[str, int],
    opts: EstimatorOptions,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> list[MaskVec]:
    """Mask-space probe directions, chunked by ``probe_batch``."""
    total = sum(sizes.values())
    if opts.probes == "ones":
        flat = torch.ones(1, total, dtype=dtype)
    elif opts.probes == "exact":
        flat = torch.eye(total, dtype=dtype)
    else:
        flat = (torch.randint(0, 2, (opts.num_probes, total), generator=gen) * 2 - 1).to(dtype)
    chunks = []
    for part in flat.split(opts.probe_batch):
        vec, start = {}, 0
        for name, n in sizes.items():
            vec[name] = part[:, start : start + n].to(device)
            start += n
        chunks.append(vec)
    return chunks


def estimate(
    structure: ChannelStructure,
    batches: Iterable[Batch],
    loss: LossClosure,
    options: EstimatorOptions | None = None,
) -> EstimateResult:
    """Score every channel of ``structure`` with the influence estimator.

    ``loss(model, batch)`` is the scalar training loss of a batch. The model's weights,
    buffers, grads, ``requires_grad`` flags and modes are left exactly as found. Runs on the
    model's device, in float32 (float64 for float64 models), never under autocast.
    """
    opts = options or EstimatorOptions()
    if opts.needs_decay and opts.decay <= 0:
        raise ValueError(
            "influence with score='retrained' and inverse='identity' uses 1/weight_decay: give weight_decay > 0 "
            "(the callback takes the optimizer's)"
        )
    model = structure.model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters to estimate with")
    dtype = compute_dtype(structure)
    gen = torch.Generator().manual_seed(opts.seed)
    losses = []
    with estimation_mode(model), mask_params(structure) as (params, trainable):
        ref = next(iter(params.values()))
        space = MaskSpace(structure, params)
        sums: MaskVec = {n: torch.zeros(s, dtype=torch.float64, device=ref.device) for n, s in space.sizes.items()}
        for batch in batches:
            hess = BatchHessian(model, params, to_compute(batch, ref.device, dtype), loss, opts.micro_batches)
            losses.append(hess.loss)
            w = {k: p.detach() for k, p in params.items()}
            try:
                per_batch = _batch_scores(space, hess, w, hess.grad, opts, gen, dtype, ref.device, trainable)
            except RuntimeError as err:
                if not any(s in str(err) for s in ("double backward", "derivative for", "differentiate twice")):
                    raise
                raise ValueError(
                    f"the influence criterion needs second derivatives of the loss, and an op of "
                    f"{type(model).__name__} has none ({err}): "
                    "use a first-order criterion (fisher, taylor) or magnitude"
                ) from err
            hess.release()
            for n, s in per_batch.items():
                sums[n] += s.double()
    if not losses:
        raise ValueError("the influence criterion needs at least one batch")
    count = len(losses)
    scores = {n: (s if opts.score == "paper" else s / count).to(ref.dtype) for n, s in sums.items()}
    return EstimateResult(scores, {"loss": sum(losses) / count, "batches": float(count)})


def _batch_scores(
    space: MaskSpace,
    hess: BatchHessian,
    w: Tensors,
    g: Tensors,
    opts: EstimatorOptions,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    trainable: frozenset[str],
) -> MaskVec:
    """One batch's contribution: |B p| (paper, ones) or diagonals via probes. ``w`` covers every
    weight the masks touch; the retraining only the ``trainable`` ones (H_wm rows, H_ww)."""
    total: MaskVec = {n: torch.zeros(s, dtype=dtype, device=device) for n, s in space.sizes.items()}
    g_m = space.reduce({k: (w[k] * g[k]).unsqueeze(0) for k in w}, dtype=dtype)
    probes = probe_stack(space.sizes, opts, gen, dtype, device)
    n_probes = sum(next(iter(p.values())).shape[0] for p in probes)
    for z in probes:
        k = next(iter(z.values())).shape[0]
        ez = space.expand(z, w)
        wez = {
            name: w[name] * ez[name]
            if name in ez
            else torch.zeros((k, *w[name].shape), dtype=w[name].dtype, device=device)
            for name in w
        }
        a = hess.hvp(wez)  # H̃ (w ⊙ Ez)
        h_wm = {name: a[name] + (g[name] * ez[name] if name in ez else 0) for name in w}
        u = apply_inverse(hess, h_wm, opts, trainable)
        hu = hess.hvp(u)
        b = space.reduce({name: g[name] * u[name] + w[name] * hu[name] for name in w}, dtype=dtype)
        if opts.score == "paper":
            if opts.probes == "ones":
                for n in total:
                    total[n] += b[n][0].abs()
                continue
            for n in total:
                total[n] += (z[n] * b[n]).sum(0)
            continue
        h_mm = space.reduce({name: w[name] * a[name] for name in w}, dtype=dtype)
        for n in total:
            total[n] += (z[n] * (h_mm[n] - b[n])).sum(0)
    scale = 1.0 / n_probes if opts.probes == "rademacher" else 1.0
    if opts.score == "paper":
        return total if opts.probes == "ones" else {n: (scale * t).abs() for n, t in total.items()}
    return {n: -g_m[n][0] + 0.5 * scale * total[n] for n in total}
