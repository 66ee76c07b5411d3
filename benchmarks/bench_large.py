"""Large dictionaries: the optimizer step and the whole training step at M = 262,144 and 1,048,576.

Shape: d = 576, N = 4096 tokens a step, k = 32 (float32). Every case runs in a fresh process
(``harness.run_isolated``) that makes itself the OOM killer's first choice: a case that does not fit
fails (an allocation error, or killed when memory runs out), and that is recorded as its result.

- ``optimizer``: one optimizer step alone. Dense: ``torch.optim.Adam(fused=True)`` (what ``ssae train
  --optimizer adam`` runs) over W_enc, W_dec [M, d], b_enc, b_dec with dense gradients. Sparse:
  ``SparseAdam.step`` (catch-up table included) with the gradient rows of the latents a batch touched,
  with float32 and with bfloat16 moments (``--optimizer-state bfloat16``).
  The touched rows are the distinct latents of N x k uniform draws, redrawn each step: about 11.8% of
  M = 1,048,576. Uniform draws touch the most distinct rows for a given N k; real firing is skewed
  toward fewer. Timing starts after ``--optimizer-warmup`` steps, when most rows have been touched
  and carry moments, as in a running training (the first steps catch up nothing).
- ``step``: whole training steps (encode, decode, backward, optimizer) on random activations: ours
  through ``Trainer.train_step`` (dense and sparse optimizer), eai-sparsify's SparseCoder and the dense
  PyTorch formulation (N x M pre-activations, topk, scatter, matmul), each with fused Adam. No AuxK
  on any side (no latent is dead in the first steps; the peers run with it off).

    python benchmarks/bench_large.py                       # both parts -> results/large.{md,json}
    python benchmarks/bench_large.py --part optimizer      # the optimizer step only

The last line printed is ``peak_gb=... step_s=... opt_sparse/dense=...`` for ours (sparse optimizer)
at M = 1,048,576 (``-`` for what was not run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import IsolatedRunError, environment, run_isolated, set_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D, BATCH, K = 576, 4096, 32
LATENTS = (262144, 1048576)
STEP_PROVIDERS = ("ssae (adam)", "ssae (sparse-adam)", "ssae (sparse-adam, bfloat16 moments)", "eai-sparsify",
                  "dense pytorch")


OPTIMIZERS = ("adam", "sparse-adam", "sparse-adam-bf16")  # the last: SparseAdam with bfloat16 moments


def _first_to_go() -> None:
    """Makes this process the kernel's first choice when memory runs out, so that a case that does not fit
    is the one killed (recorded as out of memory) and nothing else on the machine is."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def optimizer_worker(latents: int, optimizer: str, warmup: int, repeats: int, *, d: int = D, batch: int = BATCH,
                     k: int = K, seed: int = 0, first_to_go: bool = True) -> dict:
    """(fresh process) Median seconds of one optimizer step, and the rows a step touched."""
    import torch

    from harness import median, peak_rss_bytes, time_fn
    from ssae_kernels.optim import SparseAdam

    if first_to_go:
        _first_to_go()
    g = torch.Generator().manual_seed(seed)
    M = latents
    params = {"W_enc": torch.randn(M, d, generator=g) / d**0.5, "b_enc": torch.zeros(M),
              "W_dec": torch.randn(M, d, generator=g) / d**0.5, "b_dec": torch.zeros(d)}
    touched = []
    if optimizer == "adam":
        leaves = [torch.nn.Parameter(p) for p in params.values()]
        for p in leaves:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        adam = torch.optim.Adam(leaves, lr=1e-4, eps=6.25e-10, fused=True)
        step = adam.step
    else:  # "sparse-adam", or "sparse-adam-bf16": its moments in bfloat16
        opt = SparseAdam({n: params[n] for n in ("W_enc", "b_enc", "W_dec")}, {"b_dec": params["b_dec"]},
                         lr=1e-4, eps=6.25e-10, state_dtype=torch.bfloat16 if optimizer.endswith("bf16") else None)

        def step():
            rows = torch.unique(torch.randint(0, M, (batch * k,), generator=g))
            touched.append(rows.numel())
            grads = {n: torch.randn((rows.numel(), *params[n].shape[1:]), generator=g) * 1e-3
                     for n in ("W_enc", "b_enc", "W_dec")}
            dense = {"b_dec": torch.randn(d, generator=g) * 1e-3}
            return lambda: opt.step(rows, grads, dense)

        # the gradient draw is setup, not the step: time only opt.step
        pending = []
        seconds = time_fn(lambda: pending.pop()(), warmup=warmup, repeats=repeats, setup=lambda: pending.append(step()))
        return {"seconds": median(seconds), "samples": seconds, "touched_rows": median(touched),
                "peak_bytes": peak_rss_bytes()}
    seconds = time_fn(step, warmup=warmup, repeats=repeats)
    return {"seconds": median(seconds), "samples": seconds, "touched_rows": M, "peak_bytes": peak_rss_bytes()}


