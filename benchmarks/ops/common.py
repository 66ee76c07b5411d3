"""Shared pieces of the per-op benchmarks ``benchmarks/ops/bench_<op>.py``: arguments, shapes, timing of
one (ours, baseline) case, records and the markdown table.

A script defines ``build_cases(shape, device, dtype) -> list[Case]`` and calls
``common.main(module, __doc__, build_cases, notes)``. For every shape and case, ours and the baseline
run once untimed (their outputs are compared: ``max rel diff``), then in one process round by round
(``harness.time_interleaved``: one warm-up round, ``--repeats`` timed rounds). A round of a call that
takes less than ``--min-sample-ms`` runs it several times back to back (the same count for ours and the
baseline) and its time is divided by that count. ``ours/baseline`` is the median over rounds of the
per-round ratio (``harness.paired_ratio``): below 1 means ours is faster.

Results: ``<out>/<op>.json`` (records appended, one run id per invocation) and ``<out>/<op>.md`` (the
table of this run).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402

OPS_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = harness.BENCH_DIR / "results" / "ops"

# SAE shapes (N rows, d width, M latents, k active). "ref" is the reference shape of docs/benchmarks.md.
SHAPES = {
    "small": dict(N=4, d=64, M=256, k=8),  # one small call: dispatch and per-call overhead
    "mid": dict(N=1024, d=768, M=8192, k=32),
    "ref": dict(N=2048, d=768, M=24576, k=32),
}
QUICK_SHAPES = ("small", "mid")
SMOKE_SHAPES = ("small",)
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class Case:
    """One timed comparison: ``ours()`` against ``baseline()``; both return what is compared (tensors)."""

    op: str  # the op timed, e.g. "topk_encode" or "sampled_dot"
    case: str  # e.g. "forward", "forward+backward, b_enc=None"
    ours: Callable
    baseline: Callable
    baseline_desc: str  # the baseline formulation, as code
    shape: dict | None = None  # shape to report, if not the SAE shape (e.g. project_subspace's d, n, r)
    # (ours output, baseline output) -> (max rel diff, extra facts for the record); default: max_rel_diff
    compare: Callable | None = None
    extra: dict = field(default_factory=dict)
    memory: bool = False  # also measure each side's peak memory above the start of one call


def parser(module: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and OpenMP)")
    p.add_argument("--repeats", type=int, default=harness.MIN_REPEATS, help="timed rounds (>= 5)")
    p.add_argument("--quick", action="store_true",
                   help=f"shapes {', '.join(QUICK_SHAPES)} only, without the reference shape")
    p.add_argument("--smoke", action="store_true",
                   help=f"shape {', '.join(SMOKE_SHAPES)} only and short rounds (for tests of the script)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                   help="shapes to run (overrides --quick/--smoke)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="repeat a fast call within a round until a round takes this long (default 2, --smoke 0.2)")
    p.add_argument("--omp-wait-policy", choices=("default", "active", "passive"), default="default",
                   help="OMP_WAIT_POLICY for this process (recorded); on a busy machine spinning OpenMP threads "
                        "can slow calls that open a parallel region by orders of magnitude")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"writes <out>/{module}.json and <out>/{module}.md")
    return p


def parse_args(module: str, doc: str, argv=None) -> argparse.Namespace:
    p = parser(module, doc)
    args = p.parse_args(argv)
    # OpenMP reads these when it starts (at the first parallel region): set them before torch is imported.
    # (The scripts import torch only after parsing; harness.set_threads fixes the count again anyway.)
    os.environ.update(harness.thread_env(args.threads))
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.repeats < harness.MIN_REPEATS:
        p.error(f"--repeats must be at least {harness.MIN_REPEATS} (medians of at least 5 runs, docs/benchmarks.md)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here")
    if args.shapes is None:
        args.shapes = list(SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else SHAPES)
    if args.min_sample_ms is None:
        args.min_sample_ms = 0.2 if args.smoke else 2.0
    return args


# ---------------------------------------------------------------------------------------------- running


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


def max_rel_diff(ours, baseline) -> float:
    """max over output tensors of max|a - b| / max|b| (float64); NaN if they do not pair up."""
    a, b = list(_tensors(ours)), list(_tensors(baseline))
    if len(a) != len(b) or not a:
        return float("nan")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("nan")
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        scale = float(y.abs().max()) if y.numel() else 0.0
        diff = float((x - y).abs().max()) if y.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _freeze():
    # The harness collects garbage before every timed call: with torch's objects in the collector's
    # generations that takes ~0.1 s a call. Frozen objects are skipped; new garbage is still collected.
    gc.collect()
    gc.freeze()


def _repeat(fn, n):
    if n == 1:
        return fn

    def many():
        for _ in range(n):
            fn()
    return many


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def measure(case: Case, *, device, repeats: int, min_sample_s: float) -> dict:
    """Run one case: {"status", "reason", "ours", "baseline" (per-call seconds per round), "ratio", ...}."""
    try:
        t0 = time.perf_counter()
        out_ours = case.ours()
        harness._sync(device)
        probe = time.perf_counter() - t0
    except Exception as error:  # recorded with its reason, the other cases still run
        return {"status": "error", "reason": "ours: " + _reason(error)}
    try:
        t0 = time.perf_counter()
        out_base = case.baseline()
        harness._sync(device)
        probe = min(probe, time.perf_counter() - t0)
    except Exception as error:
        return {"status": "error", "reason": "baseline: " + _reason(error)}
    diff, facts = case.compare(out_ours, out_base) if case.compare else (max_rel_diff(out_ours, out_base), {})
    del out_ours, out_base
    if case.memory:  # after the probe calls: one-off allocations (caches, lazy state) are already made
        facts["peak_MB_ours"] = harness.peak_call_bytes(case.ours, device) / 1e6
        facts["peak_MB_baseline"] = harness.peak_call_bytes(case.baseline, device) / 1e6
    _freeze()  # the first calls may have imported more
    calls = 1
    if probe < min_sample_s:  # the first call may include one-off costs: time one more round to size the rounds
        once = harness.time_interleaved({"ours": case.ours, "baseline": case.baseline}, warmup=0, repeats=1,
                                        device=device)
        fastest = max(min(once["ours"][0], once["baseline"][0]), 1e-7)
        calls = max(1, min(10_000, math.ceil(min_sample_s / fastest)))
    samples = harness.time_interleaved({"ours": _repeat(case.ours, calls), "baseline": _repeat(case.baseline, calls)},
                                       warmup=1, repeats=repeats, device=device)
    ours = [s / calls for s in samples["ours"]]
    base = [s / calls for s in samples["baseline"]]
    return {"status": "ok", "reason": None, "ours": ours, "baseline": base,
            "ratio": harness.paired_ratio(ours, base), "calls_per_round": calls, "max_rel_diff": diff, "facts": facts}


def fmt_ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1 else f"{ms:.4g}" if ms < 1000 else f"{ms:.0f}"


def shape_label(name: str, shape: dict) -> str:
    return f"{name} ({' '.join(f'{k}={v}' for k, v in shape.items())})"


TABLE_HEAD = ["| shape | op | case | baseline | ours ms | baseline ms | ours/baseline | max rel diff |",
              "|---|---|---|---|---|---|---|---|"]


def table_row(shape_name, shape, case: Case, result: dict) -> str:
    cells = [shape_label(shape_name, shape), case.op, case.case, f"`{case.baseline_desc}`"]
    if result["status"] == "ok":
        cells += [fmt_ms(harness.median(result["ours"])), fmt_ms(harness.median(result["baseline"])),
                  f"{result['ratio']:.3f}", f"{result['max_rel_diff']:.1e}"
                  + "".join(f", {k} {v:.4g}" for k, v in result["facts"].items())]
    else:
        cells += [f"{result['status']}: {result['reason']}".replace("|", "\\|"), "-", "-", "-"]
    return "| " + " | ".join(cells) + " |"


def records_for(module, shape_name, shape, case: Case, result, *, dtype, device, env, run_id) -> list[dict]:
    fields = dict(benchmark=f"ops/{module}", op=case.op, shape=shape, dtype=dtype, device=device, versions=env,
                  run_id=run_id)
    extra = dict(shape_name=shape_name, case=case.case, baseline=case.baseline_desc, **case.extra)
    if result["status"] != "ok":
        return [harness.make_record(provider=p, status=result["status"], reason=result["reason"], extra=extra,
                                    **fields) for p in ("ssae", "torch")]
    extra.update(calls_per_round=result["calls_per_round"], max_rel_diff=result["max_rel_diff"], **result["facts"])
    return [
        harness.make_record(provider="ssae", samples_s=result["ours"],
                            extra=dict(extra, ratio_to_baseline=result["ratio"]), **fields),
        harness.make_record(provider="torch", samples_s=result["baseline"], extra=dict(extra, ratio_to_baseline=1.0),
                            **fields),
    ]


def main(module: str, doc: str, build_cases: Callable, notes=(), argv=None, memory: bool = False) -> list[dict]:
    """Parse the arguments, run every case of every shape, print and write the results; returns the records.
    ``memory``: some cases measure peak memory, which on the CPU needs ``harness.MALLOC_ENV`` (so that freed
    buffers leave the resident set): run from the command line, the process starts again with it when it is
    missing."""
    args = parse_args(module, doc, argv)
    if memory and argv is None and args.device == "cpu" and any(os.environ.get(k) != v for k, v in harness.MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **harness.MALLOC_ENV})
    import torch

    import ssae_kernels  # noqa: F401  (registers torch.ops.ssae)

    _freeze()
    threads = harness.set_threads(args.threads)
    env = harness.environment(threads)
    env["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    run_id = harness.new_run_id()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else env["cpu"]
    header = (f"{args.dtype}, device {args.device} ({machine}), {threads} threads, OMP_WAIT_POLICY "
              f"{env['omp_wait_policy'] or 'unset'}, {args.repeats} timed rounds after 1 warm-up, shapes "
              f"{', '.join(args.shapes)} ({mode} run); torch {env['torch']}, git {env['git']}, load average "
              f"{env['loadavg_1min']} at the start; run {run_id}")
    print(f"ops/{module}: {header}", flush=True)
    print("\n".join(TABLE_HEAD), flush=True)
    rows, records = [], []
    for shape_name in args.shapes:
        sae_shape = SHAPES[shape_name]
        torch.manual_seed(0)
        cases = build_cases(sae_shape, device, dtype)
        _freeze()
        for case in cases:
            result = measure(case, device=device, repeats=args.repeats, min_sample_s=args.min_sample_ms / 1e3)
            shape = case.shape or sae_shape
            row = table_row(shape_name, shape, case, result)
            rows.append(row)
            print(row, flush=True)
            records += records_for(module, shape_name, shape, case, result, dtype=args.dtype, device=device,
                                   env=env, run_id=run_id)
        del cases
    out = Path(args.out)
    harness.append_records(out / f"{module}.json", records)
    command = shlex.join(["python", f"benchmarks/ops/bench_{module}.py", *(sys.argv[1:] if argv is None else argv)])
    body = [f"# ops/{module}", "", f"`{command}`", "", header + ".", "",
            *TABLE_HEAD, *rows, "",
            "`ours ms`, `baseline ms`: median time of one call over the timed rounds; ours and the baseline run "
            "interleaved round by round in one process. `ours/baseline`: the median over rounds of the per-round "
            "ratio (below 1: ours is faster). `max rel diff`: max |ours - baseline| / max |baseline| over the "
            "compared outputs (values, or the gradients after a backward pass), one untimed call each.",
            *[f"\n{n}" for n in notes], ""]
    (out / f"{module}.md").write_text("\n".join(body))
    print(f"wrote {out / (module + '.json')} and {out / (module + '.md')}", flush=True)
    gc.unfreeze()  # let the interpreter free them at exit (else extensions report leaks)
    return records


# ---------------------------------------------------------------------------------------------- inputs


def sae_inputs(shape: dict, device, dtype, seed: int = 0) -> dict:
    """Random SAE tensors of one shape: x [N, d], W_enc [M, d], b_enc [M], W_dec [M, d], b_dec [d], and a
    TopK code (values [N, k] > 0, indices [N, k] distinct within a row) and a gradient grad [N, d]."""
    import torch

    N, d, M, k = (shape[key] for key in ("N", "d", "M", "k"))
    g = torch.Generator().manual_seed(seed)

    def make(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    indices = torch.rand(N, M, generator=g).topk(k, dim=1).indices.to(device)
    return dict(
        x=make(N, d),
        W_enc=make(M, d, scale=d**-0.5),
        b_enc=make(M, scale=0.1),
        W_dec=make(M, d, scale=d**-0.5),
        b_dec=make(d, scale=0.1),
        values=torch.rand(N, k, generator=g).to(device=device, dtype=dtype),
        indices=indices,
        grad=make(N, d),
    )


def no_grad_call(fn, *args):
    """A case's call of ``fn(*args)`` without autograd (a forward pass)."""
    import torch

    def call():
        with torch.no_grad():
            return fn(*args)
    return call


def backward_call(fn, args, params, grad):
    """A case's call of ``fn(*args)`` whose first output is backpropagated with ``grad``: returns the outputs and
    the gradients of the parameters in ``params`` that are not None (cleared first)."""
    trained = [p for p in params if p is not None]

    def call():
        clear(trained)
        out = fn(*args)
        out[0].backward(grad)
        return (*out, grads(trained))
    return call


def leaves(*tensors):
    """Detached copies that require grad (the parameters of a forward+backward case)."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads(params):
    return tuple(p.grad for p in params)


def clear(params):
    for p in params:
        p.grad = None
