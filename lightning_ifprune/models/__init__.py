"""Model zoo: CIFAR ResNets and VGG, a small digits CNN, and torchvision classifiers by name."""

from lightning_ifprune.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    resnet20,
    resnet32,
    resnet56,
)
from lightning_ifprune.models.small_cnn import SmallCNN
from lightning_ifprune.models.vgg_cifar import VGG16_LAYOUT, VGG16BNCifar, vgg16_bn_cifar
from lightning_ifprune.models.zoo import (
    ZOO,
    available_models,
    build_model,
    torchvision_model_names,
)

__all__ = [
    "VGG16_LAYOUT",
    "ZOO",
    "BasicBlock",
    "CifarResNet",
    "SmallCNN",
    "VGG16BNCifar",
    "available_models",
    "build_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "torchvision_model_names",
    "vgg16_bn_cifar",
]
