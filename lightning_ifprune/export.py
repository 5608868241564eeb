"""Export a pruned network for use without Lightning or Hydra.

:func:`export_pruned` writes two files into a directory:

- ``pruned_state.pt``: plain data, loadable with ``torch.load(path, weights_only=True)``::

      {"state_dict": {...},                                   # the pruned net's tensors
       "ifprune": {"history": [[{"group": str, "indices": [int, ...]}, ...], ...],
                   "example_input": Tensor},                  # what the history was traced with
       "model": "small_cnn", "num_classes": 10, "in_channels": 1,
       "model_kwargs": {"widths": [16, 32, 64]}}              # extra build_model arguments

  Rebuild it with ``build_model(model, num_classes, in_channels, **model_kwargs)``, then
  ``lightning_ifprune.surgery.replay_history(net, history, example_input)`` and
  ``net.load_state_dict(state_dict)`` — which is what :func:`load_exported` does.
- ``model.pt``: the eval-mode net traced with TorchScript (``torch.jit.trace``);
  ``torch.jit.load("model.pt")`` needs neither this package nor the model's source.
"""

from __future__ import annotations

import copy
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_ifprune.batch import map_tensors
from lightning_ifprune.checkpoint import CHECKPOINT_KEY, read_checkpoint, recorded_history, verify_checkpoint_file
from lightning_ifprune.structure import Example, single_sample
from lightning_ifprune.surgery import History, replay_history

STATE_FILE = "pruned_state.pt"
SCRIPT_FILE = "model.pt"


def plain_history(history: Iterable[Sequence[Mapping[str, Any]]], strip_prefix: str = "") -> History:
    """A pruning history as plain lists, dicts, strings and ints.

    ``strip_prefix`` removes a leading module path from the group names, e.g. ``"net."`` to
    turn the history recorded on a ``LightningModule`` into one relative to its ``net``.
    """
    out: History = []
    for step in history:
        entries = []
        for entry in step:
            group = str(entry["group"])
            if strip_prefix:
                if not group.startswith(strip_prefix):
                    raise ValueError(f"group {group!r} does not start with {strip_prefix!r}")
                group = group[len(strip_prefix) :]
            entries.append({"group": group, "indices": [int(i) for i in entry["indices"]]})  # type: ignore[union-attr]
        out.append(entries)
    return out


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript still works, but recent PyTorch versions warn that it is deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")
        yield


def export_pruned(
    net: nn.Module,
    out_dir: str | PathLike,
    *,
    example_input: Example,
    history: Iterable[Sequence[Mapping[str, Any]]] | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    torchscript: bool = True,
) -> dict[str, Path]:
    """Write ``pruned_state.pt`` (and ``model.pt`` with ``torchscript``) into ``out_dir``.

    ``history`` is relative to ``net`` (see :func:`plain_history` for a ``LightningModule``'s);
    by default, the steps recorded on ``net`` (and its submodules) when they were pruned;
    ``example_input`` is a batch the net accepts (one sample is enough). ``model``,
    ``num_classes``, ``in_channels`` and ``model_kwargs`` are what
    :func:`lightning_ifprune.models.build_model` needs to rebuild the unpruned net. ``net``
    is left as it was (device and train/eval mode). Returns ``{"state": path,
    "torchscript": path}`` (the latter only with ``torchscript``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = map_tensors(example_input, lambda t: t.detach().cpu())
    if history is None:
        history = recorded_history(net)[0]
    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        CHECKPOINT_KEY: {
            "history": plain_history(history),
            "example_input": map_tensors(single_sample(example), torch.clone),
        },
        "model": model,
        "num_classes": None if num_classes is None else int(num_classes),
        "in_channels": None if in_channels is None else int(in_channels),
        "model_kwargs": dict(model_kwargs or {}),
    }
    paths = {"state": out / STATE_FILE}
    torch.save(payload, paths["state"])
    if torchscript:
        frozen = copy.deepcopy(net).cpu().eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        with _quiet_jit(), torch.no_grad():
            traced = torch.jit.trace(frozen, example, check_trace=False)
            paths["torchscript"] = out / SCRIPT_FILE
            torch.jit.save(traced, str(paths["torchscript"]))
    return paths


def is_torchscript(path: str | PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (rather than a ``torch.save`` file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


def load_exported(path: str | PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load what :func:`export_pruned` wrote, in eval mode.

    ``model.pt`` (any TorchScript archive) loads with ``torch.jit.load``. ``pruned_state.pt``
    is rebuilt as a regular ``nn.Module``: ``build_model``, the history replayed, the weights
    loaded (its pruning history is recorded on it, so it can be exported again). A
    directory means its ``pruned_state.pt`` (else its ``model.pt``). Both files are verified
    first: truncated, corrupted or foreign files raise
    :class:`~lightning_ifprune.checkpoint.CheckpointError` naming the path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE if (path / STATE_FILE).is_file() else path / SCRIPT_FILE
    if is_torchscript(path):
        verify_checkpoint_file(path)
        with _quiet_jit():
            return torch.jit.load(str(path), map_location=map_location).eval()
    payload = read_checkpoint(path, map_location="cpu")
    if "state_dict" not in payload:
        raise ValueError(f"{path} is neither a TorchScript archive nor an exported pruned_state.pt")
    if not payload.get("model") or payload.get("num_classes") is None:
        raise ValueError(f"{path} does not say which model to build (no 'model'/'num_classes')")
    from lightning_ifprune.models import build_model  # torchvision import only when needed

    net = build_model(
        payload["model"],
        num_classes=int(payload["num_classes"]),
        in_channels=int(payload.get("in_channels") or 3),
        **dict(payload.get("model_kwargs") or {}),
    )
    saved = payload.get(CHECKPOINT_KEY) or {}
    history = saved.get("history") or []
    if history:
        example = saved["example_input"]
        net.eval()
        replay_history(net, history, example)  # records the steps on net
    net.load_state_dict(payload["state_dict"])
    return net.to(map_location).eval()
