"""Export of pruned nets: plain state + history, TorchScript, and loading both back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ifprune.checkpoint import pruning_state
from lightning_ifprune.export import (
    SCRIPT_FILE,
    STATE_FILE,
    export_pruned,
    is_torchscript,
    load_exported,
    plain_history,
)
from lightning_ifprune.models import build_model
from lightning_ifprune.structure import ChannelStructure
from lightning_ifprune.surgery import plan_to_history_step, prune_channels

WIDTHS = [8, 16, 32]


def pruned_small_cnn() -> tuple[nn.Module, torch.Tensor, list]:
    """A small CNN pruned in two steps, with non-trivial BN statistics, and its history."""
    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=10, in_channels=1, widths=WIDTHS)
    x = torch.randn(16, 1, 16, 16)
    net.train()
    with torch.no_grad():
        net(x)  # running statistics away from their defaults
    history = []
    for plan in ({"features.0": [1, 5], "features.8": [0, 7, 30]}, {"features.4": [2, 3, 11]}):
        applied = prune_channels(ChannelStructure.build(net, x[:1]), plan).plan
        history.append(plan_to_history_step(applied))
    return net.eval(), x, history


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_export_and_load_back(tmp_path: Path) -> None:
    net, x, history = pruned_small_cnn()
    expected = net(x)
    paths = export_pruned(
        net,
        tmp_path,
        example_input=x[:1],
        history=history,
        model="small_cnn",
        num_classes=10,
        in_channels=1,
        model_kwargs={"widths": WIDTHS},
    )
    assert paths == {"state": tmp_path / STATE_FILE, "torchscript": tmp_path / SCRIPT_FILE}
    assert not net.training  # left as it was

    # The state file is plain data.
    payload = torch.load(paths["state"], weights_only=True)
    assert set(payload) >= {"state_dict", "ifprune", "model", "num_classes", "in_channels"}
    assert payload["ifprune"]["history"] == history
    assert payload["ifprune"]["example_input"].shape == (1, 1, 16, 16)
    assert payload["state_dict"]["features.0.weight"].shape[0] == WIDTHS[0] - 2

    # Rebuilt from build_model + replay_history: the same function.
    rebuilt = load_exported(paths["state"])
    assert isinstance(rebuilt, nn.Module) and not rebuilt.training
    torch.testing.assert_close(rebuilt(x), expected)
    assert pruning_state(rebuilt)["history"] == history
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in net.parameters())

    # TorchScript: no Python class needed, any batch size.
    assert is_torchscript(paths["torchscript"]) and not is_torchscript(paths["state"])
    scripted = load_exported(paths["torchscript"])
    assert isinstance(scripted, torch.jit.ScriptModule)
    torch.testing.assert_close(scripted(x), expected)
    torch.testing.assert_close(torch.jit.load(str(paths["torchscript"]))(x[:3]), expected[:3])

    # A directory means its state file.
    torch.testing.assert_close(load_exported(tmp_path)(x), expected)


def test_unpruned_export_and_state_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = build_model("small_cnn", num_classes=4, in_channels=1, widths=[4, 4, 4]).train()
    x = torch.randn(2, 1, 16, 16)
    paths = export_pruned(
        net,
        tmp_path,
        example_input=x,
        model="small_cnn",
        num_classes=4,
        in_channels=1,
        model_kwargs={"widths": [4, 4, 4]},
        torchscript=False,
    )
    assert set(paths) == {"state"} and not (tmp_path / SCRIPT_FILE).exists()
    assert net.training
    again = load_exported(tmp_path)
    torch.testing.assert_close(again(x), net.eval()(x))


def test_plain_history_strips_the_module_prefix() -> None:
    history = [[{"group": "net.features.0", "indices": [torch.tensor(3).item(), 1]}]]
    assert plain_history(history, strip_prefix="net.") == [[{"group": "features.0", "indices": [3, 1]}]]
    with pytest.raises(ValueError, match="does not start with"):
        plain_history([[{"group": "features.0", "indices": [1]}]], strip_prefix="net.")


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="neither a TorchScript archive"):
        load_exported(tmp_path / "x.pt")
    torch.save({"state_dict": {}, "model": None}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="which model"):
        load_exported(tmp_path / "y.pt")
