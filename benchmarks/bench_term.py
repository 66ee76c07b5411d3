"""TERM benchmark: fused decode + tilted squared error vs the plain mean vs the unfused composition.

Methods (forward + backward into values, W_dec and b_dec, at N=4096, d=768, M=24576, k=32 float32):
  fused_t500  ssae_kernels.sparse_decode_mse(..., t=500)
  fused_t0    the same op with t=0 (the plain mean)
  unfused     sparse_decode -> square -> sum over d -> logsumexp (the PyTorch composition, t=500)
Peak extra memory of each forward is measured in a fresh process (harness.run_isolated).

    python benchmarks/bench_term.py [--quick] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

METHODS = ("fused_t500", "fused_t0", "unfused")
T = 500.0


def _inputs(N, d, M, k, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(N)]) if N * M <= 2**28 else \
        torch.randint(0, M, (N, k), generator=g)
    values = torch.rand(N, k, generator=g).requires_grad_()
    W = (torch.randn(M, d, generator=g) / d**0.5).requires_grad_()
    b = torch.zeros(d).requires_grad_()
    x = torch.randn(N, d, generator=g)
    return values, indices, W, b, x


def _loss(method, values, indices, W, b, x):
    import torch

    import ssae_kernels

    if method == "unfused":
        errors = ((ssae_kernels.sparse_decode(values, indices, W, b) - x) ** 2).sum(1)
        return (torch.logsumexp(T * errors, 0) - math.log(errors.shape[0])) / T
    return ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=T if method == "fused_t500" else 0.0)


def memory_worker(method, N, d, M, k):
    """Peak extra resident memory of one forward (no grad) and of one forward + backward."""
    import torch

    values, indices, W, b, x = _inputs(N, d, M, k)
    with torch.no_grad():
        _loss(method, values, indices, W, b, x)  # warm-up
        with harness.PeakRSS() as forward:
            _loss(method, values, indices, W, b, x)
    _loss(method, values, indices, W, b, x).backward()
    for p in (values, W, b):
        p.grad = None
    with harness.PeakRSS() as step:
        _loss(method, values, indices, W, b, x).backward()
    return {"forward_extra_bytes": forward.extra, "step_extra_bytes": step.extra}


def timing_worker(N, d, M, k, repeats=5):
    values, indices, W, b, x = _inputs(N, d, M, k)

    def clear():
        for p in (values, W, b):
            p.grad = None

    fns = {m: (lambda m=m: _loss(m, values, indices, W, b, x).backward()) for m in METHODS}
    return harness.time_interleaved(fns, warmup=1, repeats=repeats, setup=clear)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=1024, M=8192 (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--out", default=str(harness.BENCH_DIR / "results"))
    args = parser.parse_args(argv)
    N, d, M, k = (1024, 256, 8192, 16) if args.quick else (4096, 768, 24576, 32)
    shape = {"N": N, "d": d, "M": M, "k": k}
    env = harness.environment(args.threads)
    run_id = harness.new_run_id()
    print(f"TERM benchmark {shape} float32, {args.threads} threads, t={T}")
    times = harness.run_isolated("bench_term:timing_worker", dict(N=N, d=d, M=M, k=k, repeats=args.repeats),
                                 threads=args.threads)
    base = times["fused_t0"]
    records, lines = [], ["| method | median ms | ÷ fused_t0 | forward extra MB | step extra MB |", "|---|---|---|---|---|"]
    for method in METHODS:
        mem = harness.run_isolated("bench_term:memory_worker", dict(method=method, N=N, d=d, M=M, k=k),
                                   threads=args.threads)
        ratio = harness.paired_ratio(times[method], base)
        records.append(harness.make_record(benchmark="term", op="sparse_decode_mse", provider=method, shape=shape,
                                           dtype="float32", device="cpu", versions=env, samples_s=times[method],
                                           peak_extra_bytes=mem["step_extra_bytes"], run_id=run_id,
                                           extra={"ratio_to_fused_t0": ratio, **mem}))
        lines.append(f"| {method} | {1e3 * harness.median(times[method]):.1f} | {ratio:.3f} | "
                     f"{harness.fmt_mb(mem['forward_extra_bytes'])} | {harness.fmt_mb(mem['step_extra_bytes'])} |")
    nd_mb = N * d * 4 / 1e6
    lines.append("")
    lines.append(f"N·d·4 bytes = {nd_mb:.1f} MB (one [N, d] float32 tensor). Ratios are medians of per-round "
                 f"ratios from {args.repeats} interleaved rounds in one process.")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    harness.append_records(out / "term.json", records)
    (out / ("term_quick.md" if args.quick else "term.md")).write_text(
        f"# TERM benchmark\n\n{shape}, float32, {args.threads} threads, t = {T}, forward + backward.\n\n{table}\n")
    return records


if __name__ == "__main__":
    main()
