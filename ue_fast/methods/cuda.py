"""CUDA (Sadasivan et al., CVPR 2023): convolution-based unlearnable data sets.

"CUDA: Convolution-based Unlearnable Datasets" (arXiv:2303.04278). Training-free and not an
L_p perturbation: every image of class c is convolved with the class's own small random
filter, and the filtered image *is* the output. Algorithm (authors' code:
github.com/vinusankars/Convolution-based-Unlearnability @ ff58b1c,
``final_filter_unlearnable.py`` ``get_filter_unlearnable``, and its copy in
``final_muladv.py``):

1. from a private seed (the *key*), per class c in order: a ``k x k`` filter with entries
   uniform in ``[0, pb)`` (``blur_parameter`` pb = 0.3, k = 3), one entry, at a uniformly
   random position, set to 1; the same filter for R, G and B (a depthwise convolution), no
   bias, no normalisation of the filter;
2. per image x in [0, 1]: ``y = conv(x, filter of its class)``, zero padding ``k // 2``,
   stride 1; ``y <- y / max(y)`` (one maximum over the image's channels and pixels, so the
   brightest value is 1); the output is ``floor(255 y)`` in 8 bits.

The perturbation ``poison.pt`` holds is the effective difference ``floor(255 y) / 255 - x``,
in whole grey levels, up to 255/255: eps does not apply (its setting is fixed at 255/255);
the method's own budget is the filter's (``blur_parameter``, ``kernel_size``), which the
manifest's ``budget`` reports with a check of every drawn filter.

The key: whoever holds the filters can try to invert the convolution, so the seed is drawn
at random for every run unless given (``seed``), and it stays out of the outputs (the
manifest records no seed) unless asked (``protect(key_file=...)``, ``--key-file``).

Still differs from the authors' code, and why:

- the filters are drawn with torch's generator from the run's seed (theirs: NumPy's global
  generator from ``--seed``, default 0, which every user of their script then shares; a
  public default key defeats a key);
- padding is ``k // 2`` for any odd k (theirs hard-codes 1, right for their only k, 3);
- their options left out: ``grayscale`` (off in their script), ``same`` (one filter for every
  class, an ablation), ``mix`` (a random fraction of images filtered: partial poisoning,
  which ``ue-fast evaluate --poison-ratio`` measures on any method's output).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import TrainingFreeMethod
from .settings import Config, int_setting, real_setting


@dataclass
class CUDAConfig(Config):
    """Settings of a CUDA run; defaults are the authors' CIFAR-10 settings (``--blur-parameter
    0.3``, a 3 x 3 filter). ``seed`` is the private key: None (the default) draws a fresh one."""

    eps: float = 1.0  # not an L-inf method: the output is the filtered image (fixed at 255/255)
    seed: int | None = None
    blur_parameter: float = 0.3  # filter entries uniform in [0, blur_parameter), one entry set to 1
    kernel_size: int = 3

    def __post_init__(self):
        if self.seed is None:
            self.seed = secrets.randbits(62)
        super().__post_init__()

    def validate(self) -> None:
        if self.eps != 1.0:
            raise ValueError("cuda is not an L-inf perturbation: eps does not apply (the output is the filtered "
                             f"image); its strength is blur_parameter (got eps {self.eps * 255:g}/255)")
        super().validate()
        real_setting("blur_parameter", self.blur_parameter)
        int_setting("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the output keeps the image's size), got {self.kernel_size}")


def cuda_filters(num_classes: int, kernel_size: int, blur_parameter: float, gen: torch.Generator) -> torch.Tensor:
    """float32 [C, k, k]: per class, entries uniform in [0, blur_parameter) and one entry, at a
    uniform position, set to 1 (drawn from ``gen`` in class order)."""
    k = kernel_size
    out = torch.empty(num_classes, k * k)
    for c in range(num_classes):  # class by class: a class's filter does not depend on C
        out[c] = torch.rand(k * k, generator=gen) * blur_parameter
        out[c, int(torch.randint(k * k, (1,), generator=gen))] = 1.0
    return out.view(num_classes, k, k)


def cuda_filter_images(images: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """The CUDA outputs, uint8 [B, 3, H, W], of uint8 ``images`` [B, 3, H, W] and one float
    filter [B, k, k] per image: one grouped convolution of all B x 3 channels, each image then
    divided by its maximum and floored to 8 bits."""
    b, c, h, w = images.shape
    k = filters.shape[-1]
    x = images.float().div_(255).reshape(1, b * c, h, w)
    weight = filters.to(x).repeat_interleave(c, dim=0)[:, None]  # [B * 3, 1, k, k]
    y = F.conv2d(x, weight, padding=k // 2, groups=b * c).view(b, c, h, w)
    peak = y.amax(dim=(1, 2, 3), keepdim=True)
    y = torch.where(peak > 0, y / peak.clamp_min(1e-30), y)  # an all-black image stays black
    return torch.floor(y * 255).clamp_(0, 255).to(torch.uint8)


class CUDA(TrainingFreeMethod):
    """Convolution-based unlearnable data set (Sadasivan et al., CVPR 2023); see the module docstring."""

    name = "cuda"
    config_class = CUDAConfig
    lp = False
    keyed = True
    # No cpu-small cut: the method is one convolution per image.
    presets = {"paper": {}, "cpu-small": {}}

    def filters(self) -> torch.Tensor:
        """The key's filters [C, k, k], from a generator of their own seeded by ``seed`` (so a
        resumed or finished run gives them again without its other draws)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        return cuda_filters(self.num_classes, cfg.kernel_size, cfg.blur_parameter, gen)

    def begin(self, chunks, gen, device):
        self._filters = self.filters().to(device)

    def rows(self, images, labels, gen, device):
        out = cuda_filter_images(images, self._filters[labels.to(device)])
        return (out.float() - images.float()).div_(255)

    def budget(self) -> dict:
        cfg = self.config
        f = self.filters().flatten(1)
        one = f == 1.0
        rest = f.masked_fill(one, 0.0)
        ok = bool((one.any(1) & (rest >= 0).all(1) & (rest < cfg.blur_parameter).all(1)).all())
        return {"kind": "convolution",
                "what": f"each class's images convolved with the class's own random {cfg.kernel_size}x"
                        f"{cfg.kernel_size} filter (entries in [0, {cfg.blur_parameter:g}), one entry 1), divided "
                        "by their maximum and floored to 8 bits: not an L-inf perturbation, eps does not apply",
                "blur_parameter": cfg.blur_parameter, "kernel_size": cfg.kernel_size,
                "holds": ok}

    def key(self) -> dict:
        """The private key: the seed and the filters it draws (class order of the manifest's ``classes``)."""
        cfg = self.config
        return {"method": self.name, "seed": cfg.seed, "blur_parameter": cfg.blur_parameter,
                "kernel_size": cfg.kernel_size, "filters": self.filters().tolist()}
