"""Triton kernels of the supervised-contrastive (MI-UE) loss.

Notation (see ``ue_fast.ops.supcon`` for the derivation): ``r_i = 1/max(|f_i|, eps)``,
``cos_ij = (f_i . f_j) r_i r_j``, ``s_ij = cos_ij / tau``, ``A_i`` and ``P_i`` the
log-sum-exp of row i of ``s`` over all columns and over same-label columns.

- ``_supcon_fwd_kernel``: one program per block of rows; sweeps the column
  blocks, builds each [BLOCK_M, BLOCK_N] tile of ``s`` from a K-loop of dots and
  folds it into two online log-sum-exps. Writes A, P and r; the B x B matrix is
  never stored.
- ``_supcon_bwd_kernel``: one program per (row block, D block); recomputes the
  tiles of ``s`` and accumulates ``dZ = W Z`` for its D slice, with the symmetric
  weight ``w_ij = e^{s_ij-A_i} + e^{s_ij-A_j} - [y_i=y_j](e^{s_ij-P_i} + e^{s_ij-P_j})``.
  The projection onto the sphere's tangent needs ``z_i . dz_i``, which is
  ``sum_j w_ij cos_ij`` (scaled), so no reduction across D blocks is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreted, new_output
from ._scalars import acc_scalar, split_f32

NORM_EPS = 1e-8


@triton.jit
def _online_lse(m, l, s):
    """Fold the rows of tile ``s`` [M, N] into running (max, sum of exp) [M]."""
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row with no finite entry yet keeps m = -inf; shift by 0 so exp() gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
    return m_new, l


@triton.jit
def _dot_tile(F_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_fb, stride_fd,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr):
    """Gram tile F[offs_m] @ F[offs_n]^T [M, N], accumulated in ACC over K blocks."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(F_ptr + offs_m[:, None] * stride_fb + offs_k[None, :] * stride_fd,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(F_ptr + offs_n[:, None] * stride_fb + offs_k[None, :] * stride_fd,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if CAST:  # float64 inputs (dot in float64), or bf16 under the interpreter
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _inv_norms(F_ptr, offs, mask, D, stride_fb, stride_fd, NORM_EPS: tl.constexpr,
               BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """r = 1 / max(|f|, eps) of the rows ``offs`` [ROWS], over K blocks."""
    sq = tl.zeros([BLOCK_ROWS], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(F_ptr + offs[:, None] * stride_fb + offs_k[None, :] * stride_fd,
                    mask=mask[:, None] & (offs_k[None, :] < D), other=0.0).to(ACC)
        sq += tl.sum(x * x, 1)
    # eps built in ACC: a bare float (argument or constexpr) may be float32, 6e-9 off 1e-8 in float64
    return 1.0 / tl.maximum(tl.sqrt(sq), tl.full([], NORM_EPS, ACC))


@triton.jit
def _supcon_fwd_kernel(F_ptr, Y_ptr, RN_ptr, LSE_ALL_ptr, LSE_POS_ptr,
                       B, D, stride_fb, stride_fd, inv_tau_hi, inv_tau_lo, NORM_EPS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       ACC: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr):
    pid = tl.program_id(0)
    inv_tau = acc_scalar(inv_tau_hi, inv_tau_lo, ACC)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    y_m = tl.load(Y_ptr + offs_m, mask=mask_m, other=0)

    r_m = _inv_norms(F_ptr, offs_m, mask_m, D, stride_fb, stride_fd, NORM_EPS, BLOCK_M, BLOCK_K, ACC)

    m_all = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_all = tl.zeros([BLOCK_M], dtype=ACC)
    m_pos = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_pos = tl.zeros([BLOCK_M], dtype=ACC)
    for n0 in range(0, B, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < B
        y_n = tl.load(Y_ptr + offs_n, mask=mask_n, other=0)
        r_n = _inv_norms(F_ptr, offs_n, mask_n, D, stride_fb, stride_fd, NORM_EPS, BLOCK_N, BLOCK_K, ACC)
        gram = _dot_tile(F_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_fb, stride_fd,
                         BLOCK_M, BLOCK_N, BLOCK_K, ACC, PREC, CAST)
        s = gram * r_m[:, None] * r_n[None, :] * inv_tau  # [M, N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_all, l_all = _online_lse(m_all, l_all, s)
        pos = (y_m[:, None] == y_n[None, :]) & mask_n[None, :]
        m_pos, l_pos = _online_lse(m_pos, l_pos, tl.where(pos, s, float("-inf")))

    # Padding rows (offs_m >= B) may have no positive column: keep log() off their zeros.
    tl.store(LSE_ALL_ptr + offs_m, m_all + tl.log(tl.where(mask_m, l_all, 1.0)), mask=mask_m)
    tl.store(LSE_POS_ptr + offs_m, m_pos + tl.log(tl.where(mask_m, l_pos, 1.0)), mask=mask_m)
    tl.store(RN_ptr + offs_m, r_m, mask=mask_m)


@triton.jit
def _supcon_bwd_kernel(F_ptr, Y_ptr, RN_ptr, LSE_ALL_ptr, LSE_POS_ptr, GOUT_ptr, DF_ptr,
                       B, D, stride_fb, stride_fd, stride_db, stride_dd, inv_tau_hi, inv_tau_lo,
                       grad_scale_hi, grad_scale_lo, NORM_EPS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr):
    inv_tau = acc_scalar(inv_tau_hi, inv_tau_lo, ACC)
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    y_m = tl.load(Y_ptr + offs_m, mask=mask_m, other=0)
    r_m = tl.load(RN_ptr + offs_m, mask=mask_m, other=0.0)
    a_m = tl.load(LSE_ALL_ptr + offs_m, mask=mask_m, other=0.0)
    p_m = tl.load(LSE_POS_ptr + offs_m, mask=mask_m, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)  # sum_j w_ij z_j, this D slice
    c = tl.zeros([BLOCK_M], dtype=ACC)  # sum_j w_ij cos_ij
    for n0 in range(0, B, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < B
        y_n = tl.load(Y_ptr + offs_n, mask=mask_n, other=0)
        r_n = tl.load(RN_ptr + offs_n, mask=mask_n, other=0.0)
        a_n = tl.load(LSE_ALL_ptr + offs_n, mask=mask_n, other=0.0)
        p_n = tl.load(LSE_POS_ptr + offs_n, mask=mask_n, other=0.0)
        gram = _dot_tile(F_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_fb, stride_fd,
                         BLOCK_M, BLOCK_N, BLOCK_K, ACC, PREC, CAST)
        cos = gram * r_m[:, None] * r_n[None, :]
        s = cos * inv_tau
        pos = (y_m[:, None] == y_n[None, :]) & mask_n[None, :]
        w = tl.exp(s - a_m[:, None]) + tl.exp(s - a_n[None, :])
        w -= tl.where(pos, tl.exp(s - p_m[:, None]) + tl.exp(s - p_n[None, :]), 0.0)
        w = tl.where(mask_n[None, :] & mask_m[:, None], w, 0.0)
        c += tl.sum(w * cos, 1)
        z_n = tl.load(F_ptr + offs_n[:, None] * stride_fb + offs_d[None, :] * stride_fd,
                      mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC) * r_n[:, None]
        acc = tl.dot(w, z_n, acc, input_precision=PREC, out_dtype=ACC)

    scale = tl.load(GOUT_ptr).to(ACC) * acc_scalar(grad_scale_hi, grad_scale_lo, ACC)
    g = acc * scale
    zg = c * scale  # z_i . g_i
    z_m = tl.load(F_ptr + offs_m[:, None] * stride_fb + offs_d[None, :] * stride_fd,
                  mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(ACC) * r_m[:, None]
    # |f_i| <= eps: z = f/eps is linear in f, so no tangent projection (as torch's clamp_min).
    zg = tl.where(r_m < 1.0 / tl.full([], NORM_EPS, ACC), zg, 0.0)
    df = r_m[:, None] * (g - zg[:, None] * z_m)
    tl.store(DF_ptr + offs_m[:, None] * stride_db + offs_d[None, :] * stride_dd,
             df.to(DF_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _meta(features: torch.Tensor):
    acc = _acc_dtype(features.dtype)
    return dict(
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        # fp32 dots in IEEE precision: TF32 would cost ~1e-3 relative error in cos.
        PREC="ieee",
        # Triton's CPU interpreter multiplies bf16 dot operands as raw bits: upcast there.
        CAST=features.dtype == torch.float64 or (features.dtype == torch.bfloat16 and interpreted()),
    )


def _blocks(B: int, D: int, dtype: torch.dtype = torch.float32, aligned: bool = True) -> tuple[dict, dict]:
    """(forward, backward) tiles and num_warps. ``aligned``: D and the strides of the
    features are multiples of 16 elements (or 1), so loads vectorise.

    On a GPU, 64 x 64 x 16 forward tiles with 16 warps (8 in float64) and 32 x 32 x 32
    backward tiles with 8 warps. The forward with 8 warps spilled 20 B a thread in float32
    for sm_90 under Triton 3.8.0 (B = 128, D = 512), and 4-8 B where D is unaligned under
    3.8-3.9; with 16 warps it needs at most 128 registers; in float64, 16 warps spilled
    where 8 do not. The backward's D slice: 128 in bf16/fp16 where D is aligned, else 64
    (128 spilled 16-72 B a thread at 255 registers where D is not); 64 in float32 (128
    spilled 8 B for sm_90 under Triton 3.6 when B is not a multiple of 16, e.g. B = 1000);
    32 in float64 (64 came within a register of the 255 cap). With 4 warps the backward
    spilled at BLOCK_D 32 and 64 in float32, and 64 x 64 x 64 (BLOCK_D 256) tiles spilled
    hundreds of bytes a thread at D = 512. Each choice compiles without a spill for sm_80
    and sm_90 under Triton 3.6.0, 3.7.0, 3.7.1, 3.8.0 and 3.9.0 (those torch 2.11-2.14 pin,
    and the newest): benchmarks/triton_compile.py, and .ci/triton_check.sh in CI. None of
    these tiles has been timed on a GPU yet.
    """
    if interpreted():  # the interpreter runs programs one after another: few, large blocks
        block_d = min(128, max(16, triton.next_power_of_2(D)))
        block_k = min(128, max(16, triton.next_power_of_2(D)))
        return (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, num_warps=4),
                dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8 if block_d >= 128 else 4))
    cap = {torch.float64: 32, torch.float32: 64}.get(dtype, 128 if aligned else 64)
    block_d = min(cap, max(32, triton.next_power_of_2(D)))
    return (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8 if dtype == torch.float64 else 16),
            dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_D=block_d, num_warps=8))


def _aligned(features: torch.Tensor) -> bool:
    """Whether D and the strides are multiples of 16 elements (or 1): Triton's divisibility."""
    return all(v == 1 or v % 16 == 0 for v in (features.shape[1], *features.stride()))


def supcon_fwd(features: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Row statistics of the loss: (lse_all [B], lse_pos [B], rnorm [B]) in the accumulation dtype."""
    B, D = features.shape
    acc = _acc_dtype(features.dtype)
    lse_all = new_output((B,), dtype=acc, device=features.device)
    lse_pos = new_output((B,), dtype=acc, device=features.device)
    rnorm = new_output((B,), dtype=acc, device=features.device)
    blk, _ = _blocks(B, D, features.dtype, _aligned(features))
    grid = (triton.cdiv(B, blk["BLOCK_M"]),)
    _supcon_fwd_kernel[grid](
        features, labels, rnorm, lse_all, lse_pos, B, D, features.stride(0), features.stride(1),
        *split_f32(1.0 / temperature), NORM_EPS=NORM_EPS, **blk, **_meta(features),
    )
    return lse_all, lse_pos, rnorm


def supcon_bwd(features, labels, lse_all, lse_pos, rnorm, grad_out: torch.Tensor, temperature: float):
    """Gradient of the loss w.r.t. features [B, D], for upstream gradient ``grad_out`` (0-d tensor)."""
    B, D = features.shape
    dfeat = new_output((B, D), dtype=features.dtype, device=features.device)
    _, blk = _blocks(B, D, features.dtype, _aligned(features))
    grid = (triton.cdiv(B, blk["BLOCK_M"]), triton.cdiv(D, blk["BLOCK_D"]))
    _supcon_bwd_kernel[grid](
        features, labels, rnorm, lse_all, lse_pos, grad_out.reshape(1), dfeat,
        B, D, features.stride(0), features.stride(1), dfeat.stride(0), dfeat.stride(1),
        *split_f32(1.0 / temperature), *split_f32(1.0 / (B * temperature)), NORM_EPS=NORM_EPS, **blk,
        **_meta(features),
    )
    return dfeat


def compile_cases() -> list[dict]:
    """Inputs on which the launchers above pick each configuration they can (dtype, the
    backward's BLOCK_D and num_warps; D aligned to 16 or not; contiguous or transposed features).

    ``benchmarks/triton_compile.py`` calls :func:`run_case` on each and compiles what the
    launchers launch: a new branch in ``_blocks`` or ``_meta`` needs a case here.
    """
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        # The shapes that matter; B = 1000 is not a multiple of 16 (Triton specialises on that).
        cases += [dict(dtype=dtype, B=B, D=512) for B in (128, 1000, 1024)]
        # BLOCK_D 32 (D = 16 and 32) and 64; D % 16 != 0: the unaligned cap.
        cases += [dict(dtype=dtype, B=100, D=D) for D in (16, 32, 64, 100)]
    cases.append(dict(dtype=torch.float32, B=100, D=100, transposed=True))
    return cases


def run_case(case: dict, device="meta", num_sms: int | None = None) -> None:
    """Run both launchers once on uninitialised tensors of ``case`` (meta tensors: nothing executes)."""
    B, D = case["B"], case["D"]
    if case.get("transposed"):
        features = torch.empty(D, B, dtype=case["dtype"], device=device).t()
    else:
        features = torch.empty(B, D, dtype=case["dtype"], device=device)
    labels = torch.empty(B, dtype=torch.int64, device=device)
    lse_all, lse_pos, rnorm = supcon_fwd(features, labels, 0.1)
    supcon_bwd(features, labels, lse_all, lse_pos, rnorm, torch.empty((), dtype=lse_all.dtype, device=device), 0.1)
