"""Hydra config: every option of every group composes and instantiates (without training)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf

from lightning_ifprune import Influence, InfluencePruningCallback
from lightning_ifprune.app.instantiators import build_loggers, build_module, build_pruner
from lightning_ifprune.app.phases import phase_optimization_nodes, set_phase_optimization
from lightning_ifprune.criteria import criterion_name
from lightning_ifprune.data import ImageDataModule
from lightning_ifprune.data.shapes import ShapesDetectionDataModule
from lightning_ifprune.detector import DetectionModule
from lightning_ifprune.module import ImageClassifier

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    """A group's options: its files less the ``_``-prefixed bases (``prune/_schedule``)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_groups_have_the_expected_options() -> None:
    assert set(options("data")) >= {"digits", "cifar10", "cifar100", "imagenet", "synthetic"}
    assert set(options("model")) >= {
        "small_cnn", "resnet20", "resnet32", "resnet56", "vgg16_bn_cifar",
        "resnet18", "resnet50", "vgg16_bn", "mobilenet_v2",
    }  # fmt: skip
    assert set(options("trainer")) >= {"cpu", "gpu", "ddp", "ddp_cpu"}
    assert set(options("logger")) >= {"csv", "tensorboard"}
    assert set(options("prune")) == {
        "none", "influence", "influence_paper", "fisher", "taylor", "magnitude", "bn_scale", "random",
        "loss_drop",
    }  # fmt: skip
    assert set(options("experiment")) >= {
        "resnet32_cifar10_flops50", "resnet32_cifar10_flops60", "vgg16bn_cifar10_flops50",
        "vgg16bn_cifar10_flops30", "resnet50_imagenet_flops50", "digits_compare", "digits_small",
    }  # fmt: skip


def test_default_config(tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path)
    assert dict(cfg.choices) == {"data": "digits", "model": "small_cnn", "prune": "none"}
    assert cfg.model.name == "small_cnn"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.seed == 0 and cfg.data.seed == 0
    assert cfg.prune._target_ is None
    assert build_pruner(cfg) is None
    assert cfg.pretrain.epochs > 0 and cfg.finetune.epochs is None and cfg.init_from is None
    assert cfg.export.enabled and cfg.report.latency_batch_size > 0
    assert cfg.num_threads == 1


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name: str, tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, f"data={name}", f"data_dir={tmp_path}")
    assert cfg.choices.data == name
    dm = instantiate(cfg.data)
    assert isinstance(dm, ShapesDetectionDataModule if name == "detection_shapes" else ImageDataModule)
    assert dm.num_classes >= 2 and len(dm.input_shape) == 3
    if hasattr(dm, "data_dir"):  # on-disk datasets live under cfg.data_dir
        assert str(dm.data_dir).startswith(str(tmp_path))


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(name: str, tmp_path: Path, compose_cfg) -> None:
    detection = OmegaConf.load(CONF / "model" / f"{name}.yaml").get("task") == "detection"
    cfg = compose_cfg(tmp_path, f"model={name}", f"data={'detection_shapes' if detection else 'synthetic'}")
    dm = instantiate(cfg.data)
    module = build_module(cfg, dm)
    assert isinstance(module, DetectionModule if detection else ImageClassifier)
    assert cfg.model.net.name == name
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.model.optimizer.lr
    if cfg.model.get("scheduler") is not None:
        assert optimizers["lr_scheduler"]["interval"] == "epoch"
    if name in {"small_cnn", "resnet20"}:  # small enough to run here
        channels = dm.input_shape[0]
        out = module(torch.randn(2, channels, 32, 32))
        assert out.shape == (2, dm.num_classes)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose(name: str, tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, f"trainer={name}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.max_epochs >= 1
    if name == "ddp_cpu":
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == (
            "cpu", 2, "ddp"
        )  # fmt: skip
    if name in {"cpu", "ddp_cpu"} or torch.cuda.is_available():
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
        assert isinstance(trainer, pl.Trainer)
        assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(name: str, tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, f"logger={name}")
    loggers = build_loggers(cfg)
    expected = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}[name]
    assert len(loggers) == 1 and isinstance(loggers[0], expected)
    assert Path(loggers[0].save_dir) == tmp_path


