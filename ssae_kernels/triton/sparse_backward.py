"""Sparse backward primitives in Triton (definitions in ssae_kernels/ops/sparse_backward.py).

- ``sampled_dot``: a gather-dot, program (row, slot block), float32 accumulation over d
  in a [BLOCK_J, BLOCK_D] tile reduced once at the end.
- ``latent_transpose``: a stable counting sort of the N*k entries by latent: an int32
  histogram (atomics) for the offsets, and an LSD radix sort with 8-bit digits for the
  order (per pass: a per-block digit histogram, a prefix sum, and a scatter whose
  in-block ranks come from sorting (digit, position) pairs, so every pass is stable and
  the result is exactly the reference's, not merely a valid grouping).
- ``sparse_transpose_matmul``: per-latent sums over the sorted segments, no atomics, so
  deterministic. Segments are cut into pieces of at most PIECE entries, one program
  each, so a latent that fires on every row does not serialise the kernel behind one
  program; latents with several pieces are finished by a second kernel that adds the
  pieces' partial sums in order.

Gathers accumulate elementwise into 2-D float32 tiles and reduce them once after their
loop (no reduction across threads per chunk); each sum keeps a fixed order, so results
are deterministic. Weights (``W``) are read in place through their row stride and never
copied (``_common.weight_strides``); activations and gradients (``grad``, ``rows``)
through theirs, copied only without unit stride along d (O(N * d)).

The prefix sums over the small tables (digit x block histograms, per-latent counts) use
torch.cumsum on the device: a device-wide scan is exactly what it is written for, and
these tables hold O(M + N*k / 1024) entries. Everything that touches the N*k entries or
the N x d rows is a Triton kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, guarded, interpreting, rne_bf16, round_bf16_in_kernel
from ._common import rows_view, weight_strides

RADIX_BITS = 8
PIECE = 256  # entries of one latent summed by one program of sparse_transpose_matmul

GPU_CONFIG = dict(
    sampled_dot=dict(BLOCK_J=32, BLOCK_D=128, num_warps=4),
    count=dict(BLOCK=1024, num_warps=4),
    radix=dict(BLOCK=1024, num_warps=4),
    fill_items=dict(BLOCK=128, num_warps=4),
    # a [BLOCK_P, BLOCK_D] float32 tile: BLOCK_P = 32 spilled 8 bytes on sm_80 (bf16, 72 registers)
    stm=dict(BLOCK_P=16, BLOCK_D=128, num_warps=4),
    stm_reduce=dict(BLOCK_D=128, num_warps=4),
)
# Under the interpreter: small blocks so that small test shapes cross block edges.
INTERPRET_CONFIG = dict(
    sampled_dot=dict(BLOCK_J=4, BLOCK_D=16, num_warps=4),
    count=dict(BLOCK=64, num_warps=4),
    radix=dict(BLOCK=64, num_warps=4),
    fill_items=dict(BLOCK=16, num_warps=4),
    stm=dict(BLOCK_P=8, BLOCK_D=16, num_warps=4),
    stm_reduce=dict(BLOCK_D=16, num_warps=4),
)


def config(name: str, device: torch.device) -> dict:
    table = GPU_CONFIG if device.type == "cuda" and not interpreting() else INTERPRET_CONFIG
    return table[name]


# ---- sampled_dot -------------------------------------------------------------------


@triton.jit
def _sampled_dot_kernel(g_ptr, idx_ptr, w_ptr, out_ptr, K, M, D, stride_g, stride_w, stride_wd,
                        BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < K
    idx = tl.load(idx_ptr + n * K + js, mask=j_ok, other=0)
    ok = j_ok & (idx >= 0) & (idx < M)
    acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        g = tl.load(g_ptr + n * stride_g + ds, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_w + ds.to(tl.int64)[None, :] * stride_wd,
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * g[None, :]
    dots = tl.sum(acc, axis=1)
    if ROUND_BF16:
        dots = rne_bf16(dots)
    tl.store(out_ptr + n * K + js, dots.to(out_ptr.dtype.element_ty), mask=j_ok)


@guarded
def sampled_dot(grad, indices, W):
    for t, name in ((grad, "grad"), (W, "W")):
        check_dtype(t, name)
        check_device(t, name)
    M, d = W.shape
    N, k = indices.shape
    stride_w, stride_wd = weight_strides(W)  # read in place, never copied
    out = torch.empty(N, k, dtype=grad.dtype, device=grad.device)
    if N == 0 or k == 0:
        return out
    cfg = config("sampled_dot", grad.device)
    grad, stride_g = rows_view(grad)
    indices = indices.contiguous()  # O(N * k)
    _sampled_dot_kernel[(N, triton.cdiv(k, cfg["BLOCK_J"]))](
        grad, indices, W, out, k, M, d, stride_g, stride_w, stride_wd, ROUND_BF16=round_bf16_in_kernel(grad.dtype),
        **cfg)
    return out


# ---- latent_transpose --------------------------------------------------------------


@triton.jit
def _count_latents_kernel(idx_ptr, key_ptr, counts_ptr, P, M, BLOCK: tl.constexpr):
    """counts[m] += 1 per entry of latent m; key[p] = the entry's latent as int32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    # Out-of-range entries (unchecked on CUDA) are clamped so that offsets and order stay consistent.
    latent = tl.minimum(tl.maximum(tl.load(idx_ptr + offs, mask=ok, other=0), 0), M - 1).to(tl.int32)
    tl.store(key_ptr + offs, latent, mask=ok)
    tl.atomic_add(counts_ptr + latent, 1, mask=ok)


