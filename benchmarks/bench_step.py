"""TopK-SAE training-step benchmark: ours vs the dense PyTorch formulation, the GEMM floor and the peers.

One step = encode -> decode -> per-row squared error summed over d, mean over rows -> backward
(gradients on W_enc, b_enc, W_dec, b_dec; x has none), no optimizer step, gradients set to None
between steps. Methods:

  gemm_floor   x @ W_enc.T alone, forward only: the hardware floor of the step (docs/benchmarks.md)
  ssae         ssae_kernels.topk_encode + ssae_kernels.sparse_decode (ours)
  dense        plain PyTorch: pre = (x - b_dec) @ W_enc.T + b_enc, topk, ReLU, scatter into a dense
               N x M code, decode with a matmul
  eai-sparsify, sae-lens, sae-lens-sparse   the peers of benchmarks/peers.py, when they run here
  ssae_encode, dense_encode   the encode forward alone (no grad), for the encode-memory bar

Per shape, every method's peak memory is measured in its own fresh process (harness.run_isolated:
warm-up step, reset VmHWM, one step; reported above inputs, weights and gradients), then all methods
are timed in ONE process: ours interleaved round by round with the floor, each peer interleaved with
the floor, warm-up then >= 5 timed rounds. "x floor" is the median over rounds of time / floor time.

    python benchmarks/bench_step.py [--quick] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

REF = {"N": 2048, "d": 768, "M": 24576, "k": 32}
M_SWEEP = (4096, 8192, 16384, 24576, 65536, 131072, 262144)
M_QUICK = (4096, 8192, 24576)  # ~3-4 min on 2 idle cores; 65536 alone would add ~5
OWN = ("gemm_floor", "ssae", "dense", "ssae_encode", "dense_encode")
PEERS = ("eai-sparsify", "sae-lens", "sae-lens-sparse")  # = peers.PEERS, without importing the peers here
METHODS = OWN + PEERS
STEP_METHODS = ("ssae", "dense") + PEERS
OPS = {"gemm_floor": "gemm", "ssae_encode": "encode_forward", "dense_encode": "encode_forward"}

# Memory estimate per method for skipping shapes that cannot fit: resident weights (+grads) in units of
# M*d elements, transient memory in units of N*M elements. The N*M factors come from the peaks
# measured at the reference shape (dense 787 MB, sparsify 578 MB, SAELens 1261 MB over N*M*4 =
# 201 MB), rounded up; ours is O(N*k + N*d).
_MD_UNITS = {"gemm_floor": 1, "ssae_encode": 1, "dense_encode": 1}
_NM_UNITS = {"gemm_floor": 1, "ssae": 0, "dense": 4.5, "ssae_encode": 0, "dense_encode": 2,
             "eai-sparsify": 3.5, "sae-lens": 7, "sae-lens-sparse": 7}
_FIT_MARGIN = 1.3


def estimate_bytes(method, N, d, M, k, dtype) -> int:
    s = torch.empty((), dtype=dtype).element_size()
    md = _MD_UNITS.get(method, 4)  # W_enc, W_dec and their gradients
    return int(s * (md * M * d + _NM_UNITS[method] * N * M + 4 * N * d + 8 * N * k))


def fit_problem(methods, N, d, M, k, dtype) -> str | None:
    """None if the largest of ``methods`` fits in available memory now, else why not."""
    need = max(estimate_bytes(m, N, d, M, k, dtype) for m in methods) * _FIT_MARGIN
    have = harness.mem_available_bytes()
    if have is not None and need > have:
        return f"would not fit: needs ~{need / 1e9:.1f} GB (estimate), {have / 1e9:.1f} GB available"
    return None


# ---------------------------------------------------------------------------------------------- the steps


class OwnCase:
    """Inputs and weights shared by gemm_floor, ssae, dense and the encode-only methods."""

    def __init__(self, N, d, M, k, dtype, seed=0, need_decoder=True):
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.x = torch.randn(N, d, generator=g, dtype=dtype)
        # The usual TopK-SAE init (Gao et al.): unit-norm decoder rows, encoder = decoder.
        W = torch.randn(M, d, generator=g, dtype=dtype)
        W /= W.norm(dim=1, keepdim=True)
        self.W_enc = W.requires_grad_()
        self.b_enc = (0.01 * torch.randn(M, generator=g, dtype=dtype)).requires_grad_()
        self.b_dec = (0.01 * torch.randn(d, generator=g, dtype=dtype)).requires_grad_()
        self.W_dec = W.detach().clone().requires_grad_() if need_decoder else None
        self.params = [p for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec) if p is not None]

    def drop_grads(self):
        for p in self.params:
            p.grad = None

    def gemm_floor(self):
        with torch.no_grad():
            torch.mm(self.x, self.W_enc.T)

    def ssae(self):
        import ssae_kernels

        values, indices = ssae_kernels.topk_encode(self.x, self.W_enc, self.b_enc, self.k, b_dec=self.b_dec)
        x_hat = ssae_kernels.sparse_decode(values, indices, self.W_dec, self.b_dec)
        loss = (x_hat - self.x).pow(2).sum(-1).mean()
        loss.backward()
        return loss.detach()

    def dense(self):
        pre = F.linear(self.x - self.b_dec, self.W_enc, self.b_enc)
        top = pre.topk(self.k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        x_hat = z @ self.W_dec + self.b_dec
        loss = (x_hat - self.x).pow(2).sum(-1).mean()
        loss.backward()
        return loss.detach()

    def ssae_encode(self):
        import ssae_kernels

        with torch.no_grad():
            return ssae_kernels.topk_encode(self.x, self.W_enc, self.b_enc, self.k, b_dec=self.b_dec)

    def dense_encode(self):
        with torch.no_grad():
            top = F.linear(self.x - self.b_dec, self.W_enc, self.b_enc).topk(self.k, dim=-1, sorted=False)
            return top.values.relu(), top.indices


class PeerCase:
    def __init__(self, name, N, d, M, k, dtype, seed=0):
        import peers

        with contextlib.redirect_stdout(sys.stderr):  # sparsify prints its decoder choice on import
            self.peer = peers.make_peer_step(name, d=d, M=M, k=k, dtype=dtype, device="cpu", seed=seed)
        self.x = torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        self.params = list(self.peer.module.parameters())

    def drop_grads(self):
        for p in self.params:
            p.grad = None

    def step(self):
        return self.peer.step(self.x)


def _grad_bytes(params) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def _build(method, N, d, M, k, dtype, seed):
    """(case, callable running one measured call)."""
    if method in PEERS:
        case = PeerCase(method, N, d, M, k, dtype, seed)
        return case, case.step
    case = OwnCase(N, d, M, k, dtype, seed, need_decoder=method in ("ssae", "dense"))
    return case, getattr(case, method)


def _backend_name():
    from ssae_kernels import backends

    x, W = torch.zeros(1, 1), torch.zeros(1, 1)
    return backends.select("topk_encode", (x, W, None, 1, None)).name


# ---------------------------------------------------------------------------------------------- workers
# These run in fresh processes via harness.run_isolated and return JSON-able dicts.


def memory_worker(method, N, d, M, k, dtype="float32", seed=0):
    """Peak RSS of one call of ``method`` above inputs, weights and (for steps) the gradients it leaves."""
    problem = harness.rss_measurement_problem()
    if problem:
        raise RuntimeError(problem)
    case, fn = _build(method, N, d, M, k, getattr(torch, dtype), seed)
    fn()  # warm-up: thread pools, oneDNN primitives, lazily loaded code are first-call costs, not the step's
    case.drop_grads()
    with harness.PeakRSS() as m:
        out = fn()
        del out  # the step's outputs are transient too
    grads = _grad_bytes(case.params) if method in STEP_METHODS else 0
    return {"baseline_bytes": m.baseline, "peak_bytes": m.peak, "raw_extra_bytes": m.extra,
            "grad_bytes": grads, "extra_bytes": m.extra - grads}


def timing_worker(methods, N, d, M, k, dtype="float32", seed=0, warmup=1, repeats=5):
    """Time ``methods`` at one shape in this one process. Returns method -> {samples, floor_samples} or {error}."""
    dt = getattr(torch, dtype)
    out: dict[str, dict] = {}
    own = [m for m in OWN if m in methods]
    peer_list = [m for m in PEERS if m in methods]
    case = OwnCase(N, d, M, k, dt, seed, need_decoder=any(m in ("ssae", "dense") for m in own))
    fns = {m: getattr(case, m) for m in dict.fromkeys(["gemm_floor"] + own)}

    def first_call(name, fn, drop):
        # The first warm-up round, one method at a time, so that one failing method only loses itself.
        try:
            drop()
            res = fn()
            if name in STEP_METHODS:
                out.setdefault(name, {})["loss"] = float(res)
            return True
        except Exception as e:  # e.g. out of memory: report it, time the others
            out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            return False

    fns = {m: fn for m, fn in fns.items() if first_call(m, fn, case.drop_grads)}
    if "gemm_floor" not in fns:
        return out
    if "ssae" in fns:
        out["ssae"]["backend"] = _backend_name()
    samples = harness.time_interleaved(fns, warmup=warmup - 1, repeats=repeats, setup=case.drop_grads)
    for m in own:
        if m in fns:
            out.setdefault(m, {}).update(samples=samples[m], floor_samples=samples["gemm_floor"])
    # Peers: the ssae/dense weights go, the floor's W_enc stays for the floor rounds beside each peer.
    case.W_dec = None
    case.params = [case.W_enc]
    case.drop_grads()
    floor = case.gemm_floor
    for name in peer_list:
        try:
            peer, step = _build(name, N, d, M, k, dt, seed)
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            continue
        if first_call(name, step, peer.drop_grads):
            s = harness.time_interleaved({"gemm_floor": floor, name: step}, warmup=warmup - 1, repeats=repeats,
                                         setup=peer.drop_grads)
            out[name].update(samples=s[name], floor_samples=s["gemm_floor"])
        del peer, step
    return out


# ---------------------------------------------------------------------------------------------- driver


def _peer_availability(wanted):
    """name -> None or reason, checked in a child process (peers import triton, sparsify, sae_lens)."""
    if not wanted:
        return {}
    try:
        res = harness.run_isolated("bench_step:_available_peers_child", {}, threads=1, malloc_env=False)
    except harness.IsolatedRunError as e:
        return {name: f"availability check failed: {str(e).splitlines()[0]}" for name in wanted}
    return {name: res.get(name, "not a known peer") for name in wanted}


def _available_peers_child():
    import peers

    with contextlib.redirect_stdout(sys.stderr):
        return peers.available_peers()


def run_shape(methods, avail, N, d, M, k, dtype, threads, warmup, repeats, env, run_id, seed=0, log=print):
    """Measure every method at one shape; return its records."""
    dt = getattr(torch, dtype)
    shape = {"N": N, "d": d, "M": M, "k": k}
    status: dict[str, tuple[str, str]] = {}  # method -> (status, reason) for methods that cannot run
    for m in methods:
        if m in PEERS and avail.get(m):
            status[m] = ("unavailable", avail[m])
        elif (why := fit_problem([m], N, d, M, k, dt)) is not None:
            status[m] = ("skipped", why)
    if "gemm_floor" in status:
        for m in methods:
            status.setdefault(m, ("skipped", f"no GEMM floor at this shape: {status['gemm_floor'][1]}"))
    runnable = [m for m in methods if m not in status]

    mem: dict[str, dict] = {}
    for m in runnable:
        log(f"  M={M}: peak memory of {m} (fresh process) ...")
        try:
            mem[m] = harness.run_isolated(
                "bench_step:memory_worker",
                {"method": m, "N": N, "d": d, "M": M, "k": k, "dtype": dtype, "seed": seed}, threads=threads,
            )
        except harness.IsolatedRunError as e:
            mem[m] = {"error": str(e).strip().splitlines()[-1]}

    timing: dict[str, dict] = {}
    if runnable:
        log(f"  M={M}: timing {', '.join(runnable)} in one process ...")
        try:
            # The default allocator here: timing is of the code as users run it.
            timing = harness.run_isolated(
                "bench_step:timing_worker",
                {"methods": runnable, "N": N, "d": d, "M": M, "k": k, "dtype": dtype, "seed": seed,
                 "warmup": warmup, "repeats": repeats},
                threads=threads, malloc_env=False,
            )
        except harness.IsolatedRunError as e:
            reason = str(e).strip().splitlines()[-1]
            timing = {m: {"error": f"timing process failed: {reason}"} for m in runnable}

    records = []
    for m in methods:
        rec_status, reason, samples, extra = "ok", None, None, {}
        if m in status:
            rec_status, reason = status[m]
        else:
            t = timing.get(m, {"error": "not timed"})
            if "error" in t:
                rec_status, reason = "error", t["error"]
            else:
                samples = t["samples"]
                extra["floor_samples_s"] = t["floor_samples"]
                extra["floor_median_s"] = harness.median(t["floor_samples"])
                extra["ratio_to_floor"] = harness.paired_ratio(t["samples"], t["floor_samples"])
            for key in ("loss", "backend"):
                if key in t:
                    extra[key] = t[key]
            mm = mem.get(m, {})
            if "error" in mm:
                extra["memory_error"] = mm["error"]
            else:
                extra.update({key: mm[key] for key in ("baseline_bytes", "peak_bytes", "raw_extra_bytes",
                                                       "grad_bytes")})
        records.append(harness.make_record(
            benchmark="step", op=OPS.get(m, "train_step"), provider=m, shape=shape, dtype=dtype, device="cpu",
            versions=env, samples_s=samples, peak_extra_bytes=mem.get(m, {}).get("extra_bytes"),
            status=rec_status, reason=reason, run_id=run_id, extra=extra,
        ))
    return records


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_rows(records):
    rows = []
    for r in records:
        e = r["extra"]
        note = r["reason"] if r["status"] != "ok" else e.get("memory_error", "")
        rows.append([r["provider"], str(r["shape"]["M"]), _fmt(r["median_s"] and r["median_s"] * 1e3, ".1f"),
                     _fmt(e.get("ratio_to_floor"), ".2f"), harness.fmt_mb(r["peak_extra_bytes"]),
                     r["status"] + (f": {note}" if note else "")])
    return rows


HEADER = ["method", "M", "median ms", "x floor", "peak extra MB", "status"]


def format_table(records) -> str:
    rows = [HEADER] + table_rows(records)
    widths = [max(len(row[i]) for row in rows[:]) if i < 5 else 0 for i in range(6)]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if 0 < i < 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _get(records, provider, M):
    for r in records:
        if r["provider"] == provider and r["shape"]["M"] == M:
            return r
    return None


def bars(records) -> list[tuple[str, str, str]]:
    """The issue's bars at the reference shape: (bar, measured, verdict) with verdict PASS/FAIL/not measured."""
    out = []
    M = REF["M"]
    ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
    s, dn, sp = _get(records, "ssae", M), _get(records, "dense", M), _get(records, "eai-sparsify", M)
    enc = _get(records, "ssae_encode", M)
    na = "not measured"
    if ok(s):
        r = s["extra"]["ratio_to_floor"]
        out.append(("step <= 1.25 x GEMM floor", f"{r:.2f} x", "PASS" if r <= 1.25 else "FAIL"))
    else:
        out.append(("step <= 1.25 x GEMM floor", "-", na))
    if ok(s) and ok(sp):
        a, b = s["extra"]["ratio_to_floor"], sp["extra"]["ratio_to_floor"]
        out.append(("faster than eai-sparsify", f"{a:.2f} x vs {b:.2f} x floor", "PASS" if a < b else "FAIL"))
    else:
        out.append(("faster than eai-sparsify", "-", na))
    if ok(s) and ok(dn):
        sp_up = dn["extra"]["ratio_to_floor"] / s["extra"]["ratio_to_floor"]
        out.append((">= 4 x faster than dense PyTorch", f"{sp_up:.2f} x", "PASS" if sp_up >= 4 else "FAIL"))
    else:
        out.append((">= 4 x faster than dense PyTorch", "-", na))
    if enc is not None and enc["peak_extra_bytes"] is not None:
        sh = enc["shape"]
        frac = enc["peak_extra_bytes"] / (sh["N"] * sh["M"] * 4)
        out.append(("encode forward peak extra <= 5% of N*M*4 B", f"{enc['peak_extra_bytes'] / 1e6:.1f} MB = "
                    f"{100 * frac:.2f}%", "PASS" if frac <= 0.05 else "FAIL"))
    else:
        out.append(("encode forward peak extra <= 5% of N*M*4 B", "-", na))
    big = _get(records, "ssae", 262144)
    if ok(s) and ok(big):
        a, b = big["extra"]["ratio_to_floor"], s["extra"]["ratio_to_floor"]
        out.append(("ratio at M=262144 <= ratio at M=24576", f"{a:.2f} x vs {b:.2f} x", "PASS" if a <= b else "FAIL"))
    else:
        out.append(("ratio at M=262144 <= ratio at M=24576", "-", na))
    return out


