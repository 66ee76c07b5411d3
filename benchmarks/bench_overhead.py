"""Per-call overhead of the ops on small inputs, and the cold start of the package.

Small calls (N=4, d=64, M=256, k=8, float32, CPU): what a call costs when there is
almost no work, against torch's dense equivalent in the same process:

  encode          ssae_kernels.topk_encode(x, W_enc, b_enc, k)  vs  torch.topk(x @ W_enc.T + b_enc, k)
  encode+decode   topk_encode -> sparse_decode -> squared error -> backward (W_enc, b_enc, W_dec, b_dec)
                  vs the dense formulation (x @ W_enc.T, topk, ReLU, scatter into N x M, @ W_dec)

Each sample times a loop of ``--calls`` calls; the two sides run interleaved round by round
(harness.time_interleaved), and the ratio is the median over rounds of ours / torch.

Cold start, in a fresh process per run (``--cold-runs``), after ``import torch``: the time and
resident memory that ``import ssae_kernels`` and the first ``topk_encode`` on CPU tensors add,
and whether they imported triton or torch._dynamo. The bars (issue "ops layer v2"): small calls
<= 1.5x torch, first call <= 0.3 s and <= 20 MB, neither module imported.

    python benchmarks/bench_overhead.py [--threads 1 2] [--repeats 9] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPE = dict(N=4, d=64, M=256, k=8)
CALL_BAR = 1.5
FIRST_CALL_S_BAR = 0.3
FIRST_CALL_MB_BAR = 20.0

_COLD = r"""
import json, resource, sys, time
import torch
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
x, W, b = torch.randn(4, 64), torch.randn(256, 64), torch.randn(256)
before = rss_mb()
t0 = time.perf_counter()
import ssae_kernels
t1 = time.perf_counter()
after_import = rss_mb()
ssae_kernels.topk_encode(x, W, b, 8)
t2 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, first_call_s=t2 - t1, import_mb=after_import - before,
                      first_call_mb=rss_mb() - after_import, triton="triton" in sys.modules,
                      dynamo="torch._dynamo" in sys.modules)))
