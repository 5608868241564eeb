"""Every baseline criterion against a hand computation on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_setup
from torch import nn

import lightning_ifprune as lip
from lightning_ifprune.criteria import resolve_criterion
from lightning_ifprune.structure import ChannelStructure
from lightning_ifprune.surgery import prune_channels


@pytest.fixture
def tiny():
    model, structure, x, y = tiny_setup(seed=1)
    return model, x, y


def _batch_stat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss with BN on batch statistics and running stats untouched (as the criteria see it)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.track_running_stats = False
    model.train()
    try:
        return F.cross_entropy(model(x), y)
    finally:
        for m in norms:
            m.track_running_stats = True


def _mask_grads_by_autograd(model, x, y):
    """∂L/∂m through real mask tensors in the forward pass (independent of MaskSpace)."""
    structure = ChannelStructure.build(model, x[:1])
    masks = {n: torch.ones(g.size, dtype=x.dtype, requires_grad=True) for n, g in structure.groups.items()}
    with lip.channel_masks(structure, masks):
        loss = _batch_stat_loss(model, x, y)
    grads = torch.autograd.grad(loss, list(masks.values()))
    return dict(zip(masks, grads, strict=True))


def test_magnitude_and_bn_scale(tiny) -> None:
    model, x, y = tiny
    l1 = lip.score_channels(model, criterion="magnitude", example_inputs=x[:1])
    l2 = lip.score_channels(model, criterion="magnitude", example_inputs=x[:1], p=2)
    bn = lip.score_channels(model, criterion="bn_scale", example_inputs=x[:1])
    assert torch.allclose(l1["conv1"], model.conv1.weight.abs().sum((1, 2, 3)))
    assert torch.allclose(l2["conv2"], model.conv2.weight.pow(2).sum((1, 2, 3)).sqrt())
    assert torch.allclose(bn["conv2"], model.bn2.weight.abs())


def test_taylor_and_fisher_accumulate_over_batches(tiny) -> None:
    model, x, y = tiny
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    per_batch = [_mask_grads_by_autograd(model, bx, by) for bx, by in batches]
    taylor = lip.score_channels(model, batches, loss_fn=F.cross_entropy, criterion="taylor")
    fisher = lip.score_channels(model, batches, loss_fn=F.cross_entropy, criterion="fisher")
    for name in taylor:
        assert torch.allclose(taylor[name], sum(g[name].abs() for g in per_batch), rtol=1e-10)
        assert torch.allclose(fisher[name], sum(g[name] ** 2 for g in per_batch), rtol=1e-10)


def test_loss_drop_equals_loss_of_the_physically_pruned_model(tiny) -> None:
    model, x, y = tiny
    scores = lip.score_channels(model, [(x, y)], loss_fn=F.cross_entropy, criterion="loss_drop")
    base = _batch_stat_loss(model, x, y).item()
    for name, k in (("conv1", 2), ("conv2", 0)):
        pruned = copy.deepcopy(model)
        prune_channels(ChannelStructure.build(pruned, x[:1]), {name: [k]})
        expected = _batch_stat_loss(pruned, x, y).item() - base
        assert scores[name][k].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_random_is_seeded_and_callables_are_accepted(tiny) -> None:
    model, x, _ = tiny
    a = lip.score_channels(model, criterion="random", example_inputs=x[:1], seed=4)
    b = lip.score_channels(model, criterion="random", example_inputs=x[:1], seed=4)
    c = lip.score_channels(model, criterion="random", example_inputs=x[:1], seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["conv1"], c["conv1"])

    def by_index(structure, batches, loss):
        return {n: torch.arange(g.size, dtype=torch.float) for n, g in structure.groups.items()}

    custom = lip.score_channels(model, criterion=by_index, example_inputs=x[:1])
    assert torch.equal(custom["conv1"], torch.arange(4, dtype=torch.float))


def test_criterion_errors(tiny) -> None:
    model, x, y = tiny
    with pytest.raises(ValueError, match="unknown criterion 'nope'"):
        lip.score_channels(model, criterion="nope", example_inputs=x[:1])
    with pytest.raises(ValueError, match="needs a loss"):
        lip.score_channels(model, [(x, y)], criterion="taylor")
    with pytest.raises(TypeError, match="unknown influence options"):
        lip.score_channels(model, [(x, y)], loss_fn=F.cross_entropy, criterion="influence", probs="ones")
    with pytest.raises(ValueError, match="got 1 scores"):
        lip.score_channels(
            model,
            criterion=lambda s, b, f: {n: torch.ones(1) for n in s.groups},
            example_inputs=x[:1],
        )
    with pytest.raises(ValueError, match="example_inputs"):
        lip.score_channels(model, criterion="magnitude")


@pytest.mark.parametrize(
    ("build", "error", "field"),
    [
        (lambda: lip.Influence(cg_iters=2.5), ValueError, "cg_iters"),
        (lambda: lip.Influence(cg_iters=True), ValueError, "cg_iters"),
        (lambda: lip.Influence(damping="0.01"), ValueError, "damping"),
        (lambda: lip.Influence(damping=-1.0), ValueError, "damping"),
        (lambda: lip.Influence(weight_decay="1e-4"), ValueError, "weight_decay"),
        (lambda: lip.Influence(score="exact"), ValueError, "score"),
        (lambda: lip.Influence(probs="ones"), TypeError, "probs"),
        (lambda: lip.Influence({"micro_batches": 0}), ValueError, "micro_batches"),
        (lambda: lip.Influence(["paper"]), TypeError, "options"),
        (lambda: lip.Influence(score="retrained"), ValueError, "retrained"),
        (
            lambda: lip.Influence(score="retrained", probes="exact", inverse="identity", weight_decay=0.0),
            ValueError,
            "weight_decay",
        ),
        (lambda: lip.Magnitude(p=3), ValueError, "p must be"),
        (lambda: lip.Magnitude(p=True), ValueError, "p must be"),
        (lambda: lip.Random(seed=1.5), ValueError, "seed"),
        (lambda: resolve_criterion("magnitude", damping=1), TypeError, "damping"),
        (lambda: resolve_criterion("taylor", p=2), TypeError, r"\['p'\]"),
        (lambda: resolve_criterion(lip.Taylor(), p=2), TypeError, "configure the object"),
        (
            lambda: lip.InfluencePruningCallback(0.5, criterion="fisher", num_batches=0),
            ValueError,
            "num_batches",
        ),
    ],
)
def test_criterion_options_fail_at_construction_naming_the_field(build, error, field) -> None:
    with pytest.raises(error, match=field):
        build()


def test_criteria_compare_by_configuration() -> None:
    assert lip.Influence(cg_iters=5) == lip.Influence(lip.EstimatorOptions(cg_iters=5))
    assert lip.Influence(cg_iters=5) != lip.Influence()
    assert lip.Influence({"cg_iters": 5}, cg_iters=7).options.cg_iters == 7  # fields override
    assert lip.Magnitude(2) != lip.Magnitude(1) and lip.Taylor() == lip.Taylor()
    assert resolve_criterion("influence", num_probes=4) == lip.Influence(num_probes=4)
    assert lip.Influence().needs_data and not lip.Magnitude().needs_data


class _ConcatNorm(nn.Module):
    """Two convs concatenated, then one BatchNorm over both (as in a DenseNet block)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.c, self.bn_c = nn.Conv2d(9, 2, 1), nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(self.bn_c(self.c(y)).flatten(1))


