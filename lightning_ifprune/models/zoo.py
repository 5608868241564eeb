"""Model registry: build any zoo, torchvision or (optional) timm classifier by name."""

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


TIMM_PREFIX = "timm/"


def _timm():
    """The ``timm`` module, or an ImportError saying how to get it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "timm models need the optional dependency timm: pip install 'lightning-ifprune[timm]' (or pip install timm)"
        ) from err
    return timm


def timm_model_names() -> list[str]:
    """Names of timm's models (empty when timm is not installed)."""
    try:
        return _timm().list_models()
    except ImportError:
        return []


def build_timm_model(arch: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model by name (``pretrained=False``: nothing is downloaded)."""
    timm = _timm()
    if arch not in timm.list_models():
        raise ValueError(f"unknown timm model {arch!r} (see timm.list_models())")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def available_models() -> list[str]:
    """Every name :func:`build_model` accepts: the zoo's, then torchvision's."""
    return [*ZOO, *torchvision_model_names()]


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised classifier by name.

    Zoo names (:data:`ZOO`) come first; any other name is looked up among torchvision's
    classification models by its plain torchvision name (``resnet18``, ``mobilenet_v2``),
    built with ``weights=None`` so nothing is downloaded. torchvision models take 3 input
    channels. ``"timm/<arch>"``, or ``"timm"`` with ``arch=...``, builds a timm model
    (:func:`build_timm_model`; needs the optional ``timm`` extra). Extra ``kwargs`` go to the builder.
    """
    if name == "timm" or name.startswith(TIMM_PREFIX):
        arch = kwargs.pop("arch", None) if name == "timm" else name[len(TIMM_PREFIX) :]
        if not arch:
            raise ValueError("model 'timm' needs arch=<timm model name>, e.g. arch='resnet10t'")
        return build_timm_model(arch, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name in ZOO:
        return ZOO[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name in torchvision_model_names():
        if in_channels != 3:
            raise ValueError(f"torchvision model {name!r} takes 3 input channels, the data has {in_channels}")
        return tv_models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise ValueError(
        f"unknown model {name!r}; available: {', '.join(available_models())} (and timm/<arch> with timm installed)"
    )
