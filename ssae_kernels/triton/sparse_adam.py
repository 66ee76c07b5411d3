"""sparse_adam_ in Triton: Adam on selected rows of a float32 parameter, after each row's catch-up.

Program (row block, column block) updates a [BLOCK_R, BLOCK_D] tile: rows ``rows[i]`` for
BLOCK_R consecutive i, BLOCK_D columns of each; every element of param, exp_avg and
exp_avg_sq in it is read and written once (and of grad read once), with the formulas of
ops/sparse_adam.py in float32. Memory-bound: the tile has a fixed number of elements,
BLOCK_D = next_pow2(d) up to a maximum, so short rows (d = 64, or a 1-D parameter viewed
as [M, 1]) share a program instead of leaving most of it masked. Offsets are int64
(row * stride passes 2^31 at M = 2^20, d = 4096).

The tensors are read through their row strides (unit column stride); one that is not
row-strided (a transposed view) is computed in a contiguous copy, then copied back.
A row outside [0, M) is left alone: ranges (and distinctness) are checked by the op's
checks on request (SSAE_CHECK_INDICES=1), as for every index of the GPU backends.

bfloat16 moments (STATE_BF16) are loaded into float32 and stored with stochastic rounding, from
the random bits every backend derives from (seed, step, row, column): csrc/kernels/stochastic_round.h.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, guarded, interpreting, next_power_of_2, row_stride, rows_strided, rows_view

# GPU: 2048 elements a program, 8 per thread (two 16-byte vectors per tensor); BLOCK_D up to 1024,
# so a row of d > 1024 spans several programs. aot_report: 75-80 registers on sm_80/sm_90, no spills,
# every load and store 16 bytes wide (at 4 warps, 16 elements a thread took 126-167 registers).
GPU_CONFIG = dict(TILE=2048, MAX_BLOCK_D=1024, num_warps=8)
# The interpreter: small tiles so small tests cross row and column blocks (d = 17 is two blocks).
INTERPRET_CONFIG = dict(TILE=64, MAX_BLOCK_D=16, num_warps=4)
MIN_BLOCK_D = 16  # four 16-byte vectors: narrower rows are padded to it


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (stochastic_round.h's mix32)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _bf16_stochastic(x, random16):
    """float32 -> bfloat16, rounded up when the 16 dropped bits plus random16 carry; infinities stay, NaN stays NaN."""
    u = x.to(tl.uint32, bitcast=True)
    special = (u & 0x7F800000) == 0x7F800000
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = tl.where(nan, (u >> 16) | 0x40, tl.where(special, u, u + random16) >> 16)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adam_kernel(p_ptr, m_ptr, v_ptr, rows_ptr, g_ptr, c_ptr, R, M, D, stride_p, stride_m, stride_v, stride_g,
                 beta1, beta2, step_size, bc2_sqrt, eps, seed, step,
                 HAS_GRAD: tl.constexpr, STATE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    i_ok = i < R
    row = tl.load(rows_ptr + i, mask=i_ok, other=0)
    row_ok = i_ok & (row >= 0) & (row < M)  # out of range: left alone
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    drift = tl.load(c_ptr + 4 * i, mask=i_ok, other=0.0)[:, None]
    decay1 = tl.load(c_ptr + 4 * i + 1, mask=i_ok, other=1.0)[:, None]
    decay2 = tl.load(c_ptr + 4 * i + 2, mask=i_ok, other=1.0)[:, None]
    eps_skip = tl.load(c_ptr + 4 * i + 3, mask=i_ok, other=1.0)[:, None]
    p_at = p_ptr + row[:, None] * stride_p + cols[None, :]
    m_at = m_ptr + row[:, None] * stride_m + cols[None, :]
    v_at = v_ptr + row[:, None] * stride_v + cols[None, :]
    p = tl.load(p_at, mask=mask, other=0.0)
    m = tl.load(m_at, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_at, mask=mask, other=0.0).to(tl.float32)
    # IEEE sqrt and division (not Triton's approximate ones), as torch.optim.Adam and the other backends.
    # Where m is zero the skipped steps moved nothing (0 / 0 otherwise; the inner guard keeps that 0 / 0
    # out of the discarded lanes, on which the interpreter warns).
    moved = m != 0.0
    skipped = tl.where(moved, tl.div_rn(drift * m, tl.where(moved, tl.sqrt_rn(v) + eps_skip, 1.0)), 0.0)
    if HAS_GRAD:
        g = tl.load(g_ptr + i[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        m = beta1 * decay1 * m + (1.0 - beta1) * g
        v = beta2 * decay2 * v + (1.0 - beta2) * g * g
        # torch.optim.Adam's order of operations: p - step_size * (m / (sqrt(v) / sqrt(bc2) + eps))
        p = p - skipped - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    else:
        p = p - skipped
        m = decay1 * m
        v = decay2 * v
    tl.store(p_at, p, mask=mask)
    if STATE_BF16:
        key = _mix32(seed.to(tl.uint32) * 0x9E3779B9 + step.to(tl.uint32))
        bits = _mix32(_mix32(key ^ row.to(tl.uint32))[:, None] ^ cols.to(tl.uint32)[None, :])
        tl.store(m_at, _bf16_stochastic(m, bits & 0xFFFF), mask=mask)
        tl.store(v_at, _bf16_stochastic(v, bits >> 16), mask=mask)
    else:
        tl.store(m_at, m, mask=mask)
        tl.store(v_at, v, mask=mask)


def tile_shape(d: int, tile: int, max_block_d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of a program for rows of d columns: ``tile`` elements in all."""
    block_d = min(max_block_d, max(MIN_BLOCK_D, next_power_of_2(d)))
    return max(1, tile // block_d), block_d


@guarded
def sparse_adam_(param, exp_avg, exp_avg_sq, rows, grad, catchup, lr, beta1, beta2, eps, step, seed=0, *,
                 tile=None, max_block_d=None):
    """Launcher with the schema's signature; ``tile`` and ``max_block_d`` override the config (tests)."""
    if param.dtype != torch.float32:
        raise TypeError(f"the triton backend's sparse_adam_ supports float32 only; param has dtype {param.dtype} "
                        "(float64 runs on the cpu and reference backends)")
    check_device(param, "param")
    R, d = rows.shape[0], param.shape[1]
    if R == 0 or d == 0:
        return
    cfg = GPU_CONFIG if param.device.type == "cuda" and not interpreting() else INTERPRET_CONFIG
    block_r, block_d = tile_shape(d, tile or cfg["TILE"], max_block_d or cfg["MAX_BLOCK_D"])
    # Bias corrections in double, as torch.optim.Adam computes them; the kernel gets them rounded once.
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = math.sqrt(1 - beta2**step)
    g, stride_g = rows_view(grad) if grad is not None else (param, 0)  # grad is only read: any row stride
    rows, catchup = rows.contiguous(), catchup.contiguous()  # O(R)
    # Written tensors must be row-strided; any other layout is computed densely and copied back.
    written = [t if rows_strided(t) else t.contiguous() for t in (param, exp_avg, exp_avg_sq)]
    p, m, v = written
    _adam_kernel[(triton.cdiv(R, block_r), triton.cdiv(d, block_d))](
        p, m, v, rows, g, catchup, R, param.shape[0], d, row_stride(p), row_stride(m), row_stride(v), stride_g,
        beta1, beta2, step_size, bc2_sqrt, eps, seed & 0xFFFFFFFF, step & 0xFFFFFFFF, HAS_GRAD=grad is not None,
        STATE_BF16=exp_avg.dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=cfg["num_warps"])
    for original, used in zip((param, exp_avg, exp_avg_sq), written):
        if used is not original:
            original.copy_(used)


def aot_specs():
    """Ahead-of-time compilation specs for ``triton/aot_report.py``: every tile shape the GPU launcher picks."""
    from .aot_report import Spec

    specs = []
    block_d = MIN_BLOCK_D
    while block_d <= GPU_CONFIG["MAX_BLOCK_D"]:
        block_r, _ = tile_shape(block_d, GPU_CONFIG["TILE"], GPU_CONFIG["MAX_BLOCK_D"])
        for has_grad, state in ((True, "fp32"), (False, "fp32"), (True, "bf16"), (False, "bf16")):
            specs.append(Spec(
                "sparse_adam._adam_kernel", _adam_kernel,
                f"fp32 BLOCK_R={block_r} BLOCK_D={block_d} w={GPU_CONFIG['num_warps']} {state} moments"
                f"{'' if has_grad else ' no grad'}",
                dict(p_ptr="*fp32", m_ptr=f"*{state}", v_ptr=f"*{state}", rows_ptr="*i64", g_ptr="*fp32",
                     c_ptr="*fp32", R="i32", M="i32", D="i32", stride_p="i32", stride_m="i32", stride_v="i32",
                     stride_g="i32", beta1="fp32", beta2="fp32", step_size="fp32", bc2_sqrt="fp32", eps="fp32",
                     seed="i32", step="i32"),
                dict(HAS_GRAD=has_grad, STATE_BF16=state == "bf16", BLOCK_R=block_r, BLOCK_D=block_d),
                GPU_CONFIG["num_warps"],
                aligned=("D", "stride_p", "stride_m", "stride_v", "stride_g")))
        block_d *= 2
    return specs
