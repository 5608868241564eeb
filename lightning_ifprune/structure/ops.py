"""Which layers and autograd ops the channel structure recognises, and what they do to channels.

Public type tuples (``CONV_TYPES``, ``NORM_TYPES``, …) are shared by the estimator, the
criteria and the surgery, so every stage agrees on what a convolution or a norm is.
"""

from __future__ import annotations

import re

from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED_TYPES = (*CONV_TYPES, nn.Linear)
#: BatchNorm layers, matched with ``isinstance``: subclasses (timm's ``BatchNormAct2d``) are norms too.
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: Per-channel layers sliced with their channel (norms, and PReLU with one slope per channel).
PER_CHANNEL_TYPES = (*NORM_TYPES, nn.PReLU)
#: Layers with parameters whose channels we can remove (all others are refused inside a group).
SUPPORTED_TYPES = (*WEIGHTED_TYPES, *PER_CHANNEL_TYPES)

# Autograd ops that keep the channel axis as it is (Torch-Pruning treats every op it does not
# know as such; we only accept the ones that really are). Names without "Backward<N>".
CHANNEL_PRESERVING_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Clone", "ToCopy", "Alias", "Detach",
    "Relu", "Relu6", "Hardtanh", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Silu", "Mish",
    "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Softplus", "Threshold",
    "Clamp", "ClampMin", "ClampMax", "NativeDropout", "Dropout", "Squeeze", "Unsqueeze",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices",
    "AvgPool1D", "AvgPool2D", "AvgPool3D",
    "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
    "UpsampleNearest1D", "UpsampleNearest2D", "UpsampleNearest3D",
    "UpsampleBilinear2D", "UpsampleBicubic2D",
})  # fmt: skip
#: Batch-norm ops: per-channel, accepted only inside a norm module whose channels are pruned with
#: the group (a BatchNorm subclass calling ``F.batch_norm`` itself, then e.g. an activation).
BATCH_NORM_OPS = frozenset({
    "NativeBatchNorm", "NativeBatchNormLegit", "NativeBatchNormLegitNoTraining", "NativeBatchNormLegitFunctional",
    "CudnnBatchNorm", "MiopenBatchNorm", "BatchNormWithUpdate", "BatchNormNoUpdate",
})  # fmt: skip
#: Ops a Linear layer runs on an input of more than two dims (flatten, matmul, reshape back): its own
#: computation over the last axis, accepted inside a Linear whose input or output is the group's.
LINEAR_INTERNAL_OPS = frozenset({"Addmm", "Mm", "Bmm", "T", "View", "UnsafeView", "Reshape", "ReshapeAlias"})
#: Dropout layers: element-wise, also when in place on a view (an autograd ``CopySlices`` node).
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: Custom ops (by autograd node name) that act on every channel alike: torchvision's RoIAlign pools
#: each channel of its feature map separately (``(N, C, H, W) -> (K, C, h, w)``).
CHANNEL_PRESERVING_CUSTOM_OPS = frozenset({"GeneratedBackwardFor_torchvision_roi_align_default"})
#: Module types refused by name before tracing, with why: their channel mapping is beyond the
#: machinery, and Torch-Pruning's grouping of them does not finish (it exhausts memory).
UNSUPPORTED_MODULES = {
    "RelativePositionalMultiHeadAttention": "partitions channels-last windows and grids and splits "
    "q/k/v along the last axis (torchvision MaxViT)",
}
#: Ops that keep channels only when they do not act on the channel axis (dim 1).
AXIS_OPS = frozenset({"Mean", "Sum", "ConstantPadNd", "Amax", "Amin"})


def holds_channel_buffers(module: nn.Module) -> bool:
    """A layer we do not slice that holds its own non-scalar buffers (e.g. a frozen BatchNorm):
    its ops may scale or shift channels with state that pruning would leave at full width."""
    return not isinstance(module, SUPPORTED_TYPES) and any(
        b is not None and b.dim() >= 1 for _, b in module.named_buffers(recurse=False)
    )


def is_depthwise(module: nn.Module) -> bool:
    """A convolution with one group per channel (its input and output channels are coupled)."""
    return (
        isinstance(module, CONV_TYPES)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def op_name(grad_fn: object) -> str:
    """An autograd node's op name without its ``Backward<N>`` suffix."""
    name = grad_fn.name() if hasattr(grad_fn, "name") else "Unknown"
    return re.sub(r"Backward\d*$", "", name)


def acts_on_channels(grad_fn: object, name: str) -> bool:
    """Whether a reduction/pad op touches the channel axis (dim 1)."""
    if name == "ConstantPadNd":
        pad = list(getattr(grad_fn, "_saved_pad", ()))
        ndim = len(getattr(grad_fn, "_saved_self_sym_sizes", ())) or 4
        channel_pad = pad[2 * (ndim - 2) : 2 * (ndim - 1)]  # pads are listed last dim first
        return any(int(p) != 0 for p in channel_pad)
    dims = getattr(grad_fn, "_saved_dim", None)
    if dims is None:
        return True  # full reduction
    dims = [dims] if isinstance(dims, int) else list(dims)
    ndim = len(getattr(grad_fn, "_saved_self_sym_sizes", ())) or 4
    return any(int(d) % ndim == 1 for d in dims)


def only_restrides(grad_fn: object) -> bool:
    """An ``as_strided`` that only re-lays out an ``(N, C, 1, …)`` tensor of the same shape.

    PyTorch emits it after global pooling of ``channels_last`` tensors; element ``[n, c]``
    stays ``[n, c]``. Any other ``as_strided`` may move channels and is not accepted.
    """
    size = tuple(getattr(grad_fn, "_saved_size", ()))
    stride = tuple(getattr(grad_fn, "_saved_stride", ()))
    offset = getattr(grad_fn, "_saved_storage_offset", None)
    nexts = getattr(grad_fn, "next_functions", ())
    if len(size) < 2 or len(stride) != len(size) or offset not in (None, 0) or not nexts or nexts[0][0] is None:
        return False
    source, index = nexts[0]
    meta = getattr(source, "_input_metadata", ())
    if index >= len(meta) or tuple(meta[index].shape) != size or any(s != 1 for s in size[2:]):
        return False
    return (size[1] == 1 or stride[1] == 1) and (size[0] == 1 or stride[0] == size[1])


def keeps_channels(grad_fn: object) -> bool:
    """Whether an element-wise node of the graph leaves the channel axis as it is."""
    name = op_name(grad_fn)
    if name == "AsStrided":
        return only_restrides(grad_fn)
    if name == "IndexPut":  # x[rows] = y (the per-level RoI features into one batch): rows only
        indices = list(getattr(grad_fn, "_saved_indices", ()))
        return len(indices) == 1 and indices[0] is not None
    return (
        name in CHANNEL_PRESERVING_OPS
        or name in CHANNEL_PRESERVING_CUSTOM_OPS
        or (name in AXIS_OPS and not acts_on_channels(grad_fn, name))
    )
