"""The CNN victims of APBench and the MI-UE authors' evaluation, in their CIFAR forms:
MobileNetV2, DenseNet-121, SENet-18 and WideResNet-34-10.

The CIFAR forms are the ones the field trains on 32x32 images (APBench's ``nets/``, after
the common CIFAR re-implementations; WRN-34-10 as in the adversarial-training literature):
a 3x3 stride-1 first convolution and no early down-sampling. Above 64 px (``stem="imagenet"``)
each takes its ImageNet form's early down-sampling back: MobileNetV2 its stride-2 first
convolution and second stage; DenseNet-121 its 7x7 stride-2 convolution and 3x3 max-pool;
SENet-18 and WRN-34-10 a 7x7 stride-2 convolution and 3x3 max-pool, as ResNet's.

Every model takes x [N, 3, H, W] in [0, 1] (normalised inside), pools adaptively, and returns
``(features [N, feature_dim], logits [N, num_classes])``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import Normalize, init_weights

STEMS = ("cifar", "imagenet")


def _check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")


def _stem(stem: str, planes: int) -> tuple[nn.Module, nn.Module]:
    """(conv1, pool1): a 3x3 stride-1 convolution and no pool (CIFAR), or a 7x7 stride-2
    convolution and a 3x3 stride-2 max-pool (ImageNet), into ``planes`` channels."""
    _check_stem(stem)
    if stem == "cifar":
        return nn.Conv2d(3, planes, 3, padding=1, bias=False), nn.Identity()
    return nn.Conv2d(3, planes, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, stride=2, padding=1)


class _Classifier(nn.Module):
    """Shared tail: ``forward_features`` from the subclass, then the linear head ``classifier``."""

    def _head(self, planes: int, num_classes: int) -> None:
        """The final BN, the feature width, the linear head, then the weights' initialisation."""
        self.bn = nn.BatchNorm2d(planes)
        self.feature_dim = planes
        self.classifier = nn.Linear(planes, num_classes)
        init_weights(self)

    def _pool_features(self, out: torch.Tensor) -> torch.Tensor:
        """BN-ReLU, global average pool, flatten."""
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return features, self.classifier(features)


# ----------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (carrying the stride), 1x1 linear projection; the input is
    added back at stride 1 (through a 1x1 projection when the widths differ)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        planes = expansion * in_planes
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = None
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride != 1:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


class MobileNetV2(_Classifier):
    """MobileNetV2 (Sandler et al. 2018), CIFAR form: the first convolution and the second
    stage at stride 1 (2 in the ImageNet form); 1280-d features."""

    # (expansion, width, blocks, stride); the second row's stride is 2 in the ImageNet form
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, stem: str = "cifar"):
        super().__init__()
        _check_stem(stem)
        self.stem = stem
        self.normalize = Normalize()
        imagenet = stem == "imagenet"
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2 if imagenet else 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, in_planes = [], 32
        for i, (expansion, width, blocks, stride) in enumerate(self.CFG):
            stride = 2 if (imagenet and i == 1) else stride
            for b in range(blocks):
                layers.append(InvertedResidual(in_planes, width, expansion, stride if b == 0 else 1))
                in_planes = width
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.feature_dim = 1280
        self.classifier = nn.Linear(1280, num_classes)
        init_weights(self)

    def forward_features(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(self.layers(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


# ----------------------------------------------------------------------------- DenseNet-121


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (4 growth wide), BN-ReLU-3x3 (growth wide); the new maps are concatenated
    in front of the input's."""

    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 halving the width, then a 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2, ceil_mode=True)


class DenseNet(_Classifier):
    """DenseNet-BC (Huang et al. 2017), CIFAR form: growth 32, blocks (6, 12, 24, 16),
    compression 0.5, a 3x3 stride-1 first convolution (7x7 stride 2 and a max-pool in the
    ImageNet form); 1024-d features for DenseNet-121."""

    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 32, num_classes: int = 10, stem: str = "cifar"):
        super().__init__()
        self.stem = stem
        self.normalize = Normalize()
        planes = 2 * growth
        self.conv1, self.pool1 = _stem(stem, planes)
        stages = []
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            if i < len(blocks) - 1:
                layers.append(Transition(planes, planes // 2))
                planes //= 2
            stages.append(nn.Sequential(*layers))
        self.dense = nn.Sequential(*stages)
        self._head(planes, num_classes)

    def forward_features(self, x):
        return self._pool_features(self.dense(self.pool1(self.conv1(self.normalize(x)))))


# ----------------------------------------------------------------------------- SENet-18


class SEPreActBlock(nn.Module):
    """Pre-activation basic block with squeeze-and-excitation (Hu et al. 2018): the residual
    branch's channels are rescaled by sigmoid(fc2(relu(fc1(mean over space)))), reduction 16."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        self.fc1 = nn.Conv2d(planes, planes // 16, 1)
        self.fc2 = nn.Conv2d(planes // 16, planes, 1)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return out * w + identity


class SENet(_Classifier):
    """SENet-18: pre-activation SE blocks (2, 2, 2, 2) of widths 64-128-256-512, CIFAR stem
    (3x3 stride 1; 7x7 stride 2 and a max-pool in the ImageNet form); 512-d features."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, stem: str = "cifar"):
        super().__init__()
        self.stem = stem
        self.normalize = Normalize()
        self.conv1, self.pool1 = _stem(stem, 64)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for b in range(n):
                layers.append(SEPreActBlock(in_planes, planes, (1 if i == 0 else 2) if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)
        init_weights(self)

    def forward_features(self, x):
        out = self.pool1(F.relu(self.bn1(self.conv1(self.normalize(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(out), 1), 1)


# ----------------------------------------------------------------------------- WideResNet-34-10


class WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-3x3 (carrying the stride), BN-ReLU-3x3; a 1x1
    projection of the activated input where the width changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if in_planes != planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + identity


class WideResNet(_Classifier):
    """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) as the adversarial-training
    literature uses it: three groups of (depth - 4) / 6 wide blocks, widths 16k-32k-64k,
    strides 1-2-2, a final BN-ReLU; 640-d features for WRN-34-10."""

    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10, stem: str = "cifar"):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        self.stem = stem
        self.normalize = Normalize()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1, self.pool1 = _stem(stem, widths[0])
        groups, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            groups.append(nn.Sequential(*[WideBlock(in_planes if b == 0 else planes, planes, stride if b == 0 else 1)
                                          for b in range(n)]))
            in_planes = planes
        self.groups = nn.Sequential(*groups)
        self._head(in_planes, num_classes)

    def forward_features(self, x):
        return self._pool_features(self.groups(self.pool1(self.conv1(self.normalize(x)))))


def mobilenetv2(num_classes: int = 10, stem: str = "cifar") -> MobileNetV2:
    """MobileNetV2, CIFAR form: 2,296,922 parameters for 10 classes."""
    return MobileNetV2(num_classes, stem)


def densenet121(num_classes: int = 10, stem: str = "cifar") -> DenseNet:
    """DenseNet-121 (growth 32), CIFAR form: 6,956,298 parameters for 10 classes."""
    return DenseNet((6, 12, 24, 16), 32, num_classes, stem)


def senet18(num_classes: int = 10, stem: str = "cifar") -> SENet:
    """SENet-18, CIFAR form: 11,260,354 parameters for 10 classes."""
    return SENet((2, 2, 2, 2), num_classes, stem)


def wrn34_10(num_classes: int = 10, stem: str = "cifar") -> WideResNet:
    """WideResNet-34-10, CIFAR form: 46,160,474 parameters for 10 classes."""
    return WideResNet(34, 10, num_classes, stem)

