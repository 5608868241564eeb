"""The Hydra training application behind ``train.py``: pre-train, prune, fine-tune, report.

``train(cfg)`` wires a composed config into objects — data module, net, ``ImageClassifier``,
loggers, the optional prune callback — and runs up to three phases on the same module, each
with a fresh ``Trainer`` (from ``cfg.trainer``), a fresh optimizer and a fresh LR schedule:

1. **pretrain** — ``cfg.pretrain.epochs`` epochs without pruning (0 skips it). The test set
   then gives ``test_acc_before``: the accuracy of exactly the network that phase 2 starts
   pruning. (This two-phase run is how the app measures the accuracy before pruning; a
   checkpoint given as ``init_from`` is loaded before phase 1, and with ``pretrain.epochs=0``
   ``test_acc_before`` is the loaded network's accuracy.)
2. **prune** — ``cfg.trainer.max_epochs`` epochs with the callback of ``cfg.prune``, whose
   ``start_epoch``/``end_epoch`` count from the start of this phase. Unless a separate
   fine-tune is configured, the epochs after the last round are the fine-tune (the callback's
   plain-Lightning usage). With ``prune=none`` this phase trains the dense net for the same
   budget, the control that pruned runs are compared with.
3. **finetune** — only when ``cfg.finetune.epochs`` is set: phase 2 then ends with the epoch
   in which pruning finished (``trainer.max_epochs`` caps it) and this phase fine-tunes the
   pruned net for that many epochs (the reference's protocol: prune a trained net while SGD
   goes on, then fine-tune 200 epochs with a fresh schedule). With ``prune=none`` phase 2 is
   skipped and this phase trains the dense net.

The test set after the last phase gives ``test_acc_after`` (= ``test_acc``). Phases take their
optimizer and scheduler from ``cfg.<phase>.optimizer``/``scheduler`` when set, else from
``cfg.model``; ``${trainer.max_epochs}`` inside them resolves to the phase's own epochs, so a
cosine schedule spans each phase. Each phase is seeded (``seed``, ``seed + 1``, ``seed + 2``),
so a phase does not depend on whether the one before it ran or came from the pre-train cache
(``pretrain.cache_dir``: pre-trained weights keyed by data, model, settings and seed, so that
a sweep over criteria prunes the same network per seed and pre-trains it once).

Outputs in ``cfg.output_dir`` (Hydra's run directory): ``summary.json`` (see :func:`train`),
``channels.png`` (channels per group before/after), ``pruned_state.pt`` and ``model.pt``
(:mod:`lightning_ifprune.export`), ``pretrained.ckpt`` (the phase-1 Lightning checkpoint,
usable as ``init_from``), and per-phase logs (``csv/<phase>/``, with Lightning's checkpoints;
those of the prune and fine-tune phases carry the pruning history). A table of the results is
printed at the end.

Config contract (see ``conf/``): ``cfg.data`` and ``cfg.prune`` are instantiable nodes with
an extra descriptive ``name`` key, which is dropped before instantiation; ``cfg.prune``
without ``_target_`` (``prune=none``) means no pruning. ``cfg.model`` holds ``name``,
``net`` (instantiated with ``num_classes`` and ``in_channels`` from the data module),
``optimizer`` and optional ``scheduler`` (``_partial_`` factories) and ``label_smoothing``.
``cfg.logger`` maps logger names to instantiable nodes (each gets ``version=<phase>``);
``cfg.trainer`` is a ``Trainer``. ``cfg.pretrain``, ``cfg.finetune``, ``cfg.report`` and
``cfg.export`` are described in ``conf/train.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from lightning_ifprune.callback import InfluencePruningCallback
from lightning_ifprune.checkpoint import (
    CHECKPOINT_KEY,
    pruning_state,
    restore_architecture,
    save_pruning_state,
)
from lightning_ifprune.data import ImageDataModule
from lightning_ifprune.export import export_pruned, plain_history
from lightning_ifprune.measure import count_macs, count_params
from lightning_ifprune.module import ImageClassifier
from lightning_ifprune.structure import ChannelStructure, UnsupportedModelError

NET_PREFIX = "net."


# ---------------------------------------------------------------------------- building
def instantiate_named(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node after dropping its descriptive ``name`` key."""
    container = OmegaConf.to_container(node, resolve=True)
    if not isinstance(container, dict):
        raise TypeError(f"expected a mapping config node, got {type(container).__name__}")
    container.pop("name", None)
    return instantiate(container, **kwargs)


