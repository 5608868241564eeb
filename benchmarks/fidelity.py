"""Fidelity benchmark: how well does each criterion predict the retrained loss change? (spec §6–§7)

Method
------
* Data: sklearn's embedded digits (8×8, 1,797 images), raw pixels scaled to [0, 1] and
  standardised. Each seed draws its own stratified training subset of ``--n-train`` images
  (500 by default — a subset, for speed); the other 1,297 only give a test accuracy.
* Model: a BatchNorm-free CNN, float64 throughout: conv3×3/2 (1→8) · tanh · conv3×3 (8→12) ·
  tanh · avg-pool 2 · conv2×2 (12→12) · tanh · linear (12→10): three prunable groups, 32
  channels, 1,674 weights. Activation: tanh. ReLU is not smooth enough for tight L-BFGS
  convergence, and SiLU (tried first) left H_ww at the base with a condition number ≈ 1e6, so
  retrains stalled near ‖g‖ ≈ 5e-6 after 3,000 evaluations; with tanh it is ≈ 4e4.
* Objective: full-batch mean cross-entropy + λ/2‖w‖² over all parameters, λ = 1e-3. The
  criteria get the same data as one batch and ``weight_decay=λ`` (the estimator's H_ww = H̃ + λI).
* Optimiser: L-BFGS (300 correction pairs, in the compact form of Byrd, Nocedal & Schnabel, i.e.
  a few matrix products per step) with a strong-Wolfe line search (``scipy.optimize.line_search``,
  c1 = 1e-4, c2 = 0.9), float64, full batch, run until the 2-norm of the full gradient is ≤
  ``--tol`` = 1e-7 for every retrain; the base aims at 1e-9. (``torch.optim.LBFGS`` is the same
  method, but its Python two-loop recursion over a 300-pair history cost more than a function
  evaluation here.) L-BFGS runs in preconditioned coordinates w = w₀ + M z with Mᵀ H M = I for
  the exact Hessian H of the base, restricted to the weights being trained; the base itself gets
  a plain L-BFGS phase, then preconditioned rounds with the Hessian recomputed at each round's
  end. The preconditioner changes the path only: the stopping rule is checked on the gradient in
  the original coordinates, and a retrain that misses it within its budget counts as not
  converged.
* Removal: channel k is removed by setting its mask to 0 (applied where it is consumed) and
  holding its producer row, bias and consumer columns at 0 — exactly physical removal, and exactly
  where those weights sit at the retrained optimum (their data gradient is 0, weight decay pulls
  them to 0). Every other weight is retrained.
* Training loop: a functional re-implementation of the CNN as matrix products (float64 CPU
  convolutions are slow on 8×8 images); the script checks that it matches the ``nn.Module`` under
  ``channel_masks`` to 1e-10 and that every removed weight has exactly zero gradient.
* Noise ceiling (spec §7): every removal is retrained twice, run r ∈ {1, 2} starting from the base
  weights + N(0, σ²), σ = 1e-3 (one perturbation per run, shared by the channels of that run).
  r = Spearman(ΔL⁽¹⁾, ΔL⁽²⁾) over channels is the test–retest reliability; a criterion cannot be
  expected to correlate with a single run beyond ≈ √r, so each Spearman is also given as a
  fraction of √r.
* Control: for each run the base itself is retrained from the same perturbed start with nothing
  removed; ΔL_true⁽ʳ⁾_k = L_k⁽ʳ⁾ − min(L_base, L_control⁽ʳ⁾), and we report how often the control
  ended below the base.
* Scores: the project's criteria (``magnitude`` L1, ``taylor``, ``fisher``, ``random``,
  ``loss_drop`` and ``influence`` with the library's default options and in several other
  estimator configurations; ``bn_scale`` is skipped: there is no BatchNorm) and four
  explicit-matrix references from the exact Hessian of L(w, m) over [w; m]: the exact
  second-order retrained prediction −g_k + ½(H_mm − H_mw H_ww⁻¹ H_wm)_kk ("exact Schur", the
  quantity the estimator approximates), the second-order prediction without retraining
  −g_k + ½(H_mm)_kk, the paper score with the exact inverse, and the spec's ``newton`` score
  (remove the channel, one full Newton step of the rest with the exact base Hessian, loss
  there). Every score is compared,
  pooled over all 32 channels, with ΔL⁽¹⁾ and with ΔL⁽²⁾ (Spearman, Kendall, and top-k: the share
  of the k lowest-scored channels that are among the k truly cheapest, ties at the k-th value
  included, k = 25 % of the channels); the two values are averaged. Seeds change the data subset, the initialisation and the perturbations.

Run ``python benchmarks/fidelity.py [--seeds 3] [--quick]``; results go to
``benchmarks/results/fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
import torch.nn.functional as F
from scipy import optimize, stats
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import lightning_ifprune as lip
from lightning_ifprune.structure import ChannelStructure, channel_masks

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity.json"
WIDTHS = (8, 12, 12)
DTYPE = torch.float64
#: The control "wins" when it ends more than this below the base: ‖g‖ ≤ 1e-7 with the smallest
#: Hessian eigenvalue ≈ 3e-5 leaves each converged loss uncertain by ‖g‖²/2μ ≈ 2e-10.
CONTROL_MARGIN = 1e-10


@dataclass
class Config:
    """Benchmark settings (all written to the JSON)."""

    seeds: int = 3
    quick: bool = False
    n_train: int = 500
    widths: tuple[int, ...] = WIDTHS
    activation: str = "tanh"
    weight_decay: float = 1e-3
    tol: float = 1e-7
    base_tol: float = 1e-9
    sigma: float = 1e-3
    topk_frac: float = 0.25
    max_evals_base: int = 4000
    max_evals_retrain: int = 3000
    history: int = 300
    threads: int = 1


# ----------------------------------------------------------------------------- data and model
def load_data(seed: int, n_train: int) -> tuple[torch.Tensor, ...]:
    """A stratified training subset of the digits and the rest as a test set (N, 1, 8, 8)."""
    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    tr, te, ytr, yte = train_test_split(
        images, digits.target, train_size=n_train, stratify=digits.target, random_state=seed
    )
    mean, std = tr.mean(), tr.std()
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=DTYPE).unsqueeze(1)  # noqa: E731
    return to_x(tr), torch.tensor(ytr), to_x(te), torch.tensor(yte)


class DigitsCNN(nn.Module):
    """conv3×3/2 · tanh · conv3×3 · tanh · avg-pool 2 · conv2×2 · tanh · linear, no BN."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 2)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        x = torch.tanh(self.conv3(x))
        return self.fc(x.flatten(1))


