"""The ``device`` argument of protect, evaluate, report and demo, checked once."""
from __future__ import annotations

import re

import torch

_DEVICE = re.compile(r"^(cpu|cuda)(:\d+)?$")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``: "cpu", "cuda" or "cuda:N" (None: CUDA when torch sees a
    GPU, else the CPU). A ValueError saying what is accepted for anything else, and for a CUDA
    device torch cannot see."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    if not _DEVICE.match(text):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {text!r}")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} requested but torch sees no CUDA device "
                             f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU build'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev
