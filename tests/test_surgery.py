"""Physical pruning: validation before change, atomicity, history replay, selection to target."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lightning_ifprune as lip
from lightning_ifprune.measure import count_macs, count_params
from lightning_ifprune.models import build_model
from lightning_ifprune.selection import baseline_of, select_channels
from lightning_ifprune.structure import ChannelStructure
from lightning_ifprune.surgery import (
    PruningPlanError,
    prune_channels,
    replay_history,
)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def resnet() -> tuple[nn.Module, ChannelStructure]:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    return model, ChannelStructure.build(model, X[:1], min_channels=2)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"nope": [0]}, "unknown group 'nope'"),
        ({"fc": [0]}, "group 'fc' is not prunable"),
        ({"layer1.0.conv1": [16]}, r"out of range \[0, 16\)"),
        ({"layer1.0.conv1": [-1]}, "out of range"),
        ({"layer1.0.conv1": [1, 1]}, "duplicate indices"),
        ({"layer1.0.conv1": list(range(15))}, "minimum of 2"),
        ({"layer1.0.conv1": [0.5]}, "must be integers"),
        ({"layer1.0.conv1": [0], "layer2.0.conv1": [99]}, "'layer2.0.conv1'.*out of range"),
    ],
)
def test_bad_plans_raise_and_change_nothing(resnet, plan, match, state_snapshot) -> None:
    model, structure = resnet
    snap = state_snapshot(model)
    with pytest.raises(PruningPlanError, match=match):
        prune_channels(structure, plan)
    snap.assert_unchanged()


def test_failure_during_surgery_rolls_back(resnet, monkeypatch, state_snapshot) -> None:
    model, structure = resnet
    snap = state_snapshot(model)
    ids = {n: id(p) for n, p in model.named_parameters()}
    calls = {"n": 0}
    original = structure.graph.get_pruning_group

    def flaky(*args, **kwargs):  # the second group's surgery fails half-way through a plan
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(structure.graph, "get_pruning_group", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        prune_channels(structure, {"layer1.0.conv1": [0, 1], "layer2.0.conv1": [3]})
    snap.assert_unchanged()
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    model.eval()
    model(X)  # still a working network


def test_frozen_parameters_and_modes_are_preserved(resnet) -> None:
    model, structure = resnet
    model.train()
    model.layer1.eval()
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    prune_channels(structure, {"layer1.0.conv1": [0, 5], "layer2.1.conv1": [2]})
    assert all(not p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("layer1."))
    assert model.training and not model.layer1.training and not model.layer1[0].bn1.training
    assert model.layer1[0].conv1.out_channels == 14 and model.layer1[0].conv2.in_channels == 14


def test_history_is_plain_data_and_replays_to_identical_outputs(resnet) -> None:
    model, structure = resnet
    gen = torch.Generator().manual_seed(3)
    history = []
    for _ in range(2):  # two rounds: the second on the already pruned model
        plan = {}
        for name, group in structure.groups.items():
            k = int(torch.randint(0, group.size - group.min_keep + 1, (1,), generator=gen))
            plan[name] = torch.randperm(group.size, generator=gen)[:k].tolist()
        history.append(prune_channels(structure, plan).history_step)
        structure = ChannelStructure.build(model, X[:1], min_channels=2)
    buf = io.BytesIO()
    torch.save({"history": history, "state_dict": model.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    fresh = build_model("resnet20", num_classes=10, in_channels=3)
    replay_history(fresh, loaded["history"], X[:1])
    fresh.load_state_dict(loaded["state_dict"])
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))


def test_prune_to_target_reaches_target_within_one_channel() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    x = X[:1]
    scores = lip.score_channels(model, criterion="magnitude", example_inputs=x)
    structure = ChannelStructure.build(model, x)
    plan = select_channels(structure, scores, "flops", 0.5, "sqrt")
    base = baseline_of(structure)
    report = lip.prune_to_target(model, scores, flops=0.5)
    assert report.plan == plan
    measured = count_macs(model, x)
    assert measured == report.flops_after <= 0.5 * report.flops_before
    assert report.flops_before == base.flops
    # One channel fewer would have missed the target: the last selected channel was needed.
    largest = max(c for c, _ in structure.channel_costs().values())
    assert 0.5 * report.flops_before - measured < largest
    assert report.params_after == count_params(model)
    assert sum(report.channels_after.values()) < sum(report.channels_before.values())


@pytest.mark.parametrize("resource", ["params", "channels"])
def test_prune_to_target_other_resources(resource: str) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 16, 16)
    before = count_params(model)
    scores = lip.score_channels(model, criterion="random", example_inputs=x, seed=1)
    report = lip.prune_to_target(model, scores, normalize="cost", **{resource: 0.6})
    if resource == "params":
        assert count_params(model) == report.params_after <= 0.6 * before
    else:
        assert sum(report.channels_after.values()) <= 0.6 * sum(report.channels_before.values())


def test_unreachable_target_and_bad_scores_change_nothing(state_snapshot) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 16, 16)
    snap = state_snapshot(model)
    scores = lip.score_channels(model, criterion="magnitude", example_inputs=x)
    with pytest.raises(ValueError, match="unreachable"):
        lip.prune_to_target(model, scores, flops=0.01, min_channels=0.5)
    bad = dict(scores)
    bad[next(iter(bad))] = bad[next(iter(bad))] * float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lip.prune_to_target(model, bad, flops=0.5, example_inputs=x)
    with pytest.raises(ValueError, match="exactly one"):
        lip.prune_to_target(model, scores, flops=0.5, params=0.5)
    with pytest.raises(ValueError, match="normalize"):
        lip.prune_to_target(model, scores, flops=0.5, normalize="log")
    snap.assert_unchanged()


def test_channels_without_signal_are_removed_without_changing_outputs() -> None:
    """Acceptance: zero the producer rows and BN scale/shift of some channels; magnitude
    selects exactly those, and the pruned network computes the same function."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x)  # non-trivial BN statistics
    model.eval()
    structure = ChannelStructure.build(model, x[:1])
    dead = {name: [0, 3] for name in structure.groups}
    with torch.no_grad():
        for name, idxs in dead.items():
            group = structure.groups[name]
            for prod in group.producers:
                model.get_submodule(prod).weight[idxs] = 0
            for norm in group.norms:
                bn = model.get_submodule(norm.module)
                at = norm.positions[torch.isin(norm.channels, torch.tensor(idxs))]
                bn.weight[at] = 0
                bn.bias[at] = 0
        before = model(x)
    scores = lip.score_channels(model, criterion="magnitude", example_inputs=x[:1])
    total = sum(structure.widths().values())
    keep = (total - 2 * len(dead) + 0.5) / total  # exactly the dead channels fit the target
    report = lip.prune_to_target(model, scores, channels=keep, normalize="none")
    assert report.plan == dead
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6, rtol=0)