def step_worker(latents: int, provider: str, warmup: int, repeats: int, *, d: int = D, batch: int = BATCH,
                k: int = K, seed: int = 0, first_to_go: bool = True) -> dict:
    """(fresh process) Median seconds of one whole training step, and the process's peak memory."""
    import tempfile

    import torch
    import torch.nn.functional as F

    from harness import median, peak_rss_bytes, time_fn

    if first_to_go:
        _first_to_go()
    torch.manual_seed(seed)
    M = latents
    acts = torch.randn(2 * batch, d)
    if provider.startswith("ssae"):
        from ssae_kernels.trainer import TrainConfig, Trainer, new_sae

        optimizer, *moments = provider.split("(")[1].rstrip(")").split(", ")
        # no latent is dead within the few steps timed (the default horizon is 10^6 tokens): AuxK stays off,
        # as it is for the peers (peers.py)
        trainer = Trainer(new_sae(acts, M, k), acts,
                          TrainConfig(steps=10**6, batch_size=batch, optimizer=optimizer,
                                      optimizer_state="bfloat16" if moments else "float32", checkpoint_every=10**9,
                                      log_every=10**9), tempfile.mkdtemp(), progress=False)
        step = trainer.train_step
    else:
        if provider == "eai-sparsify":
            from peers import make_peer_step

            peer = make_peer_step("eai-sparsify", d=d, M=M, k=k)
            params, loss_fn = list(peer.module.parameters()), peer.step
        else:
            W_enc = torch.nn.Parameter(torch.randn(M, d) / d**0.5)
            W_dec = torch.nn.Parameter(W_enc.detach().clone())
            b_enc, b_dec = torch.nn.Parameter(torch.zeros(M)), torch.nn.Parameter(torch.zeros(d))
            params = [W_enc, W_dec, b_enc, b_dec]

            def loss_fn(x):
                pre = F.linear(x - b_dec, W_enc, b_enc)
                top = pre.topk(k, dim=-1, sorted=False)
                z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
                loss = ((z @ W_dec + b_dec - x) ** 2).sum(-1).mean()
                loss.backward()
                return loss
        adam = torch.optim.Adam(params, lr=1e-4, fused=True)
        x = acts[:batch]

        def step():
            for p in params:
                p.grad = None
            loss_fn(x)
            adam.step()
    seconds = time_fn(step, warmup=warmup, repeats=repeats)
    return {"seconds": median(seconds), "samples": seconds, "peak_bytes": peak_rss_bytes()}


