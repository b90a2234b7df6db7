"""``poison_classwise.pt`` (class-wise methods): float32 [C, 3, H, W] in [-eps, eps], row c
the perturbation of class c of the manifest's ``classes`` in whole grey levels (rounded
once per class), so that ``clip(clean + row of its class)`` is each PNG, exactly: the
layout class-wise readers take."""
from __future__ import annotations

from ..exports import save_poison_pt
from .base import Sink, SinkContext


class PoisonClasswise(Sink):
    name = "poison_classwise.pt"

    def planned(self, ctx: SinkContext) -> list[str]:
        return ["poison_classwise.pt"] if ctx.class_levels is not None else []

    def close(self) -> dict:
        if self.ctx.class_levels is None:
            return {}
        save_poison_pt(self.ctx.output_dir / "poison_classwise.pt", self.ctx.class_levels().float() / 255)
        return {self.name: {
            "written": True, "why": f"the {len(self.ctx.classes)} class-wise perturbations [C, 3, H, W], float32 "
            "in [-eps, eps], row c for class c of `classes`, in whole grey levels: clip(clean + row of its class) "
            "is each PNG"}}
