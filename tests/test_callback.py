"""InfluencePruningCallback inside real ``Trainer.fit`` runs on the embedded digits data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _lit import classifier, cpu_trainer, loader, widths
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

import lightning_ifprune as lip
from lightning_ifprune.fit_loop import draw_batches
from lightning_ifprune.measure import count_macs
from lightning_ifprune.module import ImageClassifier

EXAMPLE = torch.zeros(1, 1, 8, 8)
FAST = {"num_probes": 4, "probe_batch": 4, "cg_iters": 4, "seed": 0}


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.epoch_losses: list[float] = []
        self._sum = self._n = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sum += float(outputs["loss"])
        self._n += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_losses.append(self._sum / self._n)
        self._sum = self._n = 0.0


class MomentumProbe(Callback):
    """Snapshots momentum before the pruner's epoch-start hook and compares it after."""

    def __init__(self, pruner: lip.InfluencePruningCallback, before: bool, shared: dict) -> None:
        self.pruner, self.before, self.shared = pruner, before, shared

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        if self.before:
            self.shared["momentum"] = {
                n: opt.state[p]["momentum_buffer"].clone() for n, p in pl_module.named_parameters() if p in opt.state
            }
            self.shared["history"] = len(lip.checkpoint.pruning_state(pl_module)["history"])
            return
        history = lip.checkpoint.pruning_state(pl_module)["history"]
        if len(history) == self.shared.get("history", len(history)):
            return  # no round this epoch
        params = dict(pl_module.named_parameters())
        assert [p for g in opt.param_groups for p in g["params"]] == list(params.values())
        plan = {e["group"]: e["indices"] for e in history[-1]}
        conv = "net.features.0" if "net.features.0" in plan else next(iter(plan))
        removed = set(plan[conv])
        old = self.shared["momentum"][f"{conv}.weight"]
        kept = [i for i in range(old.shape[0]) if i not in removed]
        new = opt.state[params[f"{conv}.weight"]]["momentum_buffer"]
        assert new.shape == params[f"{conv}.weight"].shape
        assert torch.equal(new, old[kept])  # the old momentum of every kept channel
        for p in params.values():
            if p in opt.state:
                assert opt.state[p]["momentum_buffer"].shape == p.shape
        self.shared["checked"] = self.shared.get("checked", 0) + 1


def fast_rounds(rounds: int) -> lip.InfluencePruningCallback:
    """Influence pruning to half the FLOPs in ``rounds`` rounds from epoch 1, fast options."""
    criterion = lip.Influence(**FAST)
    return lip.InfluencePruningCallback(0.5, start_epoch=1, rounds=rounds, criterion=criterion, example_input=EXAMPLE)


