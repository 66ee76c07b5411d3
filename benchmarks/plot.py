"""Plots of benchmark records (benchmarks/harness.py format).

    python benchmarks/plot.py [benchmarks/results/step.json] [--out benchmarks/results/step.png]

plots the latest run in the file: time and peak extra memory against M, log-x, one line per method.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

STYLE = {  # method -> (colour, marker, line style): ours solid, baselines dashed, encode-only dotted
    "gemm_floor": ("black", "s", "-"),
    "ssae": ("tab:red", "o", "-"),
    "dense": ("tab:blue", "^", "--"),
    "eai-sparsify": ("tab:green", "v", "--"),
    "sae-lens": ("tab:purple", "D", "--"),
    "sae-lens-sparse": ("tab:brown", "P", "--"),
    "ssae_encode": ("tab:red", "o", ":"),
    "dense_encode": ("tab:blue", "^", ":"),
}


def plot_step(records, path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    if not records:
        raise ValueError("no records to plot")
    r0 = records[0]
    sh = r0["shape"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for provider in dict.fromkeys(r["provider"] for r in records):
        rs = sorted((r for r in ok if r["provider"] == provider), key=lambda r: r["shape"]["M"])
        color, marker, ls = STYLE.get(provider, (None, "x", "-"))
        kw = dict(color=color, marker=marker, linestyle=ls, label=provider)
        if rs:
            ax_t.plot([r["shape"]["M"] for r in rs], [r["median_s"] * 1e3 for r in rs], **kw)
        rm = [r for r in rs if r["peak_extra_bytes"] is not None]
        if rm:
            # clip at 0.1 MB so that a near-zero (or slightly negative) extra still shows on the log axis
            ax_m.plot([r["shape"]["M"] for r in rm], [max(r["peak_extra_bytes"] / 1e6, 0.1) for r in rm], **kw)
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (latents)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel("median time per call (ms)")
    ax_t.set_title("time (step = fwd + bwd; floor and *_encode: forward only)")
    ax_m.set_ylabel("peak extra memory (MB, above inputs/weights/grads)")
    ax_m.set_title("peak extra resident memory of one call")
    handles, labels = ax_t.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_m.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=8, frameon=False)
    fig.suptitle(f"TopK-SAE step, N={sh['N']} d={sh['d']} k={sh['k']} {r0['dtype']}, {r0['threads']} threads, "
                 f"{r0['versions'].get('cpu', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="plot the latest run of a step.json")
    ap.add_argument("json", nargs="?", default=str(harness.BENCH_DIR / "results" / "step.json"))
    ap.add_argument("--out", default=None, help="PNG path (default: next to the JSON)")
    a = ap.parse_args(argv)
    records = harness.latest_run(harness.load_records(a.json), benchmark="step")
    if not records:
        raise SystemExit(f"no step records in {a.json}")
    out = a.out or str(Path(a.json).with_suffix(".png"))
    plot_step(records, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
