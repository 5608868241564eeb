"""What the pruning callback needs from a running ``Trainer``: batches, ranks, DDP, logs.

Kept apart so that :mod:`lightning_ifprune.callback` reads as the orchestration it is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric
from tqdm.auto import tqdm

from lightning_ifprune.batch import Batch
from lightning_ifprune.checkpoint import pruning_state
from lightning_ifprune.loss import inputs_and_targets
from lightning_ifprune.selection import Baseline
from lightning_ifprune.structure import ChannelStructure, Example, single_sample, validate_example_inputs


class TrainingStepLoss:
    """``loss(module, batch)``: the loss a LightningModule trains with.

    ``module.pruning_loss(batch)`` when the module defines it; else the loss its
    ``training_step(batch, 0)`` returns (a tensor, or the ``"loss"`` of a dict), with
    ``self.log``/``self.log_dict`` silenced and every torchmetrics state restored afterwards,
    so scoring leaves no trace in the logs or the metrics. Either runs on a fork of the random
    generators: the global RNG is left untouched, and a loss that samples (Faster R-CNN's
    proposal sampler) samples alike in every evaluation of the same batch.
    """

    def __call__(self, module: LightningModule, batch: Batch) -> torch.Tensor:
        device = getattr(module, "device", torch.device("cpu"))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._loss(module, batch)

    def _loss(self, module: LightningModule, batch: Batch) -> torch.Tensor:
        custom = getattr(module, "pruning_loss", None)
        if callable(custom):
            return custom(batch)
        if not getattr(module, "automatic_optimization", True):
            raise ValueError(
                f"{type(module).__name__} uses manual optimization: its training_step steps the optimizer, so "
                "it cannot be called to score channels; define pruning_loss(self, batch) or pass loss="
            )
        with _quiet(module):
            out = module.training_step(batch, 0)
        if isinstance(out, Mapping):
            out = out.get("loss")
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{type(module).__name__}.training_step returned {type(out).__name__}, not a loss tensor (or a dict "
                "with 'loss'); define pruning_loss(self, batch) or pass loss= to the callback"
            )
        return out

    def __repr__(self) -> str:
        return "TrainingStepLoss()"


@contextmanager
def _quiet(module: LightningModule) -> Iterator[None]:
    """``module.log``/``log_dict`` as no-ops and its metrics' states kept, for the duration."""
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    saved = [(m, copy.deepcopy(m.metric_state), m.__dict__.get("_update_count"), m.__dict__.get("_computed"))
             for m in metrics]  # fmt: skip
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict
        for metric, state, count, computed in saved:
            for key, value in state.items():
                setattr(metric, key, value)
            metric.__dict__.update(_update_count=count, _computed=computed)


def training_loader(trainer: Trainer) -> Iterable:
    """The (first) training dataloader, set up if the fit loop has not done so yet."""
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)):
        loader = loader[0]
    return loader


def draw_batches(trainer: Trainer, pl_module: LightningModule | None, count: int) -> list[Batch]:
    """``count`` fresh training batches, moved to ``pl_module``'s device (when given) by
    Lightning's own ``transfer_batch_to_device``; the global RNG is left as it was."""
    on_cuda = pl_module is not None and pl_module.device.type == "cuda"
    loader = training_loader(trainer)  # outside the fork: setting the data up draws as it would in fit
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if on_cuda else []):
        batches = list(islice(iter(loader), count))
    if not batches:
        raise ValueError("InfluencePruningCallback: the training dataloader is empty")
    if pl_module is not None:
        batches = [pl_module.transfer_batch_to_device(b, pl_module.device, 0) for b in batches]
    return batches


