"""VGG-16 and VGG-19 with batch norm, in the CIFAR form: thirteen (sixteen) 3x3
conv-BN-ReLU layers, five max-pools, global average pool and one linear layer (no
4096-wide MLP), as the CIFAR VGGs the UE literature and APBench evaluate on."""
from __future__ import annotations

import torch
from torch import nn

from ._layers import Normalize, init_weights

# Channel widths; "M" is a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """forward(x [N, 3, H, W] in [0, 1]) -> (features [N, 512], logits [N, num_classes]).

    The pools use ``ceil_mode=True``: identical to floor pooling for the even
    sizes that matter (32, 64, 96, 224), and it keeps inputs down to 16x16 valid
    (five floor pools would shrink a 16x16 map to nothing).
    """

    def __init__(self, cfg: tuple = VGG16_CFG, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                # Conv bias kept (redundant before BN) as in torchvision's vgg16_bn and
                # the CIFAR VGGs, so parameter counts and checkpoints line up.
                layers += [
                    nn.Conv2d(in_ch, v, kernel_size=3, padding=1),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] in [0, 1] -> features [N, 512]."""
        return torch.flatten(self.avgpool(self.features(self.normalize(x))), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return features, self.classifier(features)


def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16-BN, CIFAR form; 14,728,266 parameters for 10 classes."""
    return VGG(VGG16_CFG, num_classes)


def vgg19(num_classes: int = 10) -> VGG:
    """VGG-19-BN, CIFAR form; 20,040,522 parameters for 10 classes."""
    return VGG(VGG19_CFG, num_classes)
