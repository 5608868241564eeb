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
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_ifprune.batch import to_compute
from lightning_ifprune.checkpoint import (
    recorded_history,
    restore_on_load,
    save_pruning_state,
)
from lightning_ifprune.criteria import (
    Criterion,
    CriterionFn,
    criterion_name,
    for_optimizer,
    needs_data,
    resolve_criterion,
    score_structure,
)
from lightning_ifprune.fit_loop import (
    TrainingStepLoss,
    agree,
    draw_batches,
    log_metrics,
    optimizer_weight_decay,
    rewrap_ddp,
    round_metrics,
    scoring_progress,
    trace_example,
)
from lightning_ifprune.latency import LatencyModel
from lightning_ifprune.loss import LossClosure, OutputsTargetsLoss, resolve_loss
from lightning_ifprune.optim import repoint_optimizer
from lightning_ifprune.schedule import PruningSchedule, check_int
from lightning_ifprune.selection import (
    NORMALIZATIONS,
    Baseline,
    RoundTo,
    baseline_of,
    check_reachable,
    check_round_to,
    kept_fraction,
    parse_target,
    select_channels,
)
from lightning_ifprune.structure import ChannelStructure, Example, resolve_min_keep, validate_example_inputs
from lightning_ifprune.surgery import SurgeryResult, prune_channels


