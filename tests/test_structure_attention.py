"""Transformer blocks: attention heads and MLP hidden units as groups; ConvNeXt's channels-last blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import TinyTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.convnext import CNBlock

from lightning_ifprune.criteria import score_channels
from lightning_ifprune.structure import ChannelStructure, channel_masks
from lightning_ifprune.structure.attention import PrunedMultiheadAttention
from lightning_ifprune.surgery import prune_channels, recorded_history, replay_history

pytest.importorskip("timm.layers")  # the "timm" attention variant


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample counted with gradients on (no fused, uncounted attention fast path)."""
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2 // x.shape[0]


def _masked(structure: ChannelStructure, plan: dict[str, list[int]], x: torch.Tensor) -> torch.Tensor:
    masks = {n: torch.ones(g.size) for n, g in structure.groups.items()}
    for name, idxs in plan.items():
        masks[name][idxs] = 0
    with torch.no_grad(), channel_masks(structure, masks):
        return structure.model(x)


@pytest.mark.parametrize("attention", ["mha", "mha_seq_first", "timm"])
def test_heads_and_mlp_units_mask_equals_removal_and_cost_is_exact(attention: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer(attention).eval()
    x = torch.randn(2, 5, 6)
    structure = ChannelStructure.build(model, x[:1])
    assert set(structure.groups) == {"attn", "fc1"}
    assert structure.groups["attn"].size == 4 and structure.heads["attn"].head_dim == 2
    assert "LayerNorm" in structure.skipped["embed"] or "Parameter" in structure.skipped["embed"]
    plan = {"attn": [1, 2], "fc1": [0, 5, 7]}
    macs, params = structure.cost({"attn": 2, "fc1": 3})
    masked = _masked(structure, plan, x)
    prune_channels(structure, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5)
    assert model.attn.num_heads == 2 and model.fc1.out_features == 9
    if attention != "timm":
        assert type(model.attn) is PrunedMultiheadAttention and model.attn.in_proj_weight.shape == (12, 8)
    assert (macs, params) == (_macs(model, x[:1]), sum(p.numel() for p in model.parameters()))
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # The pruned model builds again (fewer heads), and its history rebuilds it on a fresh model.
    assert ChannelStructure.build(model, x[:1]).groups["attn"].size == 2
    history, example = recorded_history(model)
    torch.manual_seed(0)
    fresh = replay_history(TinyTransformer(attention), history, example)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_head_masks_leave_the_parameters_as_they_were() -> None:
    """Masking reads a scaled out_proj weight for one forward; the model's parameters keep their
    objects and their order (an optimizer or a checkpoint maps them by position)."""
    torch.manual_seed(0)
    model = TinyTransformer("mha")
    x = torch.randn(2, 5, 6)
    structure = ChannelStructure.build(model, x[:1])
    before = list(model.named_parameters())
    masked = _masked(structure, {"attn": [1]}, x)
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in before]
    assert "weight" not in model.attn.out_proj.__dict__
    with torch.no_grad():
        assert not torch.allclose(model(x), masked)


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_multihead_attention_computes_what_torch_does(batch_first: bool) -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    ours = copy.deepcopy(ref)
    ours.__class__ = PrunedMultiheadAttention
    q, k = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2:4] = True
    for kwargs in ({}, {"key_padding_mask": pad, "attn_mask": mask}):
        for need in (True, False):
            want = ref(q, k, k, need_weights=need, **kwargs)
            got = ours(q, k, k, need_weights=need, **kwargs)
            assert torch.allclose(got[0], want[0], atol=1e-5)
            assert (got[1] is None) == (want[1] is None)
            if need:
                assert torch.allclose(got[1], want[1], atol=1e-5)


def test_failed_head_surgery_restores_the_attention_layer(monkeypatch) -> None:
    torch.manual_seed(0)
    model = TinyTransformer("mha").eval()
    x = torch.randn(1, 5, 6)
    structure = ChannelStructure.build(model, x)
    weight = model.attn.in_proj_weight

    def broken(*_args) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("lightning_ifprune.surgery._check_forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        prune_channels(structure, {"attn": [0]})
    assert type(model.attn) is nn.MultiheadAttention and model.attn.num_heads == 4
    assert model.attn.in_proj_weight is weight and model.attn.out_proj.in_features == 8


@pytest.mark.parametrize("criterion", ["taylor", "fisher", "influence"])
def test_mask_criteria_score_heads(criterion: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer("mha")
    x, y = torch.randn(4, 5, 6), torch.randint(0, 3, (4,))
    scores = score_channels(model, [(x, y)], criterion=criterion, loss_fn=F.cross_entropy)
    assert scores["attn"].shape == (4,) and torch.isfinite(scores["attn"]).all()
    assert scores["fc1"].shape == (12,)


class TinyConvNeXt(nn.Module):
    """Stem conv, one torchvision ConvNeXt block (depthwise conv, channels-last LayerNorm, MLP, layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = CNBlock(8, layer_scale=1.0, stochastic_depth_prob=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_convnext_block_prunes_mlp_units_and_keeps_normalised_channels() -> None:
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    with torch.no_grad():
        model.block.layer_scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 5, 5)
    structure = ChannelStructure.build(model, x[:1])
    assert set(structure.groups) == {"block.block.3"}
    assert "LayerNorm" in structure.skipped["stem"]
    scale = model.block.layer_scale.detach().clone()
    plan = {"block.block.3": [0, 3, 9, 30]}
    masked = _masked(structure, plan, x)
    prune_channels(structure, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5)
    assert model.block.block[3].out_features == 28 and torch.equal(model.block.layer_scale, scale)
