"""Channel structure against independent references: physical removal and PyTorch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ifprune.measure import count_macs, count_params
from lightning_ifprune.models import build_model
from lightning_ifprune.structure import ChannelStructure, UnsupportedModelError, channel_masks
from lightning_ifprune.surgery import prune_channels

# (model name, input channels, spatial size): every zoo model, small inputs.
ZOO = [
    ("small_cnn", 1, 16),
    ("resnet20", 3, 32),
    ("resnet32", 3, 32),
    ("resnet56", 3, 32),
    ("vgg16_bn_cifar", 3, 32),
    ("resnet18", 3, 32),
    ("resnet50", 3, 32),
    ("mobilenet_v2", 3, 32),
    ("vgg16_bn", 3, 32),
    ("densenet121", 3, 32),
]


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a conv and a flattened linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        x = F.max_pool2d(F.relu(self.c(x)), 2)
        return self.fc(x.flatten(1))


def _randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Give BN layers non-trivial statistics so every channel carries signal in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _random_plan(structure: ChannelStructure, gen: torch.Generator) -> dict[str, list[int]]:
    plan = {}
    for name, group in structure.groups.items():
        k = int(torch.randint(0, group.size - group.min_keep + 1, (1,), generator=gen))
        plan[name] = torch.randperm(group.size, generator=gen)[:k].tolist()
    return plan


def _mask_vs_removal(model: nn.Module, x: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    _randomize_norms(model, gen)
    model.eval()
    structure = ChannelStructure.build(model, x[:1])
    assert structure.groups, "every zoo model has prunable groups"
    plan = _random_plan(structure, gen)
    masks = {n: torch.ones(g.size) for n, g in structure.groups.items()}
    for name, idxs in plan.items():
        masks[name][idxs] = 0
    with torch.no_grad(), channel_masks(structure, masks):
        masked = model(x)
    predicted = structure.cost({n: len(v) for n, v in plan.items()})
    prune_channels(structure, plan)
    with torch.no_grad():
        pruned = model(x)
    scale = pruned.abs().max().item()
    assert scale > 1e-6
    assert (masked - pruned).abs().max().item() <= 1e-5 * scale
    # The exact cost model against PyTorch's own FLOP counter and a parameter count.
    macs, params = count_macs(model, x[:1]), count_params(model)
    assert abs(predicted[0] - macs) <= 0.005 * macs
    assert abs(predicted[1] - params) <= 0.005 * params


@pytest.mark.parametrize(("name", "channels", "size"), ZOO)
def test_mask_equals_physical_removal_on_zoo(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=channels)
    x = torch.randn(2, channels, size, size)
    seeds = (0, 1) if name in ("small_cnn", "resnet20", "resnet32") else (0,)
    for seed in seeds:
        _mask_vs_removal(model, x, seed)  # pruning again on the already pruned model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_equals_removal_with_concatenation(seed: int) -> None:
    torch.manual_seed(seed)
    model = ConcatNet()
    x = torch.randn(3, 3, 8, 8)
    structure = ChannelStructure.build(model, x[:1])
    # The concatenated BN couples nothing across branches: each branch is its own group.
    assert set(structure.groups) == {"a", "b", "c"}
    assert [s.module for s in structure.groups["c"].consumers] == ["fc"]
    assert len(structure.groups["c"].consumers[0].positions) == 6 * 16  # flatten: 16 per channel
    _mask_vs_removal(model, x, seed)


def test_classifier_and_input_are_never_prunable() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=3)
    structure = ChannelStructure.build(model, torch.randn(1, 3, 32, 32))
    assert "fc" not in structure.groups and "fc" in structure.skipped
    # No group consumes the network input: the stem conv only produces.
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert all(s.module != first for g in structure.groups.values() for s in g.consumers)


def test_group_naming_and_residual_coupling() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=3)
    structure = ChannelStructure.build(model, torch.randn(1, 3, 32, 32))
    names = {n for n, _ in model.named_modules()}
    for name, group in structure.groups.items():
        assert name == group.producers[0] and name in names
    # Every block's inner conv is its own group; every residual sum couples conv2 + shortcut.
    inner = [n for n in structure.groups if n.endswith("conv1") and "." in n]
    assert len(inner) == 9
    coupled = [g for g in structure.groups.values() if len(g.producers) > 1]
    assert coupled and all(len(g.norms) == len(g.producers) for g in coupled)


def test_per_channel_costs_match_measurement() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    x = torch.randn(1, 3, 32, 32)
    structure = ChannelStructure.build(model, x)
    costs = structure.channel_costs()
    macs0, params0 = count_macs(model, x), count_params(model)
    name = "layer2.1.conv1" if "layer2.1.conv1" in structure.groups else next(iter(structure.groups))
    prune_channels(structure, {name: [0]})
    assert costs[name] == (macs0 - count_macs(model, x), params0 - count_params(model))


def test_min_channels_and_ignored_layers() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=3)
    x = torch.randn(1, 3, 32, 32)
    s = ChannelStructure.build(model, x, min_channels=0.5, ignored_layers=["layer1.0.conv1"])
    assert "layer1.0.conv1" not in s.groups
    assert all(g.min_keep == (g.size + 1) // 2 for g in s.groups.values())
    assert ChannelStructure.build(model, x, min_channels=3).groups["layer2.0.conv1"].min_keep == 3
    with pytest.raises(ValueError, match="min_channels"):
        ChannelStructure.build(model, x, min_channels=0)
    with pytest.raises(ValueError, match="not a module"):
        ChannelStructure.build(model, x, ignored_layers=["nope"])


def test_masks_are_removed_without_trace() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    before = model(x)
    structure = ChannelStructure.build(model, x[:1])
    ids = {n: id(p) for n, p in model.named_parameters()}
    with channel_masks(structure) as masks:
        for m in masks.values():
            m.zero_()
        assert not torch.allclose(model(x), before)
    assert torch.equal(model(x), before)
    assert {n: id(p) for n, p in model.named_parameters()} == ids  # nothing was copied
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_masks_are_differentiable() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 16, 16)
    structure = ChannelStructure.build(model, x[:1])
    masks = {n: torch.ones(g.size, requires_grad=True) for n, g in structure.groups.items()}
    with channel_masks(structure, masks):
        model(x).square().sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.values())


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample and zero-pad channels (the mis-grouping trap)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))


class _OptionANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _ZeroPadShortcut()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class _Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class _CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = _Scale(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.conv(x))).mean((2, 3))


class _ChannelSoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.softmax(self.conv(x), dim=1)).mean((2, 3))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_OptionANet(), r"'block'.*ConstantPadNd.*zero-pad"),
        (_ChannelSoftmaxNet(), r"Softmax"),
    ],
)
def test_unsupported_structures_are_refused_by_name(model: nn.Module, match: str, state_snapshot) -> None:
    before = state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match=match):
        ChannelStructure.build(model, torch.randn(1, 3, 8, 8))
    before.assert_unchanged()


def test_a_custom_layer_with_a_bare_parameter_keeps_its_channels() -> None:
    structure = ChannelStructure.build(_CustomNet(), torch.randn(1, 3, 8, 8))
    assert "conv" not in structure.groups and "bare nn.Parameter" in structure.skipped["conv"]


def test_ignoring_an_unsupported_layer_keeps_its_channels() -> None:
    model = _CustomNet()
    structure = ChannelStructure.build(model, torch.randn(1, 3, 8, 8), ignored_layers=["scale"])
    assert "conv" not in structure.groups  # the channels through the custom layer stay


def test_build_preserves_modes() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=3).train()
    model.layer1.eval()
    ChannelStructure.build(model, torch.randn(1, 3, 32, 32))
    assert model.training and not model.layer1.training and model.layer2.training