class InfluencePruningCallback(Callback):
    """Prune channels globally during ``fit``, physically, and keep fine-tuning.

    Args:
        target_flops / target_params / target_channels / target_latency: the fraction of the
            original model to keep (exactly one). ``target_latency`` is measured latency: a
            :class:`~lightning_ifprune.latency.LatencyModel` timed at fit start on the model's
            device at ``latency_batch_size`` (cached on disk), whose per-channel savings
            replace FLOPs in the selection.
        round_to: every pruned group keeps a multiple of it (rounded down, never below
            ``min_channels``, the target still met). ``"auto"`` (default): with a latency
            target the device's channel block (16 on an AVX-512 CPU, 8 with AVX2 or on CUDA),
            halved while the target is unreachable at it, else no rounding; None: never round.
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
        example_input: what to trace the model with: a batched tensor, a tuple of positional
            arguments, a dict of keyword arguments or a list of samples (a detector's images);
            default: the module's ``example_input_array``, else one sample of the first
            training batch's inputs (:func:`~lightning_ifprune.fit_loop.trace_example`).
        loss: a closure ``loss(module, batch) -> scalar``; or ``loss_fn(outputs, targets)``
            for ``(inputs, targets)`` batches. Default: the module's own training loss
            (:class:`~lightning_ifprune.fit_loop.TrainingStepLoss`: ``pruning_loss(batch)`` if
            defined, else what ``training_step`` returns).
    """

    def __init__(
        self,
        target_flops: float | None = None,
        target_params: float | None = None,
        target_channels: float | None = None,
        *,
        target_latency: float | None = None,
        latency_batch_size: int = 64,
        round_to: RoundTo = "auto",
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
        example_input: Example | None = None,
        loss: LossClosure | None = None,
        loss_fn: OutputsTargetsLoss | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.resource, self.target = parse_target(target_flops, target_params, target_channels, target_latency)
        check_int("latency_batch_size", latency_batch_size, 1)
        self.latency_batch_size, self.round_to = latency_batch_size, check_round_to(round_to)
        self.latency_model: LatencyModel | None = None
        self.schedule = PruningSchedule(start_epoch, end_epoch, rounds, split, every_n_steps, channels_per_step)
        self.criterion = resolve_criterion(criterion)
        check_int("num_batches", num_batches, 1)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        resolve_min_keep(min_channels, 1)
        if example_input is not None:
            validate_example_inputs(example_input)
        self.num_batches, self.normalize = num_batches, normalize
        self.ignored_layers, self.min_channels = tuple(ignored_layers), min_channels
        self.example_input, self.verbose = example_input, verbose
        self.loss = resolve_loss(loss, loss_fn) or TrainingStepLoss()
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
        if self.resource == "latency" and self.latency_model is None:
            progress = self.verbose and trainer.is_global_zero
            built = LatencyModel.build(structure, self.latency_batch_size, progress=progress)
            self.latency_model = trainer.strategy.broadcast(built, src=0)  # every rank decides alike
        if self.baseline is None:
            if recorded_history(pl_module)[0]:
                raise ValueError("the module is already pruned; resume from its checkpoint instead")
            self.baseline = baseline_of(structure, self.latency_model)
            self.original_sizes = structure.widths()
            if structure.unsafe:
                first = next(iter(structure.unsafe.values()))
                rank_zero_warn(
                    f"InfluencePruningCallback: {len(structure.unsafe)} channel group(s) keep all their channels, "
                    f"removing them is not safe (ChannelStructure.unsafe lists them all), e.g.: {first}"
                )
            structure = self._structure(pl_module, example)  # min_channels of the original widths
        hint = f" (min_channels={self.min_channels!r}, ignored_layers={list(self.ignored_layers)})"
        check_reachable(structure, self.resource, self.target, self.baseline, hint,
                        latency=self.latency_model, round_to=self.round_to)  # fmt: skip
        self._scorer = for_optimizer(self.criterion, optimizer_weight_decay(trainer))
        overrun = None if self.finished else self.schedule.overrun(trainer.max_epochs)
        if overrun:
            rank_zero_warn(f"InfluencePruningCallback: {overrun}; the target will not be reached")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.finished or self.baseline is None:
            return
        structure = self._structure(pl_module, self._example(trainer, pl_module))
        kept = kept_fraction(structure, self.resource, self.baseline, self.latency_model)
        self.finished = kept <= self.target
        if not self.finished:
            rank_zero_warn(
                f"InfluencePruningCallback: the target {self.resource}={self.target:g} was not reached by the end "
                f"of fit: the model keeps {kept:.3f} of its {self.resource} after {self.rounds_done} round(s)"
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
            "config": self._config(),
        }

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # A changed target or criterion changes the state key: adopt the one pruner state saved.
        states = checkpoint.get("callbacks") or {}
        saved = [k for k in states if isinstance(k, str) and k.startswith(type(self).__qualname__)]
        if self.state_key not in states and len(saved) == 1:
            self.load_state_dict(states[saved[0]])

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_done = int(state_dict["rounds_done"])
        base = state_dict.get("baseline")
        self.baseline = None if base is None else Baseline(**base)
        self.original_sizes = dict(state_dict.get("original_sizes", {}))
        old, new = state_dict.get("config", {}), self._config()
        changed = [f"{k} {old[k]!r} → {new[k]!r}" for k in new if k in old and old[k] != new[k]]
        self.finished = bool(state_dict["finished"]) and not changed
        if changed:
            if not self.schedule.progressive:  # at least the last round of the new schedule is still to run
                self.rounds_done = min(self.rounds_done, self.schedule.rounds - 1)
            rank_zero_warn(
                f"InfluencePruningCallback: resuming {self.resource}={self.target:g} with a changed configuration "
                f"({', '.join(changed)}); the new values apply from here on, after {state_dict['rounds_done']} round(s) done"
            )

    def _config(self) -> dict[str, Any]:
        """What a checkpoint remembers of the configuration, to tell a resume that changed it."""
        return dict(resource=self.resource, target=self.target, criterion=criterion_name(self.criterion),
                    round_to=self.round_to, **vars(self.schedule))  # fmt: skip

    def latency_ms(self, pl_module: LightningModule) -> float | None:
        """The latency model's prediction (ms per batch) for ``pl_module`` now; None without a latency target."""
        if self.latency_model is None or self.example_input is None:
            return None
        ref = next(pl_module.parameters())
        example = to_compute(self.example_input, ref.device, ref.dtype)
        return self.latency_model.predict(self._structure(pl_module, example))

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
        if kept_fraction(structure, self.resource, self.baseline, self.latency_model) <= self.target:
            self.finished = True
            return SurgeryResult()
        batches = draw_batches(trainer, pl_module, self.num_batches) if needs_data(self._scorer) else []
        shown = scoring_progress(trainer, batches, self.verbose)
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
            latency=self.latency_model,
            round_to=self.round_to,
        )
        plan = trainer.strategy.broadcast(plan, src=0)
        if not plan:
            return SurgeryResult()
        result = prune_channels(structure, plan)  # records the step on pl_module
        for optimizer in trainer.optimizers:
            repoint_optimizer(optimizer, result)
        if isinstance(trainer.strategy, DDPStrategy):
            rewrap_ddp(trainer)
        elapsed = time.perf_counter() - start
        self.round_times.append(elapsed)
        metrics = round_metrics(structure, result.removed, scores, self.baseline, elapsed)
        if self.latency_model is not None and self.baseline.latency:
            metrics["prune/latency_ms"] = self.latency_model.predict(structure, result.removed)
            metrics["prune/latency_kept"] = metrics["prune/latency_ms"] / self.baseline.latency
        log_metrics(trainer, metrics, announce=self.verbose and not self.schedule.progressive)
        return result

    def _structure(self, pl_module: LightningModule, example: Example) -> ChannelStructure:
        return ChannelStructure.build(pl_module, example, ignored_layers=self.ignored_layers,
                                      min_channels=self.min_channels, original_sizes=self.original_sizes or None)  # fmt: skip

    def _example(self, trainer: Trainer, pl_module: LightningModule) -> Example:
        if self.example_input is None:
            self.example_input = trace_example(trainer, pl_module)
        ref = next(pl_module.parameters())
        return to_compute(self.example_input, ref.device, ref.dtype)
