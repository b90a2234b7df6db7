"""Triton kernels of ``centroid_loss``: class sums of L2-normalised features and their backward.

The loss depends on the features only through ``S_c = sum_{i: y_i = c} z_i`` with
``z_i = f_i / max(|f_i|, eps)`` (see ``ue_fast.ops.centroid``), so the kernels
compute ``S`` [C, D] and map ``dL/dS`` back to the features; the O(C D)
remainder is plain torch.

Three kernels: row norms (one program per block of rows), class sums (one per
(class, D-block)) and the backward (one per block of rows).

Determinism: no float atomics. Rows are sorted by label (stable, in torch) and
each program of the class-sum kernel owns one (class, D-block) and sums its
class's rows in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreted, new_output

EPS = 1e-8  # norm clamp, as in F.normalize(eps=1e-8)


@triton.jit
def _sqrt(x):
    # Correctly rounded, as torch: tl.sqrt is approximate for fp32 on GPUs; sqrt_rn is fp32-only.
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(a, b):
    # Correctly rounded division, as torch's x / norm: then z = +-1 exactly where D = 1, and class
    # sums that cancel are exactly 0 in both backends (the centroid clamp is discontinuous there).
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _centroid_norm_kernel(
    X_ptr, N_ptr, B, D, stride_xb, stride_xd,
    eps: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """|f_i| for a block of rows (unclamped: the backward needs to know where the clamp is active)."""
    acc_ty = N_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)  # B * stride_xb may exceed int32
    cols = tl.arange(0, BLOCK_D)
    ss = tl.zeros([BLOCK_B], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = rmask[:, None] & (c < D)[None, :]
        x = tl.load(X_ptr + rows64[:, None] * stride_xb + c[None, :] * stride_xd, mask=m, other=0.0).to(acc_ty)
        ss += tl.sum(x * x, axis=1)
    tl.store(N_ptr + rows, _sqrt(ss), mask=rmask)


@triton.jit
def _centroid_fwd_kernel(
    X_ptr, N_ptr, Order_ptr, Start_ptr, Count_ptr, S_ptr, D, stride_xb, stride_xd, stride_sc,
    eps: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """S[c, d-block] = sum over the rows i of class c (sorted order) of f_i[d-block] / max(|f_i|, eps)."""
    acc_ty = S_ptr.dtype.element_ty
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(Start_ptr + c)
    count = tl.load(Count_ptr + c)
    acc = tl.zeros([BLOCK_D], dtype=acc_ty)
    for i0 in range(0, count, BLOCK_B):
        k = i0 + tl.arange(0, BLOCK_B)
        kmask = k < count
        rows = tl.load(Order_ptr + start + k, mask=kmask, other=0).to(tl.int64)  # [BLOCK_B]
        # eps in the accumulation dtype: some Triton versions make a float constexpr fp32, which
        # would clamp fp64 norms at 1e-8 rounded to fp32 (a 6e-9 relative error where it is active).
        n = tl.maximum(tl.load(N_ptr + rows, mask=kmask, other=1.0), tl.full([], eps, acc_ty))
        m = kmask[:, None] & cmask[None, :]
        x = tl.load(X_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xd, mask=m, other=0.0).to(acc_ty)
        acc += tl.sum(_div(x, n[:, None]), axis=0)
    tl.store(S_ptr + c.to(tl.int64) * stride_sc + cols, acc, mask=cmask)  # absent class: zeros


@triton.jit
def _centroid_bwd_kernel(
    X_ptr, Y_ptr, N_ptr, G_ptr, DX_ptr, B, D,
    stride_xb, stride_xd, stride_y, stride_gc, stride_gd, stride_dxb, stride_dxd,
    eps: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dF_i = (g_i - z_i (z_i . g_i)) / n_i with g_i = G[y_i], z_i = f_i / n_i, n_i = max(|f_i|, eps).

    Where |f_i| < eps the clamp is active and the norm gets no gradient (torch's clamp_min
    backward): only g_i / n_i. Same rounding order as torch's autograd of f / n (so the
    gradient is exactly 0 where D = 1). Two passes over D: z_i . g_i, then the write.
    """
    acc_ty = G_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(Y_ptr + rows64 * stride_y, mask=rmask, other=0).to(tl.int64)
    norm = tl.load(N_ptr + rows, mask=rmask, other=1.0)  # [BLOCK_B] unclamped
    eps_t = tl.full([], eps, acc_ty)  # not a bare constexpr: see _centroid_fwd_kernel
    n = tl.maximum(norm, eps_t)
    cols = tl.arange(0, BLOCK_D)
    zg = tl.zeros([BLOCK_B], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = rmask[:, None] & (c < D)[None, :]
        x = tl.load(X_ptr + rows64[:, None] * stride_xb + c[None, :] * stride_xd, mask=m, other=0.0).to(acc_ty)
        g = tl.load(G_ptr + y[:, None] * stride_gc + c[None, :] * stride_gd, mask=m, other=0.0)
        zg += tl.sum(_div(x, n[:, None]) * g, axis=1)
    zg = tl.where(norm >= eps_t, zg, 0.0)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = rmask[:, None] & (c < D)[None, :]
        x = tl.load(X_ptr + rows64[:, None] * stride_xb + c[None, :] * stride_xd, mask=m, other=0.0).to(acc_ty)
        g = tl.load(G_ptr + y[:, None] * stride_gc + c[None, :] * stride_gd, mask=m, other=0.0)
        dx = _div(g - _div(x, n[:, None]) * zg[:, None], n[:, None])
        tl.store(DX_ptr + rows64[:, None] * stride_dxb + c[None, :] * stride_dxd,
                 dx.to(DX_ptr.dtype.element_ty), mask=m)


def _row_blocks(D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D) of the row kernels: 8 x 512 tiles on a GPU (B/8 programs); 8 x 256
    in float64, where the backward's two tiles would need ~240 registers a thread.

    The interpreter pays per program and per op, not per element: tiles there are as
    large as still leave the D loops and row masks exercised at the test shapes.
    """
    if interpreted():
        return 32, min(triton.next_power_of_2(D), 128)
    return 8, min(triton.next_power_of_2(D), 256 if dtype == torch.float64 else 512)


def _class_blocks(D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) of the class-sum kernel: narrow D-blocks give C * D/64
    programs on a GPU. In float64, 8 warps: with 4, ptxas spilled 8 B a thread for sm_80
    under Triton 3.7.x (one register stored at entry and loaded at exit, beside div.rn.f64's slow-path calls in the SASS); 8 warps
    compile spill-free for sm_80 and sm_90 under 3.6.0-3.9.0 (benchmarks/triton_compile.py)."""
    if interpreted():
        return 16, min(triton.next_power_of_2(D), 128), 4
    return 32, min(triton.next_power_of_2(D), 64), 8 if dtype == torch.float64 else 4


def class_sums_fwd(features: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                   num_classes: int, acc_dtype: torch.dtype, *, block_b: int | None = None,
                   block_d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [C, D], norms [B]) in ``acc_dtype``: per-class sums of the L2-normalised rows of
    ``features`` [B, D], and the row norms |f_i| (unclamped; for the backward).

    ``order`` [B] (int64) lists the rows sorted by label (stable); ``starts``/``counts`` [C]
    (int64) give each class's segment in it. ``block_*`` override the tile (tests).
    """
    B, D = features.shape
    norms = new_output((B,), dtype=acc_dtype, device=features.device)  # [B]
    bb, bd = _row_blocks(D, acc_dtype)
    bb, bd = block_b or bb, block_d or bd
    _centroid_norm_kernel[(triton.cdiv(B, bb),)](
        features, norms, B, D, features.stride(0), features.stride(1), eps=EPS, BLOCK_B=bb, BLOCK_D=bd,
    )
    S = new_output((num_classes, D), dtype=acc_dtype, device=features.device)  # [C, D]
    cb, cd, warps = _class_blocks(D, acc_dtype)
    cb, cd = block_b or cb, block_d or cd
    _centroid_fwd_kernel[(num_classes, triton.cdiv(D, cd))](
        features, norms, order, starts, counts, S, D, features.stride(0), features.stride(1), S.stride(0),
        eps=EPS, BLOCK_B=cb, BLOCK_D=cd, num_warps=warps,
    )
    return S, norms


def class_sums_bwd(features: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor, grad_sums: torch.Tensor, *,
                   block_b: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """dL/dfeatures [B, D] (features' dtype) from ``grad_sums`` = dL/dS [C, D] (accumulation dtype),
    ``labels`` [B] (any integer dtype and stride) and the forward's ``norms`` [B]."""
    B, D = features.shape
    dx = new_output((B, D), dtype=features.dtype, device=features.device)
    bb, bd = _row_blocks(D, grad_sums.dtype)
    bb, bd = block_b or bb, block_d or bd
    _centroid_bwd_kernel[(triton.cdiv(B, bb),)](
        features, labels, norms, grad_sums, dx, B, D,
        features.stride(0), features.stride(1), labels.stride(0),
        grad_sums.stride(0), grad_sums.stride(1), dx.stride(0), dx.stride(1),
        eps=EPS, BLOCK_B=bb, BLOCK_D=bd,
    )
    return dx


def compile_cases() -> list[dict]:
    """Inputs on which the launchers above pick each configuration they can: every BLOCK_D
    (float32 and float64 features), and for each feature dtype the smallest, an unaligned and
    the largest.

    ``benchmarks/triton_compile.py`` calls :func:`run_case` on each and compiles what the
    launchers launch: a new branch in ``_row_blocks`` or ``_class_blocks`` needs a case here.
    """
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        # The shapes that matter; B = 1000 is not a multiple of 16 (Triton specialises on that).
        cases += [dict(dtype=dtype, B=B, D=512, C=C) for B, C in ((128, 10), (1000, 100), (1024, 1000))]
        # D = 1 and 100: BLOCK_D 1 and 128 (class sums: 64); D = 300: the caps, 512 (256 in float64).
        cases += [dict(dtype=dtype, B=100, D=D, C=7) for D in (1, 100, 300)]
    cases += [dict(dtype=torch.float32, B=100, D=D, C=7) for D in (2, 4, 7, 16, 32, 64, 256)]
    cases += [dict(dtype=torch.float64, B=100, D=D, C=7) for D in (2, 4, 7, 16, 32)]  # its class sums' 8 warps
    cases.append(dict(dtype=torch.float32, B=100, D=100, C=7, labels=torch.int32))
    return cases


def run_case(case: dict, device="meta", num_sms: int | None = None) -> None:
    """Run both launchers once on uninitialised tensors of ``case`` (meta tensors: nothing executes)."""
    B, D, C = case["B"], case["D"], case["C"]
    features = torch.empty(B, D, dtype=case["dtype"], device=device)
    labels = torch.empty(B, dtype=case.get("labels", torch.int64), device=device)
    order = torch.empty(B, dtype=torch.int64, device=device)
    starts = torch.empty(C, dtype=torch.int64, device=device)
    acc = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    S, norms = class_sums_fwd(features, order, starts, starts, C, acc)
    class_sums_bwd(features, labels, norms, S)
