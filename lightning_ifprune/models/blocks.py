"""Building blocks shared by the zoo's plain CNNs."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A bias-free 3×3 convolution, BatchNorm and ReLU (to splice into an ``nn.Sequential``)."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]