def is_reference(records):
    r = records[0] if records else None
    return r is not None and r["dtype"] == "float32" and all(r["shape"][key] == REF[key] for key in ("N", "d", "k"))


def markdown(records, env, probe) -> str:
    r0 = records[0]
    sh = r0["shape"]
    lines = [
        f"TopK-SAE training step, N={sh['N']}, d={sh['d']}, k={sh['k']}, {r0['dtype']}, {env['threads']} threads, "
        f"{env['cpu']}; torch {env['torch']}, ssae-kernels {env['ssae-kernels']} ({env['git']}), "
        f"eai-sparsify {env['eai-sparsify']}, sae-lens {env['sae-lens']}; run {r0['run_id']}, "
        f"load average {env.get('loadavg_1min')} at its start on {env.get('cpu_count')} cores.",
        "",
        "Median of the timed rounds; `x floor` = median over rounds of time / time of `x @ W_enc.T` in the same "
        "round; peak extra = peak resident memory of one call above inputs, weights and gradients (fresh process "
        f"per method; check: {probe}).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * 4 + ["---"]) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(records)]
    if is_reference(records):
        lines += ["", "Bars (issue 2) at the reference shape M=24576:", "",
                  "| bar | measured | verdict |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in bars(records)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"M in {M_QUICK} instead of {M_SWEEP}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(harness.BENCH_DIR / "results"))
    ap.add_argument("--N", type=int, default=REF["N"])
    ap.add_argument("--d", type=int, default=REF["d"])
    ap.add_argument("--k", type=int, default=REF["k"])
    ap.add_argument("--M", type=int, nargs="+", help="latent counts to run (overrides --quick)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    if "gemm_floor" not in methods:
        methods.insert(0, "gemm_floor")  # every ratio needs it
    if a.repeats < harness.MIN_REPEATS:
        ap.error(f"--repeats must be >= {harness.MIN_REPEATS} (medians of at least 5 runs)")
    if a.warmup < 1:
        ap.error("--warmup must be >= 1")
    Ms = a.M or (M_QUICK if a.quick else M_SWEEP)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    threads = harness.set_threads(a.threads)
    env = harness.environment(threads)
    run_id = harness.new_run_id()
    print(f"threads: {threads} (torch.set_num_threads and OMP_NUM_THREADS in every measuring process)")
    print(f"N={a.N} d={a.d} k={a.k} {a.dtype}, M in {list(Ms)}, warm-up {a.warmup}, {a.repeats} timed rounds")
    print("versions: " + ", ".join(f"{key} {env[key]}" for key in ("torch", "ssae-kernels", "eai-sparsify",
                                                                     "sae-lens", "git", "cpu")))
    print(f"load average {env['loadavg_1min']} on {env['cpu_count']} cores (above the core count, times are noisy)")
    try:
        p = harness.run_isolated("harness:probe_allocation",
                                 {"megabytes": 100, "warm_megabytes": 50, "chunk_megabytes": 1}, threads=threads)
        probe = (f"100 MB allocated in 1 MB blocks measured as {p['extra_bytes'] / 1e6:.1f} MB")
    except harness.IsolatedRunError as e:
        probe = f"peak-RSS probe failed: {str(e).splitlines()[0]}"
    print(f"memory measurement check: {probe}")
    avail = _peer_availability([m for m in methods if m in PEERS])
    for name, why in avail.items():
        print(f"peer {name}: {'available' if why is None else 'unavailable: ' + why}")

    records = []
    for M in Ms:
        recs = run_shape(methods, avail, a.N, a.d, M, a.k, a.dtype, threads, a.warmup, a.repeats, env, run_id)
        print(format_table(recs), flush=True)
        records += recs
        harness.append_records(out / "step.json", recs)  # after every shape: a long sweep keeps what it has

    print("\n" + format_table(records))
    md = markdown(records, env, probe)
    (out / "step.md").write_text(md)
    if is_reference(records):
        print("\nbars at the reference shape:")
        for bar, measured, verdict in bars(records):
            print(f"  {verdict:13s} {bar}: {measured}")
    if not a.no_plot:
        import plot

        plot.plot_step(records, out / "step.png")
    print(f"\nwrote {out / 'step.json'} (appended), {out / 'step.md'}" + ("" if a.no_plot else f", {out / 'step.png'}"))
    return records


if __name__ == "__main__":
    main()
