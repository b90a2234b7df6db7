"""The model zoo: surrogates and victims for generating and evaluating
unlearnable examples.

Every model takes images x [N, 3, H, W] with values in [0, 1] (the CIFAR-10
normalisation is a buffer inside the model, so perturbations are bounded in
pixel space) and returns ``(features [N, model.feature_dim], logits [N, num_classes])``,
features being the pooled penultimate representation that feature-space losses
(MI-UE's supervised-contrastive loss, class covariances) act on.

    model = build_model("resnet18", 10)
    features, logits = model(x)          # [N, 512], [N, 10]
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops._checks import check_int
from ._layers import CIFAR10_MEAN, CIFAR10_STD, Normalize
from .cifar_cnns import DenseNet, MobileNetV2, SENet, WideResNet, densenet121, mobilenetv2, senet18, wrn34_10
from .resnet import ResNet, resnet18, resnet50
from .small import LinearNet, SmallCNN, cnn_small, linear_net
from .transformers import CaiT, ViT, cait_small, vit_small
from .vgg import VGG, vgg16, vgg19

__all__ = [
    "ARCHS", "SURROGATE_ARCHS", "RECIPES", "build_model", "count_parameters", "make_optimizer", "recipe", "LinearNet",
    "ResNet", "VGG", "SmallCNN", "MobileNetV2", "DenseNet", "SENet", "WideResNet", "ViT", "CaiT", "Normalize",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]

ARCHS = ("resnet18", "resnet50", "vgg16", "vgg19", "mobilenetv2", "densenet121", "senet18", "wrn34-10", "vit-small",
         "cait-small", "cnn-small")
# Surrogates only (not victims): PIL's bias-free linear model.
SURROGATE_ARCHS = ARCHS + ("linear",)

_BUILDERS = {"resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16, "vgg19": vgg19, "mobilenetv2": mobilenetv2,
             "densenet121": densenet121, "senet18": senet18, "wrn34-10": wrn34_10, "vit-small": vit_small,
             "cait-small": cait_small, "cnn-small": cnn_small, "linear": linear_net}
_STEMMED = ("resnet18", "resnet50", "mobilenetv2", "densenet121", "senet18", "wrn34-10")
_SIZED = ("vit-small", "cait-small", "linear")  # built for a patch grid or an input size: take image_size

# How each architecture is trained as a victim (``ue_fast.evaluate.train_victim``) and the base of a
# surrogate's optimiser (``ue_fast.generation.surrogate``): the CNNs with SGD (momentum 0.9, weight
# decay 5e-4, lr 0.1), the field's recipe; the transformers with AdamW (lr 1e-3, weight decay 0.05),
# on which SGD at 0.1 does not train them (APBench's train.py uses Adam for them).
_SGD = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}
_ADAMW = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999)}
RECIPES = {arch: dict(_ADAMW if arch in ("vit-small", "cait-small") else _SGD) for arch in SURROGATE_ARCHS}

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
IMAGENET_STEM_ABOVE = 64  # px: larger images get the ImageNet stem in ResNets


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """The ops' ``check_int``, with build_model's contract that every bad argument is a ValueError."""
    try:
        return check_int(name, value, lo, hi)
    except TypeError as e:
        raise ValueError(str(e)) from None


def build_model(arch: str, num_classes: int, *, image_size: int = 32) -> nn.Module:
    """A freshly initialised model (seed with ``torch.manual_seed`` for a
    reproducible one).

    arch: one of ``ARCHS`` (or ``linear``, a surrogate only). num_classes: >= 2. image_size: the side of the
    (square) training images, 16..1024. All models pool adaptively, so they
    accept any H, W >= 16 whatever ``image_size`` says; it is validated and kept
    as ``model.image_size`` for callers (checkpoints, input checks) to read.
    ResNets take torchvision's ImageNet stem (7x7 stride-2 convolution and max-pool)
    above ``IMAGENET_STEM_ABOVE`` = 64 px, the CIFAR stem otherwise (see
    ``ue_fast.models.resnet``), and so do MobileNetV2, DenseNet-121, SENet-18 and
    WRN-34-10 their ImageNet forms' early down-sampling (``ue_fast.models.cifar_cnns``);
    ViT-small and CaiT-small cut 16-px patches there instead of 4-px ones and learn a
    position embedding for ``image_size``'s grid, resized for other sizes
    (``ue_fast.models.transformers``); VGG and cnn-small do not change with the size.
    """
    if not isinstance(arch, str) or arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(SURROGATE_ARCHS)}")
    num_classes = _check_int("num_classes", num_classes, 2)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    if arch in _STEMMED:
        model = _BUILDERS[arch](num_classes, stem="imagenet" if image_size > IMAGENET_STEM_ABOVE else "cifar")
    elif arch in _SIZED:
        model = _BUILDERS[arch](num_classes, image_size=image_size)
    else:
        model = _BUILDERS[arch](num_classes)
    model.arch = arch
    model.num_classes = num_classes
    model.image_size = image_size
    return model


def recipe(arch: str) -> dict:
    """A copy of ``RECIPES[arch]``: the optimiser (``"sgd"`` or ``"adamw"``) and its lr, weight decay, ...."""
    if arch not in RECIPES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(SURROGATE_ARCHS)}")
    return dict(RECIPES[arch])


def make_optimizer(params, arch: str, *, lr: float | None = None, weight_decay: float | None = None,
                   momentum: float | None = None, nesterov: bool = False) -> torch.optim.Optimizer:
    """The optimiser of ``arch``'s recipe over ``params``; ``lr``, ``weight_decay`` (and, for SGD,
    ``momentum``) override the recipe's when given."""
    r = recipe(arch)
    lr = r["lr"] if lr is None else lr
    wd = r["weight_decay"] if weight_decay is None else weight_decay
    if r["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=r["betas"])
    return torch.optim.SGD(params, lr=lr, momentum=r["momentum"] if momentum is None else momentum,
                           weight_decay=wd, nesterov=nesterov)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
