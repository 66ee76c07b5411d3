"""Subspace projection in Triton: out = U (U^T G), or G - U (U^T G); U [d, r], G [d, n].

Fused path (r <= MAX_FUSED_R): program j owns BLOCK_N columns of G. It walks G's
rows in BLOCK_D chunks accumulating C = U^T G[:, cols] ([BLOCK_R, BLOCK_N] float32,
in registers), then walks them again writing U C or G - U C. G is read from memory
once (the second pass re-reads the program's own columns, mostly from L2), and
writing into G itself is safe: a program writes only columns it has finished reading.

Two-pass path (larger r, whose C would not fit in registers): C = U^T G goes to a
float32 [r, n] scratch buffer, then a second kernel writes every output element
from its own G element and C (also safe in place). Both paths share the U^T G loop,
the U tile load and the epilogue (complement, bf16 rounding, store) as jit helpers.

Both dots run in float32 (inputs upcast: products of bfloat16/float16 numbers are
exact in float32; and the interpreter's bfloat16 dot is wrong) with the precision
PyTorch's float32 matmul setting asks for (tf32x3 by default, see _common).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, fp32_dot_precision, guarded, interpreting, next_power_of_2
from ._common import rne_bf16, round_bf16_in_kernel, row_stride, rows_strided

# Largest r served by the fused kernel (C is BLOCK_R x BLOCK_N float32 in registers).
MAX_FUSED_R = 128

# GPU tiles by BLOCK_R (fused kernel): BLOCK_N columns per program, BLOCK_D rows per
# step. Chosen by ahead-of-time compilation (aot_specs) for sm_80 and sm_90: no spills
# (92-226 registers per thread; float32 with tf32x3 needs the most, three products
# per dot); BLOCK_R=32 at BLOCK_D=64 with 4 warps spilled 340 bytes on sm_80.
GPU_CONFIGS = {
    16: dict(BLOCK_N=64, BLOCK_D=64, num_warps=4),
    32: dict(BLOCK_N=64, BLOCK_D=32, num_warps=8),
    64: dict(BLOCK_N=64, BLOCK_D=16, num_warps=8),
    128: dict(BLOCK_N=32, BLOCK_D=16, num_warps=8),
}
# Two-pass kernels on the GPU (no spills; 106-248 registers).
GPU_TWO_PASS = dict(BLOCK_N=64, BLOCK_D=32, BLOCK_R=64, num_warps=8)
# The interpreter runs each program in Python: small tiles, so small tests cross every mask.
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_D=16, num_warps=4)
INTERPRET_TWO_PASS = dict(BLOCK_N=16, BLOCK_D=16, BLOCK_R=16, num_warps=4)


# Shared pieces of the fused and two-pass kernels (inlined by Triton).


@triton.jit
def _utg(acc, g_ptr, u_ptr, D, R, stride_g, cols, col_ok, rs, r_ok, BLOCK_D: tl.constexpr,
         PRECISION: tl.constexpr):
    """acc + U[:, rs]^T G[:, cols] ([BLOCK_R, BLOCK_N] float32), walking G's D rows in BLOCK_D chunks."""
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        g = tl.load(g_ptr + ds.to(tl.int64)[:, None] * stride_g + cols[None, :],
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        ut = tl.load(u_ptr + ds.to(tl.int64)[None, :] * R + rs[:, None],
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(ut, g, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _u_rows(u_ptr, R, ds, d_ok, rs, r_ok):
    """U[ds, rs] as float32 ([BLOCK_D, BLOCK_R], zero outside)."""
    return tl.load(u_ptr + ds.to(tl.int64)[:, None] * R + rs[None, :],
                   mask=d_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_projection(p, g_ptr, out_ptr, stride_g, stride_o, ds, d_ok, cols, col_ok,
                      COMPLEMENT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """out[ds, cols] = p (= U U^T G there, float32), or G - p with COMPLEMENT, in out's dtype."""
    mask = d_ok[:, None] & col_ok[None, :]
    if COMPLEMENT:
        g = tl.load(g_ptr + ds.to(tl.int64)[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        p = g.to(tl.float32) - p
    if ROUND_BF16:
        p = rne_bf16(p)
    tl.store(out_ptr + ds.to(tl.int64)[:, None] * stride_o + cols[None, :], p.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _project_kernel(g_ptr, u_ptr, out_ptr, D, R, N, stride_g, stride_o,
                    COMPLEMENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Fused: C = U^T G[:, cols] in registers, then out[:, cols] from U C (all of U's r columns)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    c = _utg(tl.zeros([BLOCK_R, BLOCK_N], tl.float32), g_ptr, u_ptr, D, R, stride_g, cols, col_ok, rs, r_ok,
             BLOCK_D, PRECISION)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        p = tl.dot(_u_rows(u_ptr, R, ds, d_ok, rs, r_ok), c, input_precision=PRECISION)
        _store_projection(p, g_ptr, out_ptr, stride_g, stride_o, ds, d_ok, cols, col_ok, COMPLEMENT, ROUND_BF16)


@triton.jit
def _utg_kernel(g_ptr, u_ptr, c_ptr, D, R, N, stride_g,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """c[rows, cols] = U[:, rows]^T G[:, cols] in float32 (c is [R, N], row-major)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rs < R
    acc = _utg(tl.zeros([BLOCK_R, BLOCK_N], tl.float32), g_ptr, u_ptr, D, R, stride_g, cols, col_ok, rs, r_ok,
               BLOCK_D, PRECISION)
    tl.store(c_ptr + rs.to(tl.int64)[:, None] * N + cols[None, :], acc, mask=r_ok[:, None] & col_ok[None, :])


@triton.jit
def _apply_kernel(g_ptr, u_ptr, c_ptr, out_ptr, D, R, N, stride_g, stride_o,
                  COMPLEMENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                  PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr):
    """out[rows, cols] = (G or 0) -/+ U[rows, :] c[:, cols]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < R
        c = tl.load(c_ptr + rs.to(tl.int64)[:, None] * N + cols[None, :], mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(_u_rows(u_ptr, R, ds, d_ok, rs, r_ok), c, acc, input_precision=PRECISION)
    _store_projection(acc, g_ptr, out_ptr, stride_g, stride_o, ds, d_ok, cols, col_ok, COMPLEMENT, ROUND_BF16)


def _block_r(r: int) -> int:
    return max(16, next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _launch(G, U, complement, out, fused_max_r):
    d, n = G.shape
    r = U.shape[1]
    if d == 0 or n == 0:
        return
    U = U.contiguous()  # the basis [d, r], r <= d: O(d * r)
    precision = fp32_dot_precision()
    round_bf16 = round_bf16_in_kernel(G.dtype)
    gpu = G.device.type == "cuda" and not interpreting()
    if r <= fused_max_r:
        block_r = _block_r(r)
        cfg = GPU_CONFIGS[block_r] if gpu else INTERPRET_CONFIG
        _project_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            G, U, out, d, r, n, row_stride(G), row_stride(out), COMPLEMENT=complement, BLOCK_R=block_r,
            PRECISION=precision, ROUND_BF16=round_bf16, **cfg)
        return
    cfg = GPU_TWO_PASS if gpu else INTERPRET_TWO_PASS
    c = torch.empty(r, n, dtype=torch.float32, device=G.device)
    _utg_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(r, cfg["BLOCK_R"]))](
        G, U, c, d, r, n, row_stride(G), PRECISION=precision, **cfg)
    _apply_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(d, cfg["BLOCK_D"]))](
        G, U, c, out, d, r, n, row_stride(G), row_stride(out), COMPLEMENT=complement, PRECISION=precision,
        ROUND_BF16=round_bf16, **cfg)


def _check(G, U):
    for t, name in ((G, "G"), (U, "U")):
        check_dtype(t, name)
        check_device(t, name)


@guarded
def project_subspace(G, U, complement=False, *, fused_max_r=MAX_FUSED_R):
    """Launcher with the schema's signature; ``fused_max_r`` moves the two-pass threshold (tests).

    G is read through its row stride; a layout without unit column stride (a transposed
    view) is copied first, O(d * n): the size of the output this call allocates anyway.
    """
    _check(G, U)
    out = torch.empty(G.shape, dtype=G.dtype, device=G.device)
    _launch(G if rows_strided(G) else G.contiguous(), U, complement, out, fused_max_r)
    return out


@guarded
def project_subspace_(G, U, complement=False, *, fused_max_r=MAX_FUSED_R):
    """In-place launcher with the schema's signature (writes G, returns None)."""
    _check(G, U)
    if rows_strided(G):
        _launch(G, U, complement, G, fused_max_r)
    else:  # e.g. a transposed view: compute densely, then copy back through G's strides
        dense = G.contiguous()
        _launch(dense, U, complement, dense, fused_max_r)
        G.copy_(dense)


def aot_specs():
    """Ahead-of-time compilation specs for ``triton/aot_report.py`` (every shipped config, bf16 and fp32)."""
    from .aot_report import Spec

    specs = []
    for dtype in ("bf16", "fp32"):
        for block_r, cfg in sorted(GPU_CONFIGS.items()):
            for complement in (False, True):
                specs.append(Spec(
                    "project_subspace._project_kernel", _project_kernel,
                    f"{dtype} BLOCK_R={block_r} BN={cfg['BLOCK_N']} BD={cfg['BLOCK_D']} w={cfg['num_warps']}"
                    f"{' complement' if complement else ''}",
                    dict(g_ptr=f"*{dtype}", u_ptr=f"*{dtype}", out_ptr=f"*{dtype}", D="i32", R="i32", N="i32",
                         stride_g="i32", stride_o="i32"),
                    dict(COMPLEMENT=complement, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_R=block_r,
                         PRECISION="tf32x3", ROUND_BF16=False),
                    cfg["num_warps"], aligned=("stride_g", "stride_o")))
        cfg = GPU_TWO_PASS
        specs.append(Spec(
            "project_subspace._utg_kernel", _utg_kernel,
            f"{dtype} BR={cfg['BLOCK_R']} BN={cfg['BLOCK_N']} BD={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(g_ptr=f"*{dtype}", u_ptr=f"*{dtype}", c_ptr="*fp32", D="i32", R="i32", N="i32", stride_g="i32"),
            dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"], PRECISION="tf32x3"),
            cfg["num_warps"], aligned=("stride_g",)))
        specs.append(Spec(
            "project_subspace._apply_kernel", _apply_kernel,
            f"{dtype} BR={cfg['BLOCK_R']} BN={cfg['BLOCK_N']} BD={cfg['BLOCK_D']} w={cfg['num_warps']} complement",
            dict(g_ptr=f"*{dtype}", u_ptr=f"*{dtype}", c_ptr="*fp32", out_ptr=f"*{dtype}", D="i32", R="i32",
                 N="i32", stride_g="i32", stride_o="i32"),
            dict(COMPLEMENT=True, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"],
                 PRECISION="tf32x3", ROUND_BF16=False),
            cfg["num_warps"], aligned=("stride_g", "stride_o")))
    return specs