def build_loggers(cfg: DictConfig, version: str | None = None) -> list[Logger]:
    """The loggers of ``cfg.logger`` (a mapping of names to logger nodes; may be absent).

    ``version`` (a phase name) becomes each logger's version, i.e. its sub-directory.
    """
    nodes = cfg.get("logger") or {}
    extra = {} if version is None else {"version": version}
    return [instantiate(node, **extra) for node in nodes.values() if node is not None]


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The prune callback, when ``cfg.prune`` names one with ``_target_``."""
    prune = cfg.get("prune")
    if prune is None or "_target_" not in prune:
        return []
    return [instantiate_named(prune)]


def build_module(cfg: DictConfig, dm: ImageDataModule) -> ImageClassifier:
    """The net of ``cfg.model`` sized for ``dm``, wrapped with its optimizer and scheduler."""
    net = instantiate(cfg.model.net, num_classes=dm.num_classes, in_channels=dm.input_shape[0])
    scheduler = cfg.model.get("scheduler")
    return ImageClassifier(
        net=net,
        num_classes=dm.num_classes,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(scheduler) if scheduler is not None else None,
        label_smoothing=cfg.model.get("label_smoothing", 0.0),
    )


def phase_config(cfg: DictConfig, epochs: int) -> DictConfig:
    """A copy of ``cfg`` whose ``trainer.max_epochs`` is ``epochs`` (for interpolations)."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    with open_dict(out):
        out.trainer.max_epochs = int(epochs)
    return out


def phase_optimization_nodes(cfg: DictConfig, phase: str | None, epochs: int) -> tuple[Any, Any]:
    """The (optimizer, scheduler) nodes of ``cfg.<phase>`` (else of ``cfg.model``), resolved
    with ``trainer.max_epochs`` = ``epochs``; the scheduler may be None."""
    pcfg = phase_config(cfg, epochs)
    node = pcfg.get(phase) if phase else None
    optimizer = node.get("optimizer") if node is not None else None
    if optimizer is None:
        optimizer = pcfg.model.optimizer
    scheduler = node.get("scheduler") if node is not None else None
    if scheduler is None:
        scheduler = pcfg.model.get("scheduler")
    resolve = lambda n: None if n is None else OmegaConf.to_container(n, resolve=True)  # noqa: E731
    return resolve(optimizer), resolve(scheduler)


def set_phase_optimization(module: ImageClassifier, cfg: DictConfig, phase: str | None, epochs: int) -> None:
    """Point the module at the optimizer and scheduler of ``cfg.<phase>`` (else ``cfg.model``)."""
    optimizer, scheduler = phase_optimization_nodes(cfg, phase, epochs)
    module.optimizer_factory = instantiate(optimizer)
    module.scheduler_factory = instantiate(scheduler) if scheduler is not None else None