@triton.jit
def _radix_histogram_kernel(key_ptr, hist_ptr, start_ptr, P, num_blocks, shift, BLOCK: tl.constexpr):
    """Per block: the count of each digit, and where its run starts once the block is sorted by digit."""
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    digit = tl.where(ok, (tl.load(key_ptr + offs, mask=ok, other=0) >> shift) & 255, 256)
    hist = tl.histogram(digit, 512)  # bins 256.. count padding only
    start = tl.cumsum(hist, 0) - hist
    bins = tl.arange(0, 512)
    # digit-major [256, num_blocks]: a flat prefix sum gives each (digit, block) its global base
    tl.store(hist_ptr + bins * num_blocks + block, hist, mask=bins < 256)
    tl.store(start_ptr + bins * num_blocks + block, start, mask=bins < 256)


@triton.jit
def _radix_scatter_kernel(key_in, val_in, key_out, val_out, adjust_ptr, P, num_blocks, shift,
                          BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, FIRST: tl.constexpr, STORE_KEYS: tl.constexpr):
    """Stable scatter of one block by digit: rank within the block from a sort of (digit, position)."""
    block = tl.program_id(0)
    base = block.to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK)
    ok = base + local < P
    digit = tl.where(ok, (tl.load(key_in + base + local, mask=ok, other=0) >> shift) & 255, 256)
    ranked = tl.sort((digit << LOG_BLOCK) | local)  # by digit, then by position: stable
    sorted_digit = ranked >> LOG_BLOCK
    src = base + (ranked & (BLOCK - 1))
    valid = sorted_digit < 256
    # destination = global base of (digit, block) + rank within the block's run of that digit
    dest = tl.load(adjust_ptr + sorted_digit * num_blocks + block, mask=valid, other=0).to(tl.int64) + local
    if FIRST:
        val = src  # entries start in their own order: the value is the position
    else:
        val = tl.load(val_in + src, mask=valid, other=0)
    tl.store(val_out + dest, val, mask=valid)
    if STORE_KEYS:
        tl.store(key_out + dest, tl.load(key_in + src, mask=valid, other=0), mask=valid)