def test_no_logger(tmp_path: Path, compose_cfg) -> None:
    assert build_loggers(compose_cfg(tmp_path, "~logger")) == []


@pytest.mark.parametrize("name", options("prune"))
def test_prune_options(name: str, tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, f"prune={name}")
    assert cfg.choices.prune == name
    callback = build_pruner(cfg)
    assert (callback is None) == (name == "none")
    if callback is None:
        return
    assert isinstance(callback, InfluencePruningCallback)
    assert (callback.resource, callback.target) == ("flops", 0.5)
    assert criterion_name(callback.criterion) == ("influence" if name.startswith("influence") else name)
    assert callback.schedule.start_epoch == 0  # counted from the start of the prune phase
    assert callback.schedule.progressive == (name == "influence_paper")
    assert callback.normalize == "sqrt"
    if name.startswith("influence"):
        assert isinstance(callback.criterion, Influence)
    if name.startswith("influence"):
        # The default is the paper's estimator (chosen by benchmarks/compare.py); prune=influence
        # takes the library defaults, not YAML copies; influence_paper adds the progressive schedule.
        paper = Influence(score="paper", probes="ones", inverse="identity", micro_batches=1)
        assert callback.criterion == paper == Influence()
    if name == "influence_paper":
        assert callback.schedule.channels_per_step == 1


