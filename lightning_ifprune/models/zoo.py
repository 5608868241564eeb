"""Model registry: build any zoo or torchvision classifier by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision import models as tv_models

from lightning_ifprune.models.cifar_resnet import resnet20, resnet32, resnet56
from lightning_ifprune.models.small_cnn import SmallCNN
from lightning_ifprune.models.vgg_cifar import vgg16_bn_cifar

# Builders taking (num_classes=..., in_channels=..., **kwargs).
ZOO: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg16_bn_cifar": vgg16_bn_cifar,
}


def torchvision_model_names() -> list[str]:
    """Names of torchvision's image-classification models (``resnet18``, ``vgg16_bn``, ...)."""
    return tv_models.list_models(module=tv_models)


def available_models() -> list[str]:
    """Every name :func:`build_model` accepts: the zoo's, then torchvision's."""
    return [*ZOO, *torchvision_model_names()]


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised classifier by name.

    Zoo names (:data:`ZOO`) come first; any other name is looked up among torchvision's
    classification models by its plain torchvision name (``resnet18``, ``mobilenet_v2``),
    built with ``weights=None`` so nothing is downloaded. torchvision models take 3 input
    channels. Extra ``kwargs`` go to the builder.
    """
    if name in ZOO:
        return ZOO[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name in torchvision_model_names():
        if in_channels != 3:
            raise ValueError(f"torchvision model {name!r} takes 3 input channels, the data has {in_channels}")
        return tv_models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