@guarded
def latent_transpose(indices, num_latents):
    check_device(indices, "indices")
    device = indices.device
    flat = indices.contiguous().reshape(-1)  # O(N * k)
    P, M = flat.numel(), int(num_latents)
    if P >= 2**31 or M >= 2**31:
        raise ValueError(f"the triton latent_transpose supports fewer than 2^31 entries and latents, "
                         f"got N * k = {P} and num_latents = {M}")
    offsets = torch.zeros(M + 1, dtype=torch.int64, device=device)
    order = torch.empty(P, dtype=torch.int64, device=device)
    if P == 0:
        return offsets, order
    cfg = config("count", device)
    keys = torch.empty(P, dtype=torch.int32, device=device)
    counts = torch.zeros(M, dtype=torch.int32, device=device)
    _count_latents_kernel[(triton.cdiv(P, cfg["BLOCK"]),)](flat, keys, counts, P, M, **cfg)
    torch.cumsum(counts, 0, out=offsets[1:])

    cfg = config("radix", device)
    block = cfg["BLOCK"]
    blocks = triton.cdiv(P, block)
    passes = triton.cdiv(max(1, (M - 1).bit_length()), RADIX_BITS)
    hist = torch.empty(256, blocks, dtype=torch.int32, device=device)
    start = torch.empty(256, blocks, dtype=torch.int32, device=device)
    keys_out = torch.empty_like(keys) if passes > 1 else keys
    spare = torch.empty(P, dtype=torch.int64, device=device) if passes > 1 else order
    vals = order  # unread by the first pass
    for i in range(passes):
        last = i == passes - 1
        shift = RADIX_BITS * i
        _radix_histogram_kernel[(blocks,)](keys, hist, start, P, blocks, shift, **cfg)
        flat_hist = hist.view(-1)
        adjust = (torch.cumsum(flat_hist, 0) - flat_hist - start.view(-1)).to(torch.int32)
        # ping-pong between order and a spare buffer, so that the last pass writes order
        vals_out = order if (passes - 1 - i) % 2 == 0 else spare
        _radix_scatter_kernel[(blocks,)](
            keys, vals, keys_out, vals_out, adjust, P, blocks, shift,
            LOG_BLOCK=block.bit_length() - 1, FIRST=i == 0, STORE_KEYS=not last, **cfg)
        keys, keys_out = keys_out, keys
        vals = vals_out
    return offsets, order


# ---- sparse_transpose_matmul ---------------------------------------------------------


@triton.jit
def _fill_items_kernel(item_start_ptr, item_latent_ptr, M, BLOCK: tl.constexpr):
    """item_latent[i] = m for each of latent m's pieces i."""
    ms = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = ms < M
    first = tl.load(item_start_ptr + ms, mask=ok, other=0)
    count = tl.load(item_start_ptr + ms + 1, mask=ok, other=0) - first
    for t in range(0, tl.max(count, axis=0)):
        tl.store(item_latent_ptr + first + t, ms, mask=ok & (t < count))


