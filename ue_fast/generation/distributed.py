"""One run over several processes (``torchrun``): shards, global batches, gathered losses.

``torchrun --nproc_per_node=K -m ue_fast protect IN OUT ...`` starts K processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`from_env` joins them into one
process group (NCCL on GPUs, one per process; gloo on CPUs). Then:

- **shards**: rank r owns the contiguous samples ``[r N / K, (r + 1) N / K)``: their
  perturbations live in its store (memory or disk) and only it reads their images;
- **global batches**: every rank draws the same permutation from the run's seeded
  generator, so the global batches are those of a one-process run; a rank computes the
  members of each batch it owns (:class:`Part`), and every per-sample random draw is
  made for the whole global batch and indexed (:class:`~.batches.Draws`: so all
  generators stay in step and draw what one process draws);
- **batch losses** (supervised contrastive, centroid, the cross-entropy means) see the
  global batch: :func:`global_batch` all-gathers features and logits with their
  gradients; class-wise perturbations' gradients are summed (:func:`all_sum`). Every rank
  then computes the same loss, so the backward of the gather keeps each rank's own
  rows of the gradient (no sum over ranks): a rank's perturbations get the gradient one
  process would give them;
- the surrogate trains under ``DistributedDataParallel`` on per-rank sums scaled so that
  the averaged gradient is the one-process mean over the global batch (with
  ``--sync-bn``, batch norm takes its statistics over the global batch too).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    backend: str

    def shard(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The samples [lo, hi) that ``rank`` (default: this one) owns."""
        r = self.rank if rank is None else rank
        return r * n // self.world, (r + 1) * n // self.world

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def from_env(device: str | None) -> tuple[Dist | None, torch.device | None]:
    """Join the process group torchrun describes (None when not launched by it), and this
    process's device: ``cuda:LOCAL_RANK`` on GPUs (NCCL), the CPU otherwise (gloo)."""
    world = env_world_size()
    if world <= 1:
        return None, None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        if device not in (None, "cuda"):
            raise ValueError(f"under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda, not {device!r}")
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, backend), dev


@dataclass(frozen=True)
class Part:
    """This rank's share of a global batch of ``size`` samples: at ``positions`` in it."""

    size: int
    positions: torch.Tensor  # int64 [b] on the CPU


def split(batch: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, Part]:
    """The members of ``batch`` (global indices) in [lo, hi), as local indices, and their Part."""
    mine = (batch >= lo) & (batch < hi)
    positions = torch.nonzero(mine.cpu(), as_tuple=True)[0]
    return batch[mine] - lo, Part(len(batch), positions)


class _GatherRows(torch.autograd.Function):
    """All-gather rows of different counts; the backward keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int):
        top = max(counts)
        padded = x.new_zeros((top, *x.shape[1:]))
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.start, ctx.count = sum(counts[:rank]), counts[rank]
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start: ctx.start + ctx.count], None, None


def counts_of(n: int, device) -> list[int]:
    """Every rank's row count (an all-gather of ``n``)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(c) for c in out]


