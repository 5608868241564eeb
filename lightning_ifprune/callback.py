"""``InfluencePruningCallback``: scheduled global channel pruning inside ``Trainer.fit``.

The callback only orchestrates: it draws batches, asks :mod:`~lightning_ifprune.criteria`
for scores, averages them across ranks, selects channels with
:mod:`~lightning_ifprune.selection`, removes them with :mod:`~lightning_ifprune.surgery`,
then keeps training going: the optimizer's parameters and per-parameter state are sliced
to the kept channels, DDP is re-wrapped, and the history goes into every checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from tqdm.auto import tqdm

from lightning_ifprune.checkpoint import (
    pruning_state,
    record_pruning,
    restore_architecture,
    save_pruning_state,
)
from lightning_ifprune.criteria import CRITERIA, DATA_CRITERIA, score_structure
from lightning_ifprune.estimator import EstimatorOptions
from lightning_ifprune.selection import (
    NORMALIZATIONS,
    Baseline,
    baseline_of,
    parse_target,
    resource_size,
    select_channels,
)
from lightning_ifprune.structure import ChannelStructure
from lightning_ifprune.surgery import (
    parameter_slices,
    plan_to_history_step,
    prune_channels,
    slice_like,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SPLITS = ("geometric", "linear")


class InfluencePruningCallback(Callback):
    """Prune channels globally during ``fit``, physically, and keep fine-tuning.

    Args:
        target_flops / target_params / target_channels: the fraction of the original model
            to keep (exactly one).
        start_epoch, end_epoch, rounds, split: epoch schedule — ``rounds`` pruning rounds at
            the start of epochs spread from ``start_epoch`` to ``end_epoch`` (default
            ``start_epoch + rounds - 1``); after round ``i`` the model keeps
            ``target ** (i / rounds)`` (``geometric``) or ``1 - (1 - target) * i / rounds``
            (``linear``) of the original.
        every_n_steps, channels_per_step: progressive schedule instead (the reference's):
            remove ``channels_per_step`` channels every ``every_n_steps`` optimizer steps,
            from ``start_epoch`` on, until the target is met.
        criterion: ``"influence"`` (default), a baseline name from :data:`CRITERIA`, or a
            callable ``fn(structure, batches, loss_fn, **options) -> {group: scores}``.
        num_batches: training batches drawn per round for data-driven criteria.
        estimator: options for the criterion (for ``influence``: :class:`EstimatorOptions`
            fields; ``weight_decay`` defaults to the optimizer's).
        normalize: score ÷ cost normalisation, ``"none"``, ``"cost"`` or ``"sqrt"``.
        ignored_layers, min_channels: layers whose channels stay; least channels per group
            (a count, or a fraction of the original width).
        example_input: a batch to trace the model with (default: the module's
            ``example_input_array`` or the first training batch).
        loss_fn: ``loss_fn(module(inputs), targets)``; default cross-entropy.
    """

    #: Re-wrap the DDP module after surgery (a switch for tests that prove it matters).
    rewrap_ddp: bool = True

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
        criterion: str | Callable[..., Mapping[str, torch.Tensor]] = "influence",
        num_batches: int = 2,
        estimator: Mapping[str, Any] | None = None,
        normalize: str = "sqrt",
        ignored_layers: Sequence[str] = (),
        min_channels: int | float = 1,
        example_input: torch.Tensor | None = None,
        loss_fn: LossFn | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.resource, self.target = parse_target(target_flops, target_params, target_channels)
        _check_int("start_epoch", start_epoch, 0)
        _check_int("rounds", rounds, 1)
        _check_int("num_batches", num_batches, 1)
        _check_int("channels_per_step", channels_per_step, 1)
        if end_epoch is None:
            end_epoch = start_epoch + rounds - 1
        _check_int("end_epoch", end_epoch, start_epoch)
        if every_n_steps is not None:
            _check_int("every_n_steps", every_n_steps, 1)
        elif end_epoch - start_epoch + 1 < rounds:
            raise ValueError(f"rounds={rounds} do not fit in epochs {start_epoch}..{end_epoch}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not callable(criterion) and criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {sorted(CRITERIA)} or a callable, got {criterion!r}")
        self.estimator_options = dict(estimator or {})
        if criterion == "influence":
            EstimatorOptions(**{"weight_decay": 1.0, **self.estimator_options})  # validates early
        if isinstance(min_channels, bool) or min_channels <= 0:
            raise ValueError(f"min_channels must be a positive count or fraction, got {min_channels!r}")
        if example_input is not None and not isinstance(example_input, torch.Tensor):
            raise ValueError("example_input must be a tensor batch, e.g. torch.randn(1, 3, 32, 32)")
        self.start_epoch, self.end_epoch, self.rounds, self.split = start_epoch, end_epoch, rounds, split
        self.every_n_steps, self.channels_per_step = every_n_steps, channels_per_step
        self.criterion, self.num_batches, self.normalize = criterion, num_batches, normalize
        self.ignored_layers, self.min_channels = tuple(ignored_layers), min_channels
        self.example_input, self.loss_fn, self.verbose = example_input, loss_fn or F.cross_entropy, verbose
        # Schedule state (travels in checkpoints).
        self.rounds_done = 0
        self.finished = False
        self.baseline: Baseline | None = None
        self.original_sizes: dict[str, int] = {}
        self.round_times: list[float] = []

    # ------------------------------------------------------------------ schedule
    def round_epochs(self) -> list[int]:
        """Epochs whose start triggers a round (epoch schedule)."""
        if self.rounds == 1:
            return [self.start_epoch]
        span = self.end_epoch - self.start_epoch
        return [self.start_epoch + round(i * span / (self.rounds - 1)) for i in range(self.rounds)]

    def round_target(self, i: int) -> float:
        """Fraction kept after round ``i`` (1-based)."""
        if self.split == "geometric":
            return self.target ** (i / self.rounds)
        return 1 - (1 - self.target) * i / self.rounds

    # ------------------------------------------------------------------ lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            raise RuntimeError(f"InfluencePruningCallback does not support the {name} strategy (use ddp)")
        # Lightning calls the module's on_load_checkpoint right before it loads the weights of
        # fit(ckpt_path=...): rebuild the pruned layers there (what PrunableMixin does).
        original = pl_module.on_load_checkpoint
        if not getattr(original, "_restores_pruning", False):
            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                restore_architecture(pl_module, checkpoint)
                original(checkpoint)

            on_load_checkpoint._restores_pruning = True  # type: ignore[attr-defined]
            pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

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
        floor = {n: g.min_keep for n, g in structure.groups.items()}
        removable = {n: g.size - floor[n] for n, g in structure.groups.items()}
        smallest = resource_size(structure, self.resource, removable)
        if smallest > self.target * getattr(self.baseline, self.resource):
            raise ValueError(
                f"target_{self.resource}={self.target:g} is unreachable: the model cannot go below "
                f"{smallest / getattr(self.baseline, self.resource):.3f} with min_channels={self.min_channels!r} "
                f"and ignored_layers={list(self.ignored_layers)}"
            )
        options = self._estimator_options(trainer)
        if self.criterion == "influence" and options.get("inverse", EstimatorOptions.inverse) == "identity" \
                and options["weight_decay"] <= 0:
            raise ValueError("influence with inverse='identity' needs the optimizer's weight_decay > 0 "
                             "(or estimator={'weight_decay': ...})")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps is not None or self.finished:
            return
        epochs = self.round_epochs()
        while self.rounds_done < self.rounds and epochs[self.rounds_done] <= trainer.current_epoch:
            fraction = self.round_target(self.rounds_done + 1)
            if self._round(trainer, pl_module, fraction=fraction) is None:
                return
            self.rounds_done += 1
        self.finished = self.rounds_done >= self.rounds

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps is None or self.finished or trainer.current_epoch < self.start_epoch:
            return
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps:
            return
        if self.rounds_done * self.every_n_steps >= step:
            return  # this boundary was already handled (e.g. by gradient accumulation)
        self.rounds_done = step // self.every_n_steps
        self._round(trainer, pl_module, count=self.channels_per_step)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        save_pruning_state(pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds_done": self.rounds_done,
            "finished": self.finished,
            "baseline": None if self.baseline is None else vars(self.baseline).copy(),
            "original_sizes": dict(self.original_sizes),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_done = int(state_dict["rounds_done"])
        self.finished = bool(state_dict["finished"])
        base = state_dict.get("baseline")
        self.baseline = None if base is None else Baseline(**base)
        self.original_sizes = dict(state_dict.get("original_sizes", {}))

    # ------------------------------------------------------------------ one round
    def _round(self, trainer: Trainer, pl_module: LightningModule, fraction: float | None = None,
               count: int | None = None) -> dict[str, list[int]] | None:
        """Score, agree across ranks, select, prune, re-point the optimizer. None = abandoned."""
        start = time.perf_counter()
        example = self._example(trainer, pl_module)
        structure = self._structure(pl_module, example)
        size = resource_size(structure, self.resource, {})
        limit = self.target * getattr(self.baseline, self.resource)
        if size <= limit:
            self.finished = True
            return {}
        batches = self._draw_batches(trainer, pl_module) if self._needs_data() else []
        options = self._estimator_options(trainer) if self.criterion == "influence" else dict(self.estimator_options)
        shown = tqdm(batches, desc="[ifprune] scoring", leave=False, dynamic_ncols=True,
                     disable=not (self.verbose and trainer.is_global_zero and len(batches) > 1))
        scores = score_structure(structure, shown, self.loss_fn, self.criterion, **options)
        flat = torch.cat([s.double().flatten() for s in scores.values()]).to(pl_module.device)
        flat = trainer.strategy.reduce(flat, reduce_op="mean") if trainer.world_size > 1 else flat
        if not torch.isfinite(flat).all():
            rank_zero_warn("pruning round abandoned, model untouched: the scores contain NaN or inf "
                           "(is the training loss finite?)")
            return None
        agreed, i = {}, 0
        for name, s in scores.items():
            agreed[name] = flat[i:i + s.numel()].cpu()
            i += s.numel()
        plan = select_channels(structure, agreed, self.resource, self.target if count else fraction,
                               self.normalize, self.baseline, max_channels=count)
        plan = trainer.strategy.broadcast(plan, src=0)
        if not plan:
            return plan
        slices = parameter_slices(structure, plan)
        old = dict(pl_module.named_parameters())
        applied = prune_channels(structure, plan)
        record_pruning(pl_module, plan_to_history_step(applied), example)
        self._repoint_optimizers(trainer, old, dict(pl_module.named_parameters()), slices)
        if self.rewrap_ddp and isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1:
            trainer.strategy.model = trainer.strategy._setup_model(trainer.strategy.model.module)
            trainer.strategy._register_ddp_hooks()
        elapsed = time.perf_counter() - start
        self.round_times.append(elapsed)
        self._log(trainer, structure, applied, agreed, elapsed)
        return applied

    def _repoint_optimizers(self, trainer: Trainer, old: dict[str, nn.Parameter],
                            new: dict[str, nn.Parameter], slices: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        """Same optimizer objects, new parameters; per-parameter state sliced to the kept channels."""
        name_of = {id(p): n for n, p in old.items()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for j, p in enumerate(group["params"]):
                    name = name_of.get(id(p))
                    if name is None or new[name] is p:
                        continue
                    replacement = new[name]
                    state = optimizer.state.pop(p, None)
                    if state is not None:
                        optimizer.state[replacement] = {
                            k: slice_like(v, slices.get(name, {}))
                            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0 else v
                            for k, v in state.items()
                        }
                    group["params"][j] = replacement

    # ------------------------------------------------------------------ helpers
    def _structure(self, pl_module: LightningModule, example: torch.Tensor) -> ChannelStructure:
        return ChannelStructure.build(pl_module, example, ignored_layers=self.ignored_layers,
                                      min_channels=self.min_channels, original_sizes=self.original_sizes or None)

    def _needs_data(self) -> bool:
        return callable(self.criterion) or self.criterion in DATA_CRITERIA

    def _estimator_options(self, trainer: Trainer) -> dict[str, Any]:
        options = dict(self.estimator_options)
        if "weight_decay" not in options:
            decays = [g.get("weight_decay", 0.0) for o in trainer.optimizers for g in o.param_groups]
            options["weight_decay"] = float(decays[0]) if decays else 0.0
        return options

    def _example(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        if self.example_input is None:
            stored = pruning_state(pl_module)["example_input"]
            array = getattr(pl_module, "example_input_array", None)
            if stored is not None:
                self.example_input = stored
            elif isinstance(array, torch.Tensor):
                self.example_input = array[:1]
            else:
                x, _ = next(iter(self._loader(trainer)))
                self.example_input = x[:1].detach().cpu()
        ref = next(pl_module.parameters())
        x = self.example_input.to(ref.device)
        return x.to(ref.dtype) if x.is_floating_point() else x

    @staticmethod
    def _loader(trainer: Trainer) -> Iterable:
        loader = trainer.train_dataloader
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
        if isinstance(loader, Mapping):
            loader = next(iter(loader.values()))
        elif isinstance(loader, (list, tuple)):
            loader = loader[0]
        return loader

    def _draw_batches(self, trainer: Trainer, pl_module: LightningModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` fresh training batches; the global RNG is left as it was."""
        devices = [torch.cuda.current_device()] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            batches = [(x.to(pl_module.device), y.to(pl_module.device))
                       for x, y in islice(_pairs(self._loader(trainer)), self.num_batches)]
        if not batches:
            raise ValueError("InfluencePruningCallback: the training dataloader is empty")
        return batches

    def _log(self, trainer: Trainer, structure: ChannelStructure, applied: Mapping[str, Sequence[int]],
             scores: Mapping[str, torch.Tensor], elapsed: float) -> None:
        """Log the model after the round from the pre-round structure's exact cost model."""
        removed = {n: len(v) for n, v in applied.items()}
        flops, params = structure.cost(removed)
        widths = {n: w - removed.get(n, 0) for n, w in structure.widths().items()}
        base = self.baseline
        flat = torch.cat(list(scores.values())).double()
        metrics = {
            "prune/flops": float(flops), "prune/params": float(params),
            "prune/flops_kept": flops / base.flops, "prune/params_kept": params / base.params,
            "prune/channels": float(sum(widths.values())),
            "prune/round_s": elapsed,
            "prune/score_mean": float(flat.mean()), "prune/score_std": float(flat.std()) if flat.numel() > 1 else 0.0,
            "prune/score_min": float(flat.min()), "prune/score_max": float(flat.max()),
        }
        metrics.update({f"prune/width/{n}": float(w) for n, w in widths.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose and self.every_n_steps is None:
            rank_zero_info(
                f"[ifprune] epoch {trainer.current_epoch}: FLOPs {flops / base.flops:.3f}, params "
                f"{params / base.params:.3f} of the original ({elapsed:.2f}s)"
            )


def _pairs(loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        if isinstance(batch, Mapping):
            batch = (batch["input"], batch["target"]) if "input" in batch else tuple(batch.values())[:2]
        x, y = batch[0], batch[1]
        yield x, y


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")

