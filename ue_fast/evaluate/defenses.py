"""Defences against unlearnable examples, applied while a victim network trains.

A defence acts once on the uint8 training set before training (``prepare``:
jpeg, grayscale) or on every cropped and flipped float batch (``loss``: the rest):

    defense = get_defense("adv-train", eps=4 / 255)
    images = defense.prepare(images, gen)             # [N, 3, H, W] uint8; identity here
    loss, logits = defense.loss(model, x, y, gen)     # x [B, 3, H, W] in [0, 1], y [B]

============  ==============================================================
none          plain cross-entropy
jpeg          Pillow JPEG round trip at ``quality`` 10 (ISS, Liu et al. 2023)
grayscale     ITU-R 601 luma as Pillow's ``convert("L")``, 3 channels (ISS)
gaussian      ``kernel_size`` 3 Gaussian blur, ``sigma`` 0.1 (APBench's setting)
bdr           bit-depth reduction to ``bits`` 2 (posterize; APBench's setting)
cutout        one ``size`` 16 zero square per image (DeVries & Taylor 2017)
cutmix        Beta(``alpha`` 1) box pasted from a shuffled batch (Yun et al. 2019)
mixup         Beta(``alpha`` 1) convex combination (Zhang et al. 2018)
adv-train     PGD-``steps`` 10 AT in ``norm`` linf (or l2), ``eps`` 8/255, step eps/4
              (Madry et al. 2018), the step by ``ue_fast.pgd_step_``
ueraser-lite  one strong augmentation per batch (Qin et al. 2023; ``max_epochs`` 0)
ueraser       worst of ``repeats`` 5 strong augmentations for the first ``max_epochs``
              50 epochs, then one (APBench's ``--repeat_epoch 50``)
ueraser-max   the same for ``max_epochs`` 300 epochs (APBench's default)
============  ==============================================================

A defence that changes with the epoch (UEraser's max-loss phase) gives the victim loop
the defence of each epoch through ``at_epoch(epoch)``.

Randomness: per-sample parameters come from ``gen`` (a CPU generator) and are
moved to x's device, as in ``crop_flip``; per-pixel noise (PGD's random start,
UEraser's plasma maps) from a generator on x's device seeded from ``gen``, so no
noise crosses the bus. A seed fixes the result on a given device.
"""
from __future__ import annotations

import dataclasses
import io
import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..ops import pgd_step_
from ..ops._checks import check_int
from .augment import GEOMETRIC, PHOTOMETRIC, plasma, trivial_augment

__all__ = ["DEFENSES", "Defense", "MixedBatch", "get_defense", "JPEG", "Grayscale", "GaussianBlur",
           "BitDepthReduction", "Cutout", "CutMix", "Mixup", "AdversarialTraining", "UEraser", "UEraserLite",
           "UEraserMax"]


def _float_option(name: str, value, lo: float, hi: float) -> float:
    """A finite real in (lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and lo < value <= hi):
        raise ValueError(f"{name} must be in ({lo}, {hi}], got {value}")
    return float(value)


def _check_images(images, gen) -> None:
    _check_gen(gen)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, 3, H, W], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must have shape [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")


def _check_x(x, gen) -> None:
    _check_gen(gen)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [B, 3, H, W] with B >= 1, got {tuple(x.shape)}")


def _check_batch(x, y, gen) -> None:
    _check_x(x, gen)
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        raise TypeError(f"y must be an int64 tensor [B], got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],) or y.device != x.device:
        raise ValueError(f"y must have shape [{x.shape[0]}] on {x.device}, got {tuple(y.shape)} on {y.device}")


def _check_gen(gen) -> None:
    if not isinstance(gen, torch.Generator) or gen.device.type != "cpu":
        raise TypeError(f"gen must be a CPU torch.Generator, got {gen!r}")


def _device_gen(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """``gen`` itself on the CPU; elsewhere a generator on ``device`` seeded from ``gen``."""
    if device.type == "cpu":
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def _beta(alpha: float, gen: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; numpy's, seeded from gen, keeps runs reproducible.
    return float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(alpha, alpha))


@dataclass(frozen=True)
class Defense:
    """No defence: identity ``prepare``, cross-entropy ``loss``. The base of the
    others, which override ``_prepare`` / ``_loss`` (called on validated input)."""

    name: ClassVar[str] = "none"

    def prepare(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Data level, once before training: uint8 [N, 3, H, W] -> uint8 [N, 3, H, W], same device."""
        _check_images(images, gen)
        return self._prepare(images, gen)

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        """Batch level: x float [B, 3, H, W] in [0, 1] (cropped and flipped), y int64 [B]
        -> (scalar training loss, logits [B, C] for the train accuracy)."""
        _check_batch(x, y, gen)
        return self._loss(model, x, y, gen)

    def at_epoch(self, epoch: int) -> "Defense":
        """The defence for training epoch ``epoch`` (0-based): itself, unless it has phases."""
        return self

    def _prepare(self, images, gen):
        return images

    def _loss(self, model, x, y, gen):
        _, logits = model(x)
        return F.cross_entropy(logits, y), logits


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W, 3] uint8 after a Pillow JPEG encode and decode."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"))