@pytest.mark.parametrize("name", ["influence", "magnitude"])
def test_prune_schedule_and_target_are_overridable(name: str, tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(
        tmp_path,
        f"prune={name}",
        "prune.target_flops=0.3",
        "prune.rounds=5",
        "prune.end_epoch=4",
        "+prune.criterion.num_probes=2" if name == "influence" else "seed=1",
    )
    callback = build_pruner(cfg)
    assert callback.target == 0.3 and callback.schedule.round_epochs() == [0, 1, 2, 3, 4]
    if name == "influence":
        assert callback.criterion == Influence(num_probes=2)
    # One round per epoch unless end_epoch spreads them (README: prune.rounds=5 alone works).
    callback = build_pruner(compose_cfg(tmp_path, f"prune={name}", "prune.rounds=5"))
    assert callback.schedule.round_epochs() == [0, 1, 2, 3, 4]
    callback = build_pruner(compose_cfg(tmp_path, f"prune={name}"))
    assert callback.schedule.round_epochs() == [0, 1, 2] and callback.schedule.split == "geometric"


def test_criterion_options_of_the_wrong_kind_fail_at_composition(tmp_path: Path, compose_cfg) -> None:
    """A mistyped or misplaced criterion option names the field when the pruner is built."""
    with pytest.raises(InstantiationException, match="cg_iters"):
        build_pruner(compose_cfg(tmp_path, "prune=influence", "+prune.criterion.cg_iters=2.5"))
    with pytest.raises(InstantiationException, match="damping"):
        build_pruner(compose_cfg(tmp_path, "prune=magnitude", "+prune.criterion.damping=0.1"))


def test_unknown_prune_option_lists_the_available_ones(tmp_path: Path, compose_cfg) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_cfg(tmp_path, "prune=bogus")
    message = str(info.value)
    assert "bogus" in message and "Available options" in message
    for name in options("prune"):
        assert name in message


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_instantiate(name: str, tmp_path: Path, compose_cfg) -> None:
    """Every experiment composes; its data module, module, phase optimizers/schedulers and
    prune callback instantiate (without reading data)."""
    cfg = compose_cfg(tmp_path, f"experiment={name}", f"data_dir={tmp_path}")
    assert cfg.task_name == name
    assert cfg.choices.data and cfg.choices.model and cfg.model.name
    dm = instantiate(cfg.data)
    assert isinstance(dm, (ImageDataModule, ShapesDetectionDataModule))
    module = build_module(cfg, dm)
    for phase, epochs in (
        ("pretrain", cfg.pretrain.epochs),
        (None, cfg.trainer.max_epochs),
        ("finetune", cfg.finetune.epochs or 1),
    ):
        set_phase_optimization(module, cfg, phase, epochs)
        optimizer = module.optimizer_factory(module.parameters())
        assert isinstance(optimizer, torch.optim.Optimizer)
        if module.scheduler_factory is not None:
            module.scheduler_factory(optimizer)
    assert (build_pruner(cfg) is None) == (cfg.choices.prune == "none")


@pytest.mark.parametrize(
    "name",
    [
        "resnet32_cifar10_flops50",
        "resnet32_cifar10_flops60",
        "vgg16bn_cifar10_flops50",
        "vgg16bn_cifar10_flops30",
    ],
)
def test_paper_experiments_use_the_reference_settings(name: str, tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, f"experiment={name}")
    target = {"50": 0.5, "60": 0.6, "30": 0.3}[name[-2:]]
    assert (cfg.choices.data, cfg.data.batch_size) == ("cifar10", 128)
    assert cfg.model.name == ("resnet32" if name.startswith("resnet") else "vgg16_bn_cifar")
    opt = cfg.model.optimizer
    assert (opt._target_, opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == (
        "torch.optim.SGD", 0.1, 0.9, 1.0e-4, False
    )  # fmt: skip
    callback = build_pruner(cfg)
    schedule = callback.schedule
    assert (callback.target, schedule.every_n_steps, schedule.channels_per_step, callback.normalize) == (
        target, 10, 1, "sqrt"
    )  # fmt: skip
    assert callback.criterion.options.score == "paper" and callback.criterion.options.inverse == "identity"
    assert cfg.pretrain.epochs == 200 and cfg.finetune.epochs == 200
    for phase in ("pretrain", "finetune"):
        _, scheduler = phase_optimization_nodes(cfg, phase, 200)
        assert scheduler["_target_"] == "torch.optim.lr_scheduler.MultiStepLR"
        assert (scheduler["milestones"], scheduler["gamma"]) == ([120, 160], 0.1)
    assert phase_optimization_nodes(cfg, None, cfg.trainer.max_epochs)[1] is None  # constant lr while pruning
    assert cfg.num_threads is None and cfg.trainer.accelerator == "gpu"


def test_phase_schedules_span_their_own_phase(tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, "pretrain.epochs=7", "trainer.max_epochs=11", "finetune.epochs=5")
    assert phase_optimization_nodes(cfg, "pretrain", 7)[1]["T_max"] == 7
    assert phase_optimization_nodes(cfg, None, 11)[1]["T_max"] == 11
    assert phase_optimization_nodes(cfg, "finetune", 5)[1]["T_max"] == 5
    assert cfg.model.scheduler.T_max == 11  # the config itself is untouched


def test_digits_compare_shares_the_pretrained_net(tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path / "3", "experiment=digits_compare", "prune=taylor", "prune.target_flops=0.3")
    assert cfg.pretrain.cache_dir == f"{tmp_path / '3'}/../pretrain_cache"
    callback = build_pruner(cfg)
    assert criterion_name(callback.criterion) == "taylor"
    assert (callback.target, callback.schedule.round_epochs()) == (0.3, [0, 1])
    assert cfg.trainer.max_epochs > 1
    paper = build_pruner(compose_cfg(tmp_path, "experiment=digits_compare", "prune=influence_paper"))
    assert not paper.schedule.progressive and paper.schedule.round_epochs() == [
        0,
        1,
    ]  # one schedule for all


def test_digits_experiment_overrides_widths(tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(tmp_path, "experiment=digits_small")
    assert list(cfg.model.net.widths) == [8, 16, 32]


def test_unknown_option_lists_the_available_ones(tmp_path: Path, compose_cfg) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_cfg(tmp_path, "model=bogus")
    message = str(info.value)
    assert "bogus" in message and "Available options" in message
    for name in ("small_cnn", "resnet32", "vgg16_bn_cifar"):
        assert name in message


def test_prune_node_must_build_the_pruning_callback() -> None:
    """``cfg.prune`` is the pruner: another callback there is refused by name."""
    cfg = OmegaConf.create({"prune": {"_target_": "lightning.pytorch.callbacks.Timer", "duration": "00:00:01:00"}})
    with pytest.raises(TypeError, match="InfluencePruningCallback, got Timer"):
        build_pruner(cfg)
