"""Sparse decode in Triton: x_hat[n] = b_dec + sum_j values[n, j] * W_dec[indices[n, j]].

A gather kernel: program (row n, column block) walks the row's k slots in chunks of
BLOCK_J, gathers the selected rows of W_dec (contiguous column blocks, so coalesced;
16-byte vectors when the row stride allows) and accumulates in float32. The
accumulator is a [BLOCK_J, BLOCK_D] tile, reduced over its BLOCK_J rows once after
the loop: a per-chunk reduction over the slot axis crossed warps (shared memory and a
barrier per BLOCK_J slots). Each column's sum is thus BLOCK_J interleaved slot-order
sums added at the end: a fixed order, deterministic. Memory-bound: see docs/triton.md.

W_dec is read in place through its row stride (any row stride, unit stride along d;
``_common.weight_strides``), never copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, guarded, interpreting, rne_bf16, round_bf16_in_kernel
from ._common import weight_strides

# GPU: the [BLOCK_J, BLOCK_D] float32 accumulator and the gathered tile are 16 registers
# each per thread at 8 warps; aot_report: 39-48 registers, no spills, 16-byte loads of W
# rows and no barrier or shuffle inside the slot loop (at 4 warps, 72 registers, and one
# fp32 variant of the fused TERM decode spilled 20 bytes on sm_80).
DECODE_CONFIG = dict(BLOCK_J=16, BLOCK_D=256, num_warps=8)
INTERPRET_DECODE_CONFIG = dict(BLOCK_J=4, BLOCK_D=16, num_warps=4)


def decode_config(device: torch.device) -> dict:
    return DECODE_CONFIG if device.type == "cuda" and not interpreting() else INTERPRET_DECODE_CONFIG


@triton.jit
def decode_tile(v_ptr, idx_ptr, w_ptr, n, K, M, stride_w, stride_wd, ds, d_ok,
                BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_j values[n, j] * W[indices[n, j], ds] in float32 (no bias); W[m, c] at m * stride_w + c * stride_wd.

    Row n's decode of one column block, shared by every decode kernel (sparse_decode and
    the fused TERM kernels in tilted_loss.py). The slots accumulate elementwise into a
    [BLOCK_J, BLOCK_D] tile, reduced once at the end (no reduction across warps inside
    the loop). Out-of-range indices add nothing.
    """
    acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < K
        idx = tl.load(idx_ptr + n * K + js, mask=j_ok, other=0)
        ok = j_ok & (idx >= 0) & (idx < M)  # out-of-range entries read nothing
        v = tl.load(v_ptr + n * K + js, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_w + ds.to(tl.int64)[None, :] * stride_wd,
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit
def _decode_kernel(v_ptr, idx_ptr, w_ptr, b_ptr, out_ptr, K, M, D, stride_w, stride_wd,
                   HAS_BIAS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROUND_BF16: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    acc = decode_tile(v_ptr, idx_ptr, w_ptr, n, K, M, stride_w, stride_wd, ds, d_ok, BLOCK_J, BLOCK_D)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    if ROUND_BF16:
        acc = rne_bf16(acc)
    tl.store(out_ptr + n * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@guarded
def sparse_decode(values, indices, W_dec, b_dec=None):
    """Launcher with the schema's signature."""
    for t, name in ((values, "values"), (W_dec, "W_dec"), (b_dec, "b_dec")):
        if t is not None:
            check_dtype(t, name)
            check_device(t, name)
    M, d = W_dec.shape
    N, k = values.shape
    stride_w, stride_wd = weight_strides(W_dec)  # read in place, never copied
    # values, indices: O(N * k) copies at most; b_dec: O(d).
    values, indices = values.contiguous(), indices.contiguous()
    out = torch.empty(N, d, dtype=values.dtype, device=values.device)
    if N == 0 or d == 0:
        return out
    cfg = decode_config(values.device)
    bias = b_dec.contiguous() if b_dec is not None else values
    _decode_kernel[(N, triton.cdiv(d, cfg["BLOCK_D"]))](
        values, indices, W_dec, bias, out, k, M, d, stride_w, stride_wd, HAS_BIAS=b_dec is not None,
        ROUND_BF16=round_bf16_in_kernel(values.dtype), **cfg)
    return out