@dataclass(frozen=True)
class JPEG(Defense):
    """Re-encode every image as JPEG at ``quality`` (Pillow's default 4:2:0 chroma subsampling)."""

    quality: int = 10
    name: ClassVar[str] = "jpeg"

    def __post_init__(self):
        object.__setattr__(self, "quality", check_int("quality", self.quality, 1, 100))

    def _prepare(self, images, gen):
        # One image per call: a mosaic would be faster but libjpeg's chroma
        # upsampling blends across tile borders. ~0.2 ms per 32x32 image; a
        # thread pool does not help (the GIL dominates at this size).
        hwc = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
        out = np.stack([_jpeg_round_trip(im, self.quality) for im in hwc])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


@dataclass(frozen=True)
class Grayscale(Defense):
    """ITU-R 601 luma L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, Pillow's exact
    integer formula for ``convert("L")``, replicated to 3 channels."""

    name: ClassVar[str] = "grayscale"

    def _prepare(self, images, gen):
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=images.device).view(1, 3, 1, 1)
        out = torch.empty_like(images)
        for i in range(0, len(images), 4096):  # chunks bound the int32 intermediate
            chunk = images[i:i + 4096].to(torch.int32)
            luma = ((chunk * weights).sum(1, keepdim=True) + 32768) >> 16  # [n, 1, H, W]
            out[i:i + 4096] = luma.to(torch.uint8)
        return out


@dataclass(frozen=True)
class GaussianBlur(Defense):
    """Blur every image once with a ``kernel_size`` x ``kernel_size`` Gaussian of standard deviation
    ``sigma`` pixels, as torchvision's ``GaussianBlur`` (APBench: ``GaussianBlur(3, sigma=0.1)``):
    the 1-D kernel exp(-t^2 / (2 sigma^2)) at t = -(k-1)/2 .. (k-1)/2, normalised, applied along
    both axes in float32 with reflected borders, rounded to 8 bits.

    At APBench's sigma of 0.1 the neighbours' weight is exp(-50) ~ 2e-22 of the centre's: on 8-bit
    images the blur changes no pixel (the tests check it). A larger sigma does blur."""

    kernel_size: int = 3
    sigma: float = 0.1
    name: ClassVar[str] = "gaussian"

    def __post_init__(self):
        k = check_int("kernel_size", self.kernel_size, 1)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {k}")
        object.__setattr__(self, "kernel_size", k)
        object.__setattr__(self, "sigma", _float_option("sigma", self.sigma, 0.0, math.inf))

    def kernel(self) -> torch.Tensor:
        """The normalised 1-D kernel, float32 [kernel_size]."""
        half = (self.kernel_size - 1) * 0.5
        t = torch.linspace(-half, half, self.kernel_size)
        pdf = torch.exp(-0.5 * (t / self.sigma).pow(2))
        return pdf / pdf.sum()

    def _prepare(self, images, gen):
        k = self.kernel().to(images.device)
        pad = self.kernel_size // 2
        out = torch.empty_like(images)
        for i in range(0, len(images), 4096):  # chunks bound the float32 copy
            x = images[i:i + 4096].float()
            n, c, h, w = x.shape
            if pad:
                if pad >= min(h, w):
                    raise ValueError(f"kernel_size {self.kernel_size} needs images larger than {pad} pixels, got {h}x{w}")
                x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
            x = x.reshape(n * c, 1, *x.shape[2:])
            x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))  # along W, then H
            out[i:i + 4096] = x.reshape(n, c, h, w).round_().clamp_(0, 255).to(torch.uint8)
        return out


