"""Small float64 models and explicit Hessians shared by the estimator tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

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


class TinyTransformer(nn.Module):
    """Token embedding, class token, one pre-norm block (4-head attention, MLP), mean-pooled head."""

    def __init__(self, attention: str = "mha") -> None:
        super().__init__()
        self.kind = attention
        self.embed = nn.Linear(6, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8)
        if attention == "timm":
            from timm.layers import Attention

            self.attn = Attention(8, num_heads=4, qkv_bias=True)
        else:
            self.attn = nn.MultiheadAttention(8, 4, batch_first=attention == "mha")
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        a = self.ln1(h)
        if self.kind == "timm":
            a = self.attn(a)
        elif self.kind == "mha":
            a = self.attn(a, a, a, need_weights=False)[0]
        else:  # sequence first
            a = a.transpose(0, 1)
            a = self.attn(a, a, a, need_weights=False)[0].transpose(0, 1)
        h = h + a
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


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


def regression_with_auxiliary(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A non-CE loss: MSE to one-hot targets plus a Huber auxiliary term on the logits."""
    target = F.one_hot(y, out.shape[1]).to(out.dtype)
    return F.mse_loss(out, target) + 0.3 * F.smooth_l1_loss(out, 0.5 * target, beta=0.5)


def tiny_transformer_setup(seed: int = 0):
    """A float64 TinyTransformer (4 heads, 12 MLP units) with non-trivial LayerNorm affine
    params, its structure and a batch of 6 sequences of 5 tokens."""
    torch.manual_seed(seed)
    model = TinyTransformer("mha").double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    x = torch.randn(6, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    structure = ChannelStructure.build(model, x[:2])
    return model, structure, x, y


def explicit_hessian(model, structure, x, y, weight_decay: float = 0.0, criterion=F.cross_entropy):
    """Full gradient and Hessian of ``criterion(model(x), y)`` (+ weight decay) over the flat
    vector [w; m] at m = 1.

    BN runs on batch statistics without updating buffers, as in the estimator; attention
    runs on the math kernel (the fused ones have no second derivative).
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
        return criterion(out, y) + 0.5 * weight_decay * (flat[:nw] ** 2).sum()

    flat0 = torch.cat([w0, m0])
    try:
        with sdpa_kernel(SDPBackend.MATH):
            full = flat0.clone().requires_grad_(True)
            grad = torch.autograd.grad(loss(full), full)[0]
            hess = torch.autograd.functional.hessian(loss, flat0)
    finally:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = True
    return grad, hess, nw, names, sizes
