"""TERM primitives in Triton: per-group tilted statistics and fused per-row squared errors.

tilted_group_stats: program (b, group tile) walks its contiguous share of the
losses in chunks, reduces each chunk to one state per group (anchor = the loss
maximising t * loss, s = sum expm1(t (loss - anchor)), count) and merges it into
a running state, all in float64 (an O(N) reduction: float64 costs little next to
the memory traffic and keeps log_mean = log1p(s / count) exact for tiny and huge
|t| alike). The [blocks, G] partial states are then merged per group by a second
kernel. Memory is O(blocks x G); with many groups each group tile re-reads the
losses (work O(N x G / BLOCK_G)), fine for the few groups hierarchical TERM uses.

row_sq_error / sparse_decode_sq_error: one program per row; the decode happens in
registers column block by column block and only the float32 squared error is stored.
sparse_decode_residual (their backward) decodes the same way and reuses each tile of
W_dec rows for the gather-dot right after (decode_tile is shared with sparse_decode.py).

The interpreter has no libdevice, so expm1 and log1p are written with exp and log
(Kahan's formulas, a few ulps in float64).

W_dec is read in place through its row stride (``_common.weight_strides``: any row
stride, unit stride along d), never copied; the [N, d] targets and the [N, k] codes are
made contiguous where they are not (O(N * d) and O(N * k)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, guarded, interpreting, multiprocessor_count
from ._common import next_power_of_2, rne_bf16, round_bf16_in_kernel, weight_strides
from .sparse_decode import decode_tile

# GPU: a [BLOCK, BLOCK_G] float64 tile of 2048 entries over 8 warps (8 per thread);
# aot_report: 32-125 registers on sm_80/sm_90, no spills, at every BLOCK_G up to 32
# (4 warps spilled 16 bytes at BLOCK_G=8 on sm_80).
STATS_TILE = 2048
MAX_BLOCK_G = 32
STATS_WARPS = 8
MERGE_CONFIG = dict(BLOCK_G=128, num_warps=4)
# Largest number of partial states (blocks x groups) kept in memory.
MAX_PARTIALS = 1 << 22
ROW_CONFIG = dict(BLOCK_D=512, num_warps=4)
# The decode tile's config (sparse_decode.DECODE_CONFIG); aot_report: 40-48 registers, no spills.
DECODE_SQ_CONFIG = dict(BLOCK_J=16, BLOCK_D=256, num_warps=8)
# aot_report: 64-96 registers on sm_80/sm_90, no spills (8 warps spilled 8 bytes on sm_80 in float32).
DECODE_RESIDUAL_CONFIG = dict(BLOCK_J=16, BLOCK_D=256, num_warps=4)
# The interpreter: small tiles so small tests cross every mask and merge.
INTERPRET_STATS = dict(TILE=64, MAX_BLOCK_G=4, BLOCK_G_MERGE=4)
INTERPRET_ROW_CONFIG = dict(BLOCK_D=16, num_warps=4)
INTERPRET_DECODE_SQ_CONFIG = dict(BLOCK_J=4, BLOCK_D=16, num_warps=4)
INTERPRET_DECODE_RESIDUAL_CONFIG = dict(BLOCK_J=4, BLOCK_D=16, num_warps=4)


def _gpu(device) -> bool:
    return device.type == "cuda" and not interpreting()


@triton.jit
def _expm1(x):
    # Kahan: (u - 1) x / log(u) with u = exp(x) cancels the rounding error of u.
    u = tl.exp(x)
    um1 = u - 1.0
    special = (u == 1.0) | (um1 == -1.0) | (u == float("inf"))
    r = um1 * x / tl.log(tl.where(special, 2.0, u))  # (the guard keeps 0/0 out of unused lanes)
    r = tl.where(u == 1.0, x, r)
    r = tl.where(um1 == -1.0, -1.0, r)
    return tl.where(u == float("inf"), u, r)


@triton.jit
def _log1p(x):
    # Kahan: log(u) x / (u - 1) with u = 1 + x.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _merge(a1, s1, c1, a2, s2, c2, t, ZERO_T: tl.constexpr):
    """Merges tilt states (anchor, s, count), elementwise; the arithmetic of the CPU TiltState."""
    c = c1 + c2
    if ZERO_T:
        return a1, s1 + s2, c
    delta = t * (a2 - a1)
    other_wins = delta > 0
    neg = tl.where(other_wins, -delta, delta)
    f = tl.exp(neg)
    m = _expm1(neg)
    s = tl.where(other_wins, f * s1 + c1.to(tl.float64) * m + s2, s1 + f * s2 + c2.to(tl.float64) * m)
    a = tl.where(other_wins, a2, a1)
    # an empty side leaves the other unchanged
    a = tl.where(c1 == 0, a2, tl.where(c2 == 0, a1, a))
    s = tl.where(c1 == 0, s2, tl.where(c2 == 0, s1, s))
    return a, s, c


@triton.jit
def _stats_kernel(loss_ptr, group_ptr, t_ptr, part_a, part_s, part_c, N, G, per_block,
                  HAS_GROUPS: tl.constexpr, ZERO_T: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    b = tl.program_id(0)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gs < G
    t = tl.load(t_ptr)
    run_a = tl.zeros([BLOCK_G], tl.float64)
    run_s = tl.zeros([BLOCK_G], tl.float64)
    run_c = tl.zeros([BLOCK_G], tl.int64)
    start = b.to(tl.int64) * per_block
    for i0 in range(0, per_block, BLOCK):
        idx = start + i0 + tl.arange(0, BLOCK)
        ok = (idx < N) & (idx < start + per_block)
        loss = tl.load(loss_ptr + idx, mask=ok, other=0.0).to(tl.float64)
        if HAS_GROUPS:
            gid = tl.load(group_ptr + idx, mask=ok, other=-1)
        else:
            gid = tl.where(ok, 0, -1).to(tl.int64)
        match = gid[:, None] == gs[None, :]
        c = tl.sum(match.to(tl.int64), axis=0)
        if ZERO_T:
            s = tl.sum(tl.where(match, loss[:, None], 0.0), axis=0)
            a = tl.zeros([BLOCK_G], tl.float64)
        else:
            top = tl.max(tl.where(match, loss[:, None], float("-inf")), axis=0)
            bottom = tl.min(tl.where(match, loss[:, None], float("inf")), axis=0)
            a = tl.where(c > 0, tl.where(t > 0, top, bottom), 0.0)
            # each loss's own group anchor (it matches at most one column of the tile)
            mine = tl.sum(tl.where(match, a[None, :], 0.0), axis=1)
            hit = tl.sum(match.to(tl.int32), axis=1) > 0
            e = _expm1(tl.where(hit, t * (loss - mine), 0.0))  # others could overflow
            s = tl.sum(tl.where(match, e[:, None], 0.0), axis=0)
        run_a, run_s, run_c = _merge(run_a, run_s, run_c, a, s, c, t, ZERO_T)
    out = b.to(tl.int64) * G + gs
    tl.store(part_a + out, run_a, mask=g_ok)
    tl.store(part_s + out, run_s, mask=g_ok)
    tl.store(part_c + out, run_c, mask=g_ok)


@triton.jit
def _stats_merge_kernel(part_a, part_s, part_c, t_ptr, anchor_ptr, log_mean_ptr, count_ptr, G, num_blocks,
                        ZERO_T: tl.constexpr, BLOCK_G: tl.constexpr):
    gs = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gs < G
    t = tl.load(t_ptr)
    a = tl.zeros([BLOCK_G], tl.float64)
    s = tl.zeros([BLOCK_G], tl.float64)
    c = tl.zeros([BLOCK_G], tl.int64)
    at = gs.to(tl.int64)
    for _ in range(0, num_blocks):  # in block order: deterministic
        a2 = tl.load(part_a + at, mask=g_ok, other=0.0)
        s2 = tl.load(part_s + at, mask=g_ok, other=0.0)
        c2 = tl.load(part_c + at, mask=g_ok, other=0)
        a, s, c = _merge(a, s, c, a2, s2, c2, t, ZERO_T)
        at += G
    n = tl.maximum(c, 1).to(tl.float64)
    if ZERO_T:
        anchor = s / n
        log_mean = tl.zeros([BLOCK_G], tl.float64)
    else:
        anchor = a
        log_mean = _log1p(s / n)
    empty = c == 0
    tl.store(anchor_ptr + gs, tl.where(empty, 0.0, anchor), mask=g_ok)
    tl.store(log_mean_ptr + gs, tl.where(empty, 0.0, log_mean), mask=g_ok)
    tl.store(count_ptr + gs, c, mask=g_ok)


def stats_config(device, num_groups: int) -> dict:
    if _gpu(device):
        tile, max_g, merge_g = STATS_TILE, MAX_BLOCK_G, MERGE_CONFIG["BLOCK_G"]
    else:
        tile, max_g, merge_g = INTERPRET_STATS["TILE"], INTERPRET_STATS["MAX_BLOCK_G"], INTERPRET_STATS["BLOCK_G_MERGE"]
    block_g = min(next_power_of_2(num_groups), max_g)
    return dict(BLOCK=tile // block_g, BLOCK_G=block_g, MERGE_G=min(next_power_of_2(num_groups), merge_g))


@guarded
def tilted_group_stats(losses, t, groups, num_groups):
    """Launcher with the schema's signature: (anchor [G] float64, log_mean [G] float64, count [G] int64)."""
    if losses.dtype != torch.float64:  # float64 losses are fine: the kernel works in float64
        check_dtype(losses, "losses")
    check_device(losses, "losses")
    if groups is not None:
        check_device(groups, "groups")
        groups = groups.contiguous()  # O(N)
    losses = losses.contiguous()  # O(N)
    N, G, device = losses.shape[0], int(num_groups), losses.device
    anchor = torch.empty(G, dtype=torch.float64, device=device)
    log_mean = torch.empty_like(anchor)
    count = torch.empty(G, dtype=torch.int64, device=device)
    cfg = stats_config(device, G)
    # a few programs per multiprocessor, each over a contiguous share (whole chunks)
    blocks = max(1, min(triton.cdiv(N, cfg["BLOCK"]), 4 * multiprocessor_count(device), MAX_PARTIALS // G))
    per_block = triton.cdiv(triton.cdiv(N, blocks), cfg["BLOCK"]) * cfg["BLOCK"]
    blocks = triton.cdiv(N, per_block)
    part_a = torch.empty(blocks, G, dtype=torch.float64, device=device)
    part_s = torch.empty_like(part_a)
    part_c = torch.empty(blocks, G, dtype=torch.int64, device=device)
    t_buf = torch.full((1,), float(t), dtype=torch.float64, device=device)  # a float64 t (scalar args are fp32)
    zero_t = float(t) == 0.0
    _stats_kernel[(blocks, triton.cdiv(G, cfg["BLOCK_G"]))](
        losses, groups if groups is not None else losses, t_buf, part_a, part_s, part_c, N, G, per_block,
        HAS_GROUPS=groups is not None, ZERO_T=zero_t, BLOCK=cfg["BLOCK"], BLOCK_G=cfg["BLOCK_G"],
        num_warps=STATS_WARPS)
    _stats_merge_kernel[(triton.cdiv(G, cfg["MERGE_G"]),)](
        part_a, part_s, part_c, t_buf, anchor, log_mean, count, G, blocks, ZERO_T=zero_t, BLOCK_G=cfg["MERGE_G"],
        num_warps=MERGE_CONFIG["num_warps"])
    return anchor, log_mean, count


@triton.jit
def _row_sq_error_kernel(a_ptr, b_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ok = ds < D
        diff = (tl.load(a_ptr + n * D + ds, mask=ok, other=0.0).to(tl.float32)
                - tl.load(b_ptr + n * D + ds, mask=ok, other=0.0).to(tl.float32))
        acc += diff * diff
    tl.store(out_ptr + n, tl.sum(acc, axis=0))


@guarded
def row_sq_error(x_hat, x):
    """Launcher with the schema's signature: sum_d (x_hat - x)^2 per row, float32 [N]."""
    for t, name in ((x_hat, "x_hat"), (x, "x")):
        check_dtype(t, name)
        check_device(t, name)
    N, d = x_hat.shape
    out = torch.zeros(N, dtype=torch.float32, device=x_hat.device)
    if N == 0 or d == 0:
        return out
    cfg = ROW_CONFIG if _gpu(x_hat.device) else INTERPRET_ROW_CONFIG
    _row_sq_error_kernel[(N,)](x_hat.contiguous(), x.contiguous(), out, d, **cfg)  # O(N * d) copies at most
    return out


@triton.jit
def _decode_sq_error_kernel(v_ptr, idx_ptr, w_ptr, b_ptr, x_ptr, out_ptr, K, M, D, stride_w, stride_wd,
                            HAS_BIAS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        # the row's decode of this column block, in registers (float32, a fixed order)
        acc = decode_tile(v_ptr, idx_ptr, w_ptr, n, K, M, stride_w, stride_wd, ds, d_ok, BLOCK_J, BLOCK_D)
        if HAS_BIAS:
            acc += tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
        diff = acc - tl.load(x_ptr + n * D + ds, mask=d_ok, other=0.0).to(tl.float32)
        total += tl.where(d_ok, diff * diff, 0.0)
    tl.store(out_ptr + n, tl.sum(total, axis=0))


@guarded
def sparse_decode_sq_error(values, indices, W_dec, b_dec, x):
    """Launcher with the schema's signature: per-row squared error of the decode, float32 [N]."""
    for t, name in ((values, "values"), (W_dec, "W_dec"), (b_dec, "b_dec"), (x, "x")):
        if t is not None:
            check_dtype(t, name)
            check_device(t, name)
    M, d = W_dec.shape
    N, k = values.shape
    out = torch.zeros(N, dtype=torch.float32, device=values.device)
    if N == 0 or d == 0:
        return out
    cfg = DECODE_SQ_CONFIG if _gpu(values.device) else INTERPRET_DECODE_SQ_CONFIG
    stride_w, stride_wd = weight_strides(W_dec)  # read in place, never copied
    values, indices, x = values.contiguous(), indices.contiguous(), x.contiguous()  # O(N * k), O(N * d)
    bias = b_dec.contiguous() if b_dec is not None else values
    _decode_sq_error_kernel[(N,)](values, indices, W_dec, bias, x, out, k, M, d, stride_w, stride_wd,
                                  HAS_BIAS=b_dec is not None,
                                  **cfg)
    return out


@triton.jit
def _decode_residual_kernel(v_ptr, idx_ptr, w_ptr, b_ptr, x_ptr, scale_ptr, res_ptr, dot_ptr, K, M, D, stride_w,
                            stride_wd,
                            HAS_BIAS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                            ROUND_BF16: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + n)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        acc = decode_tile(v_ptr, idx_ptr, w_ptr, n, K, M, stride_w, stride_wd, ds, d_ok, BLOCK_J, BLOCK_D)
        if HAS_BIAS:
            acc += tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
        res = tl.where(d_ok, scale * (acc - tl.load(x_ptr + n * D + ds, mask=d_ok, other=0.0).to(tl.float32)), 0.0)
        stored = rne_bf16(res) if ROUND_BF16 else res
        tl.store(res_ptr + n * D + ds, stored.to(res_ptr.dtype.element_ty), mask=d_ok)
        # The same [BLOCK_J, BLOCK_D] tiles of W again, just read by decode_tile (cache
        # hits): this block's share of residual . W[indices[n, j]], with the float32 residual.
        for j0 in range(0, K, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            j_ok = js < K
            idx = tl.load(idx_ptr + n * K + js, mask=j_ok, other=0)
            ok = j_ok & (idx >= 0) & (idx < M)
            w = tl.load(w_ptr + idx[:, None] * stride_w + ds.to(tl.int64)[None, :] * stride_wd,
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            part = tl.sum(w.to(tl.float32) * res[None, :], axis=1)
            # partial sums of earlier column blocks, in block order (deterministic)
            part += tl.load(dot_ptr + n * K + js, mask=j_ok & (d0 > 0), other=0.0)
            tl.store(dot_ptr + n * K + js, part, mask=j_ok)
        tl.debug_barrier()  # this block's stores of dot_ptr are visible to every thread of the next


@guarded
def sparse_decode_residual(values, indices, W_dec, b_dec, x, scale):
    """Launcher with the schema's signature: (residual [N, d], grad_values [N, k]), dtype of values.

    One program per row walks its column blocks: decode, residual = scale * (x_hat - x),
    then its dots with the row's W_dec tiles (still in cache), accumulated in a float32
    [N, k] buffer (the output itself for float32 values).
    """
    for t, name in ((values, "values"), (W_dec, "W_dec"), (b_dec, "b_dec"), (x, "x")):
        if t is not None:
            check_dtype(t, name)
            check_device(t, name)
    M, d = W_dec.shape
    N, k = values.shape
    residual = torch.empty(N, d, dtype=values.dtype, device=values.device)
    if N == 0 or d == 0:
        return residual, torch.zeros(N, k, dtype=values.dtype, device=values.device)
    dots = torch.empty(N, k, dtype=torch.float32, device=values.device)
    cfg = DECODE_RESIDUAL_CONFIG if _gpu(values.device) else INTERPRET_DECODE_RESIDUAL_CONFIG
    stride_w, stride_wd = weight_strides(W_dec)  # read in place, never copied
    values, indices, x = values.contiguous(), indices.contiguous(), x.contiguous()  # O(N * k), O(N * d)
    bias = b_dec.contiguous() if b_dec is not None else values
    _decode_residual_kernel[(N,)](values, indices, W_dec, bias, x, scale.contiguous(), residual, dots, k, M, d,
                                  stride_w, stride_wd, HAS_BIAS=b_dec is not None,
                                  ROUND_BF16=round_bf16_in_kernel(values.dtype),
                                  **cfg)
    return residual, dots if values.dtype == torch.float32 else dots.to(values.dtype)
