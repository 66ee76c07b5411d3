"""Fused TopK encode in Triton: pre-activation tiles from tl.dot, top-k selected on the fly.

Grid: (row block, latent split). A program computes [BLOCK_N, BLOCK_M] tiles of
``x @ W_enc[split].T + bias`` with float32 accumulation over its split's latents, in
increasing latent order. Every score becomes one packed int64 key:

    key = (monotone int32 of the float32 score) << 32 | (2^31 - 1 - latent)

so one integer comparison orders by score, then by lower latent index; NaN gets the
largest score key (it ranks first, as torch.sort does) and -0.0 the key of +0.0.
Every key is distinct, so the selection is exact, ties included, whatever the split
layout.

Selection: each (row, split) has a threshold ``theta`` and a candidate buffer of
CAPACITY keys in global scratch (it stays in L1/L2). Per tile, a score costs one float
comparison against its row's floor, the score of theta's key (a superset of the keys
above theta: compaction drops the extra ties); the few keys that pass are appended to
the row's buffer at slots from a per-row atomic counter. No reduction runs over
candidates per tile. When a row's buffer could not take another whole tile, the program compacts
its rows: find each buffer's k-th best key (a bitwise compare-and-count search, no
sort), keep the keys at or above it in front, and raise theta to it.
Compaction also publishes theta to a per-row threshold shared by all splits of the
row (an atomic max: the k-th best key of any subset of the row's scores is a lower
bound on the row's own k-th best), and takes the larger of the two, so splits prune
each other's tiles. A last compaction leaves each split's k best in front of its
buffer; a merge kernel reduces the splits of each row to its top k, sorted.

After the first tiles of a split only about ``BLOCK_M * k / latents seen`` keys per
row pass a tile, so compactions are rare (a handful per split) and the selection
costs a few integer operations per score. Extra memory is O(N * splits * CAPACITY)
plus O(M) for the folded bias, never O(N * M): see ``encode_plan``. k above
MAX_K_PER_ROUND runs in rounds, each restricted to keys below the previous round's
last key (the GEMM is recomputed per round; rounds start at k > 1024).

b_dec is folded into the bias, ``pre = x @ W.T + (b_enc - W @ b_dec)``, so x enters
tl.dot in its own dtype: products of 16-bit inputs are exact in float32, whereas
centring first would round x - b_dec back to 16 bits before the tensor cores.

Weights are read through their strides (any layout, no copy: a copy of W_enc costs
O(M d) per call); x is made row-contiguous when its last stride is not 1 (O(N d)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (check_device, check_dtype, device_guard, fp32_dot_precision, multiprocessor_count,
                      next_power_of_2, rne_bf16, round_bf16_in_kernel, upcast_dot)

INT64_MIN = tl.constexpr(-9223372036854775808)
INT64_MAX = tl.constexpr(9223372036854775807)

MAX_K_PER_ROUND = 1024  # larger k runs in rounds; keeps a buffer at <= 2048 keys and the merge's sort small
COMPACT_KEYS = 4096  # keys one compaction step handles at once (rows x capacity): 16 per thread at 8 warps
MIN_TILES_PER_SPLIT = 4  # a split's first tiles fill its buffers: amortise that over a few more
MAX_SPLITS = 64


@dataclass(frozen=True)
class EncodeConfig:
    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


# Shipped GPU configs by input element size, chosen from the ahead-of-time report
# (python -m ssae_kernels.triton.aot_report): no spills on sm_80 and sm_90, wgmma on sm_90.
# The candidates live in global scratch, so k no longer sets the tile shape. float32 runs
# tf32x3 (three tensor-core products per tile), whose operands need more registers.
ENCODE_CONFIGS = {
    # (arch, element bytes): config
    (90, 2): EncodeConfig(64, 256, 32, 8, 3),  # 256 latents: the epilogue works on quarters of the tile
    (80, 2): EncodeConfig(32, 128, 32, 8, 3),  # mma.sync holds operands in registers: 64 rows spill
    (90, 4): EncodeConfig(32, 128, 16, 8, 3),
    (80, 4): EncodeConfig(32, 128, 16, 8, 3),
}
# Under the interpreter small tiles keep the tests fast and put tile edges inside small shapes.
INTERPRET_CONFIG = EncodeConfig(16, 32, 16, 4, 1)


def encode_config(dtype: torch.dtype, device: torch.device, arch: int | None = None) -> EncodeConfig:
    """The shipped config for this dtype on device's architecture (or on ``arch``: 80 or 90)."""
    if arch is None:
        if device.type != "cuda":
            return INTERPRET_CONFIG
        arch = 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80
    return ENCODE_CONFIGS[(arch, 4 if dtype == torch.float32 else 2)]


