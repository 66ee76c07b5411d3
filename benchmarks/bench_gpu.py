"""GPU benchmark of the GPU backends (Triton and CUDA C++), side by side in one run: their ops and
a TopK-SAE training step against the dense PyTorch formulation, eai-sparsify (when importable) and
the GEMM floor, beside the performance model of docs/triton.md (a model of the Triton kernels).

    python benchmarks/bench_gpu.py [--dtype bfloat16] [--shape ref] [--repeats 20] [--json results.jsonl]
                                   [--backends triton cuda]
    python benchmarks/bench_gpu.py --model [--shape ref]     # the model alone, no GPU needed
    python benchmarks/bench_gpu.py --grid [--shape] [--out DIR]  # the encode grid of issue #13 (bf16)

Each GPU backend (provider `triton`, `cuda`) runs every op and the step through
``ssae_kernels.use_backend(name)``. A backend that cannot serve an op on CUDA tensors (e.g. `_C`
built without SSAE_BUILD_CUDA=1) is listed at the start and in that op's row with the reasons
``ssae_kernels.backends`` gives, and skipped.

Per shape and dtype it reports, for each op and provider: median time over --repeats timed runs
(CUDA events, after warm-up), the ratio to the dense PyTorch formulation of the same op, achieved
TFLOP/s or GB/s, the model's estimate, and the peak memory allocated during one call above what
was allocated before it. The training step (encode -> decode -> per-row squared error, mean ->
backward into W_enc, b_enc, W_dec, b_dec) is also reported as a multiple of one dense GEMM
x @ W_enc.T (the floor, docs/benchmarks.md). The optimizer (op `sparse_adam_`) is one update of a
float32 [M, d] weight on the rows the shape's code selects, with float32 and bfloat16 moments, against
fused dense Adam over every row, in GB/s of the bytes each must move.

--grid times the encode alone over the model grid (N=4096, d in {576, 2304, 4096}, M in {65536,
1048576}, k in {32, 128}, bfloat16): our Triton and CUDA encodes, the cuBLAS GEMM floor x @ W_enc.T,
torch.topk of the dense scores, and sparsify's fused encoder when it imports, round by round in one
process. Each is reported as a fraction of dense bf16 peak (PEAK_BF16, 2*N*M*d FLOPs) and as a
multiple of the GEMM floor measured in the same rounds, beside the prediction of
benchmarks/results/gpu_model.json (benchmarks/gpu_model.py) where it has one.

Results (JSON and Markdown) go to --out (default $SSAE_GPU_RESULTS, else benchmarks/results/gpu/),
and only from a run on a GPU. Without a CUDA device it lists the backends, prints why nothing is
timed and exits 0, writing nothing. It does not depend on benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results" / "gpu"
MODEL_JSON = BENCH_DIR / "results" / "gpu_model.json"

SHAPES = {  # N, d, M, k
    "ref": (2048, 768, 24576, 32),  # the reference shape of docs/benchmarks.md
    "large": (8192, 2048, 65536, 64),
    "wide": (4096, 768, 262144, 32),
}

# Peak numbers for the model: dense bf16/fp16 tensor-core FLOP/s, HBM bytes/s, int32 lanes per SM
# per clock, SM count, clock (Hz). H100 SXM5, H200 SXM (the H100's compute, faster HBM3e) and
# A100 SXM4 (80 GB) datasheets.
GPUS = {
    "H100": dict(tflops=989e12, bandwidth=3.35e12, int_lanes=64, sms=132, clock=1.83e9),
    "H200": dict(tflops=989e12, bandwidth=4.8e12, int_lanes=64, sms=132, clock=1.83e9),
    "A100": dict(tflops=312e12, bandwidth=2.04e12, int_lanes=64, sms=108, clock=1.41e9),
}


# ---- performance model (docs/triton.md) ------------------------------------------------------


def insertion_iterations(block_n, block_m, kp, tiles, seed=0) -> float:
    """Mean trips of the encode's insertion loop per tile: per tile, the largest number of a row's
    entries (among BLOCK_N rows) that enter that row's running top-KP. Simulated on Gaussian scores
    (the count depends only on ranks, so any continuous distribution gives the same answer)."""
    rng = np.random.default_rng(seed)
    tiles = int(tiles)
    best = np.full((block_n, kp), -np.inf, dtype=np.float32)
    total = 0
    for _ in range(tiles):
        tile = rng.standard_normal((block_n, block_m)).astype(np.float32)
        both = np.concatenate([best, tile], axis=1)
        top = np.partition(both, both.shape[1] - kp, axis=1)[:, -kp:]
        theta = top.min(axis=1, keepdims=True)
        total += int((tile >= theta).sum(axis=1).max())
        best = top
    return total / tiles


def model(N, d, M, k, dtype_bytes=2, gpu="H100"):
    """Per kernel: FLOPs, HBM bytes, arithmetic intensity and the expected time on ``gpu``."""
    from_triton = _encode_plan_numbers(N, M, k, dtype_bytes)
    g = GPUS[gpu]
    s = dtype_bytes
    P = N * k
    out = {}

    # float32 inputs run tl.dot as tf32x3: three tf32 products at half the bf16 rate
    tensor_rate = g["tflops"] if dtype_bytes == 2 else g["tflops"] / 6

    def add(name, flops, bytes_, extra_seconds=0.0, note=""):
        t_compute = flops / tensor_rate
        t_memory = bytes_ / g["bandwidth"]
        seconds = max(t_compute, t_memory) + extra_seconds
        out[name] = dict(flops=flops, bytes=bytes_, intensity=flops / max(bytes_, 1), seconds=seconds,
                         peak_fraction=flops / g["tflops"] / seconds, bandwidth_fraction=t_memory / seconds, note=note)

    bn, bm, kp, splits, lps = (from_triton[key] for key in ("block_n", "block_m", "kp", "splits", "latents_per_split"))
    tiles = math.ceil(lps / bm)
    iters = insertion_iterations(bn, bm, kp, min(tiles, 512))
    # Selection: per loop trip ~7 int32 ops per tile entry (max, compare, select, min, compare, and,
    # select) and ~8 per candidate (int64 compare/select/min), spread over the SM's int32 lanes.
    select_ops = iters * (7 * bn * bm + 8 * bn * kp)  # per tile
    tile_count = math.ceil(N / bn) * math.ceil(M / bm)
    t_select = tile_count * select_ops / (g["int_lanes"] * g["sms"] * g["clock"])
    t_mma = 2 * N * M * d / tensor_rate
    add("encode (fused GEMM + top-k)", 2 * N * M * d, N * d * s + M * d * s + N * splits * kp * 8,
        extra_seconds=t_select,
        note=f"{iters:.1f} insertion trips/tile; selection {t_select / t_mma:.2f}x the MMA time, not overlapped")
    add("encode merge", 0, N * splits * kp * 8 + N * k * (s + 8))
    add("fold bias (W @ b_dec)", 2 * M * d, M * d * s)
    add("sparse_decode", 2 * P * d, P * d * s + P * (s + 8) + N * d * s)
    add("sampled_dot", 2 * P * d, P * d * s + P * (s + 8) + N * d * s)
    passes = math.ceil(max(1, (M - 1).bit_length()) / 8)
    add("latent_transpose", 0, P * (8 + 4) + passes * P * 28 + M * 12,
        extra_seconds=(2 + 3 * passes) * 4e-6, note=f"{passes} radix passes; ~4 us per launch")
    add("sparse_transpose_matmul", 2 * P * d, P * d * s + M * d * s + P * (8 + s) + M * 24)
    add("dense GEMM floor x @ W_enc.T", 2 * N * M * d, N * d * s + M * d * s + N * M * s)
    return out, from_triton


def _encode_plan_numbers(N, M, k, dtype_bytes):
    from ssae_kernels.triton import topk_encode as te

    dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
    cfg = te.ENCODE_CONFIGS[(90, dtype_bytes)]  # the shipped H100 config (the interpreter's is smaller)
    plan = te.encode_plan(N, M, k, dtype, torch.device("cpu"), config=cfg, multiprocessors=132)
    return dict(block_n=cfg.block_n, block_m=cfg.block_m, kp=plan.kp, splits=plan.splits,
                latents_per_split=plan.latents_per_split, rounds=plan.rounds)


def print_model(shape_name, dtype_bytes=2, gpu="H100"):
    N, d, M, k = SHAPES[shape_name]
    rows, plan = model(N, d, M, k, dtype_bytes, gpu)
    print(f"model, {gpu}, {shape_name}: N={N} d={d} M={M} k={k}, {dtype_bytes}-byte inputs; encode plan {plan}")
    print(f"{'kernel':<32} {'GFLOP':>8} {'MB':>8} {'FLOP/B':>8} {'us':>9} {'%peak':>6} {'%HBM':>6}  note")
    for name, r in rows.items():
        print(f"{name:<32} {r['flops'] / 1e9:>8.2f} {r['bytes'] / 1e6:>8.1f} {r['intensity']:>8.1f} "
              f"{r['seconds'] * 1e6:>9.1f} {100 * r['peak_fraction']:>5.0f}% {100 * r['bandwidth_fraction']:>5.0f}%  {r['note']}")
    return rows


# ---- timing --------------------------------------------------------------------------------


def cuda_time(fn, repeats, warmup=3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return times


def peak_memory(fn) -> int:
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _dense_encode(x, W, b, k, bd):
    pre = (x - bd) @ W.T + b
    top = pre.topk(k, dim=1)
    return top.values.relu(), top.indices


def _dense_threshold_encode(x, W, b, threshold, max_k, bd):
    pre = (x - bd) @ W.T + b
    keep = pre > threshold
    counts = keep.sum(1)
    top = torch.where(keep, pre, float("-inf")).topk(max_k, dim=1)
    filled = torch.arange(max_k, device=x.device) < counts.unsqueeze(1)
    return torch.where(filled, top.values, 0), torch.where(filled, top.indices, 0), counts


def _dense_code(values, indices, M):
    return torch.zeros(values.shape[0], M, dtype=values.dtype, device=values.device).scatter_(1, indices, values)


GPU_BACKENDS = ("triton", "cuda")
# The primitives one training step runs (forward and backward).
STEP_OPS = ("topk_encode", "sparse_decode", "sampled_dot", "latent_transpose", "sparse_transpose_matmul")
# Timed beside them: the encode of the threshold architectures (JumpReLU, ReLU, BatchTopK at inference).
OTHER_OPS = ("threshold_encode",)


def backend_reasons(name, ops=STEP_OPS) -> list[str]:
    """Why backend ``name`` cannot run ``ops`` on CUDA tensors, from ssae_kernels.backends ([] if it can)."""
    from ssae_kernels import backends

    reasons = []
    for op in ops:
        for reason in backends.BACKENDS[name].not_supported_reasons(op, torch.device("cuda")):
            if reason not in reasons:
                reasons.append(reason)
    return reasons


def print_backends(names=GPU_BACKENDS) -> dict[str, list[str]]:
    status = {name: backend_reasons(name) for name in names}
    for name, reasons in status.items():
        print(f"backend {name}: " + ("available" if not reasons else "skipped, " + "; ".join(reasons)))
    return status


def run(shape_name, dtype, repeats, json_path=None, gpu_backends=GPU_BACKENDS, device="cuda"):
    """Times every case of one shape and dtype; ``device`` is "cuda" except in tests (CPU tensors
    through the Triton interpreter, with the CUDA timers replaced)."""
    import ssae_kernels
    from ssae_kernels import backends

    ops = torch.ops.ssae
    N, d, M, k = SHAPES[shape_name]
    dev = torch.device(device)
    gpu = model_gpu(torch.cuda.get_device_name())
    s = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, d, device=dev, generator=gen).to(dtype)
    W_enc = (torch.randn(M, d, device=dev, generator=gen) / d**0.5).to(dtype)
    W_dec = W_enc.clone()
    b_enc = torch.zeros(M, device=dev, dtype=dtype)
    b_dec = torch.zeros(d, device=dev, dtype=dtype)
    # Inputs of the decode and backward ops, the same for every provider (dense formulation).
    values, indices = _dense_encode(x, W_enc, b_enc, k, b_dec)
    offsets, order = backends.BACKENDS["reference"].kernel("latent_transpose")(indices, M)
    grad = torch.randn(N, d, device=dev, generator=gen).to(dtype)
    # threshold_encode: the level that leaves about k of the M latents of a row above it, and a cap of 2k
    sample = ((x[:64] - b_dec) @ W_enc.T + b_enc).float().flatten()[:2**24]
    threshold = torch.quantile(sample, 1 - k / M).to(dtype)
    max_k = min(2 * k, M)

    def on(backend, fn):
        def call():
            with ssae_kernels.use_backend(backend):
                return fn()
        return call

    def ours(backend):  # op -> callable on ``backend``
        return {
            "topk_encode": on(backend, lambda: ssae_kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)),
            "threshold_encode": on(backend, lambda: ssae_kernels.threshold_encode(x, W_enc, b_enc, threshold, max_k,
                                                                                   b_dec=b_dec)),
            "sparse_decode": on(backend, lambda: ssae_kernels.sparse_decode(values, indices, W_dec, b_dec)),
            "sampled_dot": on(backend, lambda: ops.sampled_dot(grad, indices, W_dec)),
            "latent_transpose": on(backend, lambda: ops.latent_transpose(indices, M)),
            "sparse_transpose_matmul": on(backend, lambda: ops.sparse_transpose_matmul(values, grad, offsets, order)),
        }

    baselines = {  # op -> provider -> callable
        "gemm_floor": {"torch": lambda: x @ W_enc.T},
        "topk_encode": {"dense": lambda: _dense_encode(x, W_enc, b_enc, k, b_dec)},
        "threshold_encode": {"dense": lambda: _dense_threshold_encode(x, W_enc, b_enc, threshold, max_k, b_dec)},
        "sparse_decode": {
            "dense": lambda: _dense_code(values, indices, M) @ W_dec + b_dec,
            "embedding_bag": lambda: torch.nn.functional.embedding_bag(
                indices, W_dec, per_sample_weights=values, mode="sum") + b_dec,
        },
        "sampled_dot": {
            "dense": lambda: (grad @ W_dec.T).gather(1, indices),
            "gather": lambda: torch.einsum("nd,nkd->nk", grad, W_dec[indices]),
        },
        "latent_transpose": {"torch": lambda: backends.BACKENDS["reference"].kernel("latent_transpose")(indices, M)},
        "sparse_transpose_matmul": {
            "dense": lambda: (_dense_code(values, indices, M).T @ grad, _dense_code(values, indices, M).sum(0)),
        },
    }
    # Our backends first in each op, then the baselines; a backend that cannot serve an op keeps
    # its row with the reasons (skipped[op][backend]).
    cases, skipped = {"gemm_floor": baselines["gemm_floor"]}, {}
    per_backend = {name: ours(name) for name in gpu_backends}
    for op in (*STEP_OPS, *OTHER_OPS):
        cases[op] = {}
        for name in gpu_backends:
            reasons = backend_reasons(name, (op,))
            if reasons:
                skipped.setdefault(op, {})[name] = reasons
            else:
                cases[op][name] = per_backend[name][op]
        cases[op].update(baselines[op])
    step_cases, skipped["training_step"] = _step_cases(N, d, M, k, dtype, dev, x, gpu_backends)
    optimizer_cases, skipped["sparse_adam_"], optimizer_bytes = _optimizer_cases(indices, M, d, dev, gpu_backends)
    model_rows, _ = model(N, d, M, k, s, gpu)
    model_of = {"topk_encode": ["encode (fused GEMM + top-k)", "encode merge", "fold bias (W @ b_dec)"],
                "threshold_encode": ["encode (fused GEMM + top-k)", "encode merge", "fold bias (W @ b_dec)"],
                "sparse_decode": ["sparse_decode"], "sampled_dot": ["sampled_dot"],
                "latent_transpose": ["latent_transpose"], "sparse_transpose_matmul": ["sparse_transpose_matmul"],
                "gemm_floor": ["dense GEMM floor x @ W_enc.T"]}

    extension = backends.BACKENDS["cuda"].extension
    built = "cuda" if extension is not None and extension.build_info().get("cuda", False) else "cpu only"
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {_version('triton')}  "
          f"_C: {built}  shape {shape_name}: N={N} d={d} M={M} k={k} {dtype}")
    print(f"{'op':<24} {'provider':<14} {'median ms':>10} {'vs dense':>9} {'TFLOP/s':>8} {'GB/s':>7} "
          f"{'model ms':>9} {'peak MB':>8}")
    results = []
    floor = None
    for op, providers in list(cases.items()) + [("training_step", step_cases), ("sparse_adam_", optimizer_cases)]:
        for provider, reasons in skipped.get(op, {}).items():
            print(f"{op:<24} {provider:<14} skipped: {'; '.join(reasons)}")
        medians = {}
        for provider, fn in providers.items():
            try:
                times = cuda_time(fn, repeats)
                mem = peak_memory(fn)
            except Exception as error:  # a provider that cannot run this shape (e.g. out of memory)
                print(f"{op:<24} {provider:<14} failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
                torch.cuda.empty_cache()
                continue
            medians[provider] = (statistics.median(times), mem)
            if op == "gemm_floor":
                floor = medians[provider][0]
        base = (medians.get("dense") or medians.get("torch") or (None,))[0]
        for provider, (t, mem) in medians.items():
            rows = [model_rows[name] for name in model_of.get(op, [])]
            flops = sum(r["flops"] for r in rows)
            bytes_ = optimizer_bytes[provider] if op == "sparse_adam_" else sum(r["bytes"] for r in rows)
            # the model describes the Triton kernels (and the GEMM floor), not the CUDA C++ ones
            model_s = sum(r["seconds"] for r in rows) if provider in ("triton", "torch") and rows else float("nan")
            ratio = t / base if base else float("nan")
            extra = f"  {t / floor:.2f}x floor" if op == "training_step" and floor else ""
            print(f"{op:<24} {provider:<14} {t * 1e3:>10.3f} {ratio:>8.2f}x {flops / t / 1e12:>8.1f} "
                  f"{bytes_ / t / 1e9:>7.0f} {model_s * 1e3:>9.3f} {mem / 2**20:>8.1f}{extra}")
            results.append(dict(op=op, provider=provider, shape=dict(N=N, d=d, M=M, k=k), dtype=str(dtype),
                                device=torch.cuda.get_device_name(), seconds=t, vs_dense=ratio,
                                floor_seconds=floor, model_seconds=model_s, peak_bytes=mem,
                                versions=dict(torch=torch.__version__, triton=_version("triton"), extension=built)))
    if json_path:
        with open(json_path, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


def _step_cases(N, d, M, k, dtype, dev, x, gpu_backends=GPU_BACKENDS):
    """provider -> one training step, and backend -> reasons for the GPU backends that cannot run it."""
    import ssae_kernels

    gen = torch.Generator(device=dev).manual_seed(1)

    def params():
        W_enc = (torch.randn(M, d, device=dev, generator=gen) / d**0.5).to(dtype).requires_grad_()
        W_dec = W_enc.detach().clone().requires_grad_()
        b_enc = torch.zeros(M, device=dev, dtype=dtype, requires_grad=True)
        b_dec = torch.zeros(d, device=dev, dtype=dtype, requires_grad=True)
        return W_enc, b_enc, W_dec, b_dec

    def ssae_step(backend, weights):
        def step():
            W_enc, b_enc, W_dec, b_dec = weights
            for p in weights:
                p.grad = None
            with ssae_kernels.use_backend(backend):
                values, indices = ssae_kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)
                x_hat = ssae_kernels.sparse_decode(values, indices, W_dec, b_dec)
                ((x_hat - x).float() ** 2).sum(-1).mean().backward()
        return step

    dense = params()

    def dense_step():
        W_enc, b_enc, W_dec, b_dec = dense
        for p in dense:
            p.grad = None
        values, indices = _dense_encode(x, W_enc, b_enc, k, b_dec)
        x_hat = _dense_code(values, indices, M) @ W_dec + b_dec
        ((x_hat - x).float() ** 2).sum(-1).mean().backward()

    cases, skipped = {}, {}
    for name in gpu_backends:
        reasons = backend_reasons(name, STEP_OPS)
        if reasons:
            skipped[name] = reasons
        else:
            cases[name] = ssae_step(name, params())
    cases["dense"] = dense_step
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import peers

        with contextlib.redirect_stdout(None):
            peer = peers.make_peer_step("eai-sparsify", d=d, M=M, k=k, dtype=dtype, device=dev)
        cases["eai-sparsify"] = lambda: peer.step(x)
    except Exception as error:  # not installed, or fails on this setup
        print(f"eai-sparsify: not benchmarked ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
    return cases, skipped


def _optimizer_cases(indices, M, d, dev, gpu_backends=GPU_BACKENDS):
    """provider -> one optimizer update of a float32 [M, d] weight whose gradient has the rows the code
    ``indices`` selected: ``sparse_adam_`` on those rows (float32 and bfloat16 moments) against fused dense
    Adam over every row; backend -> reasons for the backends that cannot run it; provider -> bytes moved."""
    import ssae_kernels

    gen = torch.Generator(device=dev).manual_seed(2)
    rows = indices.reshape(-1).unique()
    R = rows.numel()
    grad_rows = torch.randn(R, d, device=dev, generator=gen) * 1e-3
    catchup = torch.tensor([[1e-4, 0.9, 0.999, 1e-9]], device=dev).expand(R, 4).contiguous()  # a skipped step

    def sparse(backend, moments):
        W = torch.randn(M, d, device=dev, generator=gen)
        m, v = torch.zeros(M, d, device=dev, dtype=moments), torch.zeros(M, d, device=dev, dtype=moments)

        def step():
            with ssae_kernels.use_backend(backend):
                ssae_kernels.ops.sparse_adam_(W, m, v, rows, grad_rows, catchup, lr=1e-4, beta1=0.9, beta2=0.999,
                                              eps=1e-9, step=10)
        return step

    cases, skipped, moved = {}, {}, {}
    for name in gpu_backends:
        reasons = backend_reasons(name, ("sparse_adam_",))
        if reasons:
            skipped[name] = reasons
            continue
        for moments, label, size in ((torch.float32, name, 4), (torch.bfloat16, f"{name} bf16", 2)):
            cases[label] = sparse(name, moments)
            moved[label] = R * d * (4 * 3 + 2 * 2 * size)  # grad read; weight read + written; moments both
    dense_W = torch.randn(M, d, device=dev, generator=gen, requires_grad=True)
    dense_W.grad = torch.randn(M, d, device=dev, generator=gen) * 1e-3
    adam = torch.optim.Adam([dense_W], lr=1e-4, eps=1e-9, fused=True)
    cases["dense"] = adam.step
    moved["dense"] = M * d * 4 * 7
    return cases, skipped, moved


# ---- the encode grid of issue #13 -----------------------------------------------------------

PEAK_BF16 = 989e12  # dense bf16 FLOP/s of the H100 and H200 SXM (datasheet): the grid's "peak"
GRID = dict(N=(4096,), d=(576, 2304, 4096), M=(65536, 1048576), k=(32, 128))
# Kernel names as benchmarks/gpu_model.py writes them in gpu_model.json, so predictions join on them.
GRID_KERNELS = ("triton_encode", "cuda_encode", "gemm_floor", "torch_topk_mm", "sparsify_encode")
VALUE_TOLERANCE = 0.02  # max |values - torch.topk's| / max |torch.topk's|: bf16 rounds scores to ~0.4%


def model_gpu(device_name: str) -> str:
    """The GPUS entry that models ``device_name`` (A100 for anything not named H100 or H200)."""
    return next((name for name in ("H200", "H100") if name in device_name), "A100")


def grid_shapes(N=GRID["N"], d=GRID["d"], M=GRID["M"], k=GRID["k"]) -> list[tuple[int, int, int, int]]:
    """(N, d, M, k) of every grid point; points sharing (N, d, M) are adjacent, so weights are made once."""
    return [(n, dd, mm, kk) for n in N for dd in d for mm in M for kk in k]


def grid_memory(kernel, N, M, s=2) -> int:
    """Bytes a grid kernel allocates beyond the shared inputs (an upper estimate, to skip what cannot fit)."""
    scores = N * M * s
    return {"gemm_floor": scores,
            "torch_topk_mm": 2 * scores,      # x @ W.T, then + b_enc
            "sparsify_encode": 2 * scores,    # linear with bias, then ReLU
            }.get(kernel, 2**30)              # fused encodes: O(N*k) scratch and bounded score chunks


def load_predictions(path) -> list[dict]:
    """Rows of gpu_model.json (benchmarks/gpu_model.py); [] when there is no such file."""
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def join_predictions(measured: list[dict], predictions: list[dict]) -> list[dict]:
    """Each measured row with the model's predicted_fraction_of_peak for its (kernel, N, d, M, k), and
    measured_over_predicted = fraction_of_peak / prediction (None where either is missing)."""
    def key(row):
        return row["kernel"], int(row["N"]), int(row["d"]), int(row["M"]), int(row["k"])

    predicted = {key(p): float(p["predicted_fraction_of_peak"]) for p in predictions}
    joined = []
    for row in measured:
        p = predicted.get(key(row))
        fraction = row.get("fraction_of_peak")
        joined.append(dict(row, predicted_fraction_of_peak=p,
                           measured_over_predicted=fraction / p if p and fraction is not None else None))
    return joined


def _why(error) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"


def _event_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def time_rounds(fns: dict, repeats: int, warmup: int = 2):
    """Each callable timed once per round with CUDA events, round after round (interleaved,
    docs/benchmarks.md), after ``warmup`` calls each: (name -> seconds per round, name -> why it failed)."""
    failed = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
        except Exception as error:  # e.g. out of memory at this shape: the others still run
            failed[name] = "failed: " + _why(error)
            torch.cuda.empty_cache()
    times = {name: [] for name in fns if name not in failed}
    for _ in range(repeats):
        for name in times:
            times[name].append(_event_seconds(fns[name]))
    return times, failed


def _sparsify_encoder():
    """sparsify's fused encoder (its encode kernel: linear + ReLU + top-k), or (None, why not)."""
    try:
        with contextlib.redirect_stdout(None):  # it prints which decoder it picked
            from sparsify.fused_encoder import fused_encoder
    except Exception as error:  # not installed, or a dependency missing
        return None, "skipped: sparsify not importable (" + _why(error) + ")"
    return fused_encoder, ""