def gather_rows(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Rows [n_r, ...] of every rank, concatenated in rank order, differentiable (every rank
    must then compute the same function of them: the gradient is not summed over ranks)."""
    counts = counts_of(len(x), x.device) if counts is None else counts
    return _GatherRows.apply(x, counts, dist.get_rank())


def all_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _GlobalBatchNormFn(torch.autograd.Function):
    """Batch-norm training forward and backward over the global batch, in the arithmetic of
    torch's CPU batch norm (float64 statistics, two passes; the output by ``F.batch_norm``
    itself), so a process computes what one process would up to the order of the sums:
    outputs near zero then rarely change sign through the ReLU after them. Statistics and the
    two sums of the backward are all-reduced; the weight and bias gradients stay per process
    (DDP averages them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c = x.shape[1]
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / c], dtype=torch.float64, device=x.device)
        s = torch.cat([x.sum(dims, dtype=torch.float64), count])
        dist.all_reduce(s)
        n = s[-1]
        mean = s[:c] / n
        sq = ((x.double() - mean.view(1, c, 1, 1)) ** 2).sum(dims)
        dist.all_reduce(sq)  # two passes: no E[x^2] - E[x]^2 cancellation
        var = sq / n  # biased, as batch norm normalises
        invstd = torch.rsqrt(var + eps)
        y = torch.nn.functional.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.n = float(n)
        return y, mean.to(x.dtype), var.to(x.dtype), n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        x, mean, invstd, weight = ctx.saved_tensors
        c, dims = x.shape[1], (0, 2, 3)
        xmu = x.double() - mean.view(1, c, 1, 1)
        sum_dy = dy.sum(dims, dtype=torch.float64)  # per process: the bias gradient
        dotp = (dy.double() * xmu).sum(dims)  # per process: invstd times the weight gradient
        both = torch.cat([sum_dy, dotp])
        dist.all_reduce(both)
        mean_dy, mean_dotp = both[:c] / ctx.n, both[c:] / ctx.n
        w = weight.double() if weight is not None else torch.ones_like(invstd)
        v = (1, c, 1, 1)
        dx = ((dy.double() - mean_dy.view(v) - xmu * (invstd * invstd * mean_dotp).view(v))
              * (invstd * w).view(v)).to(dy.dtype)
        if weight is None:
            return dx, None, None, None
        return dx, (dotp * invstd).to(dy.dtype), sum_dy.to(dy.dtype), None


class GlobalBatchNorm(torch.nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the global batch (torch's
    SyncBatchNorm does the same on GPUs only; this one runs on gloo too). In eval mode, or
    alone, plain batch norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        y, mean, var, n = _GlobalBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * (n / (n - 1).clamp_min(1)).to(var.dtype), alpha=m)
        return y


def sync_batch_norm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with every BatchNorm2d taking global-batch statistics: torch's SyncBatchNorm on
    GPUs, :class:`GlobalBatchNorm` (same parameters and buffers) elsewhere."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats).to(device, child.running_mean.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batch_norm(child, device)
    return model


def gather_range(read_local, d: Dist, n: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows start..stop-1 of a per-sample array sharded over the processes, on every process
    (a collective: all call it with the same range). ``read_local(a, b)`` reads this
    process's local rows a..b-1 (CPU tensors)."""
    lo, hi = d.shard(n)
    a, b = max(start, lo), min(stop, hi)
    mine = read_local(a - lo, b - lo) if a < b else None
    if mine is None:
        probe = read_local(0, 1) if hi > lo else None  # the row shape and dtype
        mine = probe[:0] if probe is not None else None
    if mine is None:
        raise ValueError("a process owns no rows: use fewer processes than samples")
    rows = gather_rows(mine.to(device), counts_of(len(mine), device))
    return rows.cpu()


def global_batch(tensors, part: Part) -> list[torch.Tensor | None]:
    """Every process's rows of ``tensors`` (this process's part of a global batch), gathered
    with their gradients and put back in the global batch's order, so a loss of them runs
    the arithmetic one process runs on that batch. A tensor may hold k view-major blocks of
    the part's samples (k x its rows, as REM's augmented views); it comes back as k blocks of
    the global batch. None stays None."""
    device = next(t.device for t in tensors if t is not None)
    b = len(part.positions)
    lens = torch.tensor([b] + [len(t) if t is not None else 0 for t in tensors], dtype=torch.int64, device=device)
    table = [torch.zeros_like(lens) for _ in range(dist.get_world_size())]
    dist.all_gather(table, lens)
    table = torch.stack(table).cpu()  # [world, 1 + len(tensors)]: rows of every process
    counts = table[:, 0].tolist()
    total = sum(counts)
    order = torch.argsort(gather_rows(part.positions.to(device), counts))
    out = []
    for j, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        k, rest = divmod(int(table[:, j + 1].sum()), total)
        if rest or k < 1:
            raise ValueError(f"a tensor of {len(t)} rows is not a number of blocks of the {b} samples")
        if k == 1:
            out.append(gather_rows(t, counts)[order])
            continue
        per_sample = t.reshape(k, b, *t.shape[1:]).transpose(0, 1).contiguous()  # [b, k, ...]
        rows = gather_rows(per_sample, counts)[order]  # [B, k, ...] in the global order
        out.append(rows.transpose(0, 1).reshape(k * total, *t.shape[1:]))
    return out
