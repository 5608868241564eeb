"""torchvision detectors by name, randomly initialised (nothing downloaded), sized for small images.

Every builder takes ``num_classes`` (background included, torchvision's convention) and the
image size the detector's transform resizes to (``min_size``/``max_size``: detection cost
grows with it). Backbones use trainable ``BatchNorm2d`` (torchvision's frozen BatchNorm,
its default for pre-trained weights, holds statistics pruning cannot slice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import mobilenet_v3_small, resnet18
from torchvision.models.detection import FCOS, RetinaNet, fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


def _resnet18_fpn(fpn_channels: int) -> BackboneWithFPN:
    """ResNet-18 (C3–C5) with an FPN of ``fpn_channels`` and P6/P7, as RetinaNet and FCOS use it."""
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    return BackboneWithFPN(
        body,
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [128, 256, 512],
        fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )


def _mobilenet_v3_small_fpn(fpn_channels: int) -> BackboneWithFPN:
    """MobileNetV3-Small (its stride-8, 16 and 32 features) with an FPN and P6/P7."""
    body = mobilenet_v3_small(weights=None).features
    return BackboneWithFPN(
        body,
        {"3": "0", "8": "1", "12": "2"},
        [24, 48, 576],
        fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )


def retinanet_resnet18_fpn(
    num_classes: int, min_size: int = 128, max_size: int = 128, fpn_channels: int = 256, **kwargs: Any
) -> RetinaNet:
    """RetinaNet on a ResNet-18 FPN."""
    return RetinaNet(_resnet18_fpn(fpn_channels), num_classes, min_size=min_size, max_size=max_size, **kwargs)


def retinanet_mobilenet_v3_small_fpn(
    num_classes: int, min_size: int = 128, max_size: int = 128, fpn_channels: int = 64, **kwargs: Any
) -> RetinaNet:
    """RetinaNet on a MobileNetV3-Small FPN."""
    return RetinaNet(_mobilenet_v3_small_fpn(fpn_channels), num_classes, min_size=min_size, max_size=max_size, **kwargs)


def fcos_resnet18_fpn(
    num_classes: int, min_size: int = 128, max_size: int = 128, fpn_channels: int = 256, **kwargs: Any
) -> FCOS:
    """FCOS on a ResNet-18 FPN (its heads' GroupNorm convs keep their channels)."""
    return FCOS(_resnet18_fpn(fpn_channels), num_classes, min_size=min_size, max_size=max_size, **kwargs)


def _fcos_head(channels: int, num_classes: int, num_convs: int, norm: str) -> FCOSHead:
    """torchvision's FCOS head with ``num_convs`` shared convs normalised by GroupNorm (its
    default: those convs keep their channels, a GroupNorm mixes the statistics of its channels)
    or BatchNorm (prunable, but one set of running statistics for every FPN level)."""
    head = FCOSHead(channels, 1, num_classes, num_convs)
    if norm == "batch":
        head.classification_head = FCOSClassificationHead(
            channels, 1, num_classes, num_convs, norm_layer=nn.BatchNorm2d
        )
        head.regression_head = FCOSRegressionHead(channels, 1, num_convs, norm_layer=nn.BatchNorm2d)
    elif norm != "group":
        raise ValueError(f"head_norm must be 'group' or 'batch', got {norm!r}")
    return head


def fcos_mobilenet_v3_small_fpn(
    num_classes: int,
    min_size: int = 128,
    max_size: int = 128,
    fpn_channels: int = 64,
    head_convs: int = 2,
    head_norm: str = "group",
    **kwargs: Any,
) -> FCOS:
    """FCOS on a MobileNetV3-Small FPN with a head of ``head_convs`` convs (``head_norm``: see
    ``_fcos_head``): anchor-free, so small objects at low resolution get positives; the default
    of ``experiment=detection_shapes``."""
    head = _fcos_head(fpn_channels, num_classes, head_convs, head_norm)
    backbone = _mobilenet_v3_small_fpn(fpn_channels)
    return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, head=head, **kwargs)


def fasterrcnn_mobilenet_v3_fpn(num_classes: int, min_size: int = 128, max_size: int = 128, **kwargs: Any) -> nn.Module:
    """torchvision's Faster R-CNN with a MobileNetV3-Large FPN, no weights."""
    return fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs
    )


#: Builders taking ``(num_classes, min_size=, max_size=, **kwargs)``.
DETECTION_ZOO: dict[str, Callable[..., nn.Module]] = {
    "retinanet_resnet18_fpn": retinanet_resnet18_fpn,
    "retinanet_mobilenet_v3_small_fpn": retinanet_mobilenet_v3_small_fpn,
    "fcos_resnet18_fpn": fcos_resnet18_fpn,
    "fcos_mobilenet_v3_small_fpn": fcos_mobilenet_v3_small_fpn,
    "fasterrcnn_mobilenet_v3_fpn": fasterrcnn_mobilenet_v3_fpn,
}


def build_detector(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A randomly initialised detector of :data:`DETECTION_ZOO` by name."""
    if name not in DETECTION_ZOO:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(DETECTION_ZOO)}")
    return DETECTION_ZOO[name](num_classes=num_classes, **kwargs)
