"""CIFAR-style ResNet-18 and ResNet-50, the surrogate and victim of the
unlearnable-examples literature.

Same architecture as torchvision's ``resnet18`` / ``resnet50``; module names follow
torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``, ``downsample``, ``fc``). Two stems:

- ``stem="cifar"``: ``conv1`` a 3x3 stride-1 convolution and no max-pool, full resolution
  into the first stage (what the MI-UE authors do for CIFAR-10/100, gen_miue.py and
  evaluation_sl.py of hala64/mi-ue);
- ``stem="imagenet"``: torchvision's 7x7 stride-2 convolution and 3x3 stride-2 max-pool,
  4x smaller per side into the first stage, about 16x less compute there (what the
  authors keep for Tiny-ImageNet, Mini-ImageNet and ImageNet-100).

``build_model`` takes the ImageNet stem for images above 64 px (the authors' code uses it
for 64 px Tiny-ImageNet too; a 64 px set here keeps the CIFAR stem).
"""
from __future__ import annotations

import torch
from torch import nn

from ._layers import Normalize, init_weights

STEMS = ("cifar", "imagenet")


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _downsample(in_planes: int, planes: int, stride: int) -> nn.Module | None:
    """1x1 projection shortcut where the shape changes, identity otherwise."""
    if stride == 1 and in_planes == planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "v1.5"), 1x1 expand."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem (64 ch), BN, ReLU, no max-pool; four
    stages of widths 64-128-256-512 (x block expansion) with strides 1,2,2,2;
    global average pool; linear head.

    forward(x [N, 3, H, W] in [0, 1]) -> (features [N, feature_dim], logits [N, num_classes]).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int,
                 stem: str = "cifar"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        self.stem = stem
        self.normalize = Normalize()
        if stem == "cifar":
            self.conv1 = _conv3x3(3, 64)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(block(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] in [0, 1] -> features [N, feature_dim]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return features, self.fc(features)


def resnet18(num_classes: int = 10, stem: str = "cifar") -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); 512-d features; 11,173,962 parameters for 10
    classes with the CIFAR stem (11,181,642 with the ImageNet one)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, stem)


def resnet50(num_classes: int = 10, stem: str = "cifar") -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); 2048-d features; 23,520,842 parameters for 10
    classes with the CIFAR stem."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, stem)
