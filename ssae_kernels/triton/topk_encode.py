"""Fused TopK encode in Triton: pre-activation tiles from tl.dot, top-k selected on the fly.

Grid: (row block, latent split). A program computes [BLOCK_N, BLOCK_M] tiles of
``x @ W_enc[split].T + bias`` with float32 accumulation and keeps, per row, the KP
best (score, latent) pairs of its split as packed int64 keys:

    key = (monotone int32 of the float32 score) << 32 | (2^31 - 1 - latent)

so one integer comparison orders by score, then by lower latent index; NaN gets the
largest score key (it ranks first, as torch.sort does) and -0.0 the key of +0.0.
Every key is distinct, so the selection is exact, ties included: the GPU path gives
lower-index ties like the CPU path, whatever the split layout.

Selection inside a tile: while some row has a tile entry above its current KP-th
best, insert each such row's best entry over its worst candidate. After the first
tiles a row takes only ~BLOCK_M * k / (latents seen) new entries per tile, so the
loop runs a few times per tile instead of sorting BLOCK_M + KP keys.

Candidates go to a scratch buffer [N, splits, KP] (int64); a merge kernel reduces
the splits of each row to its top k, sorted. Extra memory is O(N * splits * KP)
plus O(M) for the folded bias, never O(N * M): see ``encode_plan``. For k above
MAX_KP the two kernels run in rounds of MAX_KP, each round restricted to keys below
the previous round's last key (the GEMM is recomputed per round).

b_dec is folded into the bias, ``pre = x @ W.T + (b_enc - W @ b_dec)``, so x enters
tl.dot in its own dtype: products of 16-bit inputs are exact in float32, whereas
centring first would round x - b_dec back to 16 bits before the tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (check_device, check_dtype, fp32_dot_precision, multiprocessor_count, next_power_of_2,
                      rne_bf16, round_bf16_in_kernel, upcast_dot)

SENTINEL32 = tl.constexpr(-2147483648)  # below the key of -inf: marks taken or masked tile entries
INT64_MIN = tl.constexpr(-9223372036854775808)
INT64_MAX = tl.constexpr(9223372036854775807)

MAX_KP = 256  # candidates per (row, split) kept in registers; larger k runs in rounds
MIN_TILES_PER_SPLIT = 4  # a split's first tiles fill its KP candidates: amortise that over a few more
MAX_SPLITS = 64


@dataclass(frozen=True)
class EncodeConfig:
    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


# Shipped GPU configs by candidate count KP and input element size, chosen from the
# ahead-of-time report (python -m ssae_kernels.triton.aot_report): no spills on sm_80 and
# sm_90 and wgmma on sm_90 where BLOCK_N >= 64 (one warpgroup's M). float32 (tf32x3: three
# tensor-core products per tile) needs BLOCK_K = 16 to stay unspilled on sm_80 (BLOCK_K = 32
# spilled 56-228 bytes there); k > 64 in float32 and k > 128 take BLOCK_N = 32 (mma, no wgmma),
# the only shapes without spills or 255-register kernels for 128-256 candidates per row.
ENCODE_CONFIGS = {
    # (max KP, element bytes): config
    (32, 2): EncodeConfig(64, 128, 64, 8, 3),
    (32, 4): EncodeConfig(64, 128, 16, 8, 3),
    (64, 2): EncodeConfig(64, 128, 64, 8, 3),
    (64, 4): EncodeConfig(64, 128, 16, 8, 3),
    (128, 2): EncodeConfig(64, 64, 64, 8, 3),
    (128, 4): EncodeConfig(32, 64, 32, 8, 3),
    (256, 2): EncodeConfig(32, 64, 64, 8, 3),
    (256, 4): EncodeConfig(32, 64, 32, 8, 3),
}
# Under the interpreter small tiles keep the tests fast and put tile edges inside small shapes.
INTERPRET_CONFIG = EncodeConfig(16, 32, 16, 4, 1)


def encode_config(kp: int, dtype: torch.dtype, device: torch.device) -> EncodeConfig:
    if device.type != "cuda":
        return INTERPRET_CONFIG
    size = 4 if dtype == torch.float32 else 2
    return min((bound, cfg) for (bound, s), cfg in ENCODE_CONFIGS.items() if s == size and bound >= kp)[1]


def merge_block_rows(kp: int) -> int:
    return max(1, min(16, 512 // kp))


@dataclass(frozen=True)
class EncodePlan:
    rows: int
    kp: int  # candidates kept per (row, split) in one round
    rounds: int
    splits: int
    latents_per_split: int
    config: EncodeConfig

    @property
    def scratch_shape(self) -> tuple[int, int, int]:
        """The candidate buffer, int64: the only allocation that grows with N (besides the outputs)."""
        return (self.rows, self.splits, self.kp)


def encode_plan(N: int, M: int, k: int, dtype: torch.dtype, device: torch.device, *,
                config: EncodeConfig | None = None, splits: int | None = None,
                multiprocessors: int | None = None) -> EncodePlan:
    """How topk_encode launches: tiles, latent splits and rounds for this shape.

    Scratch is ``scratch_shape`` int64 = N * splits * KP with splits <= MAX_SPLITS and
    KP <= max(2, next_power_of_2(min(k, MAX_KP))): independent of M.
    """
    kp = max(2, next_power_of_2(min(k, MAX_KP)))  # >= 2: the merge's sort wants a real axis
    rounds = triton.cdiv(k, kp)
    config = config or encode_config(kp, dtype, device)
    tiles = triton.cdiv(M, config.block_m)
    if splits is None:
        # Split the latents when row blocks alone leave multiprocessors idle. The shipped configs
        # use 150-250 registers x 256 threads, so one program runs per multiprocessor: minimise
        # waves x tiles per split, and on a tie take fewer splits (a longer split takes fewer
        # insertions per tile, and less scratch).
        row_blocks = triton.cdiv(N, config.block_n)
        sms = multiprocessors or multiprocessor_count(device)
        most = min(MAX_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT), triton.cdiv(sms, row_blocks))
        splits = min(range(1, most + 1),
                     key=lambda s: (triton.cdiv(row_blocks * s, sms) * triton.cdiv(tiles, s), s))
    splits = max(1, min(int(splits), tiles))
    latents_per_split = triton.cdiv(tiles, splits) * config.block_m
    return EncodePlan(N, kp, rounds, triton.cdiv(M, latents_per_split), latents_per_split, config)


@triton.jit
def _score_keys(score, cols, col_end):
    """Monotone int32 keys of float32 scores; columns at or past col_end get SENTINEL32."""
    s = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in a float comparison
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(s != s, 0x7FFFFFFF, key)  # every NaN: above +inf
    return tl.where(cols[None, :] < col_end, key, SENTINEL32)


@triton.jit
def _row_best(key, cols):
    """Per row: the best tile key, its lowest column, and the packed int64 key of that entry."""
    best = tl.max(key, axis=1)
    first = tl.min(tl.where(key == best[:, None], cols[None, :], 0x7FFFFFFF), axis=1)
    packed = (best.to(tl.int64) << 32) | (0x7FFFFFFF - first).to(tl.int64)
    return best, first, packed


@triton.jit
def _encode_kernel(x_ptr, w_ptr, bias_ptr, bound_ptr, cand_ptr,
                   N, M, D, latents_per_split, num_splits,
                   KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_BOUND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    m_begin = pid_s * latents_per_split
    m_end = tl.minimum(m_begin + latents_per_split, M)

    slots = tl.arange(0, KP)
    # distinct sentinels below every real key, so "the slot holding theta" is unique
    cands = tl.zeros([BLOCK_N, KP], tl.int64) + INT64_MIN + slots[None, :]
    theta = tl.min(cands, axis=1)  # per row: the worst candidate held
    if HAS_BOUND:  # a later round: only keys below the previous round's last one
        bound = tl.load(bound_ptr + rows, mask=row_ok, other=0)
        bound_hi = (bound >> 32).to(tl.int32)
        bound_lo = (bound & 0x7FFFFFFF).to(tl.int32)

    for m0 in range(m_begin, m_end, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * D
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
            b = tl.load(w_rows + ks[None, :], mask=(cols[:, None] < M) & (ks[None, :] < D), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        bias = tl.load(bias_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)
        key = _score_keys(acc + bias[None, :], cols, m_end)
        if HAS_BOUND:
            low = 0x7FFFFFFF - cols[None, :]
            below = (key < bound_hi[:, None]) | ((key == bound_hi[:, None]) & (low < bound_lo[:, None]))
            key = tl.where(below, key, SENTINEL32)

        best, first, packed = _row_best(key, cols)
        insert = (best > SENTINEL32) & (packed > theta)
        while tl.max(insert.to(tl.int32), axis=0) > 0:
            cands = tl.where(insert[:, None] & (cands == theta[:, None]), packed[:, None], cands)
            theta = tl.min(cands, axis=1)
            key = tl.where(insert[:, None] & (cols[None, :] == first[:, None]), SENTINEL32, key)
            best, first, packed = _row_best(key, cols)
            insert = (best > SENTINEL32) & (packed > theta)

    out = cand_ptr + (rows.to(tl.int64)[:, None] * num_splits + pid_s) * KP + slots[None, :]
    tl.store(out, cands, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(cand_ptr, values_ptr, indices_ptr, bound_ptr, N, num_splits, k_round, col0, k_total,
                  KP: tl.constexpr, BLOCK_R: tl.constexpr, ROUND_BF16: tl.constexpr, STORE_BOUND: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    slots = tl.arange(0, KP)
    base = cand_ptr + rows.to(tl.int64)[:, None] * num_splits * KP + slots[None, :]
    best = tl.sort(tl.load(base, mask=row_ok[:, None], other=INT64_MIN), dim=1, descending=True)
    for s in range(1, num_splits):
        # best descending, next ascending: their elementwise max holds the KP best of both
        nxt = tl.sort(tl.load(base + s * KP, mask=row_ok[:, None], other=INT64_MIN), dim=1)
        best = tl.sort(tl.maximum(best, nxt), dim=1, descending=True)

    hi = (best >> 32).to(tl.int32)
    score = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
    value = tl.where(score < 0.0, 0.0, score)  # ReLU that keeps NaN
    if ROUND_BF16:
        value = rne_bf16(value)
    index = 0x7FFFFFFF - (best & 0x7FFFFFFF)
    keep = row_ok[:, None] & (slots[None, :] < k_round)
    out = rows.to(tl.int64)[:, None] * k_total + col0 + slots[None, :]
    tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=keep)
    tl.store(indices_ptr + out, index, mask=keep)
    if STORE_BOUND:
        last = tl.min(tl.where(slots[None, :] < k_round, best, INT64_MAX), axis=1)
        tl.store(bound_ptr + rows, last, mask=row_ok)


@triton.jit
def _fold_bias_kernel(w_ptr, b_enc_ptr, b_dec_ptr, out_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[m] = b_enc[m] - W[m] . b_dec, in float32."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * D + ds[None, :],
                    mask=col_ok[:, None] & (ds[None, :] < D), other=0.0).to(tl.float32)
        b = tl.load(b_dec_ptr + ds, mask=ds < D, other=0.0).to(tl.float32)
        acc += tl.sum(w * b[None, :], axis=1)
    b_enc = tl.load(b_enc_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, b_enc - acc, mask=col_ok)


FOLD_BIAS_CONFIG = dict(BLOCK_M=32, BLOCK_D=128, num_warps=4)


def topk_encode(x, W_enc, b_enc, k, b_dec=None, *, config: EncodeConfig | None = None, splits: int | None = None):
    """Launcher with the schema's signature; ``config`` and ``splits`` override the plan (tests)."""
    for t, name in ((x, "x"), (W_enc, "W_enc"), (b_enc, "b_enc"), (b_dec, "b_dec")):
        if t is not None:
            check_dtype(t, name)
            check_device(t, name)
    N, d = x.shape
    M = W_enc.shape[0]
    if M >= 2**31 - 1:
        raise ValueError(f"W_enc has {M} latents; the triton backend supports at most 2^31 - 2")
    if b_enc is None:  # no bias: O(M) zeros, next to the O(M d) weights
        b_enc = torch.zeros(W_enc.shape[0], dtype=x.dtype, device=x.device)
    x, W_enc, b_enc = x.contiguous(), W_enc.contiguous(), b_enc.contiguous()
    device = x.device
    plan = encode_plan(N, M, k, x.dtype, device, config=config, splits=splits)
    cfg = plan.config

    if b_dec is not None:
        bias = torch.empty(M, dtype=torch.float32, device=device)
        _fold_bias_kernel[(triton.cdiv(M, FOLD_BIAS_CONFIG["BLOCK_M"]),)](
            W_enc, b_enc, b_dec.contiguous(), bias, M, d, **FOLD_BIAS_CONFIG)
    else:
        bias = b_enc

    values = torch.empty(N, k, dtype=x.dtype, device=device)
    indices = torch.empty(N, k, dtype=torch.int64, device=device)
    cand = torch.empty(plan.scratch_shape, dtype=torch.int64, device=device)
    bound = torch.empty(N, dtype=torch.int64, device=device) if plan.rounds > 1 else cand
    precision = fp32_dot_precision() if x.dtype == torch.float32 else None
    block_r = merge_block_rows(plan.kp)
    for r in range(plan.rounds):
        col0 = r * plan.kp
        _encode_kernel[(triton.cdiv(N, cfg.block_n), plan.splits)](
            x, W_enc, bias, bound, cand, N, M, d, plan.latents_per_split, plan.splits,
            KP=plan.kp, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
            HAS_BOUND=r > 0, UPCAST=upcast_dot(x.dtype), PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _merge_kernel[(triton.cdiv(N, block_r),)](
            cand, values, indices, bound, N, plan.splits, min(plan.kp, k - col0), col0, k,
            KP=plan.kp, BLOCK_R=block_r, ROUND_BF16=round_bf16_in_kernel(x.dtype),
            STORE_BOUND=r + 1 < plan.rounds, num_warps=4)
    return values, indices
