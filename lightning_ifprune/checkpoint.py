"""Pruned architectures that survive checkpoints.

A pruned module carries its pruning history (plain names and ints) and the example input
it was traced with. Both are written into every Lightning checkpoint under
``checkpoint["ifprune"]``, and replayed onto a freshly built module *before* its weights
load — by :func:`load_pruned_checkpoint`, by :class:`PrunableMixin` for plain
``load_from_checkpoint``, and by the callback when ``trainer.fit(ckpt_path=...)`` resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_ifprune.surgery import HistoryStep, replay_history

CHECKPOINT_KEY = "ifprune"
_ATTR = "_ifprune_state"
M = TypeVar("M", bound=nn.Module)


def pruning_state(module: nn.Module) -> dict[str, Any]:
    """The module's pruning state: ``{"history": [...], "example_input": Tensor | None}``."""
    state = module.__dict__.get(_ATTR)
    if state is None:
        state = {"history": [], "example_input": None}
        module.__dict__[_ATTR] = state
    return state


def record_pruning(module: nn.Module, step: HistoryStep, example_input: torch.Tensor) -> None:
    """Append one applied plan to the module's history."""
    state = pruning_state(module)
    state["history"].append(step)
    state["example_input"] = example_input.detach().cpu()


def save_pruning_state(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Write the module's history into a checkpoint dict (no-op for unpruned modules)."""
    state = pruning_state(module)
    if state["history"]:
        checkpoint[CHECKPOINT_KEY] = {
            "history": [list(step) for step in state["history"]],
            "example_input": state["example_input"],
        }


def restore_architecture(module: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Replay the part of the checkpoint's history that ``module`` has not applied yet.

    Returns whether anything was pruned. Raises ``ValueError`` if the module was pruned in
    a way the checkpoint does not continue.
    """
    saved = checkpoint.get(CHECKPOINT_KEY)
    if not saved or not saved.get("history"):
        return False
    history = list(saved["history"])
    state = pruning_state(module)
    done = state["history"]
    if [list(s) for s in done] != [list(s) for s in history[: len(done)]]:
        raise ValueError("the module was pruned differently from the checkpoint; build a fresh module to load it")
    todo = history[len(done) :]
    if not todo:
        return False
    example = saved["example_input"]
    ref = next(module.parameters())
    example = example.to(ref.device, ref.dtype if example.is_floating_point() else example.dtype)
    replay_history(module, todo, example)
    for step in todo:
        record_pruning(module, list(step), example)
    return True


def restore_on_load(module: nn.Module) -> None:
    """Make ``module.on_load_checkpoint`` rebuild the pruned layers first (once per module).

    Lightning calls it right before it loads the weights of ``fit(ckpt_path=...)``; this is
    what :class:`PrunableMixin` does for classes, applied to one instance.
    """
    original = module.on_load_checkpoint
    if getattr(original, "_restores_pruning", False):
        return

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        restore_architecture(module, checkpoint)
        original(checkpoint)

    on_load_checkpoint._restores_pruning = True  # type: ignore[attr-defined]
    module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]


class PrunableMixin:
    """Mix into a ``LightningModule`` so plain ``load_from_checkpoint`` rebuilds pruned layers.

    ``class MyModule(PrunableMixin, LightningModule): ...`` — unpruned checkpoints load as
    before. Calls ``super().on_load_checkpoint`` after restoring the architecture.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_architecture(self, checkpoint)  # type: ignore[arg-type]
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)


def load_pruned_checkpoint(
    cls: type[M],
    path: str | PathLike,
    map_location: Any = "cpu",
    strict: bool = True,
    **kwargs: Any,
) -> M:
    """Load any ``LightningModule`` class from a (possibly pruned) checkpoint.

    The module is built from the checkpoint's hyper-parameters updated with ``kwargs``,
    its pruning history is replayed, then the weights load. Works with
    ``weights_only=True`` checkpoints: the history is plain data.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.update(kwargs)
    module = cls(**hparams)
    restore_architecture(module, checkpoint)
    if hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(checkpoint)  # idempotent for PrunableMixin
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module
