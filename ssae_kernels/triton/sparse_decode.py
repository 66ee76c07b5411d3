"""Sparse decode in Triton: x_hat[n] = b_dec + sum_j values[n, j] * W_dec[indices[n, j]].

A gather kernel: program (row n, column block) walks the row's k slots in chunks,
gathers the selected rows of W_dec (contiguous column blocks, so coalesced) and
accumulates in float32 in slot order (deterministic). Memory-bound: see docs/triton.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, interpreting, rne_bf16, round_bf16_in_kernel

# GPU: a [BLOCK_J, BLOCK_D] float32 gather tile is 32 registers per thread at 4 warps.
DECODE_CONFIG = dict(BLOCK_J=16, BLOCK_D=256, num_warps=4)
INTERPRET_DECODE_CONFIG = dict(BLOCK_J=4, BLOCK_D=16, num_warps=4)


def decode_config(device: torch.device) -> dict:
    return DECODE_CONFIG if device.type == "cuda" and not interpreting() else INTERPRET_DECODE_CONFIG


@triton.jit
def decode_tile(v_ptr, idx_ptr, w_ptr, n, K, M, D, ds, d_ok, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_j values[n, j] * W[indices[n, j], ds] in float32, in slot order (no bias).

    Row n's decode of one column block, shared by every decode kernel (sparse_decode and
    the fused TERM kernels in tilted_loss.py). Out-of-range indices add nothing.
    """
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < K
        idx = tl.load(idx_ptr + n * K + js, mask=j_ok, other=0)
        ok = j_ok & (idx >= 0) & (idx < M)  # out-of-range entries read nothing
        v = tl.load(v_ptr + n * K + js, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * D + ds[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    return acc


@triton.jit
def _decode_kernel(v_ptr, idx_ptr, w_ptr, b_ptr, out_ptr, K, M, D,
                   HAS_BIAS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROUND_BF16: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    acc = decode_tile(v_ptr, idx_ptr, w_ptr, n, K, M, D, ds, d_ok, BLOCK_J, BLOCK_D)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    if ROUND_BF16:
        acc = rne_bf16(acc)
    tl.store(out_ptr + n * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def sparse_decode(values, indices, W_dec, b_dec=None):
    """Launcher with the schema's signature."""
    for t, name in ((values, "values"), (W_dec, "W_dec"), (b_dec, "b_dec")):
        if t is not None:
            check_dtype(t, name)
            check_device(t, name)
    M, d = W_dec.shape
    N, k = values.shape
    values, indices, W_dec = values.contiguous(), indices.contiguous(), W_dec.contiguous()
    out = torch.empty(N, d, dtype=values.dtype, device=values.device)
    if N == 0 or d == 0:
        return out
    cfg = decode_config(values.device)
    bias = b_dec.contiguous() if b_dec is not None else values
    _decode_kernel[(N, triton.cdiv(d, cfg["BLOCK_D"]))](
        values, indices, W_dec, bias, out, k, M, d, HAS_BIAS=b_dec is not None,
        ROUND_BF16=round_bf16_in_kernel(values.dtype), **cfg)
    return out