class FastObjective:
    """The DigitsCNN loss as a function of the flat parameter vector v and the mask vector m.

    Same maths as ``DigitsCNN`` under ``channel_masks`` (checked by :meth:`check_parity`),
    written as dense matrix products: conv1 on precomputed patches, conv2 as a Toeplitz
    matrix on the 4×4 maps, avg-pool folded into conv3.
    """

    def __init__(self, model: DigitsCNN, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> None:
        self.x, self.y, self.lam = x, y, weight_decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.sizes = [p.numel() for p in model.parameters()]
        self.num_params = sum(self.sizes)
        self.widths = (model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels)
        self.num_masks = sum(self.widths)
        # conv1 (stride 2, pad 1): 8×8 → 4×4 positions, patches (N, 16, 9)
        self.patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).contiguous()
        # conv2 (3×3, pad 1) on 4×4: shift[k, q_in, p_out] = 1 where output p reads input q
        shift = torch.zeros(9, 16, 16, dtype=DTYPE)
        for ky in range(3):
            for kx in range(3):
                for py in range(4):
                    for px in range(4):
                        qy, qx = py + ky - 1, px + kx - 1
                        if 0 <= qy < 4 and 0 <= qx < 4:
                            shift[ky * 3 + kx, qy * 4 + qx, py * 4 + px] = 1.0
        self.shift = shift
        # avg-pool 2 then conv3 (2×2): 4×4 position p feeds conv3 tap pool_idx[p] with weight 1/4
        self.pool_idx = torch.tensor([(py // 2) * 2 + px // 2 for py in range(4) for px in range(4)])

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s) for t, s in zip(v.split(self.sizes), self.shapes, strict=True)]

    def logits(self, v: torch.Tensor, m: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        c1, c2, c3 = self.widths
        w1, b1, w2, b2, w3, b3, wf, bf = self.unflatten(v)
        m1, m2, m3 = m.split(self.widths)
        p = self.patches if patches is None else patches
        h = torch.tanh(p @ w1.reshape(c1, -1).T + b1) * m1  # (N, 16, c1): [position, channel]
        t2 = torch.einsum("oik,kqp->qipo", w2.reshape(c2, c1, 9), self.shift).reshape(16 * c1, 16 * c2)
        h = torch.tanh(h.reshape(*h.shape[:-2], 16 * c1) @ t2 + b2.repeat(16))  # (N, 16·c2)
        w3e = 0.25 * w3.reshape(c3, c2, 4)[:, :, self.pool_idx] * m2.view(1, c2, 1)
        h = torch.tanh(h @ w3e.permute(2, 1, 0).reshape(16 * c2, c3) + b3) * m3
        return h @ wf.T + bf

    def loss(self, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(v, m), self.y) + 0.5 * self.lam * (v * v).sum()

    def loss_and_grad(self, v: torch.Tensor, m: torch.Tensor) -> tuple[float, torch.Tensor]:
        v = v.detach().requires_grad_(True)
        loss = self.loss(v, m)
        (grad,) = torch.autograd.grad(loss, v)
        return float(loss.detach()), grad

    def full_hessian(self, v: torch.Tensor, m: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient and exact Hessian of L over u = [v; m] (double backward, batched)."""
        u = torch.cat([v, m]).detach().requires_grad_(True)
        loss = self.loss(u[: self.num_params], u[self.num_params :])
        (grad,) = torch.autograd.grad(loss, u, create_graph=True)
        eye = torch.eye(u.numel(), dtype=DTYPE)
        rows = [
            torch.autograd.grad(grad, u, grad_outputs=eye[i : i + chunk], is_grads_batched=True, retain_graph=True)[0]
            for i in range(0, u.numel(), chunk)
        ]
        hess = torch.cat(rows)
        return grad.detach(), 0.5 * (hess + hess.T)


# ----------------------------------------------------------------------------- optimisation
@dataclass
class Fit:
    """Result of one L-BFGS run."""

    loss: float
    grad_norm: float
    evals: int
    converged: bool
    v: torch.Tensor = field(repr=False)


class Precond:
    """A change of variables w = w₀ + M z with Mᵀ H M ≈ I for a given Hessian H.

    Cholesky H = L Lᵀ gives M = L⁻ᵀ (applied by triangular solves); if H is not positive
    definite, M = V |Λ|^{-1/2} from its eigendecomposition (eigenvalues floored). ``None``
    means the identity.
    """

    def __init__(self, hess: torch.Tensor | None, floor: float = 1e-8) -> None:
        self.chol = self.evecs = self.scale = None
        if hess is None:
            return
        chol, info = torch.linalg.cholesky_ex(hess)
        if int(info) == 0:
            self.chol = chol
        else:
            evals, self.evecs = torch.linalg.eigh(hess)
            self.scale = evals.abs().clamp_min(floor).rsqrt()

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """M z."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol.T, z.unsqueeze(1), upper=True).squeeze(1)
        if self.evecs is not None:
            return self.evecs @ (self.scale * z)
        return z

    def apply_t(self, g: torch.Tensor) -> torch.Tensor:
        """Mᵀ g (the gradient in z coordinates)."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol, g.unsqueeze(1), upper=False).squeeze(1)
        if self.evecs is not None:
            return self.scale * (self.evecs.T @ g)
        return g


class _Stop(Exception):
    """Raised inside the objective to end a run: converged (‖∇L‖ ≤ tol) or out of budget."""

    def __init__(self, loss: float, grad_norm: float, v: torch.Tensor) -> None:
        super().__init__()
        self.loss, self.grad_norm, self.v = loss, grad_norm, v


def lbfgs_direction(
    g: torch.Tensor, s_mat: torch.Tensor, y_mat: torch.Tensor, sy: torch.Tensor, yy: torch.Tensor
) -> torch.Tensor:
    """−H g for the L-BFGS inverse Hessian in compact form (Byrd, Nocedal & Schnabel 1994).

    H = γI + [S γY] [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] [S γY]ᵀ with R = triu(SᵀY),
    D = diag(SᵀY), γ = sᵀy / yᵀy of the newest pair: the same matrix as the two-loop recursion,
    computed with a few matrix–vector products.
    """
    if s_mat.shape[1] == 0:
        return -g
    gamma = sy[-1, -1] / yy[-1, -1]
    a, b = s_mat.T @ g, y_mat.T @ g
    r = sy.triu()
    u = torch.linalg.solve_triangular(r, a.unsqueeze(1), upper=True).squeeze(1)
    rhs = sy.diagonal() * u + gamma * (yy @ u) - gamma * b
    p = torch.linalg.solve_triangular(r.T, rhs.unsqueeze(1), upper=False).squeeze(1)
    return -(gamma * g + s_mat @ p - gamma * (y_mat @ u))


def lbfgs(fun: Callable[[torch.Tensor], tuple[float, torch.Tensor]], n: int, history: int) -> torch.Tensor:
    """Minimise ``fun`` (value, gradient) from 0 by L-BFGS with a strong-Wolfe line search.

    Runs until ``fun`` raises :class:`_Stop`; returns the last iterate if the line search fails
    twice in a row (once with a fresh memory, i.e. along the steepest descent direction).
    """
    cache: dict[bytes, tuple[float, torch.Tensor]] = {}

    def cached(x: np.ndarray) -> tuple[float, torch.Tensor]:
        key = x.tobytes()
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = fun(torch.from_numpy(x))
        return cache[key]

    z = np.zeros(n)
    f, g = cached(z)
    empty = torch.zeros(n, 0, dtype=DTYPE)
    s_mat, y_mat, sy, yy = (
        empty,
        empty,
        torch.zeros(0, 0, dtype=DTYPE),
        torch.zeros(0, 0, dtype=DTYPE),
    )
    while True:
        d = lbfgs_direction(g, s_mat, y_mat, sy, yy)
        if float(g @ d) >= 0:  # not a descent direction: forget the memory
            s_mat, y_mat, sy, yy, d = empty, empty, sy[:0, :0], yy[:0, :0], -g
        with warnings.catch_warnings():  # a failed search returns None; handled below
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy LineSearchWarning
            alpha = optimize.line_search(
                lambda x: cached(x)[0],
                lambda x: cached(x)[1].numpy(),
                z,
                d.numpy(),
                g.numpy(),
                f,
                None,
                c1=1e-4,
                c2=0.9,
                maxiter=50,
            )[0]
        if alpha is None:
            if s_mat.shape[1] == 0:
                return torch.from_numpy(z)
            s_mat, y_mat, sy, yy = empty, empty, sy[:0, :0], yy[:0, :0]
            continue
        z_new = z + alpha * d.numpy()
        f_new, g_new = cached(z_new)
        s, y = torch.from_numpy(z_new - z), g_new - g
        if float(s @ y) > 1e-12 * float(s.norm() * y.norm()):
            if s_mat.shape[1] == history:
                s_mat, y_mat, sy, yy = s_mat[:, 1:], y_mat[:, 1:], sy[1:, 1:], yy[1:, 1:]
            s_mat, y_mat = torch.cat([s_mat, s[:, None]], 1), torch.cat([y_mat, y[:, None]], 1)
            col, row, ycol = s_mat.T @ y, y_mat.T @ s, y_mat.T @ y
            sy = torch.cat([torch.cat([sy, col[:-1, None]], 1), row[None, :]], 0)
            sy[-1, -1] = col[-1]
            yy = torch.cat([torch.cat([yy, ycol[:-1, None]], 1), ycol[None, :]], 0)
        z, f, g = z_new, f_new, g_new


def minimize(
    obj: FastObjective,
    v_start: torch.Tensor,
    mask: torch.Tensor,
    free: torch.Tensor,
    precond: Precond,
    tol: float,
    max_evals: int,
    history: int,
) -> Fit:
    """L-BFGS on the free coordinates in the variables v = v_start + M z, until ‖∇_v L‖₂ ≤ tol
    (the full gradient in the original coordinates) or ``max_evals`` evaluations."""
    evals = 0

    def point(z: torch.Tensor) -> torch.Tensor:
        return v_start.index_add(0, free, precond.apply(z))

    def fun(z: torch.Tensor) -> tuple[float, torch.Tensor]:
        nonlocal evals
        v = point(z)
        loss, grad = obj.loss_and_grad(v, mask)
        evals += 1
        gnorm = float(grad.norm())
        if gnorm <= tol or evals >= max_evals:
            raise _Stop(loss, gnorm, v)
        return loss, precond.apply_t(grad[free])

    try:
        z = lbfgs(fun, len(free), history)
    except _Stop as stop:
        return Fit(stop.loss, stop.grad_norm, evals, stop.grad_norm <= tol, stop.v)
    v = point(z)  # the line search failed twice: report the last iterate as not converged
    loss, grad = obj.loss_and_grad(v, mask)
    return Fit(loss, float(grad.norm()), evals + 1, float(grad.norm()) <= tol, v)


def train_base(
    obj: FastObjective, v0: torch.Tensor, cfg: Config
) -> tuple[Fit, torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Plain L-BFGS to ‖g‖ ≤ 1e-4, then L-BFGS preconditioned by the exact Hessian (recomputed
    at the end of each round, at most 3 rounds) to ``base_tol``. Also returns the gradient and
    exact Hessian over [w; m] at the final point."""
    ones = torch.ones(obj.num_masks, dtype=DTYPE)
    free = torch.arange(obj.num_params)
    fit = minimize(obj, v0, ones, free, Precond(None), 1e-4, cfg.max_evals_base, cfg.history)
    log = [{"phase": "plain", "loss": fit.loss, "grad_norm": fit.grad_norm, "evals": fit.evals}]
    for round_ in range(4):
        grad, hess = obj.full_hessian(fit.v, ones)
        if fit.grad_norm <= cfg.base_tol or round_ == 3:
            break
        prec = Precond(hess[: obj.num_params, : obj.num_params])
        fit = minimize(obj, fit.v, ones, free, prec, cfg.base_tol, cfg.max_evals_base, cfg.history)
        log.append(
            {
                "phase": f"exact-Hessian preconditioned {round_ + 1}",
                "loss": fit.loss,
                "grad_norm": fit.grad_norm,
                "evals": fit.evals,
            }
        )
    return fit, grad, hess, log


# ----------------------------------------------------------------------------- structure helpers
def removed_weights(structure: ChannelStructure, obj: FastObjective) -> list[torch.Tensor]:
    """Flat indices of every channel's producer rows/biases and consumer columns (structure order)."""
    offsets, start = {}, 0
    for name, shape, size in zip(obj.names, obj.shapes, obj.sizes, strict=True):
        offsets[name] = torch.arange(start, start + size).view(shape)
        start += size
    out = []
    for group in structure.groups.values():
        for k in range(group.size):
            idx = []
            for prod in group.producers:
                idx.append(offsets[f"{prod}.weight"][k].flatten())
                if f"{prod}.bias" in offsets:
                    idx.append(offsets[f"{prod}.bias"][k].view(1))
            for slot in group.consumers:
                cols = slot.positions[slot.channels == k]
                idx.append(offsets[f"{slot.module}.weight"][:, cols].flatten())
            out.append(torch.cat(idx).sort().values)
    return out


def removal(
    obj: FastObjective, v: torch.Tensor, dead: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel k removed from weights v: (indices of the weights still free, mask with m_k = 0,
    v with the channel's producer rows, bias and consumer columns set to 0)."""
    keep = torch.ones(obj.num_params, dtype=torch.bool)
    keep[dead[k]] = False
    mask = torch.ones(obj.num_masks, dtype=DTYPE)
    mask[k] = 0.0
    start = v.clone()
    start[dead[k]] = 0.0
    return keep.nonzero().flatten(), mask, start


def check_parity(
    model: DigitsCNN,
    structure: ChannelStructure,
    obj: FastObjective,
    v: torch.Tensor,
    dead: list[torch.Tensor],
) -> float:
    """The fast objective equals the module under channel_masks; removed weights have zero grad."""
    nn.utils.vector_to_parameters(v, model.parameters())
    gen = torch.Generator().manual_seed(1)
    m = torch.rand(obj.num_masks, generator=gen, dtype=DTYPE)
    masks, start = {}, 0
    for name, group in structure.groups.items():
        masks[name] = m[start : start + group.size]
        start += group.size
    with torch.no_grad(), channel_masks(structure, masks):
        ref = model(obj.x)
    err = float((ref - obj.logits(v, m)).abs().max())
    if err > 1e-10:
        raise RuntimeError(f"fast objective differs from the module under channel_masks by {err:.2e}")
    for k, idx in enumerate(dead):
        _, mk, vk = removal(obj, v, dead, k)
        _, grad = obj.loss_and_grad(vk, mk)
        same = float((obj.logits(vk, torch.ones_like(mk)) - obj.logits(v, mk)).abs().max())
        if float(grad[idx].abs().max()) != 0.0 or same > 1e-12:
            raise RuntimeError(f"channel {k}: removed weights are not inert under mask 0")
    return err


# ----------------------------------------------------------------------------- criteria
Labelled = tuple[str, lip.Criterion]
_DEFAULTS = lip.EstimatorOptions()
DEFAULT_LABEL = f"influence default options ({_DEFAULTS.score}/{_DEFAULTS.probes}/{_DEFAULTS.inverse})"


#: The default until compare.py picked the paper's options (2026-12-02).
PREVIOUS_DEFAULT = "influence paper/ones/cg10 mb2 (previous default)"


def criteria_list(lam: float, seed: int) -> list[Labelled]:
    """(label, criterion object) for every library configuration reported.

    The first influence row runs with the library's default :class:`EstimatorOptions`
    (only ``weight_decay`` and the probe seed given), so the table always measures the default.
    """
    inf = {"weight_decay": lam}
    rad = {**inf, "score": "retrained", "probes": "rademacher", "inverse": "cg", "seed": seed}
    return [
        ("magnitude (L1)", lip.Magnitude(p=1)),
        ("taylor", lip.Taylor()),
        ("fisher", lip.Fisher()),
        ("random", lip.Random(seed=seed)),
        ("loss_drop (no retrain)", lip.LossDrop()),
        (DEFAULT_LABEL, lip.Influence(**{**inf, "seed": seed})),
        (PREVIOUS_DEFAULT, lip.Influence(**{**inf, "inverse": "cg", "micro_batches": 2})),
        (
            "influence paper/ones/cg10 δ=1e-3",
            lip.Influence(**{**inf, "score": "paper", "probes": "ones", "inverse": "cg", "damping": 1e-3}),
        ),
        (
            "influence paper/ones/cg50 δ=1e-3",
            lip.Influence(
                **{
                    **inf,
                    "score": "paper",
                    "probes": "ones",
                    "inverse": "cg",
                    "cg_iters": 50,
                    "damping": 1e-3,
                }
            ),
        ),
        (
            "influence retrained/exact/identity",
            lip.Influence(
                **{
                    **inf,
                    "score": "retrained",
                    "probes": "exact",
                    "inverse": "identity",
                    "probe_batch": 32,
                }
            ),
        ),
        (
            "influence retrained/exact/cg10 δ=1e-3",
            lip.Influence(
                **{
                    **inf,
                    "score": "retrained",
                    "probes": "exact",
                    "inverse": "cg",
                    "probe_batch": 32,
                    "damping": 1e-3,
                }
            ),
        ),
        (
            "influence retrained/exact/cg50 δ=1e-3",
            lip.Influence(
                **{
                    **inf,
                    "score": "retrained",
                    "probes": "exact",
                    "inverse": "cg",
                    "cg_iters": 50,
                    "probe_batch": 32,
                    "damping": 1e-3,
                }
            ),
        ),
        (
            "influence retrained/rademacher16/cg10 δ=1e-3",
            lip.Influence(**{**rad, "num_probes": 16, "damping": 1e-3}),
        ),
        (
            "influence retrained/rademacher16/cg10",
            lip.Influence(**{**rad, "num_probes": 16, "cg_iters": 10}),
        ),
        (
            "influence retrained/rademacher8/cg5",
            lip.Influence(**{**rad, "num_probes": 8, "cg_iters": 5}),
        ),
        (
            "influence retrained/rademacher4/cg5",
            lip.Influence(**{**rad, "num_probes": 4, "cg_iters": 5}),
        ),
        (
            "influence retrained/rademacher4/cg10",
            lip.Influence(**{**rad, "num_probes": 4, "cg_iters": 10}),
        ),
    ]


def flat_scores(scores: dict[str, torch.Tensor], structure: ChannelStructure) -> np.ndarray:
    return torch.cat([scores[n].double().flatten() for n in structure.groups]).numpy()


def exact_references(
    grad: torch.Tensor, hess: torch.Tensor, num_params: int, lam: float, damping: float
) -> dict[str, np.ndarray]:
    """Scores from explicit matrices: exact Schur, no-retrain 2nd order, paper with exact inverse,
    plus the identity-inverse and damped-inverse versions used to cross-check the estimator."""
    p = num_params
    g_m, h_mm, h_wm, h_ww = grad[p:], hess[p:, p:], hess[:p, p:], hess[:p, :p]
    eye = torch.eye(p, dtype=DTYPE)

    def schur(solve: torch.Tensor) -> torch.Tensor:
        return h_mm - h_wm.T @ solve

    exact = torch.linalg.solve(h_ww, h_wm)
    damped = torch.linalg.solve(h_ww + damping * eye, h_wm)
    ident = h_wm / lam
    ones = torch.ones(h_mm.shape[0], dtype=DTYPE)
    out = {
        "exact Schur −g+½(H_mm−H_mw H_ww⁻¹ H_wm)": -g_m + 0.5 * schur(exact).diagonal(),
        "exact 2nd order, no retrain −g+½H_mm": -g_m + 0.5 * h_mm.diagonal(),
        "exact paper |H_mw H_ww⁻¹ H_wm 1|": (h_wm.T @ exact @ ones).abs(),
        "_check retrained/identity": -g_m + 0.5 * schur(ident).diagonal(),
        "_check paper/identity": (h_wm.T @ ident @ ones).abs(),
        "_check retrained/damped-exact": -g_m + 0.5 * schur(damped).diagonal(),
        "_check paper/damped-exact": (h_wm.T @ damped @ ones).abs(),
    }
    return {k: v.numpy() for k, v in out.items()}


def newton_reference(
    obj: FastObjective,
    v: torch.Tensor,
    h_ww: torch.Tensor,
    dead: list[torch.Tensor],
    base_loss: float,
) -> np.ndarray:
    """The spec's ``newton`` score, exactly: remove channel k (mask 0, its weights 0), take one
    full Newton step of the remaining weights with the exact base Hessian, δw = −H_ww⁻¹ ∇_w L,
    and report the loss there minus the base loss — a finite step instead of a Taylor expansion."""
    out = []
    for k in range(len(dead)):
        free, mask, start = removal(obj, v, dead, k)
        _, grad = obj.loss_and_grad(start, mask)
        step = torch.linalg.solve(h_ww[free][:, free], grad[free])
        out.append(obj.loss_and_grad(start.index_add(0, free, -step), mask)[0] - base_loss)
    return np.array(out)


def agreement(score: np.ndarray, target: np.ndarray, k: int) -> dict[str, float]:
    """Spearman, Kendall and top-k agreement of a score (low = cheap) with a true ΔL.

    Top-k: the fraction of the k lowest-scored channels whose true ΔL is at most the k-th
    smallest true ΔL (so ties at the boundary count; without ties it is the set overlap / k).
    """
    rho = stats.spearmanr(score, target).statistic
    tau = stats.kendalltau(score, target).statistic
    chosen = np.argsort(score, kind="stable")[:k]
    kth = np.sort(target)[k - 1]
    return {
        "spearman": float(rho),
        "kendall": float(tau),
        "topk": float(np.mean(target[chosen] <= kth)),
    }


def shared_optima(delta: np.ndarray, atol: float = 1e-9) -> int:
    """Channels whose retrained loss equals another channel's (same optimum reached)."""
    diff = np.abs(delta[:, None] - delta[None, :]) < atol
    np.fill_diagonal(diff, False)
    return int(diff.any(1).sum())


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- one seed
def run_seed(seed: int, cfg: Config, say: Callable[[str], None]) -> dict[str, Any]:
    t_seed = time.perf_counter()
    x, y, x_test, y_test = load_data(seed, cfg.n_train)
    torch.manual_seed(seed)
    model = DigitsCNN(cfg.widths).to(DTYPE)
    structure = ChannelStructure.build(model, x[:2])
    if list(structure.groups) != ["conv1", "conv2", "conv3"]:
        raise RuntimeError(f"unexpected groups {list(structure.groups)}")
    obj = FastObjective(model, x, y, cfg.weight_decay)
    dead = removed_weights(structure, obj)
    v0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    parity = check_parity(model, structure, obj, v0, dead)
    ones = torch.ones(obj.num_masks, dtype=DTYPE)
    n_ch, p = obj.num_masks, obj.num_params

    # base model
    t0 = time.perf_counter()
    base, grad_full, hess, base_log = train_base(obj, v0, cfg)
    t_base = time.perf_counter() - t0
    nn.utils.vector_to_parameters(base.v, model.parameters())
    with torch.no_grad():
        test_acc = float((model(x_test).argmax(1) == y_test).double().mean())
        train_acc = float((model(x).argmax(1) == y).double().mean())
    base_evals = sum(int(ph["evals"]) for ph in base_log)
    say(
        f"  seed {seed}: base loss {base.loss:.6f}, ‖g‖ {base.grad_norm:.1e}, {base_evals} evals, "
        f"train/test acc {train_acc:.3f}/{test_acc:.3f}, {t_base:.0f}s (incl. Hessians)"
    )

    h_ww = hess[:p, :p]
    eig = torch.linalg.eigvalsh(h_ww)
    say(
        f"  seed {seed}: exact Hessian over [w; m] {tuple(hess.shape)}, H_ww eigenvalues "
        f"[{float(eig[0]):.2e}, {float(eig[-1]):.2e}]"
    )

    # retrains: control + every channel, two perturbed runs
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(10_000 + seed)
    all_free = torch.arange(p)
    prec_all = Precond(h_ww)
    runs = []
    for _ in range(2):
        start = base.v + cfg.sigma * torch.randn(p, generator=gen, dtype=DTYPE)
        ctrl = minimize(obj, start, ones, all_free, prec_all, cfg.tol, cfg.max_evals_retrain, cfg.history)
        fits = []
        for k in range(n_ch):
            free, mk, vk = removal(obj, start, dead, k)
            prec = Precond(h_ww[free][:, free])
            fits.append(minimize(obj, vk, mk, free, prec, cfg.tol, cfg.max_evals_retrain, cfg.history))
        ref = min(base.loss, ctrl.loss)
        runs.append(
            {
                "control_loss": ctrl.loss,
                "control_grad_norm": ctrl.grad_norm,
                "control_evals": ctrl.evals,
                "control_converged": ctrl.converged,
                "control_won": base.loss - ctrl.loss > CONTROL_MARGIN,
                "control_strictly_lower": ctrl.loss < base.loss,
                "base_minus_control": base.loss - ctrl.loss,
                "reference_loss": ref,
                "losses": [f.loss for f in fits],
                "delta": [f.loss - ref for f in fits],
                "grad_norms": [f.grad_norm for f in fits],
                "evals": [f.evals for f in fits],
                "converged": [f.converged for f in fits],
            }
        )
    t_retrain = time.perf_counter() - t0
    d1, d2 = np.array(runs[0]["delta"]), np.array(runs[1]["delta"])
    r = float(stats.spearmanr(d1, d2).statistic)
    sqrt_r = math.sqrt(r) if r > 0 else float("nan")
    retrain_norms = [g for run in runs for g in run["grad_norms"]] + [run["control_grad_norm"] for run in runs]
    n_bad = sum(not c for run in runs for c in run["converged"]) + sum(not run["control_converged"] for run in runs)
    say(
        f"  seed {seed}: {2 * (n_ch + 1)} retrains in {t_retrain:.0f}s, worst ‖g‖ {max(retrain_norms):.1e}, "
        f"{n_bad} not converged, test-retest r {r:.3f} (√r {sqrt_r:.3f}), control won "
        f"{sum(run['control_won'] for run in runs)}/2"
    )

    # criteria
    t0 = time.perf_counter()
    batches = [(x, y)]
    scores: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    for label, criterion in criteria_list(cfg.weight_decay, seed):
        t1 = time.perf_counter()
        raw = lip.score_channels(model, batches, criterion=criterion, loss_fn=F.cross_entropy, example_inputs=x[:2])
        timing[label] = time.perf_counter() - t1
        scores[label] = flat_scores(raw, structure)
    refs = exact_references(grad_full, hess, p, cfg.weight_decay, 1e-3)
    checks = {
        "retrained/exact/identity vs explicit": rel_diff(
            scores["influence retrained/exact/identity"], refs["_check retrained/identity"]
        ),
        "paper/ones/identity vs explicit": rel_diff(scores[DEFAULT_LABEL], refs["_check paper/identity"]),
        "retrained/exact/cg50 vs explicit damped solve": rel_diff(
            scores["influence retrained/exact/cg50 δ=1e-3"], refs["_check retrained/damped-exact"]
        ),
        "paper/ones/cg50 vs explicit damped solve": rel_diff(
            scores["influence paper/ones/cg50 δ=1e-3"], refs["_check paper/damped-exact"]
        ),
    }
    scores.update({k: v for k, v in refs.items() if not k.startswith("_")})
    scores["exact newton: one Newton step after removal"] = newton_reference(obj, base.v, h_ww, dead, base.loss)
    t_crit = time.perf_counter() - t0

    k = max(1, round(cfg.topk_frac * n_ch))
    metrics = {}
    for label, s in scores.items():
        a1, a2 = agreement(s, d1, k), agreement(s, d2, k)
        m = {key: 0.5 * (a1[key] + a2[key]) for key in a1}
        m["spearman_over_sqrt_r"] = m["spearman"] / sqrt_r
        m["run1"], m["run2"] = a1, a2
        metrics[label] = m
    return {
        "seed": seed,
        "n_channels": n_ch,
        "n_params": p,
        "k": k,
        "parity_max_abs_err": parity,
        "base": {
            "loss": base.loss,
            "grad_norm": base.grad_norm,
            "evals": base_evals,
            "converged": base.grad_norm <= cfg.base_tol,
            "train_acc": train_acc,
            "test_acc": test_acc,
            "phases": base_log,
            "h_ww_min_eig": float(eig[0]),
            "h_ww_max_eig": float(eig[-1]),
        },
        "runs": runs,
        "test_retest_r": r,
        "sqrt_r": sqrt_r,
        "worst_retrain_grad_norm": max(retrain_norms),
        "retrains_not_converged": n_bad,
        "negative_delta_count": int((d1 < 0).sum() + (d2 < 0).sum()),
        "shared_optima_run1": shared_optima(d1),
        "shared_optima_run2": shared_optima(d2),
        "scores": {label: s.tolist() for label, s in scores.items()},
        "metrics": metrics,
        "estimator_checks_rel_diff": checks,
        "criterion_seconds": timing,
        "seconds": {
            "base_incl_hessians": t_base,
            "retrains": t_retrain,
            "criteria": t_crit,
            "total": time.perf_counter() - t_seed,
        },
    }


# ----------------------------------------------------------------------------- report
def summarize(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for label in per_seed[0]["metrics"]:
        row = {}
        for key in ("spearman", "kendall", "topk", "spearman_over_sqrt_r"):
            vals = np.array([s["metrics"][label][key] for s in per_seed])
            row[f"{key}_mean"] = float(np.mean(vals))
            row[f"{key}_std"] = float(np.std(vals))
        # paired with the default on the same seeds: is a configuration really better?
        diff = np.array([s["metrics"][label]["spearman"] - s["metrics"][DEFAULT_LABEL]["spearman"] for s in per_seed])
        row["spearman_minus_default_mean"] = float(np.mean(diff))
        row["spearman_minus_default_std"] = float(np.std(diff))
        out[label] = row
    return out


def table(summary: dict[str, dict[str, float]], k: int, n_ch: int) -> str:
    width = max(len(label) for label in summary) + 2
    lines = [
        f"{'criterion / configuration':<{width}}{'Spearman':>16}{'Kendall':>16}"
        f"{f'top-{k}/{n_ch}':>10}{'Sp/√r':>9}{'Sp − default':>16}"
    ]
    lines.append("-" * len(lines[0]))
    for label, row in summary.items():
        lines.append(
            f"{label:<{width}}"
            f"{row['spearman_mean']:>+9.3f} ±{row['spearman_std']:.3f}"
            f"{row['kendall_mean']:>+9.3f} ±{row['kendall_std']:.3f}"
            f"{row['topk_mean']:>10.3f}{row['spearman_over_sqrt_r_mean']:>9.2f}"
            f"{row['spearman_minus_default_mean']:>+9.3f} ±{row['spearman_minus_default_std']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="150 training images (smoke test)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: float64 CPU kernels oversubscribe a shared 2-core box)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cfg = Config(seeds=args.seeds, quick=args.quick, threads=args.threads)
    cfg.n_train = args.n_train or (150 if args.quick else 500)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    say(
        f"fidelity: digits, {cfg.n_train} training images, CNN widths {cfg.widths}, tanh, float64, "
        f"λ={cfg.weight_decay}, tol={cfg.tol}, σ={cfg.sigma}, {cfg.seeds} seed(s)"
    )
    per_seed = [run_seed(seed, cfg, say) for seed in range(cfg.seeds)]
    wall = time.perf_counter() - start
    summary = summarize(per_seed)
    k, n_ch = per_seed[0]["k"], per_seed[0]["n_channels"]
    print()
    print(table(summary, k, n_ch))
    print()
    base_norm = max(s["base"]["grad_norm"] for s in per_seed)
    retrain_norm = max(s["worst_retrain_grad_norm"] for s in per_seed)
    n_bad = sum(s["retrains_not_converged"] for s in per_seed)
    n_retrains = sum(2 * (s["n_channels"] + 1) for s in per_seed)
    won = sum(run["control_won"] for s in per_seed for run in s["runs"])
    margins = [run["base_minus_control"] for s in per_seed for run in s["runs"]]
    neg = sum(s["negative_delta_count"] for s in per_seed)
    print(
        f"worst base ‖∇L‖ {base_norm:.2e} (target {cfg.base_tol:g}); worst retrain ‖∇L‖ {retrain_norm:.2e} "
        f"(target {cfg.tol:g}); retrains not converged: {n_bad}/{n_retrains}"
    )
    for s in per_seed:
        print(
            f"seed {s['seed']}: test-retest r = {s['test_retest_r']:.4f}, √r = {s['sqrt_r']:.4f}; "
            f"base loss {s['base']['loss']:.6f}, test acc {s['base']['test_acc']:.3f}, "
            f"H_ww min eig {s['base']['h_ww_min_eig']:.2e}"
        )
    lower = sum(run["control_strictly_lower"] for s in per_seed for run in s["runs"])
    print(
        f"control (base retrained from the perturbed start) ended below the base by > {CONTROL_MARGIN:g} in "
        f"{won}/{len(margins)} runs (strictly lower in {lower}; largest base − control {max(margins):.1e}); "
        f"removals ending below the reference: "
        f"{neg}/{2 * sum(s['n_channels'] for s in per_seed)}"
    )
    shared = sum(s["shared_optima_run1"] + s["shared_optima_run2"] for s in per_seed)
    print(
        f"removals whose retrain reached the same loss (±1e-9) as another removal's: "
        f"{shared}/{2 * sum(s['n_channels'] for s in per_seed)}"
    )
    baselines = ["magnitude (L1)", "taylor", "fisher", "random", "loss_drop (no retrain)"]
    best_base = max(baselines, key=lambda b: summary[b]["spearman_mean"])
    influence = [lab for lab in summary if lab.startswith("influence")]
    best_inf = max(influence, key=lambda b: summary[b]["spearman_mean"])
    for label in dict.fromkeys((DEFAULT_LABEL, best_inf, PREVIOUS_DEFAULT)):
        gap = summary[label]["spearman_mean"] - summary[best_base]["spearman_mean"]
        print(
            f"{label}: Spearman {summary[label]['spearman_mean']:+.3f} vs best baseline {best_base} "
            f"{summary[best_base]['spearman_mean']:+.3f} (difference {gap:+.3f})"
        )
    checks = {
        key: max(s["estimator_checks_rel_diff"][key] for s in per_seed)
        for key in per_seed[0]["estimator_checks_rel_diff"]
    }
    print(
        "estimator vs explicit matrices (max rel. diff): "
        + "; ".join(f"{key} {val:.1e}" for key, val in checks.items())
    )
    print(
        f"activation tanh; data: {cfg.n_train} training images per seed (stratified subset of 1,797); "
        f"bn_scale skipped (no BatchNorm); wall time {wall:.0f}s with {cfg.threads} thread(s)"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "fidelity",
        "settings": {
            **asdict(cfg),
            "k": k,
            "n_channels": n_ch,
            "activation_note": "tanh: smooth, and better conditioned than SiLU here",
            "bn_scale": "skipped: the network has no BatchNorm",
            "control_margin": CONTROL_MARGIN,
        },
        "default_label": DEFAULT_LABEL,
        "default_options": asdict(lip.EstimatorOptions()),
        "summary": summary,
        "wall_seconds": wall,
        "worst_base_grad_norm": base_norm,
        "worst_retrain_grad_norm": retrain_norm,
        "retrains_not_converged": n_bad,
        "retrains_total": n_retrains,
        "control_won": won,
        "control_runs": len(margins),
        "estimator_checks_max_rel_diff": checks,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "lightning_ifprune": lip.__version__,
            "machine": platform.machine(),
            "command": " ".join(sys.argv),
        },
        "per_seed": per_seed,
    }
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
