"""Pruned architectures that survive checkpoints.

A pruned module carries its pruning history (plain names and ints) and the example input
it was traced with. Both are written into every Lightning checkpoint under
``checkpoint["ifprune"]``, and replayed onto a freshly built module *before* its weights
load — by :func:`load_pruned_checkpoint`, by :class:`PrunableMixin` for plain
``load_from_checkpoint``, and by the callback when ``trainer.fit(ckpt_path=...)`` resumes.

Restoring is all or nothing: the replayed architecture is checked against the checkpoint's
``state_dict`` before it is kept. Files are verified before they are trusted
(:func:`read_checkpoint`): ``torch.load`` does not check the CRC32 of the zip entries, so a
flipped byte in a tensor would otherwise load silently.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from os import PathLike
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_ifprune.batch import to_compute
from lightning_ifprune.structure import ChannelStructure
from lightning_ifprune.surgery import (
    HistoryStep,
    atomic,
    prune_channels,
    pruning_state,
    record_pruning,
    recorded_history,
)

__all__ = [
    "CHECKPOINT_KEY",
    "CheckpointError",
    "HistoryStep",
    "PrunableMixin",
    "load_pruned_checkpoint",
    "pruning_state",
    "read_checkpoint",
    "record_pruning",
    "recorded_history",
    "restore_architecture",
    "restore_on_load",
    "save_pruning_state",
    "verify_checkpoint_file",
]

CHECKPOINT_KEY = "ifprune"
ZIP_MAGIC = b"PK\x03\x04"
M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, or not matching the module."""


def verify_checkpoint_file(path: str | PathLike) -> bool:
    """Check the CRC32 of every entry of a torch zip file (``torch.load`` does not).

    Returns whether ``path`` is a zip archive (False: another format, nothing to check).
    Raises :class:`CheckpointError` naming the file (and the damaged entry), or
    ``FileNotFoundError``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # BadZipFile, EOFError, OSError, zlib.error, ...
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted: {_why(err)})") from err
    if bad is not None:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupted: entry {bad!r} fails its CRC check)")
    return True


def read_checkpoint(path: str | PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a verified file (:func:`verify_checkpoint_file`).

    Truncated, corrupted, empty and foreign files raise one :class:`CheckpointError` naming
    ``path``; so does a file that holds something other than a dict.
    """
    verify_checkpoint_file(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: not a readable checkpoint (empty file)")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from err
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(loaded).__name__}, not a dict)")
    return loaded


def _why(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _unreadable(path: str | PathLike, err: BaseException) -> CheckpointError:
    why = f"torch.load failed with {_why(err)}; truncated, corrupted or not a torch file?"
    return CheckpointError(f"{path}: not a readable checkpoint ({why})")


def _verify_before_loading(trainer: Any) -> None:
    """Make ``trainer.strategy.load_checkpoint`` verify a local file first (once per strategy).

    That is where ``fit(ckpt_path=...)`` reads the file, before any hook of ours runs.
    """
    strategy = getattr(trainer, "strategy", None)
    load = getattr(strategy, "load_checkpoint", None)
    if load is None or getattr(load, "_verifies", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(checkpoint_path, (str, PathLike)) and os.path.isfile(checkpoint_path)):
            return load(checkpoint_path, *args, **kwargs)  # remote or missing: Lightning's own handling
        verify_checkpoint_file(checkpoint_path)
        if os.path.getsize(checkpoint_path) == 0:
            raise CheckpointError(f"{checkpoint_path}: not a readable checkpoint (empty file)")
        try:
            return load(checkpoint_path, *args, **kwargs)
        except Exception as err:
            raise _unreadable(checkpoint_path, err) from err

    load_checkpoint._verifies = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint  # type: ignore[union-attr]


def save_pruning_state(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Write the module's history into a checkpoint dict (no-op for unpruned modules).

    Steps recorded on submodules (e.g. ``prune_to_target(module.net, ...)``) are included,
    their group names prefixed with the submodule's name.
    """
    history, example = recorded_history(module)
    if history:
        checkpoint[CHECKPOINT_KEY] = {"history": [list(step) for step in history], "example_input": example}


def _normal(history: Any) -> list[list[tuple[str, list[int]]]]:
    """A history compared by content: sorted indices, empty entries dropped."""
    return [[(str(e["group"]), sorted(int(i) for i in e["indices"])) for e in step if e["indices"]] for step in history]


def _check_shapes(module: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Raise naming the first tensor whose shape differs between ``state_dict`` and ``module``."""
    own = module.state_dict()
    for key, value in state_dict.items():
        if key in own and isinstance(value, torch.Tensor) and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} "
                "in the module after replaying the checkpoint's pruning history: the weights and the history "
                "do not belong together (nothing was changed)"
            )


