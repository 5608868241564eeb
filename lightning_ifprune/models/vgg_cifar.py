"""VGG-16 with batch norm, CIFAR variant: 13 conv3x3-BN-ReLU layers and one linear layer.

Five 2x2 max-pools reduce a 32x32 input to 1x1x512, which is flattened straight into the
classifier (no 4096-wide hidden layers as in the ImageNet VGG), so inputs must be 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_ifprune.models.blocks import conv_bn_relu

# Output channels per conv layer; "M" is a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG16BNCifar(nn.Module):
    """VGG-16-BN for 32x32 inputs: ``features`` (conv stack) then ``classifier`` (linear)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                width = int(item)
                layers += conv_bn_relu(prev, width)
                prev = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn_cifar(num_classes: int = 10, in_channels: int = 3) -> VGG16BNCifar:
    """VGG-16-BN, CIFAR variant."""
    return VGG16BNCifar(num_classes=num_classes, in_channels=in_channels)