def _free_bytes(dev) -> int | None:
    """Bytes a new allocation can get: free on the device plus what torch's allocator holds unused."""
    if dev.type != "cuda":
        return None
    return torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


def run_grid(shapes, repeats, model_json=MODEL_JSON, device="cuda", gpu_backends=GPU_BACKENDS, on_progress=None):
    """Times the encode kernels at every (N, d, M, k) of ``shapes`` in bfloat16; returns the rows joined
    with the predictions of ``model_json``. ``on_progress(rows)`` is called after each shape (to save)."""
    dev = torch.device(device)
    predictions = load_predictions(model_json)
    print(f"\nencode grid, bfloat16, {len(shapes)} shapes; peak {PEAK_BF16 / 1e12:.0f} TFLOP/s; "
          f"predictions: {f'{len(predictions)} rows from {model_json}' if predictions else f'none ({model_json} missing)'}")
    sparsify = _sparsify_encoder()
    rows, made, inputs = [], None, None
    for N, d, M, k in shapes:
        started = time.perf_counter()
        shape = dict(N=N, d=d, M=M, k=k, dtype="bfloat16")
        if made != (N, d, M):  # new weights: free the old ones first
            inputs = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            need, free = (N * d + M * d + M + d) * 2, _free_bytes(dev)
            if free is not None and need > 0.9 * free:
                note = f"skipped: inputs need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on the GPU"
            else:
                gen = torch.Generator(device=dev).manual_seed(0)
                inputs = (torch.randn(N, d, device=dev, dtype=torch.bfloat16, generator=gen),                 # x
                          torch.randn(M, d, device=dev, dtype=torch.bfloat16, generator=gen).mul_(d**-0.5),   # W_enc
                          torch.randn(M, device=dev, dtype=torch.bfloat16, generator=gen).mul_(0.1),          # b_enc
                          torch.randn(d, device=dev, dtype=torch.bfloat16, generator=gen).mul_(0.1))          # b_dec
            made = (N, d, M)
        if inputs is None:
            shape_rows = [dict(kernel=name, **shape, status="skipped", note=note) for name in GRID_KERNELS]
        else:
            shape_rows = _grid_point(shape, inputs, repeats, dev, gpu_backends, sparsify)
        shape_rows = join_predictions(shape_rows, predictions)
        rows += shape_rows
        for r in shape_rows:
            print(_grid_line(r))
        print(f"  ({time.perf_counter() - started:.1f} s for this shape)")
        if on_progress:
            on_progress(rows)
    return rows