"""


def _small_inputs(N, d, M, k):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=g)
    W_enc = (torch.randn(M, d, generator=g) / d**0.5).requires_grad_()
    b_enc = torch.zeros(M).requires_grad_()
    W_dec = W_enc.detach().clone().requires_grad_()
    b_dec = (torch.randn(d, generator=g) * 0.1).requires_grad_()
    return x, W_enc, b_enc, W_dec, b_dec


def _loops(calls, N, d, M, k):
    """name -> callable running ``calls`` calls of that method."""
    import torch

    import ssae_kernels

    x, W_enc, b_enc, W_dec, b_dec = _small_inputs(N, d, M, k)
    params = (W_enc, b_enc, W_dec, b_dec)
    W_plain, b_plain = W_enc.detach(), b_enc.detach()

    def ours_encode():
        for _ in range(calls):
            ssae_kernels.topk_encode(x, W_plain, b_plain, k)

    def torch_encode():
        for _ in range(calls):
            torch.topk(x @ W_plain.T + b_plain, k)

    def ours_step():
        for _ in range(calls):
            values, indices = ssae_kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)
            x_hat = ssae_kernels.sparse_decode(values, indices, W_dec, b_dec)
            ((x_hat - x) ** 2).sum().backward()
            for p in params:
                p.grad = None

    def dense_step():
        for _ in range(calls):
            values, indices = torch.topk((x - b_dec) @ W_enc.T + b_enc, k)
            z = torch.zeros(N, M).scatter(1, indices, torch.relu(values))
            x_hat = z @ W_dec + b_dec
            ((x_hat - x) ** 2).sum().backward()
            for p in params:
                p.grad = None

    return {"encode": (ours_encode, torch_encode), "encode+decode fwd+bwd": (ours_step, dense_step)}


def measure_calls(calls: int, repeats: int, threads: int) -> list[dict]:
    harness.set_threads(threads)
    rows = []
    for name, (ours, theirs) in _loops(calls, **SHAPE).items():
        samples = harness.time_interleaved({"ours": ours, "torch": theirs}, warmup=2, repeats=repeats)
        rows.append(dict(case=name, ours_us=harness.median(samples["ours"]) / calls * 1e6,
                         torch_us=harness.median(samples["torch"]) / calls * 1e6,
                         ratio=harness.paired_ratio(samples["ours"], samples["torch"]),
                         samples_ours=samples["ours"], samples_torch=samples["torch"]))
    return rows


def measure_cold(runs: int, threads: int) -> list[dict]:
    env = {**__import__("os").environ, **harness.thread_env(threads)}
    env.pop("TRITON_INTERPRET", None)
    out = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", _COLD], capture_output=True, text=True, env=env, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to measure the small calls at, one table each")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (>= 5)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed sample")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=harness.BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.repeats < harness.MIN_REPEATS:
        parser.error(f"--repeats must be >= {harness.MIN_REPEATS}")

    env = harness.environment(harness.set_threads(args.threads[-1]))
    run_id = harness.new_run_id()
    print(f"threads={args.threads}  load={env['loadavg_1min']}  shape={SHAPE}")
    calls = {threads: measure_calls(args.calls, args.repeats, threads) for threads in args.threads}
    cold = measure_cold(args.cold_runs, args.threads[-1])

    records = []
    for threads, rows in calls.items():
        for row in rows:
            for provider in ("ours", "torch"):
                records.append(harness.make_record(
                    benchmark="overhead", op=row["case"], provider=provider, shape=SHAPE, dtype="float32",
                    device="cpu", versions={**env, "threads": threads},
                    samples_s=[s / args.calls for s in row[f"samples_{provider}"]], run_id=run_id,
                    extra={"ratio_to_torch": row["ratio"]} if provider == "ours" else None))
    first_s = sorted(c["first_call_s"] for c in cold)[len(cold) // 2]
    first_mb = sorted(c["first_call_mb"] for c in cold)[len(cold) // 2]
    import_s = sorted(c["import_s"] for c in cold)[len(cold) // 2]
    import_mb = sorted(c["import_mb"] for c in cold)[len(cold) // 2]
    imported = sorted({m for c in cold for m in ("triton", "dynamo") if c[m]})
    records.append(harness.make_record(
        benchmark="overhead", op="cold start", provider="ours", shape=SHAPE, dtype="float32", device="cpu",
        versions=env, run_id=run_id, extra=dict(runs=cold, first_call_s=first_s, first_call_mb=first_mb)))
    harness.append_records(args.out / "overhead.json", records)

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    lines = [f"# Per-call overhead and cold start ({env['cpu']}, load {env['loadavg_1min']} at the start)",
             "", f"`python benchmarks/bench_overhead.py` — small calls at N={SHAPE['N']}, d={SHAPE['d']}, "
             f"M={SHAPE['M']}, k={SHAPE['k']}, float32; medians of {args.repeats} rounds of {args.calls} calls, "
             "ours and torch interleaved.", "",
             "| threads | case | ours µs/call | torch µs/call | ours ÷ torch | bar ≤ 1.5 |", "|---|---|---|---|---|---|"]
    for threads, rows in calls.items():
        for row in rows:
            lines.append(f"| {threads} | {row['case']} | {row['ours_us']:.1f} | {row['torch_us']:.1f} | "
                         f"{row['ratio']:.2f} | {verdict(row['ratio'] <= CALL_BAR)} |")
    lines += ["", f"Cold start after `import torch` (median of {len(cold)} fresh processes):", "",
              "| | seconds | MB | bar |", "|---|---|---|---|",
              f"| `import ssae_kernels` | {import_s:.3f} | {import_mb:.1f} | |",
              f"| first `topk_encode` (CPU tensors) | {first_s:.3f} | {first_mb:.1f} | "
              f"≤ {FIRST_CALL_S_BAR} s, ≤ {FIRST_CALL_MB_BAR:.0f} MB: "
              f"{verdict(first_s <= FIRST_CALL_S_BAR and first_mb <= FIRST_CALL_MB_BAR)} |",
              "", f"Modules imported by the import and the first call: "
              f"{', '.join(imported) if imported else 'neither triton nor torch._dynamo'} "
              f"({verdict(not imported)})."]
    text = "\n".join(lines) + "\n"
    (args.out / "overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
