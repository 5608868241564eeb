"""``InfluencePruningCallback``: scheduled global channel pruning inside ``Trainer.fit``.

The callback only orchestrates: it draws batches, asks a criterion for scores, averages
them across ranks, selects channels (:mod:`~lightning_ifprune.selection`), removes them
(:mod:`~lightning_ifprune.surgery`), re-points the optimizers (:mod:`~lightning_ifprune.optim`),
re-wraps DDP, and keeps the history in every checkpoint (:mod:`~lightning_ifprune.checkpoint`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_ifprune.batch import Batch, first_sample
from lightning_ifprune.checkpoint import (
    pruning_state,
    record_pruning,
    restore_on_load,
    save_pruning_state,
)
from lightning_ifprune.criteria import (
    Criterion,
    CriterionFn,
    criterion_name,
    needs_data,
    resolve_criterion,
    score_structure,
)
from lightning_ifprune.fit_loop import (
    agree,
    draw_batches,
    log_metrics,
    optimizer_weight_decay,
    rewrap_ddp,
    round_metrics,
)
from lightning_ifprune.loss import LossClosure, OutputsTargetsLoss, inputs_and_targets, resolve_loss
from lightning_ifprune.optim import repoint_optimizer
from lightning_ifprune.schedule import PruningSchedule, check_int
from lightning_ifprune.selection import (
    NORMALIZATIONS,
    Baseline,
    baseline_of,
    check_reachable,
    parse_target,
    resource_size,
    select_channels,
)
from lightning_ifprune.structure import ChannelStructure, resolve_min_keep
from lightning_ifprune.surgery import SurgeryResult, prune_channels


class InfluencePruningCallback(Callback):
    """Prune channels globally during ``fit``, physically, and keep fine-tuning.

    Args:
        target_flops / target_params / target_channels: the fraction of the original model
            to keep (exactly one).
        start_epoch, end_epoch, rounds, split, every_n_steps, channels_per_step: the
            schedule (:class:`~lightning_ifprune.schedule.PruningSchedule`): ``rounds`` rounds
            at epoch starts from ``start_epoch`` to ``end_epoch``, or progressive steps of
            ``channels_per_step`` channels every ``every_n_steps`` optimizer steps.
        criterion: a name (``"influence"``, the default, or a baseline), a
            :class:`~lightning_ifprune.criteria.Criterion` such as ``Influence(cg_iters=5)``,
            or a callable ``fn(structure, batches, loss) -> {group: scores}``. An influence
            criterion without ``weight_decay`` takes the optimizer's.
        num_batches: training batches drawn per round for data-driven criteria.
        normalize: score ÷ cost normalisation, ``"none"``, ``"cost"`` or ``"sqrt"``.
        ignored_layers, min_channels: layers whose channels stay; least channels per group
            (a count, or a fraction of the original width).
        example_input: a batch to trace the model with (default: the module's
            ``example_input_array`` or the first sample of the first training batch).
        loss: a closure ``loss(module, batch) -> scalar``; or ``loss_fn(outputs, targets)``
            for ``(inputs, targets)`` batches. Default: cross-entropy on ``(inputs, targets)``.
    """

    def __init__(
        self,
        target_flops: float | None = None,
        target_params: float | None = None,
        target_channels: float | None = None,
        *,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        rounds: int = 1,
        split: str = "geometric",
        every_n_steps: int | None = None,
        channels_per_step: int = 1,
        criterion: str | Criterion | CriterionFn = "influence",
        num_batches: int = 2,
        normalize: str = "sqrt",
        ignored_layers: Sequence[str] = (),
        min_channels: int | float = 1,
        example_input: torch.Tensor | None = None,
        loss: LossClosure | None = None,
        loss_fn: OutputsTargetsLoss | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.resource, self.target = parse_target(target_flops, target_params, target_channels)
        self.schedule = PruningSchedule(start_epoch, end_epoch, rounds, split, every_n_steps, channels_per_step)
        self.criterion = resolve_criterion(criterion)
        check_int("num_batches", num_batches, 1)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        resolve_min_keep(min_channels, 1)
        if example_input is not None and not isinstance(example_input, torch.Tensor):
            raise ValueError("example_input must be a tensor batch, e.g. torch.randn(1, 3, 32, 32)")
        self.num_batches, self.normalize = num_batches, normalize
        self.ignored_layers, self.min_channels = tuple(ignored_layers), min_channels
        self.example_input, self.verbose = example_input, verbose
        self.loss = resolve_loss(loss, loss_fn) or resolve_loss(None, F.cross_entropy)
        self._scorer: Criterion | CriterionFn = self.criterion
        # Schedule state (travels in checkpoints).
        self.rounds_done = 0
        self.finished = False
        self.baseline: Baseline | None = None
        self.original_sizes: dict[str, int] = {}
        self.round_times: list[float] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            resource=self.resource, target=self.target, criterion=criterion_name(self.criterion)
        )

    # ------------------------------------------------------------------ lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise RuntimeError(
                f"InfluencePruningCallback does not support the {type(trainer.strategy).__name__} strategy (use ddp)"
            )
        restore_on_load(pl_module)  # fit(ckpt_path=...) rebuilds the pruned layers before loading

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        example = self._example(trainer, pl_module)
        structure = self._structure(pl_module, example)
        if not structure.groups:
            raise ValueError("InfluencePruningCallback: the model has no prunable channel group")
        if self.baseline is None:
            if pruning_state(pl_module)["history"]:
                raise ValueError("the module is already pruned; resume from its checkpoint instead")
            self.baseline = baseline_of(structure)
            self.original_sizes = structure.widths()
            structure = self._structure(pl_module, example)  # min_channels of the original widths
        hint = f" (min_channels={self.min_channels!r}, ignored_layers={list(self.ignored_layers)})"
        check_reachable(structure, self.resource, self.target, self.baseline, hint)
        self._scorer = (
            self.criterion.for_optimizer(optimizer_weight_decay(trainer))
            if isinstance(self.criterion, Criterion)
            else self.criterion
        )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.progressive or self.finished:
            return
        epochs = self.schedule.round_epochs()
        while self.rounds_done < self.schedule.rounds and epochs[self.rounds_done] <= trainer.current_epoch:
            fraction = self.schedule.round_target(self.rounds_done + 1, self.target)
            if self._round(trainer, pl_module, fraction=fraction) is None:
                return
            self.rounds_done += 1
        self.finished = self.rounds_done >= self.schedule.rounds

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.finished or not self.schedule.step_due(trainer.current_epoch, trainer.global_step, self.rounds_done):
            return
        self.rounds_done = trainer.global_step // self.schedule.every_n_steps
        self._round(trainer, pl_module, count=self.schedule.channels_per_step)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        save_pruning_state(pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds_done": self.rounds_done,
            "finished": self.finished,
            "baseline": None if self.baseline is None else vars(self.baseline).copy(),
            "original_sizes": dict(self.original_sizes),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_done = int(state_dict["rounds_done"])
        self.finished = bool(state_dict["finished"])
        base = state_dict.get("baseline")
        self.baseline = None if base is None else Baseline(**base)
        self.original_sizes = dict(state_dict.get("original_sizes", {}))

    # ------------------------------------------------------------------ one round
    def _round(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        fraction: float | None = None,
        count: int | None = None,
    ) -> SurgeryResult | None:
        """Score, agree across ranks, select, prune, re-point the optimizer. None = abandoned."""
        start = time.perf_counter()
        example = self._example(trainer, pl_module)
        structure = self._structure(pl_module, example)
        if resource_size(structure, self.resource, {}) <= self.target * getattr(self.baseline, self.resource):
            self.finished = True
            return SurgeryResult()
        batches = draw_batches(trainer, pl_module, self.num_batches) if needs_data(self._scorer) else []
        shown = tqdm(
            batches,
            desc="[ifprune] scoring",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.verbose and trainer.is_global_zero and len(batches) > 1),
        )
        scores = agree(trainer, score_structure(structure, shown, self.loss, self._scorer), pl_module.device)
        if not all(torch.isfinite(s).all() for s in scores.values()):
            rank_zero_warn(
                "pruning round abandoned, model untouched: the scores contain NaN or inf (is the training loss finite?)"
            )
            return None
        plan = select_channels(
            structure,
            scores,
            self.resource,
            self.target if count else fraction,
            self.normalize,
            self.baseline,
            max_channels=count,
        )
        plan = trainer.strategy.broadcast(plan, src=0)
        if not plan:
            return SurgeryResult()
        result = prune_channels(structure, plan)
        record_pruning(pl_module, result.history_step, example)
        for optimizer in trainer.optimizers:
            repoint_optimizer(optimizer, result)
        if isinstance(trainer.strategy, DDPStrategy):
            rewrap_ddp(trainer)
        elapsed = time.perf_counter() - start
        self.round_times.append(elapsed)
        metrics = round_metrics(structure, result.removed, scores, self.baseline, elapsed)
        log_metrics(trainer, metrics)
        if self.verbose and not self.schedule.progressive:
            rank_zero_info(
                f"[ifprune] epoch {trainer.current_epoch}: FLOPs {metrics['prune/flops_kept']:.3f}, params "
                f"{metrics['prune/params_kept']:.3f} of the original ({elapsed:.2f}s)"
            )
        return result

    # ------------------------------------------------------------------ helpers
    def _structure(self, pl_module: LightningModule, example: torch.Tensor) -> ChannelStructure:
        return ChannelStructure.build(
            pl_module,
            example,
            ignored_layers=self.ignored_layers,
            min_channels=self.min_channels,
            original_sizes=self.original_sizes or None,
        )

    def _example(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        if self.example_input is None:
            stored = pruning_state(pl_module)["example_input"]
            array = getattr(pl_module, "example_input_array", None)
            if stored is not None:
                self.example_input = stored
            elif isinstance(array, torch.Tensor):
                self.example_input = array[:1]
            else:
                batch: Batch = draw_batches(trainer, None, 1)[0]
                self.example_input = first_sample(inputs_and_targets(batch)[0])
        ref = next(pl_module.parameters())
        x = self.example_input.to(ref.device)
        return x.to(ref.dtype) if x.is_floating_point() else x
