"""``train(cfg)``: the Hydra application behind ``train.py`` — pre-train, prune, fine-tune, report.

A composed config becomes objects — data module, net, ``ImageClassifier``, loggers, the
optional prune callback — and up to three phases run on the same module, each with a fresh
``Trainer`` (from ``cfg.trainer``), a fresh optimizer and a fresh LR schedule
(:func:`~lightning_ifprune.app.phases.run_phase`):

1. **pretrain** — ``cfg.pretrain.epochs`` epochs without pruning (0 skips it; a checkpoint
   given as ``init_from`` is loaded before it). The test set then gives ``test_acc_before``:
   the accuracy of exactly the network that phase 2 starts pruning.
2. **prune** — ``cfg.trainer.max_epochs`` epochs with the callback of ``cfg.prune``, whose
   ``start_epoch``/``end_epoch`` count from the start of this phase. Unless a separate
   fine-tune is configured, the epochs after the last round are the fine-tune. With
   ``prune=none`` this phase trains the dense net for the same budget (the control).
3. **finetune** — only when ``cfg.finetune.epochs`` is set: phase 2 then ends with the epoch
   in which pruning finished and this phase fine-tunes the pruned net apart (the reference's
   protocol). With ``prune=none`` phase 2 is skipped and this phase trains the dense net.

Phases take their optimizer and scheduler from ``cfg.<phase>.optimizer``/``scheduler`` when
set, else from ``cfg.model``; ``${trainer.max_epochs}`` inside them resolves to the phase's own
epochs. Phases are seeded ``seed``, ``seed + 1``, ``seed + 2``, so a phase does not depend on
whether the one before it ran or came from the pre-train cache (``pretrain.cache_dir``).

Outputs in ``cfg.output_dir``: ``summary.json`` (:class:`~lightning_ifprune.app.summary.RunSummary`),
``channels.png``, ``pruned_state.pt`` and ``model.pt`` (:mod:`lightning_ifprune.export`),
``pretrained.ckpt``, and per-phase logs and checkpoints. Config names come from Hydra's
choices (``cfg.choices``); every default lives in ``conf/``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_ifprune.app.callbacks import KeepPruningState, PruningMonitor
from lightning_ifprune.app.instantiators import build_module, build_pruner, make_test_trainer
from lightning_ifprune.app.phases import (
    NET_PREFIX,
    PhaseRun,
    load_initial_weights,
    pretrain,
    run_phase,
)
from lightning_ifprune.app.summary import RunSummary, Snapshot
from lightning_ifprune.app.task import Task, task_of
from lightning_ifprune.checkpoint import recorded_history
from lightning_ifprune.criteria import criterion_name
from lightning_ifprune.export import export_pruned, plain_history
from lightning_ifprune.measure import measure_cost
from lightning_ifprune.report import CHANNELS_FILE, plot_channels, print_summary


def train(cfg: DictConfig) -> dict:
    """Pre-train, prune, fine-tune and test as configured; returns what ``summary.json`` holds."""
    start = time.perf_counter()
    check_inputs(cfg)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # in-memory data on purpose
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out_dir = Path(cfg.output_dir)
    dm = instantiate(cfg.data)
    task = task_of(cfg)
    module = build_module(cfg, dm)
    dense_flops, dense_params = measure_cost(module.net, task.example(tuple(dm.input_shape)))
    pruner = build_pruner(cfg)
    if cfg.init_from:
        load_initial_weights(module, cfg.init_from)
        if pruner is not None and recorded_history(module)[0]:
            raise ValueError(
                f"init_from={cfg.init_from} is already pruned; the prune callback starts from "
                "an unpruned net. Fine-tune it with prune=none, or start from the unpruned checkpoint."
            )
    measure = dict(
        latency_batch_size=int(cfg.report.latency_batch_size),
        latency_iters=int(cfg.report.latency_iters),
    )

    pre, cached = pretrain(cfg, module, dm, out_dir, [KeepPruningState()])
    tester = pre.trainer or make_test_trainer(cfg)
    before = Snapshot.take(tester, module, dm, task, **measure)

    ft_epochs = cfg.finetune.epochs
    main_epochs = int(cfg.trainer.max_epochs)
    prune_run, monitor = PhaseRun(), None
    if main_epochs > 0 and (pruner is not None or ft_epochs is None):
        if pruner is not None:
            monitor = PruningMonitor(
                pruner,
                dm,
                evaluate=bool(cfg.report.eval_after_pruning),
                stop_when_pruned=ft_epochs is not None,
                metric=task.evaluate,
            )
        callbacks = [pruner, monitor] if pruner is not None else [KeepPruningState()]
        prune_run = run_phase(
            cfg,
            module,
            dm,
            "prune" if pruner is not None else "train",
            main_epochs,
            callbacks,
            seed=cfg.seed + 1,
            optimization=None,
        )
    ft_run = PhaseRun()
    if ft_epochs:
        ft_run = run_phase(
            cfg,
            module,
            dm,
            "finetune",
            int(ft_epochs),
            [KeepPruningState()],
            seed=cfg.seed + 2,
            optimization="finetune",
        )
    last = ft_run.trainer or prune_run.trainer or tester
    after = Snapshot.take(last, module, dm, task, **measure)

    prune_s = sum(pruner.round_times) if pruner is not None else 0.0
    resource = None if pruner is None else pruner.resource
    kept = {
        "flops": after.flops / before.flops,
        "params": after.params / before.params,
        "channels": sum(after.channels.values()) / max(sum(before.channels.values()), 1),
    }
    predicted = (None, None)
    if pruner is not None and pruner.baseline is not None and pruner.baseline.latency:
        predicted = (pruner.baseline.latency, pruner.latency_ms(module))
        kept["latency"] = predicted[1] / predicted[0]
    device = tester.strategy.root_device
    pruned = None if monitor is None else monitor.acc_pruned
    summary = RunSummary(
        model=cfg.model.name,
        data=cfg.choices.data,
        prune=cfg.choices.prune,
        criterion=None if pruner is None else criterion_name(pruner.criterion),
        target=None if pruner is None else float(pruner.target),
        target_resource=resource,
        seed=cfg.seed,
        metric=task.metric,
        test_before=before.test[f"test/{task.metric}"],
        test_pruned=pruned,
        test_after=after.test[f"test/{task.metric}"],
        test_metrics_before=before.test,
        test_metrics_after=after.test,
        test_acc_before=before.test.get("test/acc"),
        test_acc_pruned=pruned if task.metric == "acc" else None,
        test_acc_after=after.test.get("test/acc"),
        test_loss=after.test.get("test/loss"),
        test_acc_top5=after.test.get("test/acc_top5"),
        flops_before=before.flops,
        flops_after=after.flops,
        flops_kept=round(kept["flops"], 6),
        params_before=before.params,
        params_after=after.params,
        params_kept=round(kept["params"], 6),
        dense_flops=dense_flops,
        dense_params=dense_params,
        target_met=None if pruner is None else bool(kept[resource] <= pruner.target + 1e-9),
        channels_before=before.channels,
        channels_after=after.channels,
        latency_device=str(device),
        latency_batch_size=measure["latency_batch_size"],
        latency_threads=torch.get_num_threads() if device.type == "cpu" else None,
        latency_before_ms=before.latency_ms,
        latency_after_ms=after.latency_ms,
        latency_predicted_before_ms=predicted[0],
        latency_predicted_after_ms=predicted[1],
        prune_rounds=len(pruner.round_times) if pruner is not None else 0,
        pruning_finished_epoch=None if monitor is None else monitor.epoch,
        epochs_pretrain=pre.epochs,
        epochs_prune=prune_run.epochs,
        epochs_finetune=ft_run.epochs,
        epochs=pre.epochs + prune_run.epochs + ft_run.epochs,
        pretrain_cached=cached,
        wall_pretrain_s=round(pre.wall_s, 2),
        wall_prune_s=round(prune_s, 2),
        wall_finetune_s=round(prune_run.wall_s - prune_s + ft_run.wall_s, 2),
    )
    if tester.is_global_zero:
        write_outputs(cfg, module, dm, summary, out_dir, pretrained=pre.trainer is not None, task=task)
    summary.wall_s = round(time.perf_counter() - start, 2)
    if tester.is_global_zero:
        summary.write(out_dir / "summary.json")
        print_summary(summary.as_dict())
    return summary.as_dict()


def check_inputs(cfg: DictConfig) -> None:
    """Fail before any building or training when ``init_from`` names no file."""
    if not cfg.init_from:
        return
    path = Path(str(cfg.init_from))
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "no such file"
        where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
        raise FileNotFoundError(f"init_from={cfg.init_from}: {what}{where}")


def write_outputs(
    cfg: DictConfig,
    module: pl.LightningModule,
    dm,
    summary: RunSummary,
    out_dir: Path,
    pretrained: bool,
    task: Task,
) -> None:
    """The channel plot and the exports; records what was written in ``summary.files``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if pretrained and cfg.pretrain.save_checkpoint:
        summary.files["pretrained_ckpt"] = "pretrained.ckpt"
    if cfg.report.plot and summary.channels_before:
        title = (
            f"{summary.model} on {summary.data}, prune={summary.prune}: FLOPs kept {summary.flops_kept:.3f}, "
            f"channels {sum(summary.channels_before.values())} → {sum(summary.channels_after.values())}"
        )
        plot_channels(summary.channels_before, summary.channels_after, out_dir / CHANNELS_FILE, title)
        summary.files["channels_plot"] = CHANNELS_FILE
    if cfg.export.enabled:
        node = OmegaConf.to_container(cfg.model.net, resolve=True)
        assert isinstance(node, dict)
        is_zoo = node.get("_target_") == "lightning_ifprune.models.build_model"
        net_cfg = {k: v for k, v in node.items() if not str(k).startswith("_")}
        history = plain_history(recorded_history(module)[0], strip_prefix=NET_PREFIX)
        paths = export_pruned(
            module.net,
            out_dir,
            example_input=task.example(tuple(dm.input_shape)),
            history=history,
            model=str(net_cfg.pop("name")) if is_zoo else None,
            num_classes=dm.num_classes,
            in_channels=dm.input_shape[0],
            model_kwargs=net_cfg if is_zoo else {},
            torchscript=bool(cfg.export.torchscript),
        )
        summary.files.update({f"export_{k}": p.name for k, p in paths.items()})