def test_fit_prunes_in_rounds_and_keeps_training(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = classifier()
    pruner = fast_rounds(2)
    shared: dict = {}
    losses = LossRecorder()
    callbacks = [
        MomentumProbe(pruner, True, shared),
        pruner,
        MomentumProbe(pruner, False, shared),
        losses,
    ]
    dense = count_macs(module, EXAMPLE)
    cpu_trainer(tmp_path, 5, callbacks).fit(module, loader())
    assert shared["checked"] == 2
    assert count_macs(module, EXAMPLE) <= 0.5 * dense == pytest.approx(0.5 * pruner.baseline.flops)
    assert len(lip.checkpoint.pruning_state(module)["history"]) == 2
    # Training goes on decreasing the loss after each round (rounds at epochs 1 and 2).
    assert losses.epoch_losses[3] < losses.epoch_losses[2] and losses.epoch_losses[4] < losses.epoch_losses[2]


def test_progressive_steps_remove_channels_per_step(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = classifier()
    start = sum(p.shape[0] for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 4)
    pruner = lip.InfluencePruningCallback(
        target_channels=0.75,
        every_n_steps=2,
        channels_per_step=3,
        criterion="fisher",
        num_batches=1,
        example_input=EXAMPLE,
    )
    cpu_trainer(tmp_path, 1, [pruner]).fit(module, loader(256))  # 4 steps: boundaries at 2 (and 4)
    history = lip.checkpoint.pruning_state(module)["history"]
    assert len(history) == 1 and sum(len(e["indices"]) for e in history[0]) == 3
    end = sum(p.shape[0] for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 4)
    assert start - end == 3


def _resume_run(tmp_path: Path, epochs: int, ckpt: str | None = None) -> tuple[ImageClassifier, Path]:
    L.seed_everything(0)
    module = classifier()
    pruner = fast_rounds(3)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    cpu_trainer(tmp_path, epochs, [pruner, saver]).fit(module, loader(256), ckpt_path=ckpt)
    return module, tmp_path


def test_resume_from_a_checkpoint_between_rounds_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    full, _ = _resume_run(tmp_path / "full", 5)
    _, ckdir = _resume_run(tmp_path / "part", 2)  # stops after round 1 (epoch 1)
    ckpt = ckdir / "epoch=1.ckpt"
    assert torch.load(ckpt, weights_only=True)["ifprune"]["history"]
    resumed, _ = _resume_run(tmp_path / "part", 5, ckpt=str(ckpt))
    assert widths(resumed) == widths(full)
    # Mid-run and final checkpoints load into a fresh module (weights_only checkpoints).
    for path, reference in ((ckpt, None), (tmp_path / "full" / "epoch=4.ckpt", full)):
        from lightning_ifprune.models import build_model

        fresh = lip.load_pruned_checkpoint(
            ImageClassifier, path, net=build_model("small_cnn", 10, 1, widths=(16, 32, 32))
        )
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
        if reference is not None:
            fresh.eval()
            reference.eval()
            x = torch.randn(4, 1, 8, 8)
            assert torch.equal(fresh(x), reference(x))


class MixedClassifier(lip.PrunableMixin, ImageClassifier):
    pass


def test_mixin_makes_plain_load_from_checkpoint_work(tmp_path: Path) -> None:
    from lightning_ifprune.models import build_model

    L.seed_everything(0)
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1, widths=(16, 32, 32))
    module = MixedClassifier(net, 10, optimizer=classifier().optimizer_factory)
    pruner = lip.InfluencePruningCallback(target_flops=0.6, criterion="magnitude", example_input=EXAMPLE)
    trainer = cpu_trainer(tmp_path, 1, [pruner])
    trainer.fit(module, loader(128))
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    loaded = MixedClassifier.load_from_checkpoint(path, net=build_model("small_cnn", 10, 1, widths=(16, 32, 32)))
    assert widths(loaded) == widths(module)
    # An unpruned checkpoint still loads as before.
    plain = MixedClassifier(build_model("small_cnn", 10, 1, widths=(16, 32, 32)), 10)
    trainer2 = cpu_trainer(tmp_path, 0, [])
    trainer2.strategy.connect(plain)
    trainer2.save_checkpoint(tmp_path / "plain.ckpt")
    again = MixedClassifier.load_from_checkpoint(
        tmp_path / "plain.ckpt", net=build_model("small_cnn", 10, 1, widths=(16, 32, 32))
    )
    assert widths(again) == widths(plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of"),
        ({"target_flops": 1.5}, "target flops=1.5"),
        ({"target_flops": 0.5, "rounds": 0}, "rounds must be"),
        ({"target_flops": 0.5, "rounds": 3, "start_epoch": 2, "end_epoch": 3}, "do not fit"),
        ({"target_flops": 0.5, "criterion": "bogus"}, "unknown criterion 'bogus'"),
        ({"target_flops": 0.5, "normalize": "log"}, "normalize must be one of"),
        ({"target_flops": 0.5, "split": "cubic"}, "split must be one of"),
        ({"target_flops": 0.5, "every_n_steps": 0}, "every_n_steps"),
        ({"target_flops": 0.5, "min_channels": 0}, "min_channels"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        lip.InfluencePruningCallback(**kwargs)


def test_unreachable_target_raises_before_training(tmp_path: Path, state_snapshot) -> None:
    module = classifier()
    before = state_snapshot(module)
    pruner = lip.InfluencePruningCallback(target_flops=0.05, min_channels=0.5, example_input=EXAMPLE)
    with pytest.raises(ValueError, match="unreachable"):
        cpu_trainer(tmp_path, 1, [pruner]).fit(module, loader(128))
    before.assert_unchanged()


def test_model_without_prunable_group(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    module = ImageClassifier(net, 10, optimizer=classifier().optimizer_factory)
    pruner = lip.InfluencePruningCallback(target_flops=0.5, example_input=EXAMPLE)
    with pytest.raises(ValueError, match="no prunable channel group"):
        cpu_trainer(tmp_path, 1, [pruner]).fit(module, loader(128))


def test_unsafe_groups_are_announced_and_keep_their_channels(tmp_path: Path) -> None:
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Softmax(dim=1),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    module = ImageClassifier(net, 10, optimizer=classifier().optimizer_factory)
    pruner = lip.InfluencePruningCallback(target_flops=0.7, criterion="taylor", example_input=EXAMPLE)
    with pytest.warns(UserWarning, match=r"1 channel group\(s\) keep all their channels.*'net\.3' \(Softmax\)"):
        cpu_trainer(tmp_path, 2, [pruner]).fit(module, loader(128))
    assert net[2].out_channels == 8 and net[4].in_channels == 8  # the softmax's channels stay
    assert net[0].out_channels < 8 or net[4].out_channels < 16


def test_nan_scores_abandon_the_round(tmp_path: Path) -> None:
    module = classifier()
    pruner = lip.InfluencePruningCallback(
        target_flops=0.5,
        criterion="taylor",
        example_input=EXAMPLE,
        loss_fn=lambda out, y: F.cross_entropy(out, y) * float("nan"),
    )
    shapes = widths(module)
    with pytest.warns(UserWarning, match="abandoned, model untouched"):
        cpu_trainer(tmp_path, 1, [pruner]).fit(module, loader(128))
    assert widths(module) == shapes


def test_empty_dataloader_and_unsupported_strategies() -> None:
    pruner = lip.InfluencePruningCallback(target_flops=0.5, criterion="fisher")

    class Stub:
        empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
        train_dataloader = torch.utils.data.DataLoader(empty, batch_size=4)

    module = classifier()
    with pytest.raises(ValueError, match="dataloader is empty"):
        draw_batches(Stub(), module, 2)

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(RuntimeError, match="does not support the FSDPStrategy"):
        pruner.setup(FakeTrainer(), module, "fit")


def _ddp(tmp_path: Path, rewrap: bool) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / ("ok.json" if rewrap else "broken.json")
    script = Path(__file__).with_name("_ddp_run.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, str(script), str(out)] + ([] if rewrap else ["--no-rewrap"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    return proc, out


def test_ddp_ranks_stay_identical_and_the_check_can_fail(tmp_path: Path) -> None:
    proc, out = _ddp(tmp_path, rewrap=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and report["checks"] >= 4
    assert report["identical"], report
    # Without re-wrapping DDP around the pruned module the run goes on, and the ranks
    # silently diverge from the first epoch trained after a round: the check sees it.
    proc, out = _ddp(tmp_path, rewrap=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    broken = json.loads(out.read_text())
    assert broken["per_check"][:3] == [True, True, True] and not broken["identical"]


def test_identity_inverse_without_weight_decay(tmp_path: Path) -> None:
    """With no optimizer decay the retrained identity score (where 1/λ does not cancel) is refused
    before anything changes; the default paper score prunes (its ranking does not depend on λ)."""
    module = classifier()
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.05)  # no weight decay
    before = widths(module)
    retrained = lip.Influence(score="retrained", probes="rademacher", inverse="identity")
    pruner = lip.InfluencePruningCallback(target_flops=0.5, example_input=EXAMPLE, criterion=retrained)
    with pytest.raises(ValueError, match="needs the optimizer's weight_decay > 0"):
        cpu_trainer(tmp_path, 1, [pruner]).fit(module, loader(128))
    assert widths(module) == before
    pruner = lip.InfluencePruningCallback(target_flops=0.5, example_input=EXAMPLE)
    cpu_trainer(tmp_path, 1, [pruner]).fit(module, loader(128))
    assert pruner.finished and widths(module) != before


def test_tracing_from_a_training_batch_leaves_the_training_rng_alone(tmp_path: Path) -> None:
    """Without example_input the callback traces with a sample of a training batch. Drawing it
    must not move the global RNG, which shuffles the epochs: the run equals one given the
    example (a data-free criterion, so only the shuffling could differ)."""
    x, y = loader(256).dataset.tensors
    states = []
    for example in (None, EXAMPLE):
        L.seed_everything(0)
        module = classifier()
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
        pruner = lip.InfluencePruningCallback(0.6, start_epoch=1, criterion="magnitude", example_input=example)
        cpu_trainer(tmp_path, 2, [pruner]).fit(module, data)
        states.append(module.state_dict())
    assert list(states[0]) == list(states[1])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
