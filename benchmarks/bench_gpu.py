"""GPU benchmark of the GPU backends (Triton and CUDA C++), side by side in one run: their ops and
a TopK-SAE training step against the dense PyTorch formulation, eai-sparsify (when importable) and
the GEMM floor, beside the performance model of docs/triton.md (a model of the Triton kernels).

    python benchmarks/bench_gpu.py [--dtype bfloat16] [--shape ref] [--repeats 20] [--json results.jsonl]
                                   [--backends triton cuda]
    python benchmarks/bench_gpu.py --model [--shape ref]     # the model alone, no GPU needed

Each GPU backend (provider `triton`, `cuda`) runs every op and the step through
``ssae_kernels.use_backend(name)``. A backend that cannot serve an op on CUDA tensors (e.g. `_C`
built without SSAE_BUILD_CUDA=1) is listed at the start and in that op's row with the reasons
``ssae_kernels.backends`` gives, and skipped.

Per shape and dtype it reports, for each op and provider: median time over --repeats timed runs
(CUDA events, after warm-up), the ratio to the dense PyTorch formulation of the same op, achieved
TFLOP/s or GB/s, the model's estimate, and the peak memory allocated during one call above what
was allocated before it. The training step (encode -> decode -> per-row squared error, mean ->
backward into W_enc, b_enc, W_dec, b_dec) is also reported as a multiple of one dense GEMM
x @ W_enc.T (the floor, docs/benchmarks.md).

Without a CUDA device it lists the backends, prints why nothing is timed and exits 0. It does not
depend on benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

SHAPES = {  # N, d, M, k
    "ref": (2048, 768, 24576, 32),  # the reference shape of docs/benchmarks.md
    "large": (8192, 2048, 65536, 64),
    "wide": (4096, 768, 262144, 32),
}

# Peak numbers for the model: dense bf16/fp16 tensor-core FLOP/s, HBM bytes/s, int32 lanes per SM
# per clock, SM count, clock (Hz). H100 SXM5 and A100 SXM4 (80 GB) datasheets.
GPUS = {
    "H100": dict(tflops=989e12, bandwidth=3.35e12, int_lanes=64, sms=132, clock=1.83e9),
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
    kp = max(2, 1 << max(0, (min(k, te.MAX_KP) - 1).bit_length()))
    size = 2 if dtype_bytes == 2 else 4
    cfg = min((b, c) for (b, sz), c in te.ENCODE_CONFIGS.items() if sz == size and b >= kp)[1]
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


def _dense_code(values, indices, M):
    return torch.zeros(values.shape[0], M, dtype=values.dtype, device=values.device).scatter_(1, indices, values)


GPU_BACKENDS = ("triton", "cuda")
# The primitives one training step runs (forward and backward).
STEP_OPS = ("topk_encode", "sparse_decode", "sampled_dot", "latent_transpose", "sparse_transpose_matmul")


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
    gpu = "H100" if "H100" in torch.cuda.get_device_name() else "A100"
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

    def on(backend, fn):
        def call():
            with ssae_kernels.use_backend(backend):
                return fn()
        return call

    def ours(backend):  # op -> callable on ``backend``
        return {
            "topk_encode": on(backend, lambda: ssae_kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)),
            "sparse_decode": on(backend, lambda: ssae_kernels.sparse_decode(values, indices, W_dec, b_dec)),
            "sampled_dot": on(backend, lambda: ops.sampled_dot(grad, indices, W_dec)),
            "latent_transpose": on(backend, lambda: ops.latent_transpose(indices, M)),
            "sparse_transpose_matmul": on(backend, lambda: ops.sparse_transpose_matmul(values, grad, offsets, order)),
        }

    baselines = {  # op -> provider -> callable
        "gemm_floor": {"torch": lambda: x @ W_enc.T},
        "topk_encode": {"dense": lambda: _dense_encode(x, W_enc, b_enc, k, b_dec)},
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
    for op in STEP_OPS:
        cases[op] = {}
        for name in gpu_backends:
            reasons = backend_reasons(name, (op,))
            if reasons:
                skipped.setdefault(op, {})[name] = reasons
            else:
                cases[op][name] = per_backend[name][op]
        cases[op].update(baselines[op])
    step_cases, skipped["training_step"] = _step_cases(N, d, M, k, dtype, dev, x, gpu_backends)
    model_rows, _ = model(N, d, M, k, s, gpu)
    model_of = {"topk_encode": ["encode (fused GEMM + top-k)", "encode merge", "fold bias (W @ b_dec)"],
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
    for op, providers in list(cases.items()) + [("training_step", step_cases)]:
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
            bytes_ = sum(r["bytes"] for r in rows)
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


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return "missing"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", default=["ref"], choices=sorted(SHAPES))
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS), choices=GPU_BACKENDS,
                    help="GPU backends to time (default: all; one that cannot run is listed with its reasons)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="append one JSON line per (op, provider) to this file")
    ap.add_argument("--model", action="store_true", help="print the performance model only (no GPU needed)")
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS), help="GPU of the printed model")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be at least 5 (medians of at least 5 runs, docs/benchmarks.md)")

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
    for shape in args.shape:
        for dtype in args.dtype:
            run(shape, getattr(torch, dtype), args.repeats, args.json, gpu_backends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