def test_bn_scale_reads_each_group_s_slice_of_a_shared_norm() -> None:
    model = _ConcatNorm()
    with torch.no_grad():
        model.bn.weight.copy_(-torch.arange(1.0, 10.0))
    scores = lip.score_channels(model, criterion="bn_scale", example_inputs=torch.randn(1, 3, 4, 4))
    assert torch.equal(scores["a"], torch.arange(1.0, 6.0))
    assert torch.equal(scores["b"], torch.arange(6.0, 10.0))


def test_magnitude_per_group_is_each_group_s_scores_over_their_mean(tiny) -> None:
    """Per-group normalisation (as Torch-Pruning's mean normaliser) removes the layers' scale:
    scaling one layer's weights leaves its normalised scores unchanged."""
    model, x, _ = tiny
    raw = lip.score_channels(model, criterion=lip.Magnitude(), example_inputs=x[:1])
    per_group = lip.score_channels(model, criterion=lip.Magnitude(per_group=True), example_inputs=x[:1])
    for name, scores in raw.items():
        torch.testing.assert_close(per_group[name], scores / scores.mean())
    with torch.no_grad():
        model.conv1.weight.mul_(10)
    scaled = lip.score_channels(model, criterion=lip.Magnitude(per_group=True), example_inputs=x[:1])
    torch.testing.assert_close(scaled["conv1"], per_group["conv1"])
    with pytest.raises(ValueError, match="per_group"):
        lip.Magnitude(per_group="yes")