def _grid_point(shape, inputs, repeats, dev, gpu_backends, sparsify) -> list[dict]:
    """One row per GRID_KERNELS entry at one grid point: timed, or skipped/failed with the reason."""
    import ssae_kernels

    N, d, M, k = (shape[key] for key in "NdMk")
    x, W, b_enc, b_dec = inputs

    def ours(backend):
        def encode():
            with ssae_kernels.use_backend(backend):
                return ssae_kernels.topk_encode(x, W, b_enc, k, b_dec=b_dec)
        return encode

    candidates, notes = {"gemm_floor": lambda: x @ W.T}, {}
    for name in gpu_backends:
        reasons = backend_reasons(name, ("topk_encode",))
        if reasons:
            notes[f"{name}_encode"] = "skipped: " + "; ".join(reasons)
        else:
            candidates[f"{name}_encode"] = ours(name)
    candidates["torch_topk_mm"] = lambda: _dense_encode(x, W, b_enc, k, b_dec)
    sparsify_encode, sparsify_note = sparsify
    if sparsify_encode is not None:  # as sparsify's SparseCoder.encode calls it
        candidates["sparsify_encode"] = lambda: sparsify_encode(x - b_dec, W, b_enc, k, "topk")
    else:
        notes["sparsify_encode"] = sparsify_note
    fns, free = {}, _free_bytes(dev)
    for name, fn in candidates.items():
        extra = grid_memory(name, N, M)
        if free is not None and extra > 0.9 * free:
            notes[name] = f"skipped: needs ~{extra / 2**30:.1f} GiB beyond the inputs, {free / 2**30:.1f} GiB free"
        else:
            fns[name] = fn

    times, failed = time_rounds(fns, repeats)
    notes.update(failed)
    errors = _value_errors({name: fns[name] for name in times})
    floor = times.get("gemm_floor")
    rows = []
    for name in GRID_KERNELS:
        row = dict(kernel=name, **shape)
        if name in times:
            t = statistics.median(times[name])
            row.update(status="ok", seconds=t, fraction_of_peak=2 * N * M * d / t / PEAK_BF16,
                       vs_gemm_floor=statistics.median(a / b for a, b in zip(times[name], floor)) if floor else None,
                       max_value_error=errors.get(name), note="")
            if (errors.get(name) or 0) > VALUE_TOLERANCE:
                row["note"] = f"values differ from torch.topk's by {errors[name]:.3g} of their max"
        else:
            note = notes.get(name, "not run")
            row.update(status="skipped" if note.startswith("skipped") else "failed", note=note)
        rows.append(row)
    return rows


