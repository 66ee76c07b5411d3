"""Ahead-of-time compilation report of every Triton kernel, for sm_80 (A100) and sm_90 (H100).

    python -m ssae_kernels.triton.aot_report [--arch 80 90] [--kernel NAME ...] [--reuse-cache]

Compiles each kernel with each of its shipped configs through ``triton.compile``
with ``GPUTarget("cuda", 80 | 90, 32)`` (no GPU needed) and prints, per kernel x
config x arch: registers, spilled bytes (ptxas), shared memory, and the tensor-core
instructions (PTX ``mma.sync`` / ``wgmma.mma_async``, SASS ``HMMA`` / ``HGMMA``).

Exits 1 on any spill, on shared memory above the arch's per-block limit, or when
the encode kernel lacks tensor-core instructions (mma on sm_80, wgmma on sm_90 for
the configs with BLOCK_N >= 64, one warpgroup's M). By default it compiles into a
fresh temporary cache, so every run really compiles.

The interpreter replaces @triton.jit functions, so this module re-executes itself
without TRITON_INTERPRET when that is set.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "ssae_kernels.triton.aot_report", *sys.argv[1:]], env)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

# Triton 3.9 warns unless the FMA-contraction default is explicit; its current default (on) is what
# every launch uses, so say so.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import sparse_backward, sparse_decode, topk_encode  # noqa: E402
from . import tilted_loss  # noqa: E402
from . import project_subspace  # noqa: E402
from . import sparse_adam  # noqa: E402

# Largest dynamic shared memory per block (bytes): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Spec:
    kernel: str  # the kernel's name in the report
    fn: object  # the @triton.jit function
    label: str  # the config, as shown
    types: dict  # runtime argument -> Triton type ("*bf16", "i32", ...)
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    aligned: tuple = ()  # integer arguments assumed multiples of 16 (pointers always are)
    needs_tensor_cores: bool = False
    extra: dict = field(default_factory=dict)
    archs: tuple = (80, 90)  # the architectures this config ships for

    def source(self) -> ASTSource:
        signature, attrs = {}, {}
        for i, name in enumerate(self.fn.arg_names):
            if name in self.constexprs:
                signature[name] = "constexpr"
                continue
            signature[name] = self.types[name]
            if self.types[name].startswith("*") or name in self.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(self.fn, signature, dict(self.constexprs), attrs)


def _encode_specs():
    te = topk_encode
    specs = []
    # k = 32 and 128 (the usual SAE range), the largest single-round k, and the bound of later rounds
    for (arch, size), cfg in sorted(te.ENCODE_CONFIGS.items()):
        dtype = "bf16" if size == 2 else "fp32"
        precision = None if size == 2 else "tf32x3"
        # (threshold: threshold_encode's variant, at the max_k of a JumpReLU / BatchTopK SAE with k = 32)
        seen = set()
        for k, has_bound, threshold in ((32, False, False), (128, False, False), (te.MAX_K_PER_ROUND, False, False),
                                        (te.MAX_K_PER_ROUND, True, False), (128, False, True)):
            capacity = te.buffer_capacity(k, cfg.block_m)
            if (capacity, has_bound, threshold) in seen:  # k values whose buffers coincide compile alike
                continue
            seen.add((capacity, has_bound, threshold))
            rows = te.compact_rows(capacity, cfg.block_n)
            label = (f"{dtype}{' ' + precision if precision else ''} CAP={capacity} CR={rows} BN={cfg.block_n} "
                     f"BM={cfg.block_m} BK={cfg.block_k} w={cfg.num_warps} s={cfg.num_stages}"
                     f"{' bound' if has_bound else ''}{' threshold' if threshold else ''}")
            specs.append(Spec(
                "topk_encode._encode_kernel", te._encode_kernel, label,
                dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", bias_ptr="*fp32", thr_ptr="*fp32", above_ptr="*i64",
                     bound_ptr="*i64", buf_ptr="*i64",
                     count_ptr="*i32", theta_ptr="*i64", shared_ptr="*i64", N="i32", M="i32", D="i32",
                     stride_x="i32", stride_wm="i32", latents_per_split="i32", num_splits="i32", k="i32"),
                dict(stride_wd=1, CAPACITY=capacity, COMPACT_ROWS=rows, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
                     BLOCK_K=cfg.block_k, HAS_BOUND=has_bound, HAS_THRESHOLD=threshold, UPCAST=False,
                     PRECISION=precision),
                cfg.num_warps, cfg.num_stages, aligned=("D", "stride_x", "stride_wm", "latents_per_split"),
                needs_tensor_cores=True, extra=dict(block_n=cfg.block_n), archs=(arch,)))
    for kp, raw in ((2, False), (32, False), (128, False), (te.MAX_K_PER_ROUND, False), (128, True)):
        block_r = te.merge_block_rows(kp)
        capacity = te.buffer_capacity(kp, te.ENCODE_CONFIGS[(90, 2)].block_m)
        store_bound = kp == te.MAX_K_PER_ROUND
        specs.append(Spec(
            "topk_encode._merge_kernel", te._merge_kernel,
            f"KP={kp} CAP={capacity} BLOCK_R={block_r} w=4{' raw' if raw else ''}",
            dict(buf_ptr="*i64", count_ptr="*i32", values_ptr="*bf16", indices_ptr="*i64", bound_ptr="*i64",
                 N="i32", num_splits="i32", k_round="i32", col0="i32", k_total="i32"),
            dict(KP=kp, CAPACITY=capacity, BLOCK_R=block_r, ROUND_BF16=False, STORE_BOUND=store_bound, RAW=raw), 4))
    cfg = te.FOLD_BIAS_CONFIG
    for dtype in ("bf16", "fp32"):
        specs.append(Spec(
            "topk_encode._fold_bias_kernel", te._fold_bias_kernel,
            f"{dtype} BLOCK_M={cfg['BLOCK_M']} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(w_ptr=f"*{dtype}", b_enc_ptr=f"*{dtype}", b_dec_ptr=f"*{dtype}", out_ptr="*fp32", M="i32", D="i32",
                 stride_wm="i32"),
            dict(stride_wd=1, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"],
            aligned=("D", "stride_wm")))
    return specs


def _decode_specs():
    cfg = sparse_decode.DECODE_CONFIG
    return [Spec(
        "sparse_decode._decode_kernel", sparse_decode._decode_kernel,
        f"{dtype} BLOCK_J={cfg['BLOCK_J']} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
        dict(v_ptr=f"*{dtype}", idx_ptr="*i64", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
             K="i32", M="i32", D="i32", stride_w="i32"),
        dict(stride_wd=1, HAS_BIAS=True, BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"], ROUND_BF16=False),
        cfg["num_warps"], aligned=("D", "stride_w")) for dtype in ("bf16", "fp32")]


def _backward_specs():
    c = sparse_backward.GPU_CONFIG
    specs = []
    for dtype in ("bf16", "fp32"):
        cfg = c["sampled_dot"]
        specs.append(Spec(
            "sparse_backward._sampled_dot_kernel", sparse_backward._sampled_dot_kernel,
            f"{dtype} BLOCK_J={cfg['BLOCK_J']} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(g_ptr=f"*{dtype}", idx_ptr="*i64", w_ptr=f"*{dtype}", out_ptr=f"*{dtype}", K="i32", M="i32", D="i32",
                 stride_g="i32", stride_w="i32"),
            dict(stride_wd=1, BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"], ROUND_BF16=False), cfg["num_warps"],
            aligned=("D", "stride_g", "stride_w")))
    cfg = c["count"]
    specs.append(Spec(
        "sparse_backward._count_latents_kernel", sparse_backward._count_latents_kernel,
        f"BLOCK={cfg['BLOCK']} w={cfg['num_warps']}",
        dict(idx_ptr="*i64", key_ptr="*i32", counts_ptr="*i32", P="i32", M="i32"),
        dict(BLOCK=cfg["BLOCK"]), cfg["num_warps"]))
    cfg = c["radix"]
    specs.append(Spec(
        "sparse_backward._radix_histogram_kernel", sparse_backward._radix_histogram_kernel,
        f"BLOCK={cfg['BLOCK']} w={cfg['num_warps']}",
        dict(key_ptr="*i32", hist_ptr="*i32", start_ptr="*i32", P="i32", num_blocks="i32", shift="i32"),
        dict(BLOCK=cfg["BLOCK"]), cfg["num_warps"]))
    for first, store_keys in ((True, True), (False, True), (False, False)):
        specs.append(Spec(
            "sparse_backward._radix_scatter_kernel", sparse_backward._radix_scatter_kernel,
            f"BLOCK={cfg['BLOCK']} w={cfg['num_warps']} FIRST={first} STORE_KEYS={store_keys}",
            dict(key_in="*i32", val_in="*i64", key_out="*i32", val_out="*i64", adjust_ptr="*i32", P="i32",
                 num_blocks="i32", shift="i32"),
            dict(BLOCK=cfg["BLOCK"], LOG_BLOCK=cfg["BLOCK"].bit_length() - 1, FIRST=first, STORE_KEYS=store_keys),
            cfg["num_warps"]))
    cfg = c["fill_items"]
    specs.append(Spec(
        "sparse_backward._fill_items_kernel", sparse_backward._fill_items_kernel,
        f"BLOCK={cfg['BLOCK']} w={cfg['num_warps']}",
        dict(item_start_ptr="*i64", item_latent_ptr="*i32", M="i32"), dict(BLOCK=cfg["BLOCK"]), cfg["num_warps"]))
    for dtype in ("bf16", "fp32"):
        cfg = c["stm"]
        specs.append(Spec(
            "sparse_backward._stm_piece_kernel", sparse_backward._stm_piece_kernel,
            f"{dtype} PIECE={sparse_backward.PIECE} BLOCK_P={cfg['BLOCK_P']} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(w_ptr=f"*{dtype}", rows_ptr=f"*{dtype}", offsets_ptr="*i64", order_ptr="*i64", item_start_ptr="*i64",
                 item_latent_ptr="*i32", part_start_ptr="*i64", out_ptr=f"*{dtype}", colsum_ptr=f"*{dtype}",
                 part_ptr="*fp32", part_colsum_ptr="*fp32", K="i32", D="i32", P="i32", stride_r="i32"),
            dict(PIECE=sparse_backward.PIECE, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], ROUND_BF16=False),
            cfg["num_warps"], aligned=("D", "stride_r")))
        cfg = c["stm_reduce"]
        specs.append(Spec(
            "sparse_backward._stm_reduce_kernel", sparse_backward._stm_reduce_kernel,
            f"{dtype} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(item_start_ptr="*i64", part_start_ptr="*i64", part_ptr="*fp32", part_colsum_ptr="*fp32",
                 out_ptr=f"*{dtype}", colsum_ptr=f"*{dtype}", D="i32"),
            dict(BLOCK_D=cfg["BLOCK_D"], ROUND_BF16=False), cfg["num_warps"], aligned=("D",)))
    return specs


def _tilted_specs():
    m = tilted_loss
    specs = []
    # the statistics kernel at every group tile the launcher picks on the GPU
    block_g = 1
    while block_g <= m.MAX_BLOCK_G:
        for has_groups in ((False, True) if block_g == 1 else (True,)):
            for zero_t in (False, True):
                block = m.STATS_TILE // block_g
                specs.append(Spec(
                    "tilted_loss._stats_kernel", m._stats_kernel,
                    f"fp32 BLOCK={block} BLOCK_G={block_g} w={m.STATS_WARPS}"
                    f"{' groups' if has_groups else ''}{' t=0' if zero_t else ''}",
                    dict(loss_ptr="*fp32", group_ptr="*i64", t_ptr="*fp64", part_a="*fp64", part_s="*fp64",
                         part_c="*i64", N="i32", G="i32", per_block="i32"),
                    dict(HAS_GROUPS=has_groups, ZERO_T=zero_t, BLOCK=block, BLOCK_G=block_g), m.STATS_WARPS))
        block_g *= 2
    cfg = m.MERGE_CONFIG
    for zero_t in (False, True):
        specs.append(Spec(
            "tilted_loss._stats_merge_kernel", m._stats_merge_kernel,
            f"BLOCK_G={cfg['BLOCK_G']} w={cfg['num_warps']}{' t=0' if zero_t else ''}",
            dict(part_a="*fp64", part_s="*fp64", part_c="*i64", t_ptr="*fp64", anchor_ptr="*fp64",
                 log_mean_ptr="*fp64", count_ptr="*i64", G="i32", num_blocks="i32"),
            dict(ZERO_T=zero_t, BLOCK_G=cfg["BLOCK_G"]), cfg["num_warps"]))
    for dtype in ("bf16", "fp32"):
        cfg = m.ROW_CONFIG
        specs.append(Spec(
            "tilted_loss._row_sq_error_kernel", m._row_sq_error_kernel,
            f"{dtype} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", out_ptr="*fp32", D="i32"),
            dict(BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"], aligned=("D",)))
        cfg = m.DECODE_SQ_CONFIG
        specs.append(Spec(
            "tilted_loss._decode_sq_error_kernel", m._decode_sq_error_kernel,
            f"{dtype} BLOCK_J={cfg['BLOCK_J']} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(v_ptr=f"*{dtype}", idx_ptr="*i64", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", x_ptr=f"*{dtype}",
                 out_ptr="*fp32", K="i32", M="i32", D="i32", stride_w="i32"),
            dict(stride_wd=1, HAS_BIAS=True, BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"],
            aligned=("D", "stride_w")))
        cfg = m.DECODE_RESIDUAL_CONFIG
        specs.append(Spec(
            "tilted_loss._decode_residual_kernel", m._decode_residual_kernel,
            f"{dtype} BLOCK_J={cfg['BLOCK_J']} BLOCK_D={cfg['BLOCK_D']} w={cfg['num_warps']}",
            dict(v_ptr=f"*{dtype}", idx_ptr="*i64", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", x_ptr=f"*{dtype}",
                 scale_ptr="*fp32", res_ptr=f"*{dtype}", dot_ptr="*fp32", K="i32", M="i32", D="i32", stride_w="i32"),
            dict(stride_wd=1, HAS_BIAS=True, BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"], ROUND_BF16=False),
            cfg["num_warps"],
            aligned=("D", "stride_w")))
    return specs


def all_specs() -> list[Spec]:
    return (_encode_specs() + _decode_specs() + _backward_specs() + _tilted_specs() + project_subspace.aot_specs()
            + sparse_adam.aot_specs())


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_stats(log: str):
    regs = _PTXAS_USED.search(log)
    spill = _PTXAS_SPILL.search(log)
    if not regs or not spill:
        return None
    return int(regs.group(1)), int(spill.group(2)) + int(spill.group(3)), int(spill.group(1))


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v on the kernel's PTX, with the flags Triton itself uses."""
    ptxas = triton.knobs.nvidia.ptxas.path
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                                 "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    return result.stdout + result.stderr


