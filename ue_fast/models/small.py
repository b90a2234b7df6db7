"""cnn-small: a small, fast CNN for CPU runs and tests (not a paper model).

Layout: conv32-pool, conv64-pool, conv128-conv128-pool (conv3x3-BN-ReLU each),
global average pool, 128-d features, linear head; 242,474 parameters for 10
classes. Chosen for speed on a 2-core CPU: a training step on 128 32x32 images
takes ~50 ms, where two convolutions in every block (288,746 parameters) take
~100 ms for about the same accuracy on small data (15 epochs on 3,000 CIFAR-10
images: ~60% test accuracy for both).
"""
from __future__ import annotations

import torch
from torch import nn

from ._layers import Normalize, init_weights


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Blocks of ``convs`` x (conv3x3-BN-ReLU) each followed by a 2x2 max-pool,
    then global average pool and a linear head.

    forward(x [N, 3, H, W] in [0, 1]) -> (features [N, widths[-1]], logits [N, num_classes]).
    """

    def __init__(
        self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128), convs: tuple[int, ...] = (1, 1, 2)
    ):
        super().__init__()
        if len(widths) != len(convs):
            raise ValueError(f"widths {widths} and convs {convs} must have the same length")
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        in_ch = 3
        for width, n in zip(widths, convs):
            for _ in range(n):
                layers += _conv_bn_relu(in_ch, width)
                in_ch = width
            # ceil_mode keeps inputs down to 16x16 (and odd sizes) valid.
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)
        self.channels_last = True
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] in [0, 1] -> features [N, feature_dim]."""
        # Run the body channels_last whatever the caller's layout: on CPU, NCHW
        # max-pool is several times slower than NHWC (a training step of a
        # 128 x 32x32 batch: ~70 ms NCHW vs ~48 ms NHWC on 2 cores). A no-op for
        # channels_last inputs; outputs and x.grad keep their usual layout.
        x = self.normalize(x)
        if self.channels_last:  # off under torch.func.vmap, which cannot query memory formats
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return features, self.classifier(features)


def cnn_small(num_classes: int = 10) -> SmallCNN:
    """The ``cnn-small`` of the registry: widths 32-64-128, convolutions 1-1-2."""
    return SmallCNN(num_classes)


class LinearNet(nn.Module):
    """``linear``: PIL's surrogate (jinlinll/pil, ``models/linearmodel.py``), a bias-free linear
    map of rank <= C in two factors, ``logits = W2 W1 vec(x)``, on the raw [0, 1] pixels (no
    normalisation, no non-linearity): a surrogate only, not a victim.

    Built for ``image_size`` x ``image_size`` inputs (3 * S * S inputs); other sizes are
    resized to it (bilinear) first. forward(x) -> (features ``W1 vec(x)`` [N, C], logits [N, C]).
    PyTorch's default ``nn.Linear`` initialisation, as theirs.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.size = image_size
        self.feature_dim = num_classes
        self.fc1 = nn.Linear(3 * image_size * image_size, num_classes, bias=False)
        self.classifier = nn.Linear(num_classes, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        features = self.fc1(x.flatten(1))
        return features, self.classifier(features)


def linear_net(num_classes: int = 10, image_size: int = 32) -> LinearNet:
    """The ``linear`` surrogate of the registry (``SURROGATE_ARCHS``)."""
    return LinearNet(num_classes, image_size)