def _run(target: str, kwargs: dict, threads: int) -> dict:
    try:
        return run_isolated(target, kwargs, threads=threads, malloc_env=False)
    except IsolatedRunError as e:
        if "signal 9" in str(e):
            return {"error": "out of memory (killed by the OOM killer)"}
        if any(s in str(e) for s in ("can't allocate memory", "out of memory", "MemoryError")):
            return {"error": "out of memory (allocation failed)"}
        lines = str(e).splitlines()
        return {"error": "failed: " + (lines[-1] if lines else "")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("optimizer", "step", "all"), default="all")
    ap.add_argument("--latents", type=int, nargs="+", default=list(LATENTS))
    ap.add_argument("--providers", nargs="+", default=list(STEP_PROVIDERS), choices=STEP_PROVIDERS)
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps")
    ap.add_argument("--optimizer-warmup", type=int, default=10,
                    help="untimed optimizer steps: enough for most rows to have been touched, as in a running training")
    ap.add_argument("--repeats", type=int, default=9, help="timed optimizer steps (training steps: --step-repeats)")
    ap.add_argument("--step-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    path = RESULTS / "large.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["environment"] = environment(threads)
    if args.part in ("optimizer", "all"):
        rows = results.setdefault("optimizer", {})
        for M in args.latents:
            for optimizer in OPTIMIZERS:
                rows[f"{M}/{optimizer}"] = r = _run("bench_large:optimizer_worker", dict(
                    latents=M, optimizer=optimizer, warmup=args.optimizer_warmup, repeats=args.repeats), threads)
                print(f"optimizer M={M} {optimizer}: {r}", flush=True)
    if args.part in ("step", "all"):
        rows = results.setdefault("step", {})
        for M in args.latents:
            for provider in args.providers:
                rows[f"{M}/{provider}"] = r = _run("bench_large:step_worker", dict(
                    latents=M, provider=provider, warmup=args.warmup, repeats=args.step_repeats), threads)
                print(f"step M={M} {provider}: {r}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "large.md").write_text(markdown(results))
    print(last_line(results))


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "not run"
    if "error" in row:
        return row["error"][:80]
    return format(row[key], fmt)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# Large dictionaries (d = 576, N = 4096, k = 32, float32)", "",
             f"`python benchmarks/bench_large.py` on {env.get('cpu', '?')}, {env.get('threads')} threads; medians.", "",
             "## One optimizer step", "",
             "| M | dense Adam (s) | SparseAdam (s) | sparse / dense | SparseAdam, bf16 moments (s) | bf16 / dense "
             "| rows touched | peak GB dense / sparse / bf16 moments |",
             "|---|---|---|---|---|---|---|---|"]
    opt = results.get("optimizer", {})
    ok = lambda r: r is not None and "error" not in r  # noqa: E731
    for M in sorted({int(key.split("/")[0]) for key in opt}):
        dense, sparse, half = (opt.get(f"{M}/{name}") for name in OPTIMIZERS)
        ratio = lambda r: f"{r['seconds'] / dense['seconds']:.3f}" if ok(dense) and ok(r) else "-"  # noqa: E731
        touched = f"{sparse['touched_rows'] / M:.1%}" if ok(sparse) else "-"
        peaks = f"{_gb(dense)} / {_gb(sparse)} / {_gb(half)}"
        lines.append(f"| {M:,} | {_cell(dense, 'seconds', '.3f')} | {_cell(sparse, 'seconds', '.3f')} | "
                     f"{ratio(sparse)} | {_cell(half, 'seconds', '.3f')} | {ratio(half)} | {touched} | {peaks} |")
    step = results.get("step", {})
    if step:
        lines += ["", "## One training step (encode, decode, backward, optimizer)", "",
                  "| M | provider | step (s) | timed steps | peak GB |", "|---|---|---|---|---|"]
        for key, row in sorted(step.items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0])):
            M, provider = key.split("/", 1)
            timed = len(row["samples"]) if "samples" in row else "-"
            lines.append(f"| {int(M):,} | {provider} | {_cell(row, 'seconds', '.2f')} | {timed} | {_gb(row)} |")
    return "\n".join(lines) + "\n"


def _gb(row: dict | None) -> str:
    return f"{row['peak_bytes'] / 1e9:.2f}" if row is not None and "error" not in row else "-"


def last_line(results: dict) -> str:
    M = 1048576
    step = results.get("step", {}).get(f"{M}/ssae (sparse-adam)")
    opt = results.get("optimizer", {})
    dense, sparse = opt.get(f"{M}/adam"), opt.get(f"{M}/sparse-adam")
    ok = lambda r: r is not None and "error" not in r  # noqa: E731
    peak = f"{step['peak_bytes'] / 1e9:.2f}" if ok(step) else "-"
    step_s = f"{step['seconds']:.2f}" if ok(step) else "-"
    ratio = f"{sparse['seconds'] / dense['seconds']:.3f}" if ok(dense) and ok(sparse) else "-"
    return f"peak_gb={peak} step_s={step_s} opt_sparse/dense={ratio}"


if __name__ == "__main__":
    main()
