"""dvae: D-VAE purification (Yu et al., "Purify Unlearnable Examples via Rate-Constrained
Variational Autoencoders", ICML 2024). No pretrained weights: two VAEs are trained on the
protected training set itself, and the victim trains on what they give back.

A VAE under a hard rate constraint (a KL floor) reconstructs the images' content but cannot
afford the perturbation; a second decoder, fed the latent plus a learnt per-class embedding,
models what the reconstruction leaves out, the class-wise part of the poison included. As the
authors' code runs it (yuyi-sd/D-VAE @ 9d62e4c; the model is ``ResNetDVAE`` in
``configs/models/resnet.py``, with ``stem_end_block`` 7 and ``latent_dim`` 256 from
``configs/cifar10/resnet18DVAE.yaml``; training and purification in ``main_vae_disentangle.py``
L36-75, L170-215, L400-460; their command in ``some_scripts.sh``):

- encoder: a ResNet-18 stem (3x3 conv, BN, ReLU), its layer1 (two BasicBlocks at 64 channels)
  and layer2's first block (128 channels, stride 2): h [128, H/2, W/2]; mu and log-variance by
  1x1 convolutions to 256 channels, z1 = mu + exp(logvar / 2) noise, z = a 1x1 convolution of
  z1 back to 128 channels;
- decoders: ConvT(128, 64, 4, stride 2) -> ConvT(64, 64, 3) -> InstanceNorm -> ReLU ->
  ConvT(64, 32, 3) -> InstanceNorm -> ReLU -> ConvT(32, 3, 3), a sigmoid for the reconstruction
  ``rec`` = D(z); the perturbation ``p`` = D_p(E[y] + z), E a learnt embedding of the class as a
  128 x H/2 x W/2 map (their flags ``--spatial_emb`` and ``--use_y``, which is store_false);
- loss: MSE(rec, x) + MSE(clamp(rec + p, 0, 1), x) + 0.01 max(KL, tau) (the KL summed over the
  latent channels, averaged over batch and positions; the max keeps no gradient below the
  floor tau), plus max(mean(p^2), 0.002) after the 11th epoch;
- training: Adam lr 5e-3, no weight decay, cosine to 0 over 60 epochs, batches of 128
  (shuffled, whole batches), gradient norm clipped at 5, inputs in [0, 1];
- stage 1 (tau 1): train a VAE on the set; the set becomes clamp(x - p) with the VAE in eval
  mode (z still sampled), written as 8 bits by truncation;
- stage 2 (tau 3): a fresh VAE trained on that set; the set becomes clamp(rec(clamp(x - p))),
  the reconstruction of the twice-purified images, again truncated to 8 bits.

What differs, and why:

- ``epochs`` (60, theirs) can be lowered for CPU-scale runs; the p-penalty still starts after
  the 11th epoch, or after a sixth of the epochs when there are fewer than 60.
- Their script loads a classifier trained on the poisoned set only to log its losses; it does
  not touch training, so it is not here.
- Random numbers come from ue_fast's seeded generators; the last, short batch of an epoch is
  dropped as theirs (``drop_last``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...models.resnet import BasicBlock
from ...ops._checks import check_int
from .base import Defense

LATENT = 256
KL_WEIGHT = 0.01  # theirs for a floor above 0.99, both stages here
P_FLOOR = 0.002


def _decoder(sigmoid: bool) -> nn.Sequential:
    layers = [nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.ConvTranspose2d(64, 64, 3, stride=1, padding=1),
              nn.InstanceNorm2d(64), nn.ReLU(), nn.ConvTranspose2d(64, 32, 3, stride=1, padding=1),
              nn.InstanceNorm2d(32), nn.ReLU(), nn.ConvTranspose2d(32, 3, 3, stride=1, padding=1)]
    return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))


class DVAE(nn.Module):
    """The authors' ``ResNetDVAE`` at ``stem_end_block`` 7, without its unused classifier branch."""

    def __init__(self, num_classes: int, height: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), BasicBlock(64, 64), BasicBlock(64, 64), BasicBlock(64, 128, stride=2))
        self.fc_mu = nn.Conv2d(128, LATENT, 1)
        self.fc_var = nn.Conv2d(128, LATENT, 1)
        self.post_conv = nn.Conv2d(LATENT, 128, 1)
        self.decoder, self.decoder_p = _decoder(True), _decoder(False)
        self.map = (128, (height + 1) // 2, (width + 1) // 2)
        self.emb_p = nn.Embedding(num_classes, math.prod(self.map))

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None = None):
        """(rec, p, mu, log_var) for x [B, 3, H, W] in [0, 1] and labels y [B]."""
        h = self.stem(x)
        mu, log_var = self.fc_mu(h), self.fc_var(h)
        noise = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
        z = self.post_conv(mu + torch.exp(0.5 * log_var) * noise)
        rec = self.decoder(z)
        p = self.decoder_p(self.emb_p(y).view(-1, *h.shape[1:]) + z)
        return rec[..., :x.shape[2], :x.shape[3]], p[..., :x.shape[2], :x.shape[3]], mu, log_var