@triton.jit
def _stm_piece_kernel(w_ptr, rows_ptr, offsets_ptr, order_ptr, item_start_ptr, item_latent_ptr, part_start_ptr,
                      out_ptr, colsum_ptr, part_ptr, part_colsum_ptr, K, D, P, stride_r,
                      PIECE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                      ROUND_BF16: tl.constexpr):
    """One piece (<= PIECE entries) of one latent's segment: sum_p weights[p] * rows[p // K]."""
    item = tl.program_id(0)
    m = tl.load(item_latent_ptr + item)
    if m >= 0:  # items past the last piece have no latent
        m64 = m.to(tl.int64)
        first_item = tl.load(item_start_ptr + m64)
        pieces = tl.load(item_start_ptr + m64 + 1) - first_item
        piece = item - first_item
        lo = tl.load(offsets_ptr + m64) + piece * PIECE
        hi = tl.minimum(lo + PIECE, tl.load(offsets_ptr + m64 + 1))
        single = pieces == 1
        part = tl.load(part_start_ptr + m64) + piece

        col = tl.zeros([BLOCK_P], tl.float32)
        for q0 in range(lo, hi, BLOCK_P):
            qs = q0 + tl.arange(0, BLOCK_P)
            p = tl.load(order_ptr + qs, mask=qs < hi, other=-1)
            ok = (qs < hi) & (p >= 0) & (p < P)
            col += tl.load(w_ptr + p, mask=ok, other=0.0).to(tl.float32)
        colsum = tl.sum(col, axis=0)
        if single:
            if ROUND_BF16:
                colsum = rne_bf16(colsum)
            tl.store(colsum_ptr + m64, colsum.to(colsum_ptr.dtype.element_ty))
        else:
            tl.store(part_colsum_ptr + part, colsum)

        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            tile = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)  # reduced over its entries once, after the loop
            for q0 in range(lo, hi, BLOCK_P):
                qs = q0 + tl.arange(0, BLOCK_P)
                p = tl.load(order_ptr + qs, mask=qs < hi, other=-1)
                ok = (qs < hi) & (p >= 0) & (p < P)
                w = tl.load(w_ptr + p, mask=ok, other=0.0).to(tl.float32)
                r = tl.load(rows_ptr + (p // K)[:, None] * stride_r + ds[None, :], mask=ok[:, None] & d_ok[None, :],
                            other=0.0)
                tile += w[:, None] * r.to(tl.float32)
            acc = tl.sum(tile, axis=0)
            if single:
                if ROUND_BF16:
                    acc = rne_bf16(acc)
                tl.store(out_ptr + m64 * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
            else:
                tl.store(part_ptr + part * D + ds, acc, mask=d_ok)


@triton.jit
def _stm_reduce_kernel(item_start_ptr, part_start_ptr, part_ptr, part_colsum_ptr, out_ptr, colsum_ptr, D,
                       BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Latents cut into several pieces: add the pieces' partial sums, in piece order."""
    m = tl.program_id(0).to(tl.int64)
    pieces = tl.load(item_start_ptr + m + 1) - tl.load(item_start_ptr + m)
    if pieces > 1:
        first = tl.load(part_start_ptr + m)
        colsum = tl.zeros([1], tl.float32)
        for t in range(0, pieces):
            colsum += tl.load(part_colsum_ptr + first + t + tl.arange(0, 1))
        if ROUND_BF16:
            colsum = rne_bf16(colsum)
        tl.store(colsum_ptr + m + tl.arange(0, 1), colsum.to(colsum_ptr.dtype.element_ty))
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            acc = tl.zeros([BLOCK_D], tl.float32)
            for t in range(0, pieces):
                acc += tl.load(part_ptr + (first + t) * D + ds, mask=d_ok, other=0.0)
            if ROUND_BF16:
                acc = rne_bf16(acc)
            tl.store(out_ptr + m * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check_transpose(offsets, order, P, M):
    """The CPU backend's checks of (offsets, order), on CPU tensors (a device sync on CUDA)."""
    if offsets.device.type != "cpu":
        return
    if int(offsets[0]) != 0 or int(offsets[M]) != P:
        raise ValueError(f"offsets must run from 0 to N * k = {P} (from latent_transpose), "
                         f"got {int(offsets[0])} .. {int(offsets[M])}")


@guarded
def sparse_transpose_matmul(weights, rows, offsets, order):
    for t, name in ((weights, "weights"), (rows, "rows")):
        check_dtype(t, name)
        check_device(t, name)
    N, k = weights.shape
    d = rows.shape[1]
    M = offsets.shape[0] - 1
    P = N * k
    device = weights.device
    _check_transpose(offsets, order, P, M)
    # weights, order: O(N * k); offsets: O(M); rows: read through its row stride.
    weights, (rows, stride_r) = weights.contiguous(), rows_view(rows)
    offsets, order = offsets.contiguous(), order.contiguous()
    out = torch.empty(M, d, dtype=rows.dtype, device=device)
    colsum = torch.empty(M, dtype=weights.dtype, device=device)

    # Work items: each latent's segment in pieces of at most PIECE entries (an empty segment is one piece).
    pieces = torch.clamp((torch.diff(offsets) + PIECE - 1) // PIECE, min=1)
    item_start = torch.zeros(M + 1, dtype=torch.int64, device=device)
    torch.cumsum(pieces, 0, out=item_start[1:])
    part_start = torch.cumsum(torch.where(pieces > 1, pieces, 0), 0) - torch.where(pieces > 1, pieces, 0)
    # Upper bounds known without a device sync: sum of max(1, ceil(L / PIECE)) <= M + P / PIECE, and
    # latents with several pieces have L > PIECE, so at most P / PIECE of them and 2 P / PIECE pieces.
    max_items = M + triton.cdiv(P, PIECE)
    max_parts = max(1, 2 * triton.cdiv(P, PIECE))
    item_latent = torch.full((max_items,), -1, dtype=torch.int32, device=device)
    part = torch.empty(max_parts, d, dtype=torch.float32, device=device)
    part_colsum = torch.empty(max_parts, dtype=torch.float32, device=device)

    round_bf16 = round_bf16_in_kernel(rows.dtype)
    cfg = config("fill_items", device)
    _fill_items_kernel[(triton.cdiv(M, cfg["BLOCK"]),)](item_start, item_latent, M, **cfg)
    _stm_piece_kernel[(max_items,)](
        weights, rows, offsets, order, item_start, item_latent, part_start, out, colsum, part, part_colsum,
        k, d, P, stride_r, PIECE=PIECE, ROUND_BF16=round_bf16, **config("stm", device))
    _stm_reduce_kernel[(M,)](item_start, part_start, part, part_colsum, out, colsum, d,
                             ROUND_BF16=round_bf16, **config("stm_reduce", device))
    return out, colsum
