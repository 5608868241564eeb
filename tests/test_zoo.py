"""Model sweep (torchvision and timm): refused with a reason, or pruned correctly; BatchNorm subclasses."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from lightning_ifprune.app.instantiators import build_module
from lightning_ifprune.models import build_model
from lightning_ifprune.structure import NORM_TYPES, ChannelStructure, UnsupportedModelError
from lightning_ifprune.surgery import prune_channels
from lightning_ifprune.zoo_report import MODELS, ZooModel, check_model, mask_vs_removal, randomize_norms

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine oneDNN with 2 threads is ~100x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass computing ``F.batch_norm`` itself, then an activation (as timm does)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(y)


class Net(nn.Module):
    """conv → norm → conv → norm → pool → linear, with a chosen norm layer."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), norm(8)
        self.c2, self.n2 = nn.Conv2d(8, 6, 3, padding=1), norm(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.n2(self.c2(self.n1(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("norm", [NormAct, BatchNormAct2d], ids=["subclass", "timm"])
def test_batchnorm_subclasses_are_pruned_as_norms(norm: type[nn.Module], state_snapshot) -> None:
    torch.manual_seed(0)
    model = Net(norm)
    randomize_norms(model)
    assert isinstance(model.n1, NORM_TYPES)
    x = torch.randn(2, 3, 8, 8)
    snap = state_snapshot(model)
    structure, error = mask_vs_removal(model, x)
    snap.assert_unchanged()
    assert set(structure.groups) == {"c1", "c2"}
    assert [s.module for s in structure.groups["c1"].norms] == ["n1"]
    structure = ChannelStructure.build(model, x[:1])
    weight, mean = model.n1.weight.detach().clone(), model.n1.running_mean.clone()
    prune_channels(structure, {"c1": [1, 4]})
    keep = [0, 2, 3, 5, 6, 7]
    assert model.n1.num_features == 6 and model.c2.in_channels == 6
    assert torch.equal(model.n1.weight.detach(), weight[keep]) and torch.equal(model.n1.running_mean, mean[keep])
    assert model.n1.running_var.shape == (6,) and model.n1.bias.shape == (6,)


def test_frozen_batchnorm_is_refused_by_name(state_snapshot) -> None:
    model = Net(FrozenBatchNorm2d)
    x = torch.randn(1, 3, 8, 8)
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"'n1' \(FrozenBatchNorm2d\).*buffers"):
        ChannelStructure.build(model, x)
    snap.assert_unchanged()
    # Ignoring the frozen norms keeps their channels and leaves the rest prunable.
    assert set(ChannelStructure.build(model, x, ignored_layers=["n1", "n2"]).groups) == set()


def test_batch_norm_op_outside_a_norm_module_keeps_its_channels() -> None:
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(F.batch_norm(self.c1(x), self.mean, self.var, self.gamma, None, False))

    structure = ChannelStructure.build(Bare(), torch.randn(1, 3, 4, 4))
    assert "c1" not in structure.groups and "bare nn.Parameter" in structure.skipped["c1"], structure.skipped


def test_timm_models_by_name_and_missing_timm(monkeypatch) -> None:
    model = build_model("timm/resnet10t", num_classes=5).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert build_model("timm", num_classes=3, arch="resnet10t").num_classes == 3
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm/not_a_model", num_classes=3)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install"):
        build_model("timm/resnet10t", num_classes=3)


def test_timm_config_takes_any_arch(tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, "model=timm", "model.arch=mobilenetv3_small_050", "data=synthetic")
    dm = instantiate(cfg.data)
    module = build_module(cfg, dm)
    assert type(module.net).__name__ == "MobileNetV3"
    assert module(torch.randn(2, *dm.input_shape)).shape == (2, dm.num_classes)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.id, marks=[pytest.mark.slow] if s.slow else []) for s in MODELS])
def test_zoo_model_is_refused_or_pruned_correctly(spec: ZooModel) -> None:
    result = check_model(spec)  # any error other than a refusal, or a wrong result, fails here
    if result.status == "refused":
        names = {n for n, _ in spec.build().named_modules() if n}
        quoted = set(re.findall(r"'([\w.]+)'", result.reason))
        assert quoted & names or "in the top-level forward" in result.reason, result.reason
    else:
        assert result.groups > 0 and result.flops_after <= (result.flops_target + 0.01) * result.flops_before


def test_inplace_dropout_on_a_view_keeps_channels() -> None:
    # torchvision's EfficientNet: Dropout(inplace=True) on the flattened pooled features (a CopySlices node).
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.2, inplace=True), nn.Linear(8, 4),
    )  # fmt: skip
    randomize_norms(model)
    structure, _ = mask_vs_removal(model, torch.randn(2, 3, 8, 8))
    assert set(structure.groups) == {"0"}


def test_in_place_slice_write_keeps_its_channels_and_the_rest_prunes(state_snapshot) -> None:
    class Partial(nn.Module):  # ReXNet's residual: x[:, :n] += shortcut
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 5, 1)
            self.a, self.b, self.c = nn.Conv2d(5, 4, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.a(torch.tanh(self.stem(x)))
            y = self.b(s)
            y[:, :4] += s
            return self.c(y)

    model = Partial()
    x = torch.randn(2, 3, 4, 4)
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match="'CopySlices'"):
        ChannelStructure.build(model, x[:1], strict=True)
    snap.assert_unchanged()
    structure, error = mask_vs_removal(model, x)
    assert set(structure.groups) == {"stem"} and error < 1e-5
    assert "'CopySlices'" in structure.skipped["a"], structure.skipped


def test_channel_slice_is_refused_early() -> None:
    class Sliced(nn.Module):  # ReXNet: cat([x[:, :n] + shortcut, x[:, n:]])
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.a(x)
            y = self.b(s)
            return self.c(torch.cat([y[:, :4] + s, y[:, 4:]], dim=1))

    with pytest.raises(UnsupportedModelError, match=r"slice of the channels"):
        ChannelStructure.build(Sliced(), torch.randn(1, 3, 4, 4))