def buffer_capacity(k_round: int, block_m: int) -> int:
    """Keys a (row, split) buffer holds: the k kept plus room for at least half a tile more
    before compacting again (a power of two: Triton tensor shapes are)."""
    return next_power_of_2(k_round + block_m + block_m // 2)


def compact_rows(capacity: int, block_n: int) -> int:
    """Rows one compaction step takes: COMPACT_KEYS keys, but one row at a time for the largest
    buffers (two rows of 2048 keys spilled with the bound of later rounds on sm_90)."""
    return max(1, min(block_n, COMPACT_KEYS // capacity if capacity < 2048 else 1))


def merge_block_rows(kp: int) -> int:
    return max(1, min(16, 512 // kp))


@dataclass(frozen=True)
class EncodePlan:
    rows: int
    k_round: int  # keys selected per round (the last round may take fewer)
    kp: int  # the merge's width: next power of two >= k_round
    capacity: int  # candidate keys per (row, split)
    rounds: int
    splits: int
    latents_per_split: int
    config: EncodeConfig

    @property
    def scratch_shape(self) -> tuple[int, int, int]:
        """The candidate buffer, int64: the only allocation that grows with N (besides the outputs)."""
        return (self.rows, self.splits, self.capacity)


def encode_plan(N: int, M: int, k: int, dtype: torch.dtype, device: torch.device, *,
                config: EncodeConfig | None = None, splits: int | None = None,
                multiprocessors: int | None = None) -> EncodePlan:
    """How topk_encode launches: tiles, latent splits and rounds for this shape.

    Scratch is ``scratch_shape`` int64 = N * splits * CAPACITY with splits <= MAX_SPLITS and
    CAPACITY = next_power_of_2(min(k, MAX_K_PER_ROUND) + 1.5 * BLOCK_M): independent of M.
    """
    k_round = min(k, MAX_K_PER_ROUND)
    kp = max(2, next_power_of_2(k_round))  # >= 2: the merge's sort wants a real axis
    rounds = triton.cdiv(k, k_round)
    config = config or encode_config(dtype, device)
    tiles = triton.cdiv(M, config.block_m)
    if splits is None:
        # Split the latents when row blocks alone leave multiprocessors idle. The shipped configs
        # run one program per multiprocessor: minimise waves x tiles per split, and on a tie take
        # fewer splits (less scratch, fewer keys to merge).
        row_blocks = triton.cdiv(N, config.block_n)
        sms = multiprocessors or multiprocessor_count(device)
        most = min(MAX_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT), triton.cdiv(sms, row_blocks))
        splits = min(range(1, most + 1),
                     key=lambda s: (triton.cdiv(row_blocks * s, sms) * triton.cdiv(tiles, s), s))
    splits = max(1, min(int(splits), tiles))
    latents_per_split = triton.cdiv(tiles, splits) * config.block_m
    return EncodePlan(N, k_round, kp, buffer_capacity(k_round, config.block_m), rounds,
                      triton.cdiv(M, latents_per_split), latents_per_split, config)


@triton.jit
def _score_keys(score):
    """Monotone int32 keys of float32 scores: -0.0 ties with +0.0, every NaN above +inf."""
    s = tl.where(score == 0.0, 0.0, score)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(s != s, 0x7FFFFFFF, key)


@triton.jit
def _below(key, low, bound):
    """(key, low) < bound per row, for int32 score keys, int32 inverted latents and int64 bounds."""
    hi = (bound >> 32).to(tl.int32)[:, None]
    lo = (bound & 0x7FFFFFFF).to(tl.int32)[:, None]
    return (key < hi) | ((key == hi) & (low[None, :] < lo))


@triton.jit
def _score_floor(theta):
    """Per row, the float32 score of theta's score key (-inf while theta is INT64_MIN): every key above
    theta has a score >= it, or NaN."""
    hi = (theta >> 32).to(tl.int32)
    score = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
    return tl.where(theta == INT64_MIN, float("-inf"), score)


@triton.jit
def _append(acc, cols, bias_ptr, thr_ptr, count_ptr, buf_rows, state, row_ok, floor, count, above, M, m_end,
            bound, HAS_BOUND: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr,
            WIDTH: tl.constexpr):
    """Append the keys of one [BLOCK_N, WIDTH] score tile whose score is not below their row's floor (and,
    with HAS_THRESHOLD, is above their latent's threshold); returns the new count and the running count of
    scores above the thresholds.

    The floor admits a superset of the keys above theta (equal scores of later latents, and NaN): compaction
    drops the extra ones, so the selection stays exact while a score costs one float comparison; the packed
    key is built only for the store."""
    bias = tl.load(bias_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)
    score = acc + bias[None, :]
    take = ~(score < floor[:, None]) & row_ok[:, None] & (cols < m_end)[None, :]  # >= floor, or NaN
    if HAS_THRESHOLD:  # NaN is never above
        thr = tl.load(thr_ptr + cols, mask=cols < M, other=0.0)
        passed = row_ok[:, None] & (cols < m_end)[None, :] & (score > thr[None, :])
        above += tl.sum(passed.to(tl.int32), axis=1)
        take = take & passed
    key = _score_keys(score)
    low = 0x7FFFFFFF - cols  # lower latent, larger low: wins ties
    if HAS_BOUND:
        take = take & _below(key, low, bound)
    # a slot per taken key, in any order (compaction selects by value): an atomic per key, issued only by
    # the lanes that take one, so a tile where nothing passes costs no memory traffic
    slot = tl.atomic_add(tl.broadcast_to(count_ptr + state[:, None], [BLOCK_N, WIDTH]), 1, mask=take,
                         sem="relaxed", scope="cta")
    tl.store(buf_rows[:, None] + slot, (key.to(tl.int64) << 32) | low.to(tl.int64)[None, :], mask=take)
    return count + tl.sum(take.to(tl.int32), axis=1), above


@triton.jit
def _largest_with_count(values, k, base, BITS: tl.constexpr):
    """Per row, the largest t >= base with at least k of ``values`` [rows, width] >= t, built from
    the top bit down (BITS bits above base): one compare-and-count pass per bit."""
    t = base
    for bit in range(BITS - 1, -1, -1):
        cand = t | (1 << bit)
        t = tl.where(tl.sum((values >= cand[:, None]).to(tl.int32), axis=1) >= k, cand, t)
    return t


@triton.jit
def _kth_largest(keys, k, n):
    """Per row of distinct int64 keys [rows, width] holding n >= k real keys, the k-th largest.

    No sort: a compare-and-count search over the 32 score bits finds the k-th largest score
    key; only rows whose k-th key shares its score with keys left out (exact ties) search
    the 31 latent bits too. Cheaper than sorting the buffer, and with no sort's registers."""
    hi = (keys >> 32).to(tl.int32)
    zero = tl.zeros_like(n)
    h = tl.where(tl.sum((hi >= 0).to(tl.int32), axis=1) >= k, zero, zero - 2147483647 - 1)  # the sign first
    h = _largest_with_count(hi, k, h, 31)
    tie = hi == h[:, None]
    need = k - tl.sum((hi > h[:, None]).to(tl.int32), axis=1)  # >= 1 of the keys with score key h
    low = (keys & 0x7FFFFFFF).to(tl.int32)
    split = (n >= k) & (tl.sum(tie.to(tl.int32), axis=1) > need)
    if tl.max(split.to(tl.int32), axis=0) > 0:  # ties straddle the k-th key: rank them by latent
        l = _largest_with_count(tl.where(tie, low, -1), need, zero, 31)
    else:
        l = tl.min(tl.where(tie, low, 0x7FFFFFFF), axis=1)
    return (h.to(tl.int64) << 32) | l.to(tl.int64)


@triton.jit
def _compact(buf_ptr, count_ptr, theta_ptr, shared_ptr, count, row0, split, num_splits, N, k,
             CAPACITY: tl.constexpr, COMPACT_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep each buffer's k best keys (in front, unordered) for rows [row0, row0 + BLOCK_N) and
    raise theta to the k-th best (and to the row's shared threshold). Returns (theta, count)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    state = rows.to(tl.int64) * num_splits + split
    tl.store(count_ptr + state, count, mask=rows < N)
    tl.debug_barrier()  # buffers and counts were written by other threads of this program
    slots = tl.arange(0, CAPACITY)
    for r in range(0, BLOCK_N, COMPACT_ROWS):
        sub = row0 + r + tl.arange(0, COMPACT_ROWS)
        ok = sub < N
        sub_state = sub.to(tl.int64) * num_splits + split
        n = tl.load(count_ptr + sub_state, mask=ok, other=0, cache_modifier=".cg")
        ptrs = buf_ptr + sub_state[:, None] * CAPACITY + slots[None, :]
        held = ok[:, None] & (slots[None, :] < n[:, None])
        keys = tl.load(ptrs, mask=held, other=INT64_MIN, cache_modifier=".cg")
        # the k-th best key; INT64_MIN (no pruning yet) while fewer than k are held
        own = tl.where(n >= k, _kth_largest(keys, k, n), INT64_MIN)
        keep = held & (keys >= own[:, None])
        slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1
        tl.debug_barrier()  # every thread has read its keys before any is moved
        tl.store(buf_ptr + sub_state[:, None] * CAPACITY + slot, keys, mask=keep)
        others = tl.atomic_max(shared_ptr + sub, own, mask=ok, sem="relaxed")
        tl.store(theta_ptr + sub_state, tl.maximum(own, others), mask=ok)
        tl.store(count_ptr + sub_state, tl.minimum(n, k), mask=ok)
    tl.debug_barrier()
    theta = tl.load(theta_ptr + state, mask=rows < N, other=INT64_MIN, cache_modifier=".cg")
    count = tl.load(count_ptr + state, mask=rows < N, other=0, cache_modifier=".cg")
    return theta, count


@triton.jit
def _encode_kernel(x_ptr, w_ptr, bias_ptr, thr_ptr, above_ptr, bound_ptr, buf_ptr, count_ptr, theta_ptr, shared_ptr,
                   N, M, D, stride_x, stride_wm, stride_wd, latents_per_split, num_splits, k,
                   CAPACITY: tl.constexpr, COMPACT_ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_BOUND: tl.constexpr, HAS_THRESHOLD: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    state = rows.to(tl.int64) * num_splits + pid_s  # this (row, split)
    buf_rows = buf_ptr + state * CAPACITY
    m_begin = pid_s * latents_per_split
    m_end = tl.minimum(m_begin + latents_per_split, M)
    bound = theta_ptr  # unused without HAS_BOUND
    if HAS_BOUND:  # a later round: only keys below the previous round's last one
        bound = tl.load(bound_ptr + rows, mask=row_ok, other=INT64_MIN)

    floor = tl.full([BLOCK_N], float("-inf"), tl.float32)  # _score_floor(theta): no key kept yet
    count = tl.zeros([BLOCK_N], tl.int32)  # keys in the row's buffer (count_ptr starts at 0 too)
    above = tl.zeros([BLOCK_N], tl.int32)  # HAS_THRESHOLD: scores above their thresholds
    for m0 in range(m_begin, m_end, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wm
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
            b = tl.load(w_rows + ks.to(tl.int64)[None, :] * stride_wd,
                        mask=(cols[:, None] < M) & (ks[None, :] < D), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        # The epilogue runs on quarters of the tile's columns in turn, quartering the registers its scattered
        # stores need. A thread of the MMA layout holds column pairs (2t, 2t + 1) repeated 8 columns apart, so
        # splitting column 16a + 8b + 2t + e first on e, then on b, moves no data.
        even, odd = tl.split(tl.reshape(acc, [BLOCK_N, BLOCK_M // 2, 2]))
        sixteens = tl.arange(0, BLOCK_M // 16)
        pairs = tl.arange(0, 4)
        quarter = tl.reshape(m0 + 16 * sixteens[:, None] + 2 * pairs[None, :], [BLOCK_M // 4])
        for part in tl.static_range(2):
            acc_e = even if part == 0 else odd
            lo, hi = tl.split(tl.permute(tl.reshape(acc_e, [BLOCK_N, BLOCK_M // 16, 2, 4]), [0, 1, 3, 2]))
            lo = tl.reshape(lo, [BLOCK_N, BLOCK_M // 4])
            hi = tl.reshape(hi, [BLOCK_N, BLOCK_M // 4])
            count, above = _append(lo, quarter + part, bias_ptr, thr_ptr, count_ptr, buf_rows, state, row_ok, floor,
                                   count, above, M, m_end, bound, HAS_BOUND, HAS_THRESHOLD, BLOCK_N, BLOCK_M // 4)
            count, above = _append(hi, quarter + 8 + part, bias_ptr, thr_ptr, count_ptr, buf_rows, state, row_ok,
                                   floor, count, above, M, m_end, bound, HAS_BOUND, HAS_THRESHOLD, BLOCK_N,
                                   BLOCK_M // 4)
        if tl.max(count, axis=0) > CAPACITY - BLOCK_M:  # some row might not take the next tile
            theta, count = _compact(buf_ptr, count_ptr, theta_ptr, shared_ptr, count, row0, pid_s, num_splits,
                                    N, k, CAPACITY, COMPACT_ROWS, BLOCK_N)
            floor = _score_floor(theta)
    if HAS_THRESHOLD and not HAS_BOUND:  # the true counts, once (rounds after the first see the same scores)
        tl.atomic_add(above_ptr + rows, above.to(tl.int64), mask=row_ok, sem="relaxed")
    # the split's k best in front of each buffer; counts for the merge
    _compact(buf_ptr, count_ptr, theta_ptr, shared_ptr, count, row0, pid_s, num_splits, N, k,
             CAPACITY, COMPACT_ROWS, BLOCK_N)


@triton.jit
def _split_keys(buf_ptr, count_ptr, rows, row_ok, slots, split, num_splits, CAPACITY: tl.constexpr):
    """The candidate keys one split kept for each row, INT64_MIN past its count: [rows, KP]."""
    state = rows.to(tl.int64) * num_splits + split
    n = tl.load(count_ptr + state, mask=row_ok, other=0)
    return tl.load(buf_ptr + state[:, None] * CAPACITY + slots[None, :],
                   mask=row_ok[:, None] & (slots[None, :] < n[:, None]), other=INT64_MIN)


@triton.jit
def _merge_kernel(buf_ptr, count_ptr, values_ptr, indices_ptr, bound_ptr, N, num_splits, k_round, col0, k_total,
                  KP: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_R: tl.constexpr, ROUND_BF16: tl.constexpr,
                  STORE_BOUND: tl.constexpr, RAW: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    slots = tl.arange(0, KP)
    best = tl.sort(_split_keys(buf_ptr, count_ptr, rows, row_ok, slots, 0, num_splits, CAPACITY), dim=1,
                   descending=True)
    for s in range(1, num_splits):
        nxt = tl.sort(_split_keys(buf_ptr, count_ptr, rows, row_ok, slots, s, num_splits, CAPACITY), dim=1)
        # best descending, nxt ascending: their elementwise max holds the KP best of both
        best = tl.sort(tl.maximum(best, nxt), dim=1, descending=True)

    hi = (best >> 32).to(tl.int32)
    score = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
    value = score if RAW else tl.where(score < 0.0, 0.0, score)  # ReLU that keeps NaN
    if ROUND_BF16:
        value = rne_bf16(value)
    index = 0x7FFFFFFF - (best & 0x7FFFFFFF)
    # a threshold encode may hold fewer than k keys (no real key is INT64_MIN): value 0, index 0
    present = best != INT64_MIN
    value = tl.where(present, value, 0.0)
    index = tl.where(present, index, 0)
    keep = row_ok[:, None] & (slots[None, :] < k_round)
    out = rows.to(tl.int64)[:, None] * k_total + col0 + slots[None, :]
    tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=keep)
    tl.store(indices_ptr + out, index, mask=keep)
    if STORE_BOUND:
        last = tl.min(tl.where(slots[None, :] < k_round, best, INT64_MAX), axis=1)
        tl.store(bound_ptr + rows, last, mask=row_ok)


@triton.jit
def _fold_bias_kernel(w_ptr, b_enc_ptr, b_dec_ptr, out_ptr, M, D, stride_wm, stride_wd,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[m] = b_enc[m] - W[m] . b_dec, in float32."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wm + ds.to(tl.int64)[None, :] * stride_wd,
                    mask=col_ok[:, None] & (ds[None, :] < D), other=0.0).to(tl.float32)
        b = tl.load(b_dec_ptr + ds, mask=ds < D, other=0.0).to(tl.float32)
        acc += tl.sum(w * b[None, :], axis=1)
    b_enc = tl.load(b_enc_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, b_enc - acc, mask=col_ok)


FOLD_BIAS_CONFIG = dict(BLOCK_M=32, BLOCK_D=128, num_warps=4)


def topk_encode(x, W_enc, b_enc, k, b_dec=None, *, config: EncodeConfig | None = None, splits: int | None = None):
    """Launcher with the schema's signature; ``config`` and ``splits`` override the plan (tests)."""
    values, indices, _ = fused_encode(x, W_enc, b_enc, k, b_dec, config=config, splits=splits)
    return values, indices


def fused_encode(x, W_enc, b_enc, k, b_dec=None, threshold=None, *, config: EncodeConfig | None = None,
                 splits: int | None = None):
    """(values, indices, counts) of the k best scores per row: ``topk_encode`` (ReLU'd values, counts None),
    or with ``threshold`` (a 0-d or [M] tensor) ``threshold_encode``: only scores above their latent's
    threshold, raw values, 0 / 0 in the slots past a row's count, and the true counts [N] int64."""
    for t, name in ((x, "x"), (W_enc, "W_enc"), (b_enc, "b_enc"), (b_dec, "b_dec"), (threshold, "threshold")):
        if t is not None:
            check_dtype(t, name)
            check_device(t, name)
    N, d = x.shape
    M = W_enc.shape[0]
    if M >= 2**31 - 1:
        raise ValueError(f"W_enc has {M} latents; the triton backend supports at most 2^31 - 2")
    device = x.device
    if x.stride(1) != 1:  # O(N d); the kernel reads x by rows
        x = x.contiguous()
    # O(M) vectors: contiguous copies are cheap next to the O(M d) weights, which are never copied
    b_enc = torch.zeros(M, dtype=x.dtype, device=device) if b_enc is None else b_enc.contiguous()
    has_threshold = threshold is not None
    if has_threshold:  # compared with the float32 scores, as the other backends do
        threshold = threshold.to(torch.float32).expand(M).contiguous()
    plan = encode_plan(N, M, k, x.dtype, device, config=config, splits=splits)
    cfg = plan.config
    with device_guard(x):
        if b_dec is not None:
            bias = torch.empty(M, dtype=torch.float32, device=device)
            _fold_bias_kernel[(triton.cdiv(M, FOLD_BIAS_CONFIG["BLOCK_M"]),)](
                W_enc, b_enc, b_dec.contiguous(), bias, M, d, W_enc.stride(0), W_enc.stride(1), **FOLD_BIAS_CONFIG)
        else:
            bias = b_enc

        values = torch.empty(N, k, dtype=x.dtype, device=device)
        indices = torch.empty(N, k, dtype=torch.int64, device=device)
        counts = torch.zeros(N, dtype=torch.int64, device=device) if has_threshold else None
        buf = torch.empty(plan.scratch_shape, dtype=torch.int64, device=device)
        count = torch.empty(N * plan.splits, dtype=torch.int32, device=device)  # zeroed per round
        theta = torch.empty(N * plan.splits, dtype=torch.int64, device=device)
        shared = torch.empty(N, dtype=torch.int64, device=device)
        bound = torch.empty(N, dtype=torch.int64, device=device) if plan.rounds > 1 else shared
        precision = fp32_dot_precision() if x.dtype == torch.float32 else None
        block_r = merge_block_rows(plan.kp)
        for r in range(plan.rounds):
            col0 = r * plan.k_round
            k_round = min(plan.k_round, k - col0)
            shared.fill_(torch.iinfo(torch.int64).min)
            count.zero_()
            _encode_kernel[(triton.cdiv(N, cfg.block_n), plan.splits)](
                x, W_enc, bias, threshold if has_threshold else bias, counts if has_threshold else shared, bound,
                buf, count, theta, shared, N, M, d, x.stride(0),
                W_enc.stride(0), W_enc.stride(1), plan.latents_per_split, plan.splits, k_round,
                CAPACITY=plan.capacity, COMPACT_ROWS=compact_rows(plan.capacity, cfg.block_n),
                BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                HAS_BOUND=r > 0, HAS_THRESHOLD=has_threshold, UPCAST=upcast_dot(x.dtype), PRECISION=precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _merge_kernel[(triton.cdiv(N, block_r),)](
                buf, count, values, indices, bound, N, plan.splits, k_round, col0, k,
                KP=plan.kp, CAPACITY=plan.capacity, BLOCK_R=block_r, ROUND_BF16=round_bf16_in_kernel(x.dtype),
                STORE_BOUND=r + 1 < plan.rounds, RAW=has_threshold, num_warps=4)
    return values, indices, counts