def make_trainer(cfg: DictConfig, phase: str, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A ``Trainer`` of ``cfg.trainer`` for one phase, logging under ``<logger>/<phase>``
    (without loggers, its checkpoints go to ``<default_root_dir>/<phase>/checkpoints``)."""
    loggers = build_loggers(cfg, version=phase)
    extra: dict[str, Any] = {}
    if not loggers and cfg.trainer.get("default_root_dir"):
        extra["default_root_dir"] = str(Path(cfg.trainer.default_root_dir) / phase)  # checkpoints per phase
    trainer: pl.Trainer = instantiate(cfg.trainer, max_epochs=int(epochs), logger=loggers or False,
                                      callbacks=callbacks, **extra)
    hparams = OmegaConf.to_container(phase_config(cfg, epochs), resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams({"phase": phase, **hparams})  # type: ignore[dict-item]
    return trainer


def make_test_trainer(cfg: DictConfig) -> pl.Trainer:
    """A ``Trainer`` of ``cfg.trainer`` that only evaluates (no logger, no checkpoints)."""
    return instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)


# ---------------------------------------------------------------------------- callbacks
class KeepPruningState(Callback):
    """Write the module's pruning history into checkpoints of phases without the pruner."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        save_pruning_state(pl_module, checkpoint)


class PruningMonitor(Callback):
    """Watches the prune callback: when pruning finished, optionally the test accuracy of the
    just-pruned net (``acc_pruned``, before any further training), and optionally a stop at
    the end of that epoch (when a separate fine-tune phase follows)."""

    def __init__(self, pruner: InfluencePruningCallback, dm: ImageDataModule, *, evaluate: bool,
                 stop_when_pruned: bool) -> None:
        self.pruner, self.dm = pruner, dm
        self.evaluate, self.stop_when_pruned = evaluate, stop_when_pruned
        self.done = False
        self.acc_pruned: float | None = None
        self.epoch: int | None = None
        self.step: int | None = None

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or not self.pruner.finished:
            return
        self.done, self.epoch, self.step = True, trainer.current_epoch, trainer.global_step
        if self.evaluate:
            self.acc_pruned = evaluate_accuracy(pl_module, self.dm)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.pruner.every_n_steps is not None:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_when_pruned and self.done:
            trainer.should_stop = True


# ---------------------------------------------------------------------------- measuring
@torch.no_grad()
def evaluate_accuracy(module: torch.nn.Module, dm: ImageDataModule) -> float:
    """Top-1 accuracy on the full test split, computed directly (works mid-``fit``)."""
    if dm.test_set is None:
        dm.setup("test")
    was_training = module.training
    device = next(module.parameters()).device
    module.eval()
    correct = total = 0
    try:
        for x, y in dm.test_dataloader():
            pred = module(x.to(device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
    finally:
        module.train(was_training)
    return correct / max(total, 1)


def measure_cost(net: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs per sample, parameters) of ``net``, measured on CPU; ``net`` stays on CPU."""
    net.cpu()
    return count_macs(net, torch.zeros(1, *input_shape)), count_params(net)


def channel_widths(net: torch.nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Channels of every prunable group of ``net`` (``{}`` if it cannot be traced)."""
    try:
        return ChannelStructure.build(net, example.to(next(net.parameters()).device)).widths()
    except UnsupportedModelError:
        return {}


@torch.no_grad()
def measure_latency(net: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device,
                    batch_size: int, iters: int = 20, warmup: int = 5) -> float:
    """Median wall time (ms) of one eval-mode forward pass of a ``batch_size`` batch on ``device``."""
    param = next(net.parameters())
    home, was_training = param.device, net.training
    net.eval().to(device)
    x = torch.randn(batch_size, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            net(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        net.train(was_training).to(home)
    return 1000 * statistics.median(times)


def run_test(trainer: pl.Trainer, module: ImageClassifier, dm: ImageDataModule) -> dict[str, float]:
    """The test metrics of ``module`` (``test/acc``, ``test/loss``, maybe ``test/acc_top5``)."""
    return {k: float(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}


# ---------------------------------------------------------------------------- loading
def load_initial_weights(module: ImageClassifier, path: str | os.PathLike) -> None:
    """Initialise ``module`` from a Lightning checkpoint, an exported ``pruned_state.pt`` or a
    plain ``state_dict`` of the net (``torch.save(net.state_dict(), path)``).

    A pruning history in the file is replayed onto the fresh net first, so pruned
    checkpoints load (what :func:`~lightning_ifprune.load_pruned_checkpoint` does).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {"state_dict": checkpoint}  # a plain state_dict, e.g. of torchvision weights
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"init_from={path}: not a Lightning checkpoint, pruned_state.pt or state_dict")
    saved = checkpoint.get(CHECKPOINT_KEY) or {}
    if state and not all(k.startswith(NET_PREFIX) for k in state):
        # A plain net state (pruned_state.pt): names are relative to the net.
        state = {NET_PREFIX + k: v for k, v in state.items()}
        if saved.get("history"):
            history = [[{**e, "group": NET_PREFIX + str(e["group"])} for e in step] for step in saved["history"]]
            saved = {**saved, "history": history}
    restore_architecture(module, {CHECKPOINT_KEY: saved} if saved else {})
    module.load_state_dict(state, strict=True)


def pretrain_cache_file(cfg: DictConfig, epochs: int) -> Path | None:
    """Where the pre-trained weights of this configuration are cached (None: no cache)."""
    root = cfg.pretrain.get("cache_dir")
    if not root:
        return None
    pcfg = phase_config(cfg, epochs)
    trainer = OmegaConf.to_container(pcfg.trainer, resolve=True)
    assert isinstance(trainer, dict)
    for key in ("default_root_dir", "enable_progress_bar", "log_every_n_steps", "enable_model_summary"):
        trainer.pop(key, None)
    optimizer, scheduler = phase_optimization_nodes(cfg, "pretrain", epochs)
    key = {
        "data": OmegaConf.to_container(pcfg.data, resolve=True),
        "net": OmegaConf.to_container(pcfg.model.net, resolve=True),
        "label_smoothing": pcfg.model.get("label_smoothing", 0.0),
        "epochs": epochs,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "trainer": trainer,
        "seed": pcfg.seed,
        "init_from": pcfg.get("init_from"),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / f"{cfg.data.name}-{cfg.model.name}-seed{cfg.seed}-{digest}.pt"


# ---------------------------------------------------------------------------- reporting
def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: Mapping[str, Any]) -> None:
    """The run's results: a before/after table, then the wall times."""
    title = f"{summary['model']} on {summary['data']}, prune={summary['prune']}"
    if summary.get("target") is not None:
        title += f" (target {summary['target_resource']} {summary['target']:g})"
    table = Table(title=title)
    table.add_column("")
    table.add_column("before pruning", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after / before", justify="right")

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.2f} %"

    def row(label: str, before: Any, after: Any) -> None:
        ratio = f"{after / before:.3f}" if before else ""
        table.add_row(label, _format_value(before), _format_value(after), ratio)

    acc_b, acc_a = summary.get("test_acc_before"), summary.get("test_acc_after")
    table.add_row("test accuracy", pct(acc_b), pct(acc_a),
                  "" if acc_b is None or acc_a is None else f"{100 * (acc_a - acc_b):+.2f} pts")
    if summary.get("test_acc_pruned") is not None:
        table.add_row("  right after pruning, no fine-tune", "", pct(summary["test_acc_pruned"]), "")
    row("MACs per sample", summary["flops_before"], summary["flops_after"])
    row("parameters", summary["params_before"], summary["params_after"])
    row("channels (prunable groups)", sum(summary["channels_before"].values()),
        sum(summary["channels_after"].values()))
    if summary.get("latency_before_ms") is not None:
        row(f"latency ms (batch {summary['latency_batch_size']}, {summary['latency_device']})",
            round(summary["latency_before_ms"], 3), round(summary["latency_after_ms"], 3))
    table.add_section()
    for key, label in (("wall_pretrain_s", "pre-train time s"), ("wall_prune_s", "pruning rounds time s"),
                       ("wall_finetune_s", "fine-tune time s"), ("wall_s", "total wall time s")):
        table.add_row(label, "", f"{summary[key]:.2f}", "")
    Console().print(table)


def _net_kwargs(cfg: DictConfig) -> tuple[str | None, dict[str, Any]]:
    """(build_model name, extra kwargs) of ``cfg.model.net``, when it is a build_model node."""
    node = OmegaConf.to_container(cfg.model.net, resolve=True)
    assert isinstance(node, dict)
    if node.get("_target_") != "lightning_ifprune.models.build_model":
        return None, {}
    name = node.pop("name", cfg.model.name)
    return name, {k: v for k, v in node.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------- the run
def train(cfg: DictConfig) -> dict[str, Any]:
    """Pre-train, prune, fine-tune and test as configured; returns what it writes to ``summary.json``.

    Summary keys: ``model``, ``data``, ``prune`` (config names), ``criterion``, ``target``
    and ``target_resource`` (null without pruning), ``seed``; ``test_acc_before`` (before
    pruning), ``test_acc_pruned`` (right after the last round, before further training; when
    ``report.eval_after_pruning``), ``test_acc_after`` (after fine-tuning), ``test_acc``
    (= after), ``test_loss``, ``test_acc_top5`` (>= 5 classes), all fractions;
    ``flops_before``/``flops_after`` (MACs per sample; ``flops`` = after), ``flops_kept``,
    ``params_before``/``params_after`` (``params`` = after), ``params_kept``,
    ``dense_flops``/``dense_params`` (the freshly built net), ``target_met``,
    ``channels_before``/``channels_after`` (per prunable group of the net),
    ``latency_before_ms``/``latency_after_ms`` (median eval forward time of a
    ``latency_batch_size`` batch on ``latency_device``, ``latency_threads`` CPU threads),
    ``prune_rounds``, ``epochs_pretrain``/``epochs_prune``/``epochs_finetune``, ``epochs``
    (total), ``pretrain_cached``, wall times ``wall_pretrain_s``, ``wall_prune_s`` (the
    pruning rounds), ``wall_finetune_s`` (training after/between rounds) and ``wall_s``
    (the whole run), and ``files`` (what was written).
    """
    start = time.perf_counter()
    # The in-memory data modules use no loader workers on purpose.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out_dir = Path(cfg.output_dir)
    report_cfg = cfg.get("report") or {}
    export_cfg = cfg.get("export") or {}

    dm: ImageDataModule = instantiate_named(cfg.data)
    module = build_module(cfg, dm)
    shape = tuple(dm.input_shape)
    example = torch.zeros(1, *shape)
    dense_flops, dense_params = measure_cost(module.net, shape)
    callbacks = build_callbacks(cfg)
    pruner = callbacks[0] if callbacks else None
    if pruner is not None and not isinstance(pruner, InfluencePruningCallback):
        raise TypeError(f"cfg.prune must build an InfluencePruningCallback, got {type(pruner).__name__}")
    if cfg.get("init_from"):
        load_initial_weights(module, cfg.init_from)
        if pruner is not None and pruning_state(module)["history"]:
            raise ValueError(f"init_from={cfg.init_from} is already pruned; the prune callback starts from "
                             "an unpruned net. Fine-tune it with prune=none, or start from the unpruned checkpoint.")

    epochs = {"pretrain": 0, "prune": 0, "finetune": 0}
    walls = {"pretrain": 0.0, "prune_phase": 0.0, "finetune": 0.0}
    files: dict[str, str] = {}
    trainer: pl.Trainer | None = None

    # ---- phase 1: pre-train
    pre_epochs = int(cfg.pretrain.get("epochs") or 0)
    cache = pretrain_cache_file(cfg, pre_epochs) if pre_epochs > 0 else None
    cached = cache is not None and cache.is_file()
    if cached:
        assert cache is not None
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        module.load_state_dict(stored["state_dict"])
        epochs["pretrain"], walls["pretrain"] = int(stored["epochs"]), float(stored["wall_s"])
        rank_zero_info(f"[ifprune] pre-trained weights from the cache {cache}")
    elif pre_epochs > 0:
        trainer = make_trainer(cfg, "pretrain", pre_epochs, [KeepPruningState()])
        set_phase_optimization(module, cfg, "pretrain", pre_epochs)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        walls["pretrain"] = time.perf_counter() - t0
        epochs["pretrain"] = trainer.current_epoch
        if cfg.pretrain.get("save_checkpoint", False):
            trainer.save_checkpoint(out_dir / "pretrained.ckpt")
            files["pretrained_ckpt"] = "pretrained.ckpt"
        if cache is not None and trainer.is_global_zero:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                        "epochs": epochs["pretrain"], "wall_s": walls["pretrain"]}, tmp)
            os.replace(tmp, cache)
    tester = trainer or make_test_trainer(cfg)
    before = run_test(tester, module, dm)
    device = tester.strategy.root_device
    is_zero = tester.is_global_zero
    flops_before, params_before = measure_cost(module.net, shape)
    channels_before = channel_widths(module.net, example)
    latency_bs = int(report_cfg.get("latency_batch_size", 64))
    latency_iters = int(report_cfg.get("latency_iters", 20))
    latency_before = measure_latency(module.net, shape, device, latency_bs, latency_iters) \
        if is_zero and latency_iters > 0 else None

    # ---- phase 2: prune (and fine-tune, unless phase 3 does)
    ft_epochs = cfg.finetune.get("epochs")
    main_epochs = int(cfg.trainer.max_epochs)
    monitor: PruningMonitor | None = None
    if main_epochs > 0 and (pruner is not None or ft_epochs is None):
        pl.seed_everything(cfg.seed + 1, workers=True, verbose=False)
        if pruner is not None:
            monitor = PruningMonitor(pruner, dm, evaluate=bool(report_cfg.get("eval_after_pruning", True)),
                                     stop_when_pruned=ft_epochs is not None)
            phase_callbacks: list[pl.Callback] = [pruner, monitor]
        else:
            phase_callbacks = [KeepPruningState()]
        phase = "prune" if pruner is not None else "train"
        trainer = make_trainer(cfg, phase, main_epochs, phase_callbacks)
        set_phase_optimization(module, cfg, None, main_epochs)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        walls["prune_phase"] = time.perf_counter() - t0
        epochs["prune"] = trainer.current_epoch
        if pruner is not None and not pruner.finished:
            rank_zero_warn(f"pruning did not finish within trainer.max_epochs={main_epochs}: "
                           "raise it or start the schedule earlier")

    # ---- phase 3: separate fine-tune
    if ft_epochs:
        pl.seed_everything(cfg.seed + 2, workers=True, verbose=False)
        trainer = make_trainer(cfg, "finetune", int(ft_epochs), [KeepPruningState()])
        set_phase_optimization(module, cfg, "finetune", int(ft_epochs))
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        walls["finetune"] = time.perf_counter() - t0
        epochs["finetune"] = trainer.current_epoch

    after = run_test(trainer or tester, module, dm)
    flops_after, params_after = measure_cost(module.net, shape)
    channels_after = channel_widths(module.net, example)
    latency_after = measure_latency(module.net, shape, device, latency_bs, latency_iters) \
        if is_zero and latency_iters > 0 else None

    prune_s = sum(pruner.round_times) if pruner is not None else 0.0
    target = None if pruner is None else float(pruner.target)
    resource = None if pruner is None else pruner.resource
    kept = {"flops": flops_after / flops_before, "params": params_after / params_before,
            "channels": sum(channels_after.values()) / max(sum(channels_before.values()), 1)}
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "prune": cfg.prune.name,
        "criterion": None if pruner is None else (pruner.criterion if isinstance(pruner.criterion, str)
                                                  else getattr(pruner.criterion, "__name__", "callable")),
        "target": target,
        "target_resource": resource,
        "seed": cfg.seed,
        "test_acc_before": before["test/acc"],
        "test_acc_pruned": None if monitor is None else monitor.acc_pruned,
        "test_acc_after": after["test/acc"],
        "test_acc": after["test/acc"],
        "test_loss": after["test/loss"],
    }
    if "test/acc_top5" in after:
        summary["test_acc_top5"] = after["test/acc_top5"]
    summary.update(
        flops_before=flops_before,
        flops_after=flops_after,
        flops=flops_after,
        flops_kept=round(kept["flops"], 6),
        params_before=params_before,
        params_after=params_after,
        params=params_after,
        params_kept=round(kept["params"], 6),
        dense_flops=dense_flops,
        dense_params=dense_params,
        target_met=None if pruner is None else bool(kept[resource] <= target + 1e-9),  # type: ignore[index, operator]
        channels_before=channels_before,
        channels_after=channels_after,
        latency_device=str(device),
        latency_batch_size=latency_bs,
        latency_threads=torch.get_num_threads() if device.type == "cpu" else None,
        latency_before_ms=latency_before,
        latency_after_ms=latency_after,
        prune_rounds=len(pruner.round_times) if pruner is not None else 0,
        pruning_finished_epoch=None if monitor is None else monitor.epoch,
        epochs_pretrain=epochs["pretrain"],
        epochs_prune=epochs["prune"],
        epochs_finetune=epochs["finetune"],
        epochs=sum(epochs.values()),
        pretrain_cached=cached,
        wall_pretrain_s=round(walls["pretrain"], 2),
        wall_prune_s=round(prune_s, 2),
        wall_finetune_s=round(walls["prune_phase"] - prune_s + walls["finetune"], 2),
    )
    if is_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        if report_cfg.get("plot", True) and channels_before:
            from lightning_ifprune.report import CHANNELS_FILE, plot_channels

            title = (f"{cfg.model.name} on {cfg.data.name}, prune={cfg.prune.name}: FLOPs kept "
                     f"{kept['flops']:.3f}, channels {sum(channels_before.values())} → "
                     f"{sum(channels_after.values())}")
            plot_channels(channels_before, channels_after, out_dir / CHANNELS_FILE, title)
            files["channels_plot"] = CHANNELS_FILE
        if export_cfg.get("enabled", True):
            name, kwargs = _net_kwargs(cfg)
            history = plain_history(pruning_state(module)["history"], strip_prefix=NET_PREFIX)
            paths = export_pruned(module.net, out_dir, example_input=example, history=history, model=name,
                                  num_classes=dm.num_classes, in_channels=shape[0], model_kwargs=kwargs,
                                  torchscript=bool(export_cfg.get("torchscript", True)))
            files.update({f"export_{k}": p.name for k, p in paths.items()})
    summary["files"] = files
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    if is_zero:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return summary