def _value_errors(fns) -> dict:
    """max |values - torch.topk's| / max |torch.topk's| per encode, values sorted (sparsify's are not)."""
    if "torch_topk_mm" not in fns:
        return {}
    ref = fns["torch_topk_mm"]()[0].float().sort(dim=1, descending=True).values
    scale = ref.abs().max().clamp_min(1e-30)
    errors = {}
    for name, fn in fns.items():
        if name != "gemm_floor":
            values = fn()[0].float().sort(dim=1, descending=True).values
            errors[name] = float((values - ref).abs().max() / scale)
    return errors


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def _grid_line(r) -> str:
    head = f"{r['kernel']:<16} N={r['N']} d={r['d']:<5} M={r['M']:<8} k={r['k']:<4}"
    if r["status"] != "ok":
        return f"{head} {r['note']}"
    return (f"{head} {r['seconds'] * 1e3:>9.3f} ms {100 * r['fraction_of_peak']:>5.1f}% of peak "
            f"{_fmt(r['vs_gemm_floor'], '.2f')}x floor  predicted {_fmt(r['predicted_fraction_of_peak'], '.1%')} "
            f"measured/predicted {_fmt(r['measured_over_predicted'], '.2f')}  {r['note']}")


# ---- results files --------------------------------------------------------------------------


