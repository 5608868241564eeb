"""Channel structure: the coupled channel groups of a network, their masks and their costs.

A *group* is one set of channels that must be removed together (spec §1): the output rows of
its producer Conv/Linear layers, the matching BatchNorm entries, and the input columns of
every layer that consumes them, residual partners included. The coupling is read from
Torch-Pruning's ``DependencyGraph`` (:mod:`.groups`); naming, masks (:mod:`.masks`), the
exact cost model (:mod:`.cost`) and which structures are refused are ours. The graph is
traced in training mode (:mod:`.graph`), so training-only branches are part of it, with an
example of the real forward call (:mod:`.example`: a tensor, positional or keyword arguments,
a list of images); torchvision detectors are traced in eval mode with their output layers
kept (:mod:`.detection`).

Works on any ``nn.Module``; nothing here needs Lightning.
"""

from lightning_ifprune.structure.channels import ChannelStructure
from lightning_ifprune.structure.example import (
    Example,
    call_model,
    example_batch_size,
    single_sample,
    validate_example_inputs,
)
from lightning_ifprune.structure.groups import ChannelGroup, ConsumerSlot, UnsupportedModelError
from lightning_ifprune.structure.masks import MaskSpace, MaskVec, channel_masks
from lightning_ifprune.structure.ops import (
    CONV_TYPES,
    NORM_TYPES,
    PER_CHANNEL_TYPES,
    WEIGHTED_TYPES,
)
from lightning_ifprune.structure.tracing import resolve_min_keep

__all__ = [
    "CONV_TYPES",
    "NORM_TYPES",
    "PER_CHANNEL_TYPES",
    "WEIGHTED_TYPES",
    "ChannelGroup",
    "ChannelStructure",
    "ConsumerSlot",
    "Example",
    "MaskSpace",
    "MaskVec",
    "UnsupportedModelError",
    "call_model",
    "channel_masks",
    "example_batch_size",
    "single_sample",
    "resolve_min_keep",
    "validate_example_inputs",
]
