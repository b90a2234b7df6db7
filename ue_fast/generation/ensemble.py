"""Snapshots of one network as an ensemble: every member's forward and input gradient at once.

SEP attacks the checkpoints of one training run together. A Python loop over M models
runs M small forward/backward passes one after the other; :class:`Ensemble` stacks the
members' weights (``torch.func.stack_module_state``'s layout: one tensor per parameter
with a leading member dimension) and runs them as one batched pass,
``torch.func.vmap`` over ``torch.func.functional_call``, with ``torch.func.grad`` for the
per-member input gradients. ``batched=False`` runs the same members in a loop (the
reference, and on a CPU the faster of the two: ``benchmarks/bench_ensemble.py``).

Members are frozen: eval mode (batch norm on its running statistics), no weight gradients.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

# (features [B, F], logits [B, C], labels [B], aux) -> 0-d loss of one member; aux: that member's
# slice of the ensemble's per-member data (e.g. its class centroids), or None.
MemberLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def stack_snapshots(model: nn.Module, snapshots: list[dict]) -> tuple[dict, dict]:
    """(params, buffers): each of ``model``'s parameters and buffers stacked over the
    ``snapshots`` (its ``state_dict``s), [M, ...], detached."""
    params = {n: torch.stack([s[n] for s in snapshots]).detach() for n, _ in model.named_parameters()}
    buffers = {n: torch.stack([s[n] for s in snapshots]).detach() for n, _ in model.named_buffers()}
    return params, buffers


class Ensemble:
    """M snapshots (``state_dict``s) of ``model``'s architecture, frozen, on ``model``'s device.

    ``forward(x)`` -> (features [M, B, F], logits [M, B, C]); ``grads(x, y, loss, aux)`` -> the
    per-member input gradients [M, *x.shape]; ``member(k, x)`` -> member k's (features, logits).
    ``autocast``: a context manager factory (the run's bf16 autocast), or None.
    """

    def __init__(self, model: nn.Module, snapshots: list[dict], *, batched: bool = True, autocast=None):
        if not snapshots:
            raise ValueError("an ensemble needs at least one snapshot")
        self.size, self.batched = len(snapshots), batched
        self.autocast = autocast or contextlib.nullcontext
        self.members = []  # one frozen copy per snapshot: the loop's, and single members' (SEP-FA-VR's inner steps)
        for snap in snapshots:
            m = copy.deepcopy(model)
            m.load_state_dict(snap)
            self.members.append(m.eval().requires_grad_(False))
        if batched:  # the stacked weights, run through one copy of the architecture
            self.base = copy.deepcopy(self.members[0])
            if hasattr(self.base, "channels_last"):
                self.base.channels_last = False  # vmap cannot query memory formats (cnn-small)
            self.params, self.buffers = stack_snapshots(self.base, snapshots)

    def _call(self, params: dict, buffers: dict, x: torch.Tensor):
        return functional_call(self.base, (params, buffers), (x,))

    def member(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Member k's (features, logits) at x, differentiable in x."""
        with self.autocast():
            return self.members[k](x)

    @contextlib.contextmanager
    def frozen(self):
        """The members are always frozen; a context for the passes' symmetry with ``Surrogate``."""
        yield self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member at x: (features [M, B, F], logits [M, B, C]), differentiable in x."""
        with self.autocast():
            if self.batched:
                return vmap(self._call, in_dims=(0, 0, None))(self.params, self.buffers, x)
            outs = [m(x) for m in self.members]
        return torch.stack([f for f, _ in outs]), torch.stack([g for _, g in outs])

    def grads(self, x: torch.Tensor, y: torch.Tensor, loss: MemberLoss, aux: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per member k, the gradient of ``loss(features_k, logits_k, y, aux[k])`` with respect to x:
        [M, *x.shape] in x's dtype, and the losses [M]."""
        x = x.detach()
        if self.batched:
            def one(params, buffers, a, xx):
                with self.autocast():
                    f, logits = self._call(params, buffers, xx)
                value = loss(f, logits, y, a)
                return value, value.detach()

            dummy = aux if aux is not None else torch.zeros(self.size, device=x.device)
            g, values = vmap(grad(one, argnums=3, has_aux=True), in_dims=(0, 0, 0, None))(
                self.params, self.buffers, dummy, x)
            return g.to(x.dtype), values
        gs, values = [], []
        for k in range(self.size):
            leaf = x.clone().requires_grad_(True)
            f, logits = self.member(k, leaf)
            value = loss(f, logits, y, None if aux is None else aux[k])
            (g,) = torch.autograd.grad(value, leaf)
            gs.append(g.to(x.dtype))
            values.append(value.detach())
        return torch.stack(gs), torch.stack(values)

    def member_grad(self, k: int, x: torch.Tensor, y: torch.Tensor, loss: MemberLoss,
                    aux: torch.Tensor | None = None) -> torch.Tensor:
        """The input gradient of member k alone, [*x.shape] in x's dtype."""
        leaf = x.detach().clone().requires_grad_(True)
        f, logits = self.member(k, leaf)
        (g,) = torch.autograd.grad(loss(f, logits, y, None if aux is None else aux[k]), leaf)
        return g.to(x.dtype)