def trace_example(trainer: Trainer, pl_module: LightningModule) -> Example:
    """The input to trace ``pl_module`` with (one sample, on CPU), by this rule:

    1. the one its pruning history recorded;
    2. its ``example_input_array`` (Lightning's convention: a tensor is the input, a tuple
       positional arguments, a dict keyword arguments; a list is one list of samples);
    3. else the inputs of the first training batch (``inputs_and_targets``: the first item of
       a tuple/list batch, the ``"input"`` key or first value of a dict), cut to one sample —
       for a detection batch ``(images, targets)`` that is ``[images[0]]``.

    See :mod:`lightning_ifprune.structure.example` for what the forms mean.
    """
    stored = pruning_state(pl_module)["example_input"]
    if stored is not None:
        return stored
    array = getattr(pl_module, "example_input_array", None)
    if array is not None:
        return single_sample(validate_example_inputs(array))
    batch = draw_batches(trainer, None, 1)[0]
    try:
        inputs = inputs_and_targets(batch)[0]
    except TypeError as err:
        raise ValueError(
            f"InfluencePruningCallback cannot tell the model's input in a {type(batch).__name__} batch ({err}); "
            "pass example_input= or set the module's example_input_array"
        ) from err
    return single_sample(validate_example_inputs(inputs))


def optimizer_weight_decay(trainer: Trainer) -> float:
    """The first optimizer param group's weight decay (0 without optimizers)."""
    decays = [g.get("weight_decay", 0.0) for o in trainer.optimizers for g in o.param_groups]
    return float(decays[0]) if decays else 0.0


def agree(trainer: Trainer, scores: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The scores averaged over ranks (the same on every rank), on CPU in float64."""
    flat = torch.cat([s.double().flatten() for s in scores.values()]).to(device)
    if trainer.world_size > 1:
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = flat[i : i + s.numel()].cpu()
        i += s.numel()
    return out


def rewrap_ddp(trainer: Trainer) -> None:
    """Wrap the pruned module in a fresh ``DistributedDataParallel`` (its buckets know the
    old parameters)."""
    if isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1:
        trainer.strategy.model = trainer.strategy._setup_model(trainer.strategy.model.module)
        trainer.strategy._register_ddp_hooks()


def round_metrics(
    structure: ChannelStructure,
    removed: Mapping[str, int],
    scores: Mapping[str, torch.Tensor],
    baseline: Baseline,
    elapsed: float,
) -> dict[str, float]:
    """The ``prune/*`` metrics of a round: the model after it (from the pre-round structure's
    exact cost model), relative to ``baseline``, and the spread of the scores."""
    flops, params = structure.cost(removed)
    widths = {n: w - removed.get(n, 0) for n, w in structure.widths().items()}
    flat = torch.cat(list(scores.values())).double()
    metrics = {
        "prune/flops": float(flops),
        "prune/params": float(params),
        "prune/flops_kept": flops / baseline.flops,
        "prune/params_kept": params / baseline.params,
        "prune/channels": float(sum(widths.values())),
        "prune/round_s": elapsed,
        "prune/score_mean": float(flat.mean()),
        "prune/score_std": float(flat.std()) if flat.numel() > 1 else 0.0,
        "prune/score_min": float(flat.min()),
        "prune/score_max": float(flat.max()),
    }
    metrics.update({f"prune/width/{n}": float(w) for n, w in widths.items()})
    return metrics


def log_metrics(trainer: Trainer, metrics: Mapping[str, Any], announce: bool = False) -> None:
    """Send ``metrics`` to every logger at the current global step; with ``announce``, also say
    on rank 0 how much of the model a round left."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)
    if announce:
        rank_zero_info(
            f"[ifprune] epoch {trainer.current_epoch}: FLOPs {metrics['prune/flops_kept']:.3f}, params "
            f"{metrics['prune/params_kept']:.3f} of the original ({metrics['prune/round_s']:.2f}s)"
        )


def scoring_progress(trainer: Trainer, batches: list[Batch], verbose: bool) -> Iterable[Batch]:
    """``batches`` behind a progress bar on rank 0 (when verbose and there are several)."""
    show = verbose and trainer.is_global_zero and len(batches) > 1
    return tqdm(batches, desc="[ifprune] scoring", leave=False, dynamic_ncols=True, disable=not show)
