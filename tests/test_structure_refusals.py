"""Structures that must be traced fully, or whose unsafe groups keep their channels by name:
training-only branches, channel splits into residual sums, channel shuffles, channels_last and
compiled models, and strict refusals that list every offending module at once (so that
following their advice converges)."""

from __future__ import annotations

import ast
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_ifprune.models import build_model
from lightning_ifprune.structure import ChannelStructure, UnsupportedModelError, channel_masks
from lightning_ifprune.surgery import prune_channels


def _hinted_layers(err: Exception) -> list[str]:
    """The ``ignored_layers=[...]`` list a refusal suggests."""
    found = re.search(r"ignored_layers=(\[[^\]]*\])", str(err))
    assert found, f"no ignored_layers hint in: {err}"
    return ast.literal_eval(found.group(1))


def _random_plan(structure: ChannelStructure, seed: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for name, group in structure.groups.items():
        k = int(torch.randint(1, group.size - group.min_keep + 1, (1,), generator=gen)) if group.size > 1 else 0
        plan[name] = torch.randperm(group.size, generator=gen)[:k].tolist()
    return plan


def _masks_for(structure: ChannelStructure, plan: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    masks = {n: torch.ones(g.size) for n, g in structure.groups.items()}
    for name, idxs in plan.items():
        masks[name][idxs] = 0
    return masks


# ---------------------------------------------------------------------------------- item 3
class _TrainAuxNet(nn.Module):
    """An auxiliary head that reads the stem's features only in training (as googlenet's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.stem(x))
        out = self.head(torch.tanh(self.body(h)).mean((2, 3)))
        if self.training:
            return out, self.aux(h).mean((2, 3))
        return out


def test_training_only_branch_is_pruned_with_its_producer(state_snapshot) -> None:
    torch.manual_seed(0)
    model = _TrainAuxNet().eval()
    x = torch.randn(2, 3, 6, 6)
    structure = ChannelStructure.build(model, x[:1])
    assert "stem" in structure.groups
    plan = {"stem": [1, 4, 6]}
    model.train()
    with torch.no_grad(), channel_masks(structure, _masks_for(structure, plan)):
        masked_out, masked_aux = model(x)
    prune_channels(structure, plan)
    with torch.no_grad():
        out, aux = model(x)  # the training path still runs
        model.eval()
        assert model(x).shape == (2, 3)
    assert torch.allclose(aux, masked_aux, atol=1e-6) and torch.allclose(out, masked_out, atol=1e-6)


class _NoisyAuxNet(_TrainAuxNet):
    """As :class:`_TrainAuxNet`, with running statistics and dropout on the stem's features."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8, momentum=0.5)
        self.drop = nn.Dropout(0.5)
        self.stem.register_forward_hook(lambda _m, _args, out: self.drop(self.bn(out)))


def test_training_mode_trace_changes_nothing(state_snapshot) -> None:
    model = _NoisyAuxNet().train()
    x = torch.randn(1, 3, 6, 6)
    snap = state_snapshot(model)
    rng = torch.get_rng_state()
    structure = ChannelStructure.build(model, x)
    assert "stem" in structure.groups
    snap.assert_unchanged()  # BN statistics, modes, flags
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew nothing from the global generator


def test_googlenet_with_aux_heads_prunes_and_runs_in_both_modes() -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model("googlenet", weights=None, aux_logits=True, init_weights=True).eval()
    x = torch.randn(2, 3, 32, 32)
    try:
        structure = ChannelStructure.build(model, x[:1])
    except UnsupportedModelError as err:  # refusing is acceptable, by name
        assert re.search(r"'aux\d", str(err)), str(err)
        return
    aux_inputs = [s.module for g in structure.groups.values() for s in g.consumers if s.module.startswith("aux")]
    assert aux_inputs, "the aux heads read pruned features: they must be consumers of some group"
    plan = {name: [0] for name in list(structure.groups)[::3]}
    with torch.no_grad(), channel_masks(structure, _masks_for(structure, plan)):
        masked = model(x)
    prune_channels(structure, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-4)
        model.train()
        outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, 1000)] * 3


class _NeverRunNet(nn.Module):
    """A layer with parameters that no forward pass (train or eval) reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)
        self.extra = nn.Conv2d(8, 2, 1)
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        out = self.head(h)
        if self.use_extra:
            out = out + self.extra(h)
        return out.mean((2, 3))


def test_layer_never_reached_is_refused_by_name(state_snapshot) -> None:
    model = _NeverRunNet()
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"'extra' \(Conv2d\).*not reached"):
        ChannelStructure.build(model, torch.randn(1, 3, 6, 6))
    snap.assert_unchanged()
    ChannelStructure.build(model, torch.randn(1, 3, 6, 6), ignored_layers=["extra"])


# ---------------------------------------------------------------------------------- item 4
class _SplitResidualNet(nn.Module):
    """A stem, then conv(→16) split into 8 + 8; the second half is added to another conv's 8 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_a = nn.Conv2d(6, 16, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 8, 1)
        self.head_a = nn.Conv2d(8, 4, 1)
        self.head_y = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        a, b = self.conv_a(s).split(8, dim=1)
        y = torch.relu(b + self.conv_b(s))
        return (self.head_a(torch.relu(a)) + self.head_y(y)).mean((2, 3))


