"""Triton kernels of ``pgd_step_``: one projected-gradient step on ``delta``, in place.

L-inf is one elementwise kernel (read delta, grad, clean, write delta).
L2 is two kernels: a per-sample reduction of |g|^2, |delta|^2 and delta.g in one
read of delta and grad, then an update kernel that knows the projection factor
before it writes, from |delta + u g|^2 = |delta|^2 + 2u delta.g + u^2 |g|^2.

Masks are never materialised as a float copy. The launcher expands the mask
to delta's shape (a view with zero strides), drops size-1 dimensions and merges
dimensions whose strides chain, which leaves at most a few (size, stride) pairs
for the usual shapes: [N,C,H,W] -> 1 dim, [1,C,H,W] -> 2, [N,1,H,W] -> 3. The
kernel turns a flat element index into a mask offset with those, dividing by
sizes passed as constexpr (image-shape constants, so a compile per image shape,
never per batch size, and the divisions become multiplies). Only a mask whose
layout needs more than 4 merged dimensions is copied, to a contiguous
expansion. Bool masks are read as uint8 (a view, no copy).

Precision: arithmetic in float32 (float64 when delta is float64); eps and the
step are rounded to float32 once, as torch rounds a Python scalar (float64
delta gets them to ~48 bits, from a float32 pair). sign(grad) is taken before
any narrowing, so a tiny float64 gradient still has a sign.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import interpreted, new_output
from ._scalars import acc_scalar, split_f32

_MAX_MASK_DIMS = 4


@triton.jit
def _pgd_mask_offsets(offs, M0, M1, M2, M3, Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr,
                      MASK_DIMS: tl.constexpr):
    """Offsets into the mask of flat element indices ``offs`` of delta (row-major).

    The mask's merged dims have strides M0..M{k-1} (outermost first) and sizes
    ?, Z1, .., Z{k-1}: the outermost size is never needed.
    """
    if MASK_DIMS == 1:
        moff = offs * M0
    elif MASK_DIMS == 2:
        moff = (offs % Z1) * M1 + (offs // Z1) * M0
    elif MASK_DIMS == 3:
        moff = (offs % Z2) * M2
        r = offs // Z2
        moff += (r % Z1) * M1 + (r // Z1) * M0
    else:
        moff = (offs % Z3) * M3
        r = offs // Z3
        moff += (r % Z2) * M2
        r = r // Z2
        moff += (r % Z1) * M1 + (r // Z1) * M0
    return moff


@triton.jit
def _pgd_linf_kernel(
    D_ptr, G_ptr, C_ptr, M_ptr,  # delta (in/out), grad, clean: contiguous, numel each; mask: strided
    numel,
    step_hi, step_lo,  # signed step (-step_size descends) as float32 hi + lo, see _scalars.acc_scalar
    eps_hi, eps_lo,
    M0, M1, M2, M3,
    Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr, MASK_DIMS: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    a = acc_scalar(step_hi, step_lo, ACC)
    e = acc_scalar(eps_hi, eps_lo, ACC)
    g = tl.load(G_ptr + offs, mask=inb, other=0.0)
    # Compare in at least float32: exact for half types, keeps float64's range.
    if G_ptr.dtype.element_ty == tl.float64:
        g = g.to(tl.float64)
    else:
        g = g.to(tl.float32)
    s = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(ACC)
    if HAS_MASK:
        moff = _pgd_mask_offsets(offs, M0, M1, M2, M3, Z1, Z2, Z3, MASK_DIMS)
        s = s * tl.load(M_ptr + moff, mask=inb, other=0).to(ACC)
    d = tl.load(D_ptr + offs, mask=inb, other=0.0).to(ACC)
    c = tl.load(C_ptr + offs, mask=inb, other=0.0).to(ACC)
    d = d + a * s
    d = tl.minimum(tl.maximum(d, -e), e)
    d = tl.minimum(tl.maximum(c + d, 0.0), 1.0) - c
    tl.store(D_ptr + offs, d.to(D_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _pgd_l2_reduce_kernel(
    D_ptr, G_ptr, M_ptr,  # delta, grad: contiguous [N, D]; mask: strided
    P_ptr,  # [N, SPLIT, 3] partial sums of |g m|^2, |delta|^2, delta.(g m)
    D, CHUNK, SPLIT,
    M0, M1, M2, M3,
    Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr, MASK_DIMS: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    n = pid // SPLIT
    start = (pid % SPLIT) * CHUNK
    stop = tl.minimum(start + CHUNK, D)
    acc_gg = tl.zeros([BLOCK], dtype=ACC)
    acc_dd = tl.zeros([BLOCK], dtype=ACC)
    acc_dg = tl.zeros([BLOCK], dtype=ACC)
    for j in range(start, stop, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        inb = cols < stop
        offs = n * D + cols
        g = tl.load(G_ptr + offs, mask=inb, other=0.0).to(ACC)
        if HAS_MASK:
            moff = _pgd_mask_offsets(offs, M0, M1, M2, M3, Z1, Z2, Z3, MASK_DIMS)
            g = g * tl.load(M_ptr + moff, mask=inb, other=0).to(ACC)
        d = tl.load(D_ptr + offs, mask=inb, other=0.0).to(ACC)
        acc_gg += g * g
        acc_dd += d * d
        acc_dg += d * g
    tl.store(P_ptr + pid * 3, tl.sum(acc_gg, axis=0))
    tl.store(P_ptr + pid * 3 + 1, tl.sum(acc_dd, axis=0))
    tl.store(P_ptr + pid * 3 + 2, tl.sum(acc_dg, axis=0))


@triton.jit
def _pgd_l2_update_kernel(
    D_ptr, G_ptr, C_ptr, M_ptr,  # delta (in/out), grad, clean: contiguous [N, D]; mask: strided
    P_ptr,  # [N, SPLIT, 3] from _pgd_l2_reduce_kernel
    D, NBLK, SPLIT,
    step_hi, step_lo,  # as in the L-inf kernel
    eps_hi, eps_lo,
    M0, M1, M2, M3,
    Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr, MASK_DIMS: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    n = pid // NBLK
    a = acc_scalar(step_hi, step_lo, ACC)
    e = acc_scalar(eps_hi, eps_lo, ACC)
    # Per-sample scalars, recomputed by each program from SPLIT partials (cheap).
    k = tl.arange(0, SPLIT_P2)
    pk = P_ptr + (n * SPLIT + k) * 3
    kin = k < SPLIT
    gg = tl.sum(tl.load(pk, mask=kin, other=0.0), axis=0)
    dd = tl.sum(tl.load(pk + 1, mask=kin, other=0.0), axis=0)
    dg = tl.sum(tl.load(pk + 2, mask=kin, other=0.0), axis=0)
    has_g = gg > 0
    u = tl.where(has_g, a / tl.sqrt(tl.where(has_g, gg, 1.0)), 0.0)  # zero gradient: no move
    # |delta + u g|^2, with u^2 |g|^2 = a^2 exactly; rounding can make it slightly negative.
    nn = tl.maximum(dd + 2.0 * u * dg + tl.where(has_g, a * a, 0.0), 0.0)
    nrm = tl.sqrt(nn)
    over = nrm > e
    f = tl.where(over, e / tl.where(over, nrm, 1.0), 1.0)

    cols = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    inb = cols < D
    offs = n * D + cols
    g = tl.load(G_ptr + offs, mask=inb, other=0.0).to(ACC)
    if HAS_MASK:
        moff = _pgd_mask_offsets(offs, M0, M1, M2, M3, Z1, Z2, Z3, MASK_DIMS)
        g = g * tl.load(M_ptr + moff, mask=inb, other=0).to(ACC)
    d = tl.load(D_ptr + offs, mask=inb, other=0.0).to(ACC)
    c = tl.load(C_ptr + offs, mask=inb, other=0.0).to(ACC)
    d = (d + u * g) * f
    d = tl.minimum(tl.maximum(c + d, 0.0), 1.0) - c
    tl.store(D_ptr + offs, d.to(D_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- launcher


def _config(kind: str) -> tuple[int, int]:
    """(BLOCK, num_warps). Small blocks under the interpreter keep tests fast and
    make small test shapes cross block boundaries."""
    if interpreted():
        return {"linf": 128, "l2": 32}[kind], 1
    # Streaming kernels: 8-16 elements per thread keeps enough loads in flight.
    return {"linf": 2048, "l2": 2048}[kind], 8


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _mask_layout(mask: torch.Tensor, shape: torch.Size):
    """(mask view to pass, strides M0..M3, constexpr sizes Z1..Z3, MASK_DIMS, max offset).

    Merges the expanded mask's dimensions as described in the module docstring.
    """
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    m = m.expand(shape)
    dims: list[list[int]] = []  # [size, stride], innermost first
    for size, stride in zip(reversed(m.shape), reversed(m.stride())):
        if size == 1:
            continue
        if dims and stride == dims[-1][0] * dims[-1][1]:  # chains onto the inner dim
            dims[-1][0] *= size
            continue
        dims.append([size, stride])
    if len(dims) > _MAX_MASK_DIMS:
        m = m.contiguous()
        dims = [[m.numel(), 1]]
    if not dims:  # numel 1
        dims = [[1, 0]]
    dims.reverse()  # outermost first
    strides = [s for _, s in dims] + [0] * (_MAX_MASK_DIMS - len(dims))
    sizes = [z for z, _ in dims[1:]] + [1] * (_MAX_MASK_DIMS - len(dims))
    max_off = sum((z - 1) * s for z, s in dims)
    return m, strides, sizes, len(dims), max_off


def pgd_step(delta, grad, clean, eps: float, step_size: float, norm: str, maximize: bool, mask=None):
    """One PGD step on ``delta`` in place (validated input, see ``ue_fast.ops.pgd_step_``).

    delta, grad, clean: [N, ...] on one device (same shape); mask: broadcastable
    to delta or None. Non-contiguous delta is updated through a contiguous copy,
    non-contiguous grad/clean are copied.
    """
    if delta.is_cuda:  # Triton launches on the current device
        with torch.cuda.device(delta.device):
            return _pgd_step(delta, grad, clean, eps, step_size, norm, maximize, mask)
    return _pgd_step(delta, grad, clean, eps, step_size, norm, maximize, mask)


def _pgd_step(delta, grad, clean, eps, step_size, norm, maximize, mask, num_sms=None):
    """``num_sms``: the GPU's SM count, which sets the L2 split (None: the current device's)."""
    work = delta if delta.is_contiguous() else delta.contiguous()
    g = grad.contiguous()
    c = clean.contiguous()
    numel = work.numel()
    n = work.shape[0]
    acc = tl.float64 if work.dtype == torch.float64 else tl.float32
    step = float(step_size) if maximize else -float(step_size)
    if mask is not None:
        m, mstr, msz, mdims, max_off = _mask_layout(mask, work.shape)
    else:
        m, mstr, msz, mdims, max_off = work, [0] * 4, [1] * 3, 1, 0
    mask_args = dict(M0=mstr[0], M1=mstr[1], M2=mstr[2], M3=mstr[3], Z1=msz[0], Z2=msz[1], Z3=msz[2],
                     MASK_DIMS=mdims, HAS_MASK=mask is not None, ACC=acc)
    block, warps = _config(norm)
    int64 = max(numel, max_off + 1) + 2 * block >= 2**31
    if norm == "linf":
        grid = (triton.cdiv(numel, block),)
        _pgd_linf_kernel[grid](work, g, c, m, numel, *split_f32(step), *split_f32(eps), **mask_args,
                               INT64=int64, BLOCK=block, num_warps=warps)
    else:
        dim = numel // n
        if num_sms is None and work.is_cuda:
            num_sms = _num_sms(torch.cuda.current_device())
        # Enough programs to fill the GPU; under the interpreter, 8 exercise the split on small tests.
        target = 4 * num_sms if num_sms else 8
        split = max(1, min(triton.cdiv(dim, block), triton.cdiv(target, n), 64))
        chunk = triton.cdiv(triton.cdiv(dim, split), block) * block
        split = triton.cdiv(dim, chunk)
        partials = new_output((n, split, 3), dtype=torch.float64 if acc == tl.float64 else torch.float32,
                              device=work.device)
        _pgd_l2_reduce_kernel[(n * split,)](work, g, m, partials, dim, chunk, split, **mask_args,
                                            INT64=int64, BLOCK=block, num_warps=warps)
        nblk = triton.cdiv(dim, block)
        _pgd_l2_update_kernel[(n * nblk,)](work, g, c, m, partials, dim, nblk, split, *split_f32(step), *split_f32(eps),
                                           **mask_args, INT64=int64, SPLIT_P2=triton.next_power_of_2(split),
                                           BLOCK=block, num_warps=warps)
    if work is not delta:
        delta.copy_(work)
    return delta


def compile_cases() -> list[dict]:
    """Inputs on which the launcher above picks each configuration it can: L-inf and L2, each
    dtype, masked or not (bool, integer and float masks of 1 to 4 merged dims), the L2 split
    (SPLIT_P2) over batches of 128..512 images of 32x32 and 224x224, and INT64 offsets.

    ``benchmarks/triton_compile.py`` calls :func:`run_case` on each (once per GPU, whose SM
    count sets the L2 split) and compiles what the launcher launches: a new branch in
    ``_config``, ``_mask_layout`` or ``_pgd_step`` needs a case here. Keys: N, channels, H, W,
    dtype, norm, mask (a shape pattern over N, C, H, W, or None), mask_dtype, maximize.
    """
    cases = []
    for norm in ("linf", "l2"):
        batches = range(128, 513, 16) if norm == "l2" else (128, 512)  # the split varies with N
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for N in batches:
                for side in (32, 224):  # the shapes that matter
                    for mask in (None, "N1HW"):
                        cases.append(dict(norm=norm, dtype=dtype, N=N, channels=3, H=side, W=side, mask=mask))
        base = dict(norm=norm, dtype=torch.float32, N=128, channels=3, H=224, W=224)
        cases += [dict(base, mask="1CHW"), dict(base, mask="NCHW", mask_dtype=torch.float32),
                  dict(base, mask="N1H1", mask_dtype=torch.int64), dict(base, mask="N1HW", maximize=True),
                  dict(base, grad_dtype=torch.bfloat16, clean_dtype=torch.float16),
                  dict(base, N=7, channels=1, H=5, W=3, mask="N1HW"),  # sizes not multiples of 16
                  dict(base, N=512, H=2048, W=2048, mask="N1HW")]  # over 2**31 elements: INT64
    return cases


def run_case(case: dict, device="meta", num_sms: int | None = None) -> None:
    """Run the launcher once on uninitialised tensors of ``case`` (meta tensors: nothing executes)."""
    N, C, H, W = case["N"], case["channels"], case["H"], case["W"]
    delta = torch.empty(N, C, H, W, dtype=case["dtype"], device=device)
    grad = torch.empty_like(delta, dtype=case.get("grad_dtype", case["dtype"]))
    clean = torch.empty_like(delta, dtype=case.get("clean_dtype", case["dtype"]))
    mask = None
    if case.get("mask"):
        shape = [size if pat == dim else 1 for pat, dim, size in zip(case["mask"], "NCHW", (N, C, H, W))]
        mask = torch.empty(shape, dtype=case.get("mask_dtype", torch.bool), device=device)
    _pgd_step(delta, grad, clean, 8 / 255, 1 / 255, case["norm"], case.get("maximize", False), mask, num_sms=num_sms)
