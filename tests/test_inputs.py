"""Inputs a careful user gets wrong or unusual: each gets a clear error, a warning or the right result."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _lit import DictDigits, classifier, cpu_trainer, digits_tensors, widths
from torch.utils.data import DataLoader, TensorDataset

import lightning_ifprune as lip
from lightning_ifprune.measure import count_macs
from lightning_ifprune.models import build_model


@pytest.mark.parametrize("criterion", ["influence", "taylor", "fisher", "loss_drop"])
def test_data_criteria_refuse_an_empty_batch_list(criterion: str, state_snapshot) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, widths=(4, 8, 8))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="needs at least one batch"):
        lip.score_channels(
            model, [], criterion=criterion, loss_fn=F.cross_entropy, example_inputs=torch.zeros(1, 1, 8, 8)
        )
    before.assert_unchanged()


def test_random_follows_the_run_seed_unless_given_one() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, widths=(4, 8, 8))
    x = torch.zeros(1, 1, 8, 8)

    def scores(seed: int, criterion: object = "random") -> torch.Tensor:
        L.seed_everything(seed, verbose=False)
        return torch.cat(list(lip.score_channels(model, criterion=criterion, example_inputs=x).values()))

    assert torch.equal(scores(1), scores(1))
    assert not torch.equal(scores(1), scores(2))
    assert torch.equal(scores(1, lip.Random(seed=7)), scores(2, lip.Random(seed=7)))


@pytest.mark.parametrize("value", [1.5, 2.5, 0.0, -1, True, "2"])
def test_min_channels_must_be_a_count_or_a_fraction(value: object) -> None:
    with pytest.raises(ValueError, match="min_channels"):
        lip.InfluencePruningCallback(0.5, min_channels=value)
    with pytest.raises(ValueError, match="min_channels"):
        lip.ChannelStructure.build(build_model("small_cnn", 10, 1), torch.zeros(1, 1, 8, 8), min_channels=value)


class _DictClassifier(type(classifier())):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["image"]), batch["label"])


def test_dict_batches_trace_and_prune(tmp_path: Path) -> None:
    """Without example_input the callback traces with the first tensor of a dict batch
    (here beside a string field) and prunes with a loss closure on the dicts."""
    torch.manual_seed(0)
    module = _DictClassifier(
        build_model("small_cnn", 10, 1, widths=(8, 16, 16)), 10, optimizer=classifier().optimizer_factory
    )

    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["image"]), batch["label"])

    pruner = lip.InfluencePruningCallback(0.6, criterion="fisher", loss=loss, verbose=False)
    before = widths(module)
    cpu_trainer(tmp_path, 1, [pruner]).fit(module, DataLoader(DictDigits(), batch_size=32))
    assert pruner.finished and widths(module) != before


def test_an_empty_training_dataloader_is_a_clear_error(tmp_path: Path, state_snapshot) -> None:
    module = classifier()
    before = state_snapshot(module)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    pruner = lip.InfluencePruningCallback(0.5, criterion="fisher")
    with pytest.raises(ValueError, match="training dataloader is empty"):
        cpu_trainer(tmp_path, 1, [pruner]).fit(module, empty)
    before.assert_unchanged()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_epoch": 3}, r"start_epoch=3.*max_epochs=2"),
        ({"start_epoch": 0, "end_epoch": 4, "rounds": 3}, r"epochs \[0, 2, 4\].*max_epochs=2"),
        ({"start_epoch": 2, "every_n_steps": 1}, r"start_epoch=2.*max_epochs=2"),
    ],
)
def test_a_schedule_that_cannot_run_warns_at_fit_start_and_end(tmp_path: Path, kwargs: dict, match: str) -> None:
    pruner = lip.InfluencePruningCallback(0.5, criterion="magnitude", example_input=torch.zeros(1, 1, 8, 8), **kwargs)
    x, y = digits_tensors(64)
    with pytest.warns(UserWarning, match=match), pytest.warns(UserWarning, match="target .* not reached"):
        cpu_trainer(tmp_path, 2, [pruner], limit_train_batches=1).fit(classifier(), DataLoader(TensorDataset(x, y)))
    assert not pruner.finished


@pytest.mark.parametrize("change", [{"target_flops": 0.4}, {"target_flops": 0.5, "rounds": 2, "end_epoch": 3}])
def test_resuming_with_a_changed_target_or_schedule_warns_and_applies_it(tmp_path: Path, change: dict) -> None:
    """The checkpoint's pruning state carries on (rounds done, baseline); the new target and
    schedule apply from there on, and a warning names the old and new values."""
    x, y = digits_tensors(128)
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    example = torch.zeros(1, 1, 8, 8)
    first = lip.InfluencePruningCallback(0.5, rounds=3, criterion="magnitude", example_input=example, verbose=False)
    trainer = cpu_trainer(tmp_path, 1, [first])
    module = classifier()
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "one_round.ckpt")
    assert first.rounds_done == 1

    again = lip.InfluencePruningCallback(criterion="magnitude", example_input=example, verbose=False, **change)
    fresh = classifier()
    with pytest.warns(UserWarning, match="resum.*changed") as record:
        cpu_trainer(tmp_path, 4, [again]).fit(fresh, data, ckpt_path=tmp_path / "one_round.ckpt")
    message = next(str(w.message) for w in record if "changed" in str(w.message))
    for key, value in change.items():
        assert f"{key.removeprefix('target_')}" in message and str(value) in message, message
    assert again.finished and again.baseline == first.baseline
    kept = count_macs(fresh.net, example) / first.baseline.flops
    assert kept <= again.target
