"""Measured model cost: multiply-accumulates per sample and parameter count.

This is the independent measurement (PyTorch's own FLOP counter) that the analytic cost model
of :mod:`lightning_ifprune.structure` is checked against, and what run summaries report.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass per sample, counted by ``FlopCounterMode``.

    The model runs in eval mode (restored afterwards); the count covers every convolution
    and matrix product, which is what channel pruning changes.
    """
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(example_input)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // max(int(example_input.shape[0]), 1)