def _sass_tensor_ops(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return {"HMMA": len(re.findall(r"\bHMMA\b", sass)), "HGMMA": len(re.findall(r"\bHGMMA\b", sass))}


@dataclass
class Row:
    spec: Spec
    arch: int
    regs: int = -1
    spill_bytes: int = -1
    stack: int = -1
    shared: int = -1
    mma: int = 0
    wgmma: int = 0
    sass: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [f"compile failed: {self.error}"]
        out = []
        if self.spill_bytes != 0:
            out.append(f"{self.spill_bytes} bytes spilled")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared} B above the sm_{self.arch} limit {SHARED_LIMIT[self.arch]} B")
        if self.spec.needs_tensor_cores:
            if self.arch == 80 and self.mma == 0:
                out.append("no mma instructions on sm_80")
            if self.arch == 90 and self.spec.extra.get("block_n", 0) >= 64 and self.wgmma == 0:
                out.append("no wgmma instructions on sm_90")
            if self.arch == 90 and self.mma == 0 and self.wgmma == 0:
                out.append("no tensor-core instructions on sm_90")
        return out


def compile_one(spec: Spec, arch: int) -> Row:
    row = Row(spec, arch)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            old = triton.knobs.nvidia.dump_ptxas_log
            triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log
            try:
                compiled = triton.compile(spec.source(), target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
            finally:
                triton.knobs.nvidia.dump_ptxas_log = old
    except Exception as error:  # report it and keep going
        row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        row.seconds = time.perf_counter() - start
        return row
    ptx = compiled.asm["ptx"]
    stats = _ptxas_stats(log.getvalue()) or _ptxas_stats(_ptxas_log(ptx, arch))  # cache hit: no log
    if stats:
        row.regs, row.spill_bytes, row.stack = stats
    row.shared = compiled.metadata.shared
    row.wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
    row.mma = len(re.findall(r"\bmma\.sync", ptx))
    row.sass = _sass_tensor_ops(compiled.asm["cubin"])
    row.seconds = time.perf_counter() - start
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--kernel", nargs="+", default=None, help="only kernels whose name contains one of these")
    parser.add_argument("--reuse-cache", action="store_true", help="use Triton's cache (default: a fresh one)")
    args = parser.parse_args(argv)

    specs = [s for s in all_specs() if not args.kernel or any(k in s.kernel for k in args.kernel)]
    tmp_cache = None
    if not args.reuse_cache:
        tmp_cache = tempfile.TemporaryDirectory(prefix="ssae-aot-")
        triton.knobs.cache.dir = tmp_cache.name
    print(f"triton {triton.__version__}; ptxas {triton.knobs.nvidia.ptxas.path}")
    header = f"{'kernel':<40} {'config':<58} {'arch':>6} {'regs':>5} {'spill':>6} {'smem':>7} {'mma':>5} {'wgmma':>6} {'HMMA':>5} {'HGMMA':>6} {'time':>6}"
    print(header)
    print("-" * len(header))
    failures = []
    start = time.perf_counter()
    count = 0
    for spec in specs:
        for arch in (a for a in args.arch if a in spec.archs):
            count += 1
            row = compile_one(spec, arch)
            if row.error:
                print(f"{spec.kernel:<40} {spec.label:<58} sm_{arch:<3} ERROR {row.error}")
            else:
                print(f"{spec.kernel:<40} {spec.label:<58} sm_{arch:<3} {row.regs:>5} {row.spill_bytes:>6} "
                      f"{row.shared:>7} {row.mma:>5} {row.wgmma:>6} {row.sass.get('HMMA', '-'):>5} "
                      f"{row.sass.get('HGMMA', '-'):>6} {row.seconds:>5.1f}s", flush=True)
            failures += [f"{spec.kernel} [{spec.label}] sm_{arch}: {p}" for p in row.problems()]
    elapsed = time.perf_counter() - start
    print(f"\n{count} compilations in {elapsed:.0f} s")
    if tmp_cache is not None:
        tmp_cache.cleanup()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK: no spills, shared memory within limits, tensor-core instructions in the encode kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
