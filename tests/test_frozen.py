"""Frozen consuming layers still count: their weights see the masks, only the update skips them.

Reference: the explicit Hessian of the tiny float64 model over [w; m] with every weight, then
the trainable block alone for the retraining (H_ww, H_wm restricted to the unfrozen weights).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny import explicit_hessian, tiny_setup

import lightning_ifprune as lip
from lightning_ifprune.estimator import EstimatorOptions, estimate
from lightning_ifprune.loss import supervised

LAM = 1e-2
CE = supervised(F.cross_entropy)
FROZEN = "conv2.weight"  # consumes every channel of group conv1


@pytest.fixture
def frozen():
    model, structure, x, y = tiny_setup(seed=2)
    grad, hess, nw, names, sizes = explicit_hessian(model, structure, x, y, LAM)
    start = 0
    keep = torch.ones(nw, dtype=torch.bool)
    for name, p in model.named_parameters():
        if name == FROZEN:
            keep[start : start + p.numel()] = False
        start += p.numel()
    trainable = torch.cat([keep.nonzero().flatten(), torch.arange(nw, nw + sum(sizes.values()))])
    model.get_parameter(FROZEN).requires_grad_(False)
    yield model, structure, x, y, grad[nw:], hess[trainable][:, trainable], int(keep.sum()), sizes
    model.get_parameter(FROZEN).requires_grad_(True)


def _flat(scores, sizes):
    return torch.cat([scores[g].double() for g in sizes])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_paper_and_retrained_scores_count_a_frozen_consumer(frozen, state_snapshot) -> None:
    model, structure, x, y, g_m, hess, nt, sizes = frozen
    h_mm, h_mw, h_wm = hess[nt:, nt:], hess[nt:, :nt], hess[:nt, nt:]
    ones = torch.ones(h_mm.shape[0], dtype=torch.float64)
    before = state_snapshot(model)
    paper = EstimatorOptions(score="paper", probes="ones", inverse="identity", weight_decay=LAM, micro_batches=1)
    got = _flat(estimate(structure, [(x, y)], CE, paper).scores, sizes)
    assert _rel(got, (h_mw @ h_wm @ ones / LAM).abs()) <= 1e-8
    assert got[: sizes["conv1"]].min() > 0  # the channels only the frozen layer reads

    retrained = EstimatorOptions(
        score="retrained", probes="exact", inverse="identity", weight_decay=LAM, micro_batches=1
    )
    got = _flat(estimate(structure, [(x, y)], CE, retrained).scores, sizes)
    assert _rel(got, -g_m + 0.5 * torch.diagonal(h_mm - h_mw @ h_wm / LAM)) <= 1e-8

    damping = 25.0  # makes the trainable block positive definite: CG then solves it exactly
    cg = EstimatorOptions(
        score="retrained", probes="exact", inverse="cg", cg_iters=nt, damping=damping, weight_decay=LAM, micro_batches=1
    )
    solve = torch.linalg.solve(hess[:nt, :nt] + damping * torch.eye(nt, dtype=torch.float64), h_wm)
    got = _flat(estimate(structure, [(x, y)], CE, cg).scores, sizes)
    assert _rel(got, -g_m + 0.5 * torch.diagonal(h_mm - h_mw @ solve)) <= 1e-6
    before.assert_unchanged()  # still frozen, same weights


def test_taylor_and_fisher_count_a_frozen_consumer(frozen) -> None:
    model, structure, x, y, g_m, *_, sizes = frozen
    taylor = lip.score_channels(model, [(x, y)], criterion="taylor", loss_fn=F.cross_entropy, example_inputs=x[:1])
    fisher = lip.score_channels(model, [(x, y)], criterion="fisher", loss_fn=F.cross_entropy, example_inputs=x[:1])
    assert _rel(_flat(taylor, sizes), g_m.abs()) <= 1e-8
    assert _rel(_flat(fisher, sizes), g_m**2) <= 1e-8
    assert not model.get_parameter(FROZEN).requires_grad
