"""Small float64 models and explicit Hessians shared by the estimator tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_ifprune.structure import ChannelStructure, channel_masks


class TinyNet(nn.Module):
    """conv + BN + conv + BN + flatten + linear: two prunable groups, one via flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.bn1(self.conv1(x)))
        x = torch.tanh(self.bn2(self.conv2(F.avg_pool2d(x, 2))))
        return self.fc(x.flatten(1))


def tiny_setup(seed: int = 0):
    """A float64 TinyNet with non-trivial BN affine params, its structure and a batch."""
    torch.manual_seed(seed)
    model = TinyNet().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    structure = ChannelStructure.build(model, x[:2])
    return model, structure, x, y


def explicit_hessian(model, structure, x, y, weight_decay: float = 0.0):
    """Full gradient and Hessian of L(w, m) over the flat vector [w; m] at m = 1.

    BN runs on batch statistics without updating buffers, as in the estimator.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    sizes = {n: g.size for n, g in structure.groups.items()}
    w0 = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if p.requires_grad])
    m0 = torch.ones(sum(sizes.values()), dtype=w0.dtype)
    nw = w0.numel()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    model.train()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            params[n] = flat[i : i + k].view(s)
            i += k
        masks, j = {}, nw
        for g, k in sizes.items():
            masks[g] = flat[j : j + k]
            j += k
        with channel_masks(structure, masks):
            out = functional_call(model, params, (x,))
        return F.cross_entropy(out, y) + 0.5 * weight_decay * (flat[:nw] ** 2).sum()

    flat0 = torch.cat([w0, m0])
    try:
        full = flat0.clone().requires_grad_(True)
        grad = torch.autograd.grad(loss(full), full)[0]
        hess = torch.autograd.functional.hessian(loss, flat0)
    finally:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = True
    return grad, hess, nw, names, sizes