@dataclass(frozen=True)
class BitDepthReduction(Defense):
    """Keep the ``bits`` most significant bits of every 8-bit value (posterize, Pillow's
    ``ImageOps.posterize`` and torchvision's ``RandomPosterize(bits, p=1)``; APBench: 2 bits)."""

    bits: int = 2
    name: ClassVar[str] = "bdr"

    def __post_init__(self):
        object.__setattr__(self, "bits", check_int("bits", self.bits, 1, 8))

    def _prepare(self, images, gen):
        return images & (0xFF << (8 - self.bits) & 0xFF)


@dataclass(frozen=True)
class Cutout(Defense):
    """Zero one ``size`` x ``size`` square per image, centred uniformly over the image
    (so clipped at borders). Rows [cy - size//2, cy - size//2 + size): exactly ``size``
    pixels for odd sizes too, where the original code cuts size - 1. Zero is black in
    pixel space (the models normalise inside), where DeVries & Taylor zero after
    normalisation (the mean colour)."""

    size: int = 16
    name: ClassVar[str] = "cutout"

    def __post_init__(self):
        object.__setattr__(self, "size", check_int("size", self.size, 1))

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, H, W], the squares zeroed."""
        _check_x(x, gen)
        b, _, h, w = x.shape
        top = torch.randint(0, h, (b, 1), generator=gen).to(x.device) - self.size // 2
        left = torch.randint(0, w, (b, 1), generator=gen).to(x.device) - self.size // 2
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_rows = (rows >= top) & (rows < top + self.size)  # [B, H]
        in_cols = (cols >= left) & (cols < left + self.size)  # [B, W]
        return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)

    def _loss(self, model, x, y, gen):
        _, logits = model(self.apply(x, gen))
        return F.cross_entropy(logits, y), logits


@dataclass
class MixedBatch:
    """A mixed batch: x [B, 3, H, W]; sample i mixes itself (weight ``lam``) with
    sample ``perm[i]`` (weight 1 - lam); ``box`` (top, bottom, left, right) is the
    pasted region for CutMix, None for Mixup."""

    x: torch.Tensor
    perm: torch.Tensor
    lam: float
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class _Mix(Defense):
    alpha: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "alpha", _float_option("alpha", self.alpha, 0.0, math.inf))

    def mix(self, x: torch.Tensor, gen: torch.Generator) -> MixedBatch:
        """x [B, 3, H, W] -> the mixed batch."""
        _check_x(x, gen)
        return self._mix(x, gen)

    def _loss(self, model, x, y, gen):  # lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])
        m = self._mix(x, gen)
        _, logits = model(m.x)
        return m.lam * F.cross_entropy(logits, y) + (1 - m.lam) * F.cross_entropy(logits, y[m.perm]), logits


@dataclass(frozen=True)
class Mixup(_Mix):
    """x_mix = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha), one lam per batch."""

    name: ClassVar[str] = "mixup"

    def _mix(self, x, gen):
        lam = _beta(self.alpha, gen)
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        return MixedBatch(lam * x + (1 - lam) * x[perm], perm, lam)


@dataclass(frozen=True)
class CutMix(_Mix):
    """One box per batch, Yun et al.'s ``rand_bbox``: side ratio sqrt(1 - lam),
    lam ~ Beta(alpha, alpha), centre uniform, clipped at the borders; then lam is
    reset to 1 - box area / image area, the exact share of the sample's own pixels."""

    name: ClassVar[str] = "cutmix"

    def _mix(self, x, gen):
        h, w = x.shape[2:]
        lam = _beta(self.alpha, gen)
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = (int(torch.randint(0, n, (1,), generator=gen)) for n in (h, w))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
        return MixedBatch(mixed, perm, lam, (top, bottom, left, right))