def restore_architecture(module: nn.Module, checkpoint: Mapping[str, Any], source: str | None = None) -> bool:
    """Replay the part of the checkpoint's history that ``module`` has not applied yet.

    All or nothing: if a step fails, or the result does not fit ``checkpoint["state_dict"]``
    (when present), ``module`` is left exactly as it was and :class:`CheckpointError` names
    the step or the first mismatching tensor. ``source`` (e.g. the path) prefixes messages.
    Returns whether anything was pruned.
    """
    source = str(source) if source is not None else "checkpoint"
    saved = checkpoint.get(CHECKPOINT_KEY)
    if not saved or not saved.get("history"):
        return False
    history = list(saved["history"])
    done, _ = recorded_history(module)
    if _normal(done) != _normal(history[: len(done)]):
        raise CheckpointError(
            f"{source}: the module was pruned differently from the checkpoint; build a fresh module to load it"
        )
    todo = history[len(done) :]
    state_dict = checkpoint.get("state_dict")
    example = saved["example_input"]
    if todo:
        ref = next(module.parameters(), None)
        if ref is None:
            raise CheckpointError(f"{source}: the module has no parameters yet to prune (build its layers first)")
        example = to_compute(example, ref.device, ref.dtype)
    with atomic(module):
        for k, step in enumerate(todo, len(done) + 1):
            plan = {str(e["group"]): list(e["indices"]) for e in step}
            try:
                prune_channels(ChannelStructure.build(module, example), plan)
            except (ValueError, IndexError, RuntimeError) as err:  # a plan or shapes that do not fit; bugs pass
                raise CheckpointError(
                    f"{source}: pruning history step {k} of {len(history)} does not apply to this module: {err}"
                ) from err
        if isinstance(state_dict, Mapping):
            _check_shapes(module, state_dict, source)
    return bool(todo)


def _trainer_of(module: nn.Module) -> Any:
    """The ``Trainer`` ``module`` is attached to, or None."""
    try:
        return module.trainer  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return None


def restore_on_load(module: nn.Module) -> None:
    """Make ``module.on_load_checkpoint`` rebuild the pruned layers first (once per module).

    Lightning calls it right before it loads the weights of ``fit(ckpt_path=...)``; this is
    what :class:`PrunableMixin` does for classes, applied to one instance. The trainer the
    module is attached to verifies local checkpoint files before it reads them
    (:func:`verify_checkpoint_file`): a damaged file raises :class:`CheckpointError`.
    """
    trainer = _trainer_of(module)
    if trainer is not None:
        _verify_before_loading(trainer)
    original = module.on_load_checkpoint
    if getattr(original, "_restores_pruning", False):
        return

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        path = getattr(_trainer_of(module), "ckpt_path", None)
        restore_architecture(module, checkpoint, source=None if path is None else str(path))
        original(checkpoint)

    on_load_checkpoint._restores_pruning = True  # type: ignore[attr-defined]
    module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]


class PrunableMixin:
    """Mix into a ``LightningModule`` so plain ``load_from_checkpoint`` rebuilds pruned layers.

    ``class MyModule(PrunableMixin, LightningModule): ...`` — unpruned checkpoints load as
    before. Its checkpoints carry the pruning history even without the callback. Calls
    ``super().on_load_checkpoint`` / ``super().on_save_checkpoint`` after its own work.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_architecture(self, checkpoint)  # type: ignore[arg-type]
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_pruning_state(self, checkpoint)  # type: ignore[arg-type]
        parent = getattr(super(), "on_save_checkpoint", None)
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

    The file is verified (:func:`read_checkpoint`), the module is built from the checkpoint's
    hyper-parameters updated with ``kwargs`` and its ``configure_model()`` hook is called
    (layers built there exist before the replay), its pruning history is replayed, then the
    weights load. Works with ``weights_only=True`` checkpoints: the history is plain data.
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.update(kwargs)
    module = cls(**hparams)
    configure = getattr(module, "configure_model", None)
    if callable(configure):
        configure()
    restore_architecture(module, checkpoint, source=str(path))
    if hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(checkpoint)  # idempotent for PrunableMixin
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module
