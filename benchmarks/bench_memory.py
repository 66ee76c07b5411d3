"""The memory planner (``ssae plan``, ``ssae_kernels.memory``) against the measured peak of real training.

Each size trains a TopK SAE for a few steps in a fresh process (``harness.run_isolated``, without the
benchmark malloc settings, as a user's process runs) on random activations held in memory, and records the
process's peak resident memory (VmHWM) and its resident memory
before the first tensor (after one step of a tiny SAE, which loads the kernel libraries). The planner, given
that runtime figure, predicts the peak. Then the largest dictionaries the planner fits in 24, 80 and 141 GB.

    python benchmarks/bench_memory.py            # results/memory.{md,json}
    python benchmarks/bench_memory.py --quick    # two sizes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import run_isolated, set_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [  # latents, d_in, batch, k, compute dtype[, optimizer[, its moments' dtype]]
    (65536, 512, 2048, 32, "float32"),
    (131072, 576, 4096, 32, "float32"),
    (131072, 576, 4096, 32, "bfloat16"),
    (16384, 2304, 4096, 64, "float32"),
    (262144, 576, 4096, 32, "float32"),
    (32768, 768, 16384, 32, "float32"),
    (262144, 576, 4096, 32, "float32", "sparse-adam"),
    (524288, 256, 2048, 32, "float32", "sparse-adam"),
    (262144, 576, 4096, 32, "float32", "sparse-adam", "bfloat16"),
    (524288, 256, 2048, 32, "float32", "sparse-adam", "bfloat16"),
]
BUDGETS = [("24 GB (this machine: CPU)", "24GB", "cpu", "float32"),
           ("80 GB (H100: bf16 compute)", "80GB", "cuda", "bfloat16"),
           ("141 GB (H200: bf16 compute)", "141GB", "cuda", "bfloat16")]


def measure_training_peak(latents: int, d_in: int, batch: int, k: int, compute_dtype: str, dataset_tokens: int,
                          steps: int = 3, optimizer: str = "adam", optimizer_state: str = "float32") -> dict:
    """(run in a fresh process) Resident memory before any tensor and the peak over ``steps`` training steps."""
    import gc
    import tempfile

    import torch

    from harness import peak_rss_bytes, reset_peak_rss, rss_bytes
    from ssae_kernels.trainer import TrainConfig, Trainer, new_sae

    # The runtime includes what the first training step loads (kernel libraries' code, thread pools): one
    # step of a tiny SAE first.
    tiny = torch.randn(512, d_in)
    Trainer(new_sae(tiny, 256, 8), tiny, TrainConfig(steps=1, batch_size=256), tempfile.mkdtemp(),
            progress=False).train_step()
    del tiny
    gc.collect()
    runtime = rss_bytes()
    reset_peak_rss()
    acts = torch.randn(dataset_tokens, d_in)
    sae = new_sae(acts, latents, k, compute_dtype=compute_dtype)
    trainer = Trainer(sae, acts, TrainConfig(steps=steps, batch_size=batch, checkpoint_every=10**9, log_every=10**9,
                                             optimizer=optimizer, optimizer_state=optimizer_state),
                      tempfile.mkdtemp(), progress=False)
    for _ in range(steps):
        trainer.train_step()
    return {"runtime": runtime, "peak": peak_rss_bytes()}


def compare(latents, d_in, batch, k, compute_dtype, optimizer="adam", optimizer_state="float32", threads=2) -> dict:
    from ssae_kernels import memory

    dataset_tokens = 2 * batch
    measured = run_isolated("bench_memory:measure_training_peak", dict(
        latents=latents, d_in=d_in, batch=batch, k=k, compute_dtype=compute_dtype, dataset_tokens=dataset_tokens,
        optimizer=optimizer, optimizer_state=optimizer_state), threads=threads, malloc_env=False)
    planned = memory.plan(latents, d_in, batch, k, compute_dtype=compute_dtype, dataset_tokens=dataset_tokens,
                          optimizer=optimizer, optimizer_state=optimizer_state, runtime_bytes=measured["runtime"])
    return {"latents": latents, "d_in": d_in, "batch": batch, "k": k, "compute_dtype": compute_dtype,
            "optimizer": optimizer if optimizer_state == "float32" else f"{optimizer}, {optimizer_state} moments",
            "dataset_tokens": dataset_tokens, "runtime_bytes": measured["runtime"], "measured_peak": measured["peak"],
            "planned_peak": planned.total, "planned_over_measured": planned.total / measured["peak"]}


def largest_table() -> list[dict]:
    from ssae_kernels import memory

    rows = []
    for label, budget, device, dtype in BUDGETS:
        for d in (576, 2304, 4096):
            M = memory.largest(memory.parse_bytes(budget), "latents", d_in=d, batch=4096, k=32, device=device,
                               compute_dtype=dtype)
            rows.append({"budget": label, "d_in": d, "largest_latents": M})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the first two sizes only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    rows = [compare(*size, threads=threads) for size in (SIZES[:2] if args.quick else SIZES)]
    largest = largest_table()
    lines = ["# Memory planner against measured training peaks", "",
             "`python benchmarks/bench_memory.py`: peak resident memory of 3 training steps (activations of "
             f"2 batches in memory) in a fresh process, {threads} threads, against `ssae_kernels.memory.plan` given "
             "the process's resident memory before the first tensor (after one step of a tiny SAE, which loads the "
             "kernel libraries).", "",
             "| latents | d_in | batch | k | compute | optimizer | measured peak GB | planned GB | planned ÷ measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['latents']} | {r['d_in']} | {r['batch']} | {r['k']} | {r['compute_dtype']} | {r['optimizer']} | "
                     f"{r['measured_peak'] / 1e9:.3f} | {r['planned_peak'] / 1e9:.3f} | "
                     f"{r['planned_over_measured']:.3f} |")
    lines += ["", "## Largest dictionary that fits (planner; batch 4096, k = 32, Adam, training data not counted)", "",
              "| memory | d = 576 | d = 2304 | d = 4096 |", "|---|---|---|---|"]
    for label, *_ in BUDGETS:
        cells = [f"{r['largest_latents']:,}" for r in largest if r["budget"] == label]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "memory.md").write_text(text)
        (RESULTS / "memory.json").write_text(json.dumps({"measured": rows, "largest": largest}, indent=2) + "\n")


if __name__ == "__main__":
    main()