def dvae_loss(x, rec, p, mu, log_var, tau: float, penalise_p: bool) -> torch.Tensor:
    """Their ``train_batch`` loss (see the module docstring)."""
    kl = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1))
    loss = F.mse_loss(rec, x) + F.mse_loss((rec + p).clamp(0, 1), x) + KL_WEIGHT * torch.clamp(kl, min=tau)
    if penalise_p:
        loss = loss + torch.clamp(p.pow(2).mean(), min=P_FLOOR)
    return loss


@dataclass(frozen=True)
class DVAEPurification(Defense):
    """Two VAEs trained on the training set purify it before the victim trains (D-VAE).
    Options: ``epochs`` of each VAE (60, theirs), ``batch_size`` (128)."""

    epochs: int = 60
    batch_size: int = 128
    name: ClassVar[str] = "dvae"
    needs_labels: ClassVar[bool] = True
    TAUS: ClassVar[tuple[float, float]] = (1.0, 3.0)  # the KL floor of stage 1 and stage 2 (their --kd 3.0)

    def __post_init__(self):
        object.__setattr__(self, "epochs", check_int("epochs", self.epochs, 1))
        object.__setattr__(self, "batch_size", check_int("batch_size", self.batch_size, 1))

    def penalty_from(self) -> int:
        """The first 0-based epoch whose loss carries the p-penalty: theirs is 11 of 60."""
        return 11 if self.epochs >= 60 else max(1, round(self.epochs * 11 / 60))

    def train_vae(self, images: torch.Tensor, labels: torch.Tensor, tau: float,
                  gen: torch.Generator) -> tuple[DVAE, torch.Generator]:
        """A fresh VAE trained on the set at KL floor ``tau``, in eval mode, and the generator of its latent noise."""
        dev = images.device
        torch_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(torch_seed)  # the modules' initialisation, from gen
            vae = DVAE(int(labels.max()) + 1, images.shape[2], images.shape[3]).to(dev)
        opt = torch.optim.Adam(vae.parameters(), lr=5e-3, weight_decay=0)
        noise = torch.Generator(device=dev).manual_seed(torch_seed)
        n = len(images)
        bs = min(self.batch_size, n)
        with torch.enable_grad(), torch.autocast(dev.type, enabled=False):
            for epoch in range(self.epochs):
                for g in opt.param_groups:  # CosineAnnealingLR(T_max=epochs, eta_min=0), stepped per epoch
                    g["lr"] = 5e-3 * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
                vae.train()
                perm = torch.randperm(n, generator=gen).to(dev)
                for i in range(0, n - bs + 1, bs):  # whole batches, as their drop_last
                    idx = perm[i:i + bs]
                    x = images[idx].float().div_(255)
                    rec, p, mu, log_var = vae(x, labels[idx], noise)
                    loss = dvae_loss(x, rec, p, mu, log_var, tau, epoch >= self.penalty_from())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(vae.parameters(), 5.0)
                    opt.step()
        return vae.eval(), noise

    @torch.no_grad()
    def purify(self, vae: DVAE, noise: torch.Generator, images: torch.Tensor, labels: torch.Tensor,
               reconstruct: bool) -> torch.Tensor:
        """clamp(x - p), and with ``reconstruct`` the reconstruction of that; 8 bits by truncation."""
        out = torch.empty_like(images)
        with torch.autocast(images.device.type, enabled=False):
            for i in range(0, len(images), 512):
                x, y = images[i:i + 512].float().div_(255), labels[i:i + 512]
                _, p, _, _ = vae(x, y, noise)
                x = (x - p).clamp(0, 1)
                if reconstruct:
                    x = vae(x, y, noise)[0].clamp(0, 1)
                out[i:i + 512] = (x * 255).clamp(0, 255).to(torch.uint8)  # truncation, as np.uint8
        return out

    def _prepare(self, images, gen, labels):
        once = self.purify(*self.train_vae(images, labels, self.TAUS[0], gen), images, labels, reconstruct=False)
        return self.purify(*self.train_vae(once, labels, self.TAUS[1], gen), once, labels, reconstruct=True)
