"""Exact dense retrieval: the fused topk_encode vs torch.topk over torch.mm, in the same run.

Shape of the Specialized-SAE selection step: C = 100,000 embedded chunks (d = 384, all-MiniLM-L6-v2 width,
unit-norm rows), S = 20 seed queries, top 1000 per seed, float32. Methods:
  topk_encode   ssae_kernels.topk_encode(queries, corpus, zero bias, k): the retrieval through our op
  dense_search  ssae_kernels.retrieval.dense_search: the op plus the exact (un-ReLU'd) scores of the hits
  mm_topk       torch.topk(torch.mm(queries, corpus.T), k): the dense PyTorch formulation
Timed round-robin in one fresh process per thread count (harness.time_interleaved); ratios are medians
of per-round ratios to mm_topk.

    python benchmarks/bench_retrieval.py [--threads 2] [--repeats 9] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

METHODS = ("topk_encode", "dense_search", "mm_topk")


def _inputs(C, d, S, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    corpus = torch.nn.functional.normalize(torch.randn(C, d, generator=g), dim=1)
    # seeds near a few corpus rows, as topical queries are: their neighbourhoods are not uniform noise
    queries = torch.nn.functional.normalize(corpus[torch.randint(0, C, (S,), generator=g)]
                                            + 0.5 * torch.randn(S, d, generator=g) / d**0.5, dim=1)
    return queries, corpus


def timing_worker(C, d, S, k, repeats=5):
    import torch

    import ssae_kernels
    from ssae_kernels import retrieval

    queries, corpus = _inputs(C, d, S)
    bias = torch.zeros(C)
    fns = {
        "topk_encode": lambda: ssae_kernels.topk_encode(queries, corpus, bias, k),
        "dense_search": lambda: retrieval.dense_search(queries, corpus, k),
        "mm_topk": lambda: torch.topk(torch.mm(queries, corpus.T), k),
    }
    # the same answer first: indices equal (no ties in random data), scores equal to float32 rounding
    ours, ref = retrieval.dense_search(queries, corpus, k), torch.topk(queries @ corpus.T, k)
    agree = float((ours[1] == ref.indices).double().mean())
    max_diff = float((ours[0] - ref.values).abs().max())
    times = harness.time_interleaved(fns, warmup=2, repeats=repeats)
    return {"times": times, "index_agreement": agree, "max_score_diff": max_diff}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--top", type=int, default=1000)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--omp-wait-policy", choices=("default", "active", "passive"), default="default",
                        help="OMP_WAIT_POLICY of the timing process (recorded). On a busy 2-core machine, spinning "
                             "OpenMP threads cost topk_encode 2x at 2 threads (see retrieval.md)")
    parser.add_argument("--out", default=str(harness.BENCH_DIR / "results"))
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # inherited by run_isolated's child
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
    C, d, S, k = args.chunks, args.dim, args.seeds, args.top
    shape = {"C": C, "d": d, "S": S, "k": k}
    run_id = harness.new_run_id()
    records = []
    lines = ["| threads | method | median ms | ÷ mm_topk |", "|---|---|---|---|"]
    for threads in args.threads:
        env = harness.environment(threads)
        res = harness.run_isolated("bench_retrieval:timing_worker", dict(C=C, d=d, S=S, k=k, repeats=args.repeats),
                                   threads=threads)
        times = res["times"]
        for method in METHODS:
            ratio = harness.paired_ratio(times[method], times["mm_topk"])
            records.append(harness.make_record(
                benchmark="retrieval", op="topk_encode", provider=method, shape=shape, dtype="float32",
                device="cpu", versions=env, samples_s=times[method], run_id=run_id,
                extra={"ratio_to_mm_topk": ratio, "index_agreement": res["index_agreement"],
                       "max_score_diff": res["max_score_diff"], "omp_wait_policy": args.omp_wait_policy}))
            lines.append(f"| {threads} | {method} | {1e3 * harness.median(times[method]):.1f} | {ratio:.3f} |")
        print(f"{threads} threads: indices agree on {100 * res['index_agreement']:.3f}%, "
              f"max score difference {res['max_score_diff']:.2e}")
    lines += ["", f"Ratios: medians of per-round ratios over {args.repeats} interleaved rounds, one fresh process "
                  f"per thread count, OMP_WAIT_POLICY {args.omp_wait_policy}. Bar: topk_encode ÷ mm_topk <= 1. "
                  f"Indices agree with torch.topk except where two scores differ by float32 rounding."]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    harness.append_records(out / "retrieval.json", records)
    (out / "retrieval.md").write_text(f"# Exact retrieval benchmark\n\n{shape}, float32.\n\n{table}\n")
    return records


if __name__ == "__main__":
    main()
