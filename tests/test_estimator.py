"""The influence estimator against explicit Hessians of a tiny float64 model with masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny import explicit_hessian, regression_with_auxiliary, tiny_setup, tiny_transformer_setup
from torch import nn

from lightning_ifprune.estimator import (
    BatchHessian,
    EstimatorOptions,
    apply_inverse,
    estimate,
    estimation_mode,
)
from lightning_ifprune.loss import supervised
from lightning_ifprune.structure import ChannelStructure, MaskSpace
from lightning_ifprune.surgery import prune_channels

LAM = 1e-2
CE = supervised(F.cross_entropy)


@pytest.fixture(scope="module", params=["cnn", "transformer", "cnn_regression"])
def tiny(request):
    """A float64 CNN (BatchNorm, flatten) or transformer (LayerNorm, attention heads, MLP
    units), its structure, a batch, the loss closure (CE, or MSE + a Huber auxiliary term) and
    the explicit Hessian of its masked loss."""
    model, structure, x, y = (tiny_transformer_setup if request.param == "transformer" else tiny_setup)()
    criterion = regression_with_auxiliary if request.param == "cnn_regression" else F.cross_entropy
    grad, hess, nw, names, sizes = explicit_hessian(model, structure, x, y, LAM, criterion)
    return model, structure, x, y, grad, hess, nw, sizes, supervised(criterion)


def _flat_m(d, sizes):
    return torch.cat([d[g][0] for g in sizes])


def _split_m(v, sizes):
    out, j = {}, 0
    for g, k in sizes.items():
        out[g] = v[None, j : j + k]
        j += k
    return out


def _split_w(v, params):
    out, i = {}, 0
    for n, p in params.items():
        out[n] = v[i : i + p.numel()].view(1, *p.shape)
        i += p.numel()
    return out


def _flat_w(d, params):
    return torch.cat([d[n][0].flatten() for n in params])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_every_product_matches_the_explicit_hessian(tiny) -> None:
    model, structure, x, y, grad, hess, nw, sizes, loss = tiny
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    space = MaskSpace(structure, params)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(sum(sizes.values()), generator=gen, dtype=torch.float64)
    u = torch.randn(nw, generator=gen, dtype=torch.float64)
    with estimation_mode(model):
        hb = BatchHessian(model, params, (x, y), loss)
        w = {k: p.detach() for k, p in params.items()}
        g = hb.grad
        g_m = space.reduce({k: (w[k] * g[k])[None] for k in w}, dtype=torch.float64)
        ez = space.expand(_split_m(v, sizes), w)
        wez = {n: w[n] * ez[n] if n in ez else torch.zeros(1, *w[n].shape, dtype=w[n].dtype) for n in w}
        a = hb.hvp(wez)
        h_wm_v = {n: a[n] + (g[n] * ez[n] if n in ez else 0) for n in w}
        h_mm_v = space.reduce({n: w[n] * a[n] for n in w}, dtype=torch.float64)
        ud = _split_w(u, params)
        hu = hb.hvp(ud)
        h_ww_u = {n: hu[n] + LAM * ud[n] for n in w}
        h_mw_u = space.reduce({n: g[n] * ud[n] + w[n] * hu[n] for n in w}, dtype=torch.float64)
    assert _rel(_flat_m(g_m, sizes), grad[nw:]) <= 1e-8
    assert _rel(_flat_w(h_wm_v, params), hess[:nw, nw:] @ v) <= 1e-8
    assert _rel(_flat_m(h_mm_v, sizes), hess[nw:, nw:] @ v) <= 1e-8
    assert _rel(_flat_w(h_ww_u, params), hess[:nw, :nw] @ u) <= 1e-8
    assert _rel(_flat_m(h_mw_u, sizes), hess[nw:, :nw] @ u) <= 1e-8


def test_cg_matches_an_explicitapply_inverse(tiny) -> None:
    model, structure, x, y, grad, hess, nw, sizes, loss = tiny
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    damping = 25.0  # shifts the (indefinite) Hessian to positive definite: CG then solves it
    opts = EstimatorOptions(inverse="cg", cg_iters=nw, weight_decay=LAM, damping=damping)
    b = torch.randn(nw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    matrix = hess[:nw, :nw] + damping * torch.eye(nw, dtype=torch.float64)
    assert torch.linalg.eigvalsh(matrix).min() > 0
    with estimation_mode(model):
        hb = BatchHessian(model, params, (x, y), loss)
        got = _flat_w(apply_inverse(hb, _split_w(b, params), opts), params)
    assert _rel(got, torch.linalg.solve(matrix, b)) <= 1e-6


def _schur_parts(hess, nw, inverse):
    h_mm, h_mw, h_wm = hess[nw:, nw:], hess[nw:, :nw], hess[:nw, nw:]
    return h_mm, h_mw @ inverse @ h_wm


def test_paper_score_equals_explicit_formula(tiny) -> None:
    model, structure, x, y, grad, hess, nw, sizes, loss = tiny
    _, influence = _schur_parts(hess, nw, torch.eye(nw, dtype=torch.float64) / LAM)
    expected = (influence @ torch.ones(influence.shape[0], dtype=torch.float64)).abs()
    opts = EstimatorOptions(score="paper", probes="ones", inverse="identity", weight_decay=LAM, micro_batches=1)
    got = estimate(structure, [(x, y)], loss, opts).scores
    assert _rel(_flat_m({k: v[None] for k, v in got.items()}, sizes), expected) <= 1e-8


def test_retrained_score_with_exact_probes_equals_explicit_schur_diagonal(tiny) -> None:
    model, structure, x, y, grad, hess, nw, sizes, loss = tiny
    inverse = torch.eye(nw, dtype=torch.float64) / LAM
    h_mm, influence = _schur_parts(hess, nw, inverse)
    expected = -grad[nw:] + 0.5 * torch.diagonal(h_mm - influence)
    opts = EstimatorOptions(score="retrained", probes="exact", inverse="identity", weight_decay=LAM, micro_batches=1)
    got = estimate(structure, [(x, y)], loss, opts).scores
    assert _rel(_flat_m({k: v[None] for k, v in got.items()}, sizes), expected) <= 1e-8


def test_hutchinson_mean_converges_to_the_explicit_diagonal(tiny) -> None:
    model, structure, x, y, grad, hess, nw, sizes, loss = tiny
    h_mm, influence = _schur_parts(hess, nw, torch.eye(nw, dtype=torch.float64) / LAM)
    expected = -grad[nw:] + 0.5 * torch.diagonal(h_mm - influence)
    errors = []
    for probes in (8, 512):
        opts = EstimatorOptions(
            score="retrained",
            probes="rademacher",
            num_probes=probes,
            probe_batch=64,
            inverse="identity",
            weight_decay=LAM,
            seed=3,
            micro_batches=1,
        )
        got = estimate(structure, [(x, y)], loss, opts).scores
        errors.append(_rel(_flat_m({k: v[None] for k, v in got.items()}, sizes), expected))
    assert errors[1] < 0.15 and errors[1] < errors[0]


def test_estimation_restores_state_grads_and_modes(tiny, state_snapshot) -> None:
    model, structure, x, y, *_, loss = tiny
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first, second, last = layers[0], layers[1], layers[-1]
    norm = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))][-1]
    model.train()
    norm.eval()
    last.weight.requires_grad_(False)
    first.weight.grad = torch.ones_like(first.weight)
    try:
        before = state_snapshot(model)
        estimate(
            structure,
            [(x, y), (x * 2, y)],
            loss,
            EstimatorOptions(num_probes=4, cg_iters=3, weight_decay=LAM),
        )
        before.assert_unchanged()
        assert torch.equal(first.weight.grad, torch.ones_like(first.weight))
        assert second.weight.grad is None and not last.weight.requires_grad
        assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    finally:
        last.weight.requires_grad_(True)
        first.weight.grad = None


def test_estimation_under_autocast_runs_in_float32() -> None:
    model, structure, x, y = tiny_setup()
    model.float()
    structure = type(structure).build(model, x[:2].float())
    seen = []
    hook = model.conv2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opts = EstimatorOptions(score="paper", probes="ones", inverse="identity", weight_decay=LAM)
    try:
        reference = estimate(structure, [(x.float(), y)], CE, opts).scores
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = estimate(structure, [(x.float(), y)], CE, opts).scores
    finally:
        hook.remove()
    assert seen and all(d == torch.float32 for d in seen)
    assert all(torch.equal(got[k], reference[k]) for k in got)


def test_micro_batches_without_norm_layers_give_the_same_scores() -> None:
    model, structure, x, y = tiny_setup()
    # Without batch statistics the loss is a plain mean over samples, so splitting is exact.
    model.bn1, model.bn2 = torch.nn.Identity(), torch.nn.Identity()
    structure = type(structure).build(model, x[:2])
    opts = dict(score="paper", probes="ones", inverse="cg", cg_iters=4, weight_decay=LAM)
    whole = estimate(structure, [(x, y)], CE, EstimatorOptions(micro_batches=1, **opts)).scores
    split = estimate(structure, [(x, y)], CE, EstimatorOptions(micro_batches=3, **opts)).scores
    assert all(torch.allclose(whole[k], split[k], rtol=1e-10, atol=0) for k in whole)


def test_micro_batches_with_batch_norm_estimate_the_mean_of_the_parts() -> None:
    # With BN, two micro-batches are two half-batch losses (each with its own statistics):
    # the scores are those of the explicit Hessian of their mean.
    model, structure, x, y = tiny_setup()
    parts = [explicit_hessian(model, structure, x[i : i + 3], y[i : i + 3], LAM) for i in (0, 3)]
    nw = parts[0][2]
    hess = 0.5 * (parts[0][1] + parts[1][1])
    _, influence = _schur_parts(hess, nw, torch.eye(nw, dtype=torch.float64) / LAM)
    expected = (influence @ torch.ones(influence.shape[0], dtype=torch.float64)).abs()
    opts = EstimatorOptions(score="paper", probes="ones", inverse="identity", weight_decay=LAM, micro_batches=2)
    got = estimate(structure, [(x, y)], CE, opts).scores
    assert _rel(_flat_m({k: v[None] for k, v in got.items()}, parts[0][4]), expected) <= 1e-8
    whole = estimate(
        structure,
        [(x, y)],
        CE,
        EstimatorOptions(score="paper", probes="ones", inverse="identity", weight_decay=LAM, micro_batches=1),
    ).scores
    assert not all(torch.allclose(whole[k], got[k]) for k in got)  # the split really changes BN


def test_micro_batches_never_leave_a_single_sample_for_batch_norm() -> None:
    # BatchNorm1d cannot normalise one sample in training mode: a batch of 3 is not split.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    ).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    structure = ChannelStructure.build(model, x[:2])
    opts = dict(score="paper", probes="ones", inverse="cg", cg_iters=3, weight_decay=LAM)
    split = estimate(structure, [(x, y)], CE, EstimatorOptions(**opts)).scores
    whole = estimate(structure, [(x, y)], CE, EstimatorOptions(micro_batches=1, **opts)).scores
    assert all(torch.equal(split[k], whole[k]) for k in whole)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(score="bogus"), "score must be one of"),
        (dict(score="retrained", probes="ones"), "needs per-channel diagonals"),
        (dict(score="retrained", probes="exact", inverse="identity", weight_decay=0.0), "weight_decay > 0"),
        (dict(num_probes=0), "num_probes"),
        (dict(micro_batches=0), "micro_batches"),
    ],
)
def test_bad_options_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EstimatorOptions(**kwargs)


def test_sync_batchnorm_is_estimated_per_rank_and_kept() -> None:
    model, structure, x, y = tiny_setup()
    opts = EstimatorOptions(score="paper", probes="ones", inverse="identity", weight_decay=LAM)
    reference = estimate(structure, [(x, y)], CE, opts).scores
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    structure = type(structure).build(synced, x[:2])
    got = estimate(structure, [(x, y)], CE, opts).scores
    assert all(torch.allclose(got[k], reference[k], rtol=1e-12, atol=0) for k in got)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == 2
    prune_channels(structure, {"conv1": [0]})  # surgery keeps the synchronised layers
    assert isinstance(synced.bn1, torch.nn.SyncBatchNorm) and synced.bn1.num_features == 3


def test_paper_identity_without_weight_decay_is_the_scale_free_score() -> None:
    """The default (paper score, identity inverse) is |H_mw H_wm 1| / λ. With λ unset (no optimizer
    decay, or outside a fit) it is taken as 1: the same ranking as any λ > 0. The retrained score,
    where λ does not cancel, still needs λ."""
    _, structure, x, y = tiny_setup()
    free = estimate(structure, [(x, y)], CE, EstimatorOptions()).scores
    scaled = estimate(structure, [(x, y)], CE, EstimatorOptions(weight_decay=LAM)).scores
    assert all(torch.allclose(free[k] / LAM, scaled[k], rtol=1e-10, atol=0) for k in free)
    assert any(bool((free[k] > 0).any()) for k in free)
    with pytest.raises(ValueError, match="weight_decay > 0"):
        estimate(structure, [(x, y)], CE, EstimatorOptions(score="retrained", probes="exact", inverse="identity"))
