"""The data set of a run on its store's device, and the seeded generator of its randomness.

Every shuffle, flip and random transform of a method is drawn from ``gen``, one
CPU generator seeded by the method's seed and saved in every checkpoint, so a run
is fixed by its seed and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import torch


class Batches:
    """Images uint8 [N, 3, H, W] on ``place`` (the device, or pinned host memory that streams),
    labels int64 [N] on ``device``, and the generator ``gen``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, place: torch.device,
                 seed: int):
        self.device, self.place = device, place
        self.images = images.to(place)
        if place.type == "cpu" and device.type == "cuda":
            self.images = self.images.pin_memory()
        self.labels = labels.to(device, torch.int64)
        self.n = len(labels)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def shuffled(self, batch_size: int, *, merge_single: bool = False, drop_last: bool = False
                 ) -> list[torch.Tensor]:
        """Index batches [B] (on the device) of a fresh permutation; ``merge_single`` joins a last
        batch of one sample to the one before (batch norm cannot train on one sample);
        ``drop_last`` drops a last batch shorter than ``batch_size`` (unless it is the only one)."""
        perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        out = [perm[i:i + batch_size] for i in range(0, self.n, batch_size)]
        if drop_last and len(out) > 1 and len(out[-1]) < batch_size:
            out.pop()
        if merge_single and len(out) > 1 and len(out[-1]) == 1:
            out[-2:] = [torch.cat(out[-2:])]
        return out

    def ordered(self, batch_size: int) -> list[torch.Tensor]:
        """Index batches [B] (on the device) in data-set order."""
        return [torch.arange(i, min(i + batch_size, self.n), device=self.device) for i in range(0, self.n, batch_size)]

    def clean(self, idx: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Clean images ``idx`` as float [B, 3, H, W] in [0, 1] on the device; ``flip``: each
        flipped horizontally with probability 1/2 (post-augmentation)."""
        x = self.images[idx.to(self.place)].to(self.device, non_blocking=True).float().div_(255)
        if flip:
            f = (torch.rand(len(idx), generator=self.gen) < 0.5).to(self.device)
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
