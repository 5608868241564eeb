"""Example inputs: the forward call a structure is traced, measured and checked with.

An example says how the model is called, by Lightning's ``example_input_array`` rule:

- a tensor ``x``: ``model(x)``, a batch along its first dimension (shape ``(N, ...)``);
- a tuple: positional arguments, ``model(*example)`` (``(x,)`` is the same as ``x``);
- a dict with string keys: keyword arguments, ``model(**example)``;
- a list: one argument that is a list of samples, ``model(example)`` — e.g. the list of
  ``(C, H, W)`` image tensors of a torchvision detection model.

Arguments may nest tuples, lists and dicts; non-tensor values pass through unchanged. The
number of samples (what costs are divided by) is that of the first argument: a tensor's first
dimension, a list's length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_ifprune.batch import leaves, map_tensors

#: What a model is called with (see the module docstring).
Example = Any

_FORMS = (
    "a batched tensor, a tuple of positional arguments, a dict of keyword arguments, "
    "or a list of samples (e.g. image tensors)"
)


def validate_example_inputs(example: Example) -> Example:
    """``example`` if it is a well-formed example (see the module docstring), else ``ValueError``."""
    if isinstance(example, torch.Tensor):
        if example.dim() < 2:
            raise ValueError("example_inputs must be a batched tensor, e.g. shape (1, C, H, W)")
        return example
    if isinstance(example, Mapping):
        if not example or not all(isinstance(k, str) for k in example):
            raise ValueError(f"example_inputs as keyword arguments must be a non-empty dict with string keys; {_FORMS}")
    elif not isinstance(example, (tuple, list)):
        raise ValueError(f"example_inputs must be {_FORMS}; got a {type(example).__name__}")
    elif not example:
        raise ValueError(f"example_inputs must not be an empty {type(example).__name__}; {_FORMS}")
    if not leaves(example):
        raise ValueError(f"example_inputs holds no tensor; {_FORMS}")
    if isinstance(example, tuple) and len(example) == 1 and isinstance(example[0], torch.Tensor):
        return validate_example_inputs(example[0])
    first = _first_argument(example)
    if isinstance(first, torch.Tensor) and first.dim() == 0:
        raise ValueError("the first argument of example_inputs is a scalar tensor: it must be batched, e.g. (1, ...)")
    return example


def call_model(model: nn.Module, example: Example) -> Any:
    """``model`` called with ``example`` (tensor or list: one argument; tuple: ``*args``; dict: ``**kwargs``)."""
    if isinstance(example, tuple):
        return model(*example)
    if isinstance(example, Mapping):
        return model(**example)
    return model(example)


def example_batch_size(example: Example) -> int:
    """Samples in ``example``: the first argument's leading size (a list's length); at least 1."""
    first = _first_argument(example)
    if isinstance(first, torch.Tensor):
        return max(int(first.shape[0]) if first.dim() else 1, 1)
    if isinstance(first, (list, tuple)):
        return max(len(first), 1)
    return 1


def single_sample(example: Example) -> Example:
    """``example`` cut to its first sample (detached, on CPU): tensors of the batch's leading
    size are sliced, lists of samples keep their first item, anything else stays."""
    n = example_batch_size(example)

    def cut(arg: Any, top: bool) -> Any:
        if isinstance(arg, torch.Tensor):
            return arg[:1] if arg.dim() and arg.shape[0] == n else arg
        if isinstance(arg, list) and (top or len(arg) == n):
            return arg[:1]
        if isinstance(arg, Mapping):
            return {k: cut(v, False) for k, v in arg.items()}
        if isinstance(arg, tuple):
            return tuple(cut(v, False) for v in arg)
        return arg

    if isinstance(example, tuple):
        part: Example = tuple(cut(a, False) for a in example)
    elif isinstance(example, Mapping):
        part = {k: cut(v, False) for k, v in example.items()}
    else:
        part = cut(example, True)
    return map_tensors(part, lambda t: t.detach().cpu())


def example_device(example: Example) -> torch.device:
    """The device of the example's first tensor."""
    return leaves(example)[0].device


def _first_argument(example: Example) -> Any:
    """The first argument of the call ``example`` stands for."""
    if isinstance(example, tuple):
        return example[0]
    if isinstance(example, Mapping):
        return next(iter(example.values()))
    return example