def test_split_into_residual_sum_keeps_its_channels_and_the_rest_prunes(state_snapshot) -> None:
    torch.manual_seed(0)
    model = _SplitResidualNet()
    x = torch.randn(2, 3, 6, 6)
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"splits the channels.*'Split'"):
        ChannelStructure.build(model, x[:1], strict=True)
    snap.assert_unchanged()
    structure = ChannelStructure.build(model, x[:1])
    snap.assert_unchanged()
    assert set(structure.groups) == {"stem"}, structure.skipped
    assert set(structure.unsafe) == {"conv_a"} and "'Split'" in structure.unsafe["conv_a"], structure.skipped
    plan = {"stem": [1, 4]}
    with torch.no_grad(), channel_masks(structure, _masks_for(structure, plan)):
        masked = model(x)
    prune_channels(structure, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-6)
    assert model.conv_a.out_channels == 16 and model.conv_b.out_channels == 8


# --------------------------------------------------------------------------------- item 14
def test_channels_last_model_builds_prunes_and_stays_channels_last() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    structure = ChannelStructure.build(model, x[:1])
    plan = _random_plan(structure, 1)
    with torch.no_grad(), channel_masks(structure, _masks_for(structure, plan)):
        masked = model(x)
    prune_channels(structure, plan)
    with torch.no_grad():
        pruned = model(x)
    assert (masked - pruned).abs().max() <= 1e-5 * pruned.abs().max()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


class _Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_compiled_module_is_refused_with_a_working_hint() -> None:
    net = build_model("small_cnn", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 16, 16)
    for model, where in ((torch.compile(net), "model"), (_Wrapper(torch.compile(net)), "'net'")):
        with pytest.raises(UnsupportedModelError, match="uncompiled") as info:
            ChannelStructure.build(model, x)
        assert where in str(info.value) and "ignored_layers" not in str(info.value)
    assert ChannelStructure.build(net, x).groups  # the advice: prune the uncompiled module


# --------------------------------------------------------------------------------- item 15
def test_channel_shuffle_keeps_its_channels_and_the_branches_prune() -> None:
    # ShuffleNetV2: cat(x1, branch(x2)) → view(N, 2, C/2, H, W) → transpose → view; then chunk(2).
    # Torch-Pruning cannot map the shuffle (its own mapping divides by zero at 'stage4.1').
    torch.manual_seed(0)
    model = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(UnsupportedModelError, match=r"(?s)ShuffleNetV2.*'(Transpose|View)'") as info:
        ChannelStructure.build(model, x[:1], strict=True)
    assert re.search(r"'stage\d\.\d+'", str(info.value)), str(info.value)  # where it happens
    structure = ChannelStructure.build(model, x[:1])
    # Prunable: the stem, the last 1x1 conv and, in every block, the branch's inner width.
    inner = {f"stage{s}.{b}.branch2.0" for s, n in ((2, 4), (3, 8), (4, 4)) for b in range(n)}
    assert set(structure.groups) == {"conv1.0", "conv5.0"} | inner
    unsafe = structure.unsafe
    assert unsafe and all(re.search("channel shuffle|'Split'|'Transpose'|'View'", why) for why in unsafe.values()), (
        unsafe
    )
    model.eval()
    plan = _random_plan(structure, 0)
    with torch.no_grad(), channel_masks(structure, _masks_for(structure, plan)):
        masked = model(x)
    prune_channels(structure, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5)


def test_convnext_prunes_its_mlp_units_and_keeps_layernorm_channels() -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model("convnext_tiny", weights=None).eval()
    structure = ChannelStructure.build(model, torch.randn(1, 3, 32, 32))
    mlp_in = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("block.3")}
    assert set(structure.groups) == mlp_in and len(mlp_in) == 18
    # The residual stream is normalised by LayerNorm over its channels (and scaled by layer scale): it stays.
    stream = {n: why for n, why in structure.skipped.items() if n != "classifier.2"}
    assert stream and all("LayerNorm" in why for why in stream.values()), stream


class _TwoCustomNet(nn.Module):
    """A channel softmax (refused), a custom per-channel gain (its group kept) and one clean group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.gain = _Gain(4)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.mix = _ChannelSoftmax()
        self.c = nn.Conv2d(6, 5, 3, padding=1)
        self.d = nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.b(self.gain(self.a(x))))
        return self.d(F.relu(self.c(h))).mean((2, 3))


class _Gain(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.rand(n, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


class _ChannelSoftmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=1)


def test_strict_refusal_names_the_offender_and_a_bare_parameter_keeps_its_group(state_snapshot) -> None:
    torch.manual_seed(0)
    model = _TwoCustomNet()
    x = torch.randn(2, 3, 6, 6)
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedModelError) as info:
        ChannelStructure.build(model, x[:1], strict=True)
    snap.assert_unchanged()
    assert _hinted_layers(info.value) == ["mix"], str(info.value)
    assert "Softmax" in str(info.value)
    hinted = ChannelStructure.build(model, x[:1], ignored_layers=_hinted_layers(info.value))
    structure = ChannelStructure.build(model, x[:1])  # by default the unsafe group keeps its channels
    assert set(structure.groups) == set(hinted.groups) == {"c"}
    assert "'mix' (_ChannelSoftmax)" in structure.skipped["b"] and "Softmax" in structure.skipped["b"]
    # The custom gain's bare parameter keeps group 'a' whole, said by name (not a refusal).
    assert "bare nn.Parameter" in structure.skipped["a"], structure.skipped
    plan = {"c": [0, 3]}
    with torch.no_grad(), channel_masks(structure, _masks_for(structure, plan)):
        masked = model(x)
    prune_channels(structure, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-6)