def run_metadata(repeats) -> dict:
    from ssae_kernels import backends

    extension = backends.BACKENDS["cuda"].extension
    built = "cuda" if extension is not None and extension.build_info().get("cuda", False) else "cpu only"
    try:
        from importlib.metadata import version
        sparsify = version("eai-sparsify")
    except Exception:
        sparsify = None
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return dict(device=torch.cuda.get_device_name(), capability=capability, torch=torch.__version__,
                cuda=torch.version.cuda, triton=_version("triton"), extension=built, sparsify=sparsify,
                repeats=repeats, peak_flops=PEAK_BF16, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                commit=_git_commit())


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def results_markdown(meta, ops_rows, grid_rows) -> str:
    lines = [f"# GPU benchmark: {meta['device']}", "",
             f"Measured by `benchmarks/bench_gpu.py` on {meta['date']}: torch {meta['torch']} (CUDA {meta['cuda']}), "
             f"triton {meta['triton']}, extension {meta['extension']}, sparsify {meta['sparsify'] or 'not installed'}, "
             f"commit {meta['commit'] or 'unknown'}; medians of {meta['repeats']} rounds timed with CUDA events."]
    if grid_rows:
        lines += ["", "## Encode grid (bfloat16)", "",
                  f"Fraction of peak = 2·N·M·d / time / {meta['peak_flops'] / 1e12:.0f} TFLOP/s (dense bf16, H100/H200 "
                  "SXM datasheet); ÷ floor = median over rounds of time ÷ the cuBLAS GEMM `x @ W_enc.T` of the same "
                  "round; predicted = `benchmarks/results/gpu_model.json` (benchmarks/gpu_model.py).", "",
                  "| N | d | M | k | kernel | median ms | fraction of peak | ÷ GEMM floor | predicted | measured ÷ predicted | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in grid_rows:
            ok = r["status"] == "ok"
            lines.append(
                f"| {r['N']} | {r['d']} | {r['M']} | {r['k']} | {r['kernel']} | "
                f"{_fmt(r.get('seconds') and r['seconds'] * 1e3, '.3f')} | {_fmt(r.get('fraction_of_peak'), '.3f')} | "
                f"{_fmt(r.get('vs_gemm_floor'), '.2f')} | {_fmt(r.get('predicted_fraction_of_peak'), '.3f')} | "
                f"{_fmt(r.get('measured_over_predicted'), '.2f')} | {r['note'] if r['note'] or ok else ''} |")
    if ops_rows:
        lines += ["", "## Ops and training step", "",
                  "| shape (N, d, M, k) | dtype | op | provider | median ms | ÷ dense | ÷ GEMM floor | model ms | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ops_rows:
            sh = r["shape"]
            floor = r["seconds"] / r["floor_seconds"] if r.get("floor_seconds") else None
            lines.append(f"| {sh['N']}, {sh['d']}, {sh['M']}, {sh['k']} | {r['dtype']} | {r['op']} | {r['provider']} | "
                         f"{r['seconds'] * 1e3:.3f} | {_fmt(r['vs_dense'], '.2f')} | {_fmt(floor, '.2f')} | "
                         f"{_fmt(r['model_seconds'] and r['model_seconds'] * 1e3, '.3f')} | {r['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir, meta, ops_rows, grid_rows) -> None:
    """bench_gpu.json and bench_gpu.md in ``out_dir``, each written whole (rewritten after every shape)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ops_rows, grid_rows = _no_nan(ops_rows), _no_nan(grid_rows)  # NaN is not JSON: "no value" is None
    files = {"bench_gpu.json": json.dumps(dict(meta=meta, grid=grid_rows, ops=ops_rows), indent=1),
             "bench_gpu.md": results_markdown(meta, ops_rows, grid_rows)}
    for name, text in files.items():
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def _no_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _no_nan(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return "missing"


def _positive(text) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="*", default=["ref"], choices=sorted(SHAPES),
                    help="shapes of the ops and step run (default: ref; none: `--shape` alone, e.g. with --grid)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS), choices=GPU_BACKENDS,
                    help="GPU backends to time (default: all; one that cannot run is listed with its reasons)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="append one JSON line per (op, provider) to this file")
    ap.add_argument("--model", action="store_true", help="print the performance model only (no GPU needed)")
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS), help="GPU of the printed model")
    ap.add_argument("--grid", action="store_true", help="also time the encode over the model grid (bf16)")
    ap.add_argument("--grid-d", nargs="+", type=_positive, default=list(GRID["d"]), help="grid widths d")
    ap.add_argument("--grid-M", nargs="+", type=_positive, default=list(GRID["M"]), help="grid dictionary sizes M")
    ap.add_argument("--grid-k", nargs="+", type=_positive, default=list(GRID["k"]), help="grid k")
    ap.add_argument("--grid-N", nargs="+", type=_positive, default=list(GRID["N"]), help="grid batch rows N")
    ap.add_argument("--out", default=os.environ.get("SSAE_GPU_RESULTS") or str(RESULTS_DIR),
                    help="folder of bench_gpu.json and bench_gpu.md (default: $SSAE_GPU_RESULTS, else "
                         "benchmarks/results/gpu); written only by a run on a GPU")
    ap.add_argument("--model-json", default=str(MODEL_JSON),
                    help="predictions to put beside the grid's measurements (benchmarks/gpu_model.py)")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be at least 5 (medians of at least 5 runs, docs/benchmarks.md)")
    if not args.shape and not args.grid and not args.model:
        ap.error("nothing to run: give --shape NAME..., --grid, or both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model:
        for shape in args.shape:
            for dtype in args.dtype:
                print_model(shape, 4 if dtype == "float32" else 2, args.gpu)
                print()
        return 0
    gpu_backends = tuple(dict.fromkeys(args.backends))
    if torch.cuda.is_available():
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels: before the listing imports triton
    print_backends(gpu_backends)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False), so there is nothing to time. "
              "Run it on a GPU machine; `python benchmarks/bench_gpu.py --model` prints the performance "
              "model without one.")
        return 0
    meta = run_metadata(args.repeats)
    ops_rows, grid_rows = [], []

    def save(rows=None):
        if rows is not None:
            grid_rows[:] = rows
        write_results(args.out, meta, ops_rows, grid_rows)

    for shape in args.shape:
        for dtype in args.dtype:
            ops_rows += run(shape, getattr(torch, dtype), args.repeats, args.json, gpu_backends)
            save()
    if args.grid:
        shapes = grid_shapes(args.grid_N, args.grid_d, args.grid_M, args.grid_k)
        run_grid(shapes, args.repeats, args.model_json, gpu_backends=gpu_backends, on_progress=save)
    print(f"\nresults: {Path(args.out) / 'bench_gpu.json'}, {Path(args.out) / 'bench_gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
