"""Measured model cost and quality: MACs, parameters, latency, accuracy.

These are the independent measurements (PyTorch's own FLOP counter, wall-clock time, a
direct accuracy loop) that the analytic cost model of :mod:`lightning_ifprune.structure` is
checked against, and what run summaries report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ifprune.batch import to_compute
from lightning_ifprune.structure import (
    ChannelStructure,
    Example,
    UnsupportedModelError,
    call_model,
    example_batch_size,
)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Example) -> int:
    """Multiply-accumulates of one forward pass per sample, counted by ``FlopCounterMode``.

    ``example_input`` is what the model is called with (a tensor, positional or keyword
    arguments, a list of images: :mod:`lightning_ifprune.structure.example`); a detector's
    count depends on its image size (and, for two-stage detectors, on its proposals).

    The model runs in eval mode (restored afterwards); the count covers every convolution
    and matrix product, which is what channel pruning changes. Gradients are on where the model
    has ``nn.MultiheadAttention``: its fused no-grad fast path goes uncounted.
    """
    was_training = model.training
    model.eval()
    grad = torch.is_grad_enabled() or any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(grad):
            call_model(model, example_input)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // example_batch_size(example_input)


def measure_cost(net: nn.Module, example: Example) -> tuple[int, int]:
    """(MACs per sample, parameters) of ``net`` called with ``example``, measured on CPU; ``net`` stays on CPU."""
    net.cpu()
    return count_macs(net, example), count_params(net)


def channel_widths(net: nn.Module, example: Example) -> dict[str, int]:
    """Channels of every prunable group of ``net`` (``{}`` if it cannot be traced)."""
    try:
        ref = next(net.parameters())
        return ChannelStructure.build(net, to_compute(example, ref.device, ref.dtype)).widths()
    except UnsupportedModelError:
        return {}


@torch.no_grad()
def measure_latency(
    net: nn.Module,
    batch: Example,
    device: torch.device,
    iters: int = 20,
    warmup: int = 5,
) -> float:
    """Median wall time (ms) of one eval-mode forward pass of ``net`` on ``batch`` (a batched
    tensor, or any example form: :mod:`lightning_ifprune.structure.example`) on ``device``."""
    param = next(net.parameters())
    home, was_training = param.device, net.training
    net.eval().to(device)
    x = to_compute(batch, device, param.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            call_model(net, x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        net.train(was_training).to(home)
    return 1000 * statistics.median(times)


@torch.no_grad()
def evaluate_accuracy(module: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``module`` over ``(inputs, targets)`` batches (works mid-``fit``)."""
    was_training = module.training
    device = next(module.parameters()).device
    module.eval()
    correct = total = 0
    try:
        for x, y in loader:
            pred = module(x.to(device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
    finally:
        module.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def evaluate_map(module: nn.Module, loader: Iterable) -> float:
    """mAP@[.5:.95] (torchmetrics' ``MeanAveragePrecision``) of a detector over
    ``(images, targets)`` batches (works mid-``fit``)."""
    from torchmetrics.detection import MeanAveragePrecision  # its backend only where needed

    was_training = module.training
    device = next(module.parameters()).device
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    module.eval()
    try:
        for images, targets in loader:
            preds = module([img.to(device) for img in images])
            metric.update([{k: v.cpu() for k, v in p.items()} for p in preds], targets)
    finally:
        module.train(was_training)
    return float(metric.compute()["map"])
