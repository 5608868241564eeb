"""One phase of a run (pre-train, prune, fine-tune): a fresh Trainer, optimizer and schedule.

Also where a run's starting weights come from: ``init_from`` and the pre-train cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_ifprune.app.instantiators import make_trainer, phase_config
from lightning_ifprune.checkpoint import CHECKPOINT_KEY, read_checkpoint, restore_architecture
from lightning_ifprune.data import ImageDataModule
from lightning_ifprune.module import ImageClassifier

NET_PREFIX = "net."


@dataclass
class PhaseRun:
    """What one phase did: its trainer (None when skipped or cached), wall time, epochs."""

    trainer: pl.Trainer | None = None
    wall_s: float = 0.0
    epochs: int = 0


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


def run_phase(
    cfg: DictConfig,
    module: ImageClassifier,
    dm: ImageDataModule,
    phase: str,
    epochs: int,
    callbacks: list[pl.Callback],
    *,
    seed: int | None,
    optimization: str | None,
) -> PhaseRun:
    """Fit ``module`` for ``epochs`` epochs as phase ``phase`` (seeded with ``seed``; None goes
    on with the current RNG state), with the optimizer and schedule of ``cfg.<optimization>``
    (else ``cfg.model``)."""
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    trainer = make_trainer(cfg, phase, epochs, callbacks)
    set_phase_optimization(module, cfg, optimization, epochs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return PhaseRun(trainer, time.perf_counter() - start, trainer.current_epoch)


def load_initial_weights(module: ImageClassifier, path: str | os.PathLike) -> None:
    """Initialise ``module`` from a Lightning checkpoint, an exported ``pruned_state.pt`` or a
    plain ``state_dict`` of the net (``torch.save(net.state_dict(), path)``).

    A pruning history in the file is replayed onto the fresh net first, so pruned
    checkpoints load (what :func:`~lightning_ifprune.load_pruned_checkpoint` does).
    """
    checkpoint = read_checkpoint(path)
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
    restore_architecture(module, {CHECKPOINT_KEY: saved, "state_dict": state} if saved else {}, source=str(path))
    module.load_state_dict(state, strict=True)


def pretrain_cache_file(cfg: DictConfig, epochs: int) -> Path | None:
    """Where the pre-trained weights of this configuration are cached (None: no cache)."""
    root = cfg.pretrain.cache_dir
    if not root:
        return None
    pcfg = phase_config(cfg, epochs)
    trainer = OmegaConf.to_container(pcfg.trainer, resolve=True)
    assert isinstance(trainer, dict)
    for key in (
        "default_root_dir",
        "enable_progress_bar",
        "log_every_n_steps",
        "enable_model_summary",
    ):
        trainer.pop(key, None)
    optimizer, scheduler = phase_optimization_nodes(cfg, "pretrain", epochs)
    key = {
        "data": OmegaConf.to_container(pcfg.data, resolve=True),
        "net": OmegaConf.to_container(pcfg.model.net, resolve=True),
        "label_smoothing": pcfg.model.get("label_smoothing"),
        "epochs": epochs,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "trainer": trainer,
        "seed": pcfg.seed,
        "init_from": pcfg.init_from,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / f"{cfg.choices.data}-{cfg.model.name}-seed{cfg.seed}-{digest}.pt"


def pretrain(
    cfg: DictConfig,
    module: ImageClassifier,
    dm: ImageDataModule,
    out_dir: Path,
    callbacks: list[pl.Callback],
) -> tuple[PhaseRun, bool]:
    """Phase 1 (``cfg.pretrain.epochs``, 0 skips it), or its cached result; returns the run
    and whether it came from the cache."""
    epochs = int(cfg.pretrain.epochs or 0)
    if epochs <= 0:
        return PhaseRun(), False
    cache = pretrain_cache_file(cfg, epochs)
    if cache is not None and cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        module.load_state_dict(stored["state_dict"])
        pl.utilities.rank_zero_info(f"[ifprune] pre-trained weights from the cache {cache}")
        return PhaseRun(None, float(stored["wall_s"]), int(stored["epochs"])), True
    # The run's seed_everything(cfg.seed) before the module was built seeds this phase too.
    run = run_phase(cfg, module, dm, "pretrain", epochs, callbacks, seed=None, optimization="pretrain")
    assert run.trainer is not None
    if cfg.pretrain.save_checkpoint:
        run.trainer.save_checkpoint(out_dir / "pretrained.ckpt")
    if cache is not None and run.trainer.is_global_zero:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {
                "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                "epochs": run.epochs,
                "wall_s": run.wall_s,
            },
            tmp,
        )
        os.replace(tmp, cache)
    return run, False
