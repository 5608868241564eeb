"""Shared fixtures: Hydra composition as in a real run, tiny models, state snapshots."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch import nn

from lightning_ifprune.models import available_models

CONF = Path(__file__).resolve().parents[1] / "conf"
ComposeFn = Callable[..., DictConfig]


@pytest.fixture(scope="session")
def compose_cfg() -> Iterator[ComposeFn]:
    """``compose_cfg(out_dir, *overrides)``: the ``train`` config as ``train.py`` would get it.

    ``${hydra:runtime.choices.*}`` resolves as in a real run: each call sets Hydra's runtime
    config to its own composition (cleared at the end of the session).
    """

    def compose_train(out: Path, *overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"output_dir={out}", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # a task function never sees it
        return cfg

    yield compose_train
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="session")
def model_names() -> list[str]:
    """Every name of the model registry."""
    return available_models()


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    """Give later tests back torch's thread count (the app sets ``num_threads``)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class StateSnapshot:
    """A copy of what a failed or read-only call must leave alone: a module's state
    (parameters and buffers), its architecture, train/eval modes and ``requires_grad`` flags."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.state, self.marks = self._state(), self._marks()

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def _marks(self) -> list[tuple]:
        modules = [(n, repr(m), m.training) for n, m in self.module.named_modules()]
        return modules + [(n, p.requires_grad) for n, p in self.module.named_parameters()]

    def assert_unchanged(self) -> None:
        """The module is exactly as copied: same keys, shapes, values, layers and flags."""
        now = self.module.state_dict()
        assert list(now) == list(self.state)
        for key, value in self.state.items():
            assert now[key].shape == value.shape, key
            assert torch.equal(now[key], value), key
        assert self._marks() == self.marks


@pytest.fixture
def state_snapshot() -> type[StateSnapshot]:
    """``state_snapshot(module)`` copies its state; ``.assert_unchanged()`` checks it later."""
    return StateSnapshot
