"""Model zoo: output shapes, exact parameter counts by formula, registry behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ifprune.models import (
    CifarResNet,
    SmallCNN,
    available_models,
    build_model,
    resnet32,
)


def weight_count(model: nn.Module) -> int:
    """Elements of conv and linear weights (no biases, no BN)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def cifar_resnet_counts(depth: int, num_classes: int, in_channels: int = 3) -> tuple[int, int]:
    """(conv+linear weights, all parameters) of a CIFAR ResNet, from its definition.

    3x3 stem to 16 channels; stages of n = (depth - 2) / 6 basic blocks at widths 16, 32, 64;
    1x1 projection shortcuts (conv + BN) where the width changes; BN after every conv;
    linear classifier with bias.
    """
    n = (depth - 2) // 6
    weights = 9 * in_channels * 16
    bn_channels = 16
    prev = 16
    for width in (16, 32, 64):
        weights += 9 * prev * width + 9 * width * width  # first block
        bn_channels += 2 * width
        if prev != width:
            weights += prev * width
            bn_channels += width
        weights += (n - 1) * 2 * 9 * width * width
        bn_channels += (n - 1) * 2 * width
        prev = width
    weights += 64 * num_classes
    return weights, weights + 2 * bn_channels + num_classes


def vgg16_bn_cifar_counts(num_classes: int, in_channels: int = 3) -> tuple[int, int]:
    """(conv+linear weights, all parameters) of VGG-16-BN (CIFAR): 13 convs, 1 linear."""
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    ins = [in_channels, *widths[:-1]]
    weights = sum(9 * i * o for i, o in zip(ins, widths, strict=True)) + 512 * num_classes
    return weights, weights + 2 * sum(widths) + num_classes


def test_resnet32_has_464432_weights() -> None:
    assert weight_count(resnet32(num_classes=10)) == 464_432
    assert weight_count(build_model("resnet32", num_classes=10)) == 464_432


@pytest.mark.parametrize("depth", [20, 32, 56])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_resnet_counts_match_formula(depth: int, num_classes: int) -> None:
    model = build_model(f"resnet{depth}", num_classes=num_classes)
    weights, total = cifar_resnet_counts(depth, num_classes)
    assert weight_count(model) == weights
    assert sum(p.numel() for p in model.parameters()) == total


def test_cifar_resnet_projection_shortcuts_only_where_shape_changes() -> None:
    model = resnet32()
    one_by_one = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in one_by_one] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]


@pytest.mark.parametrize("num_classes", [10, 100])
def test_vgg16_bn_cifar_counts_match_formula(num_classes: int) -> None:
    model = build_model("vgg16_bn_cifar", num_classes=num_classes)
    weights, total = vgg16_bn_cifar_counts(num_classes)
    assert weight_count(model) == weights
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


@pytest.mark.parametrize(
    ("name", "in_channels", "size"),
    [
        ("small_cnn", 1, 16),
        ("resnet20", 3, 32),
        ("resnet32", 3, 32),
        ("resnet56", 1, 32),
        ("vgg16_bn_cifar", 3, 32),
        ("resnet18", 3, 64),
        ("resnet50", 3, 64),
        ("vgg16_bn", 3, 32),
        ("mobilenet_v2", 3, 64),
        ("densenet121", 3, 64),
    ],
)
def test_forward_output_shape(name: str, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_small_cnn_widths_configurable() -> None:
    model = SmallCNN(num_classes=3, widths=(4, 8))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 3)
    with pytest.raises(ValueError):
        SmallCNN(widths=())


def test_registry_names_and_errors() -> None:
    names = available_models()
    for name in [
        "small_cnn",
        "resnet20",
        "resnet32",
        "resnet56",
        "vgg16_bn_cifar",
        "resnet18",
        "resnet50",
        "vgg16_bn",
        "mobilenet_v2",
        "densenet121",
    ]:
        assert name in names
    with pytest.raises(ValueError, match="unknown model 'bogus'.*resnet32"):
        build_model("bogus", num_classes=10)
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("resnet18", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=21)
