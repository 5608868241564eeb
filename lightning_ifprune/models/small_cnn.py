"""A small CNN for the embedded digits data: quick to train, and prunable like a real one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_ifprune.models.blocks import conv_bn_relu


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU blocks of the given ``widths``, a 2x2 max-pool after each block but
    the last, global average pooling and a linear classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("SmallCNN needs at least one block width")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(int(w) for w in widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += conv_bn_relu(prev, width)
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