@dataclass(frozen=True)
class AdversarialTraining(Defense):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on
    x_adv ~ argmax_{|d| <= eps, x + d in [0, 1]} CE(model(x + d), y), found by ``steps``
    ascent steps of ``step_size`` (default eps / 4: 2/255 at 8/255, as Rice et al. 2020 and
    APBench's ``MadrysLoss``; 1/255 at 4/255), each one ``ue_fast.pgd_step_``.

    ``norm``: "linf" (signed-gradient steps, from a uniform random start in the ball) or "l2"
    (steps along the normalised gradient, the perturbation's L2 norm over the whole image kept
    within ``eps``, from a random direction of length ``step_size``, as APBench's L_2 branch).
    ``eps`` is a fraction of the pixel range in both (8/255 by default; an L2 radius of 0.5,
    common on CIFAR, is eps=0.5).

    The attack runs in the model's current mode, train mode in the victim loop, as the
    PyTorch PGD-AT recipes of UE papers do (Rice et al.'s ``attack_pgd``): its batch
    statistics then match the outer step's, which trains on the same batch (its forwards
    also update BN running statistics, as there). APBench's ``MadrysLoss`` attacks in eval
    mode instead. Gradients are taken w.r.t. the input only, so no parameter ``.grad`` is
    touched."""

    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    name: ClassVar[str] = "adv-train"

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        top = 1.0 if self.norm == "linf" else math.inf
        object.__setattr__(self, "eps", _float_option("eps", self.eps, 0.0, top))
        object.__setattr__(self, "steps", check_int("steps", self.steps, 1))
        step = self.eps / 4 if self.step_size is None else _float_option("step_size", self.step_size, 0.0, top)
        object.__setattr__(self, "step_size", step)

    def perturb(self, model, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x [B, 3, H, W] in [0, 1] -> x_adv [B, 3, H, W] in [0, 1], |x_adv - x| <= eps in ``norm``."""
        _check_batch(x, y, gen)
        x = x.detach()
        noise_gen = _device_gen(gen, x.device)
        if self.norm == "linf":
            start = torch.rand(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
            delta = (2 * start - 1) * self.eps
        else:
            start = torch.randn(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
            norms = start.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = start * (min(self.step_size, self.eps) / norms)
        delta = (x + delta).clamp_(0, 1) - x
        with torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                _, logits = model(x + delta)
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), delta)
                delta = delta.detach()
                pgd_step_(delta, grad, x, eps=self.eps, step_size=self.step_size, norm=self.norm, maximize=True)
        return (x + delta).clamp_(0, 1)

    def _loss(self, model, x, y, gen):
        _, logits = model(self.perturb(model, x, y, gen))
        return F.cross_entropy(logits, y), logits


@dataclass(frozen=True)
class UEraser(Defense):
    """UEraser (Qin et al. 2023): per batch, ``repeats`` independent strong augmentations;
    train on the mean over samples of the largest per-sample CE, for the first ``max_epochs``
    epochs (the max-loss phase: APBench's ``--repeat_epoch``, 50 for UEraser, 0 for -Lite, 300
    for -Max; None: every epoch), then on a single augmentation per batch.

    Each augmentation, per sample: plasma brightness x + i (2P - 1), i ~ U(0, 1), and
    plasma contrast (x - 1/2) 4P + 1/2, P a fractal map per channel with roughness
    ~ U(0.1, 0.7) (kornia's defaults as the paper uses them, p = 1 as in APBench); a channel
    permutation with p = 1/2; then one TrivialAugment op at a uniform magnitude:
    auto-contrast, equalize, posterize (4-8 bits kept), solarize (threshold in
    [0, 1]), contrast / brightness / sharpness (Pillow's enhance, factor in
    [0.1, 1.9]), rotate (+-30 deg), shear x/y (+-0.3), translate x/y (+-half the side).

    Differences from the paper's kornia pipeline: plasma maps are octave noise, not
    diamond-square fractals (same [0, 1] range, same role of roughness); the op is
    drawn per sample (TrivialAugment's own rule) where kornia draws one per batch
    call. Augmentation runs without autograd: nothing upstream of x needs a gradient.
    """

    repeats: int = 5
    max_epochs: int | None = 50
    name: ClassVar[str] = "ueraser"

    def __post_init__(self):
        object.__setattr__(self, "repeats", check_int("repeats", self.repeats, 1))
        if self.max_epochs is not None:
            object.__setattr__(self, "max_epochs", check_int("max_epochs", self.max_epochs, 0))

    def at_epoch(self, epoch: int) -> "Defense":
        """Worst of ``repeats`` during the first ``max_epochs`` epochs (None: always), then a
        single augmentation per batch, as APBench's ``--repeat_epoch``."""
        if self.max_epochs is None or epoch < self.max_epochs or self.repeats == 1:
            return self
        return dataclasses.replace(self, repeats=1)

    @torch.no_grad()
    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random strong augmentation: [B, 3, H, W] in [0, 1] -> [B, 3, H, W] in [0, 1]."""
        _check_x(x, gen)
        b, c = x.shape[:2]
        u = torch.rand(b, 6, generator=gen).to(x.device, x.dtype)  # per-sample parameters
        channel_perm = torch.rand(b, c, generator=gen).argsort(1).to(x.device)
        channel_perm = torch.where((u[:, 3] < 0.5)[:, None], channel_perm, torch.arange(c, device=x.device))
        op = torch.randint(0, len(PHOTOMETRIC) + len(GEOMETRIC), (b,), generator=gen).to(x.device)
        noise_gen = _device_gen(gen, x.device)
        with torch.autocast(x.device.type, enabled=False):  # the victim loop's bf16 autocast would blur ops
            bright = plasma(x.shape, 0.1 + 0.6 * u[:, 1], noise_gen, x)
            x = (x + u[:, 0].view(-1, 1, 1, 1) * (2 * bright - 1)).clamp_(0, 1)
            x = ((x - 0.5) * 4 * plasma(x.shape, 0.1 + 0.6 * u[:, 2], noise_gen, x) + 0.5).clamp_(0, 1)
            x = x.gather(1, channel_perm[:, :, None, None].expand_as(x))
            return trivial_augment(x, op, u[:, 4], u[:, 5] < 0.5)

    def _loss(self, model, x, y, gen):  # the logits returned: each sample's worst augmentation
        losses, logits = [], []
        for _ in range(self.repeats):
            _, out = model(self.augment(x, gen))
            losses.append(F.cross_entropy(out, y, reduction="none"))
            logits.append(out)
        worst, which = torch.stack(losses).max(0)  # [B]
        return worst.mean(), torch.stack(logits)[which, torch.arange(len(x), device=x.device)]


@dataclass(frozen=True)
class UEraserLite(UEraser):
    """UEraser-Lite: one strong augmentation per batch from the first epoch (``max_epochs`` 0)."""

    max_epochs: int | None = 0
    name: ClassVar[str] = "ueraser-lite"


@dataclass(frozen=True)
class UEraserMax(UEraser):
    """UEraser-Max: the worst of ``repeats`` for ``max_epochs`` 300 epochs (APBench's default)."""

    max_epochs: int | None = 300
    name: ClassVar[str] = "ueraser-max"


_REGISTRY = {cls.name: cls for cls in (Defense, JPEG, Grayscale, GaussianBlur, BitDepthReduction, Cutout, CutMix,
                                       Mixup, AdversarialTraining, UEraserLite, UEraser, UEraserMax)}
DEFENSES = tuple(_REGISTRY)


def get_defense(name: str, **options) -> Defense:
    """The defence ``name`` (one of ``DEFENSES``) with ``options`` (its dataclass fields,
    e.g. ``quality`` for jpeg, ``eps``/``steps``/``step_size`` for adv-train)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; choose one of {', '.join(DEFENSES)}")
    cls = _REGISTRY[name]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"defense {name!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(allowed) or 'none'}")
    return cls(**options)
