"""Tail evaluation: reconstruction by token-frequency third (head/torso/tail, frequency counted in the
general corpus), max per-token error, tail coverage, latent activation counts and the LM's
cross-entropy with each SAE spliced in; SAEs side by side in report.json, report.md and plots."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ...evaluate import downstream_losses
from ...sae import SAE
from ..common import UsageError


def token_counts(tokenizer, docs: list[str]) -> torch.Tensor:
    """How often each token id occurs in ``docs`` (tokenized as for harvesting, without special tokens)."""
    ids = [i for row in tokenizer(docs, add_special_tokens=False)["input_ids"] for i in row]
    return torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=len(tokenizer))


def frequency_ranks(counts: torch.Tensor) -> torch.Tensor:
    """rank[id]: position of each token id when ids are ordered by count, most frequent first (rank 0),
    equal counts by lower id."""
    order = torch.sort(-counts, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def frequency_bins(tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bin [T], global rank [T]) of every evaluation token.

    The distinct token ids of ``tokens`` are ordered by their count in the general corpus (``counts``,
    ids beyond it count 0), most frequent first, ties by lower id, and cut into thirds of ids: bin 0 =
    head, 1 = torso, 2 = tail (with n ids, id of position p goes to bin floor(3p / n)). Every occurrence
    gets its id's bin. The global rank is the id's rank over the whole vocabulary (for plots)."""
    size = max(int(counts.shape[0]), int(tokens.max()) + 1)
    full = torch.zeros(size, dtype=torch.int64)
    full[:counts.shape[0]] = counts.to(torch.int64)
    ranks = frequency_ranks(full)
    types, inverse = torch.unique(tokens, return_inverse=True)
    local = torch.empty_like(types)
    local[torch.sort(ranks[types]).indices] = torch.arange(len(types))
    bins = local * 3 // len(types)
    return bins[inverse], ranks[tokens]


BINS = ("head", "torso", "tail")
SUMMARY_KEYS = ("fvu", "tail_mse", "max_token_error", "tail_coverage", "ce_loss")  # printed by the commands


@dataclass
class TailEval:
    summary: dict
    errors: torch.Tensor  # [T] per-token squared error ||x - x_hat||^2 (raw units), over kept tokens
    ranks: torch.Tensor  # [T] global frequency rank of each kept token
    bins: torch.Tensor  # [T] 0 head, 1 torso, 2 tail
    latent_counts: torch.Tensor  # [M] activations (value > 0) per latent over kept tokens


@torch.no_grad()
def tail_metrics(sae: SAE, acts: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, *,
                 keep: torch.Tensor | None = None, coverage_threshold: float = 0.2,
                 batch_size: int = 4096) -> TailEval:
    """Reconstruction of ``acts`` [T, d] (raw) by ``sae``, by token-frequency bin (see ``frequency_bins``).

    Per-token error e_n = ||x_n - x_hat_n||^2 in raw units. ``keep`` (default all) marks the tokens the
    metrics cover (e.g. massive-norm outliers excluded); ``*_including_outliers`` cover every token.
    Bins are formed over the kept tokens' ids.
    - fvu = sum e_n / sum ||x_n - mean(x)||^2; ``<bin>_mse`` = mean e_n over the bin's tokens;
      ``max_token_error`` = max e_n (``tail_max_token_error`` over the tail only);
    - ``tail_coverage``: fraction of tail tokens with at least one latent whose contribution
      value * ||W_dec[m]|| is at least ``coverage_threshold`` times ||x_n - b_dec|| (both at the SAE's
      input scale), i.e. one latent explains a real part of the token;
    - ``latent_counts`` [M]: how many kept tokens each latent is active on (value > 0)."""
    if acts.shape[0] != tokens.shape[0]:
        raise ValueError(f"acts has {acts.shape[0]} rows but tokens has {tokens.shape[0]}")
    if not 0 < coverage_threshold:
        raise ValueError(f"coverage_threshold must be > 0, got {coverage_threshold}")
    keep = torch.ones(acts.shape[0], dtype=torch.bool) if keep is None else keep.to(torch.bool)
    if not keep.any():
        raise ValueError("no evaluation token is kept")
    M = sae.cfg.num_latents
    dec_norm = sae.W_dec.detach().float().norm(dim=1)
    errors, covered = [], []
    latent_counts = torch.zeros(M, dtype=torch.int64)
    for xb, kb in zip(acts.split(batch_size), keep.split(batch_size)):
        values, indices = sae.encode(xb)
        x_hat = sae.decode(values, indices)
        errors.append(((x_hat.double() - xb.double()) ** 2).sum(1))
        contrib = values.float().clamp_min(0) * dec_norm[indices]
        centred = (xb.float() * sae.input_scale - sae.b_dec.detach().float()).norm(dim=1)
        covered.append((contrib >= coverage_threshold * centred[:, None]).any(1))
        on = (values > 0) & kb[:, None]
        latent_counts += torch.bincount(indices[on], minlength=M)
    e_all, cov = torch.cat(errors), torch.cat(covered)
    var_all = ((acts.double() - acts.double().mean(0)) ** 2).sum()
    x = acts[keep].double()
    e = e_all[keep]
    bins, ranks = frequency_bins(tokens[keep], counts)
    summary = {"fvu": float(e.sum() / ((x - x.mean(0)) ** 2).sum()), "mse": float(e.mean())}
    for b, name in enumerate(BINS):
        sel = bins == b
        summary[f"{name}_mse"] = float(e[sel].mean()) if sel.any() else None
        summary[f"{name}_tokens"] = int(sel.sum())
    tail = bins == 2
    summary.update({
        "max_token_error": float(e.max()),
        "tail_max_token_error": float(e[tail].max()) if tail.any() else None,
        "tail_coverage": float(cov[keep][tail].double().mean()) if tail.any() else None,
        "coverage": float(cov[keep].double().mean()),
        "l0": float((latent_counts.sum() / keep.sum())),
        "latents_active_fraction": float((latent_counts > 0).double().mean()),
        "fvu_including_outliers": float(e_all.sum() / var_all),
        "max_token_error_including_outliers": float(e_all.max()),
        "tokens": int(keep.sum()), "outliers_excluded": int((~keep).sum()),
        "tail_token_ids": int(len(torch.unique(tokens[keep][tail]))),
    })
    return TailEval(summary, e.float(), ranks, bins, latent_counts)


def evaluate_saes(saes: dict[str, SAE], acts: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, *,
                  keep: torch.Tensor | None = None, coverage_threshold: float = 0.2,
                  model=None, chunks: list[list[int]] | None = None, layer: int | None = None,
                  progress: bool = True) -> tuple[dict, dict[str, TailEval]]:
    """``tail_metrics`` for each SAE, plus the downstream CE when ``model`` and ``chunks`` are given:
    ``ce_loss`` (CE with the SAE spliced in), ``ce_clean``, ``ce_zero``, ``ce_loss_recovered``."""
    report, details = {}, {}
    for name, sae in saes.items():
        details[name] = tail_metrics(sae, acts, tokens, counts, keep=keep, coverage_threshold=coverage_threshold)
        report[name] = dict(details[name].summary)
    if model is not None and chunks:
        ce = downstream_losses(model, saes, chunks, layer, progress=progress)
        gap = ce["zero"] - ce["clean"]
        for name in saes:
            report[name].update({"ce_loss": ce[name], "ce_clean": ce["clean"], "ce_zero": ce["zero"],
                                 "ce_loss_recovered": (ce["zero"] - ce[name]) / gap if gap > 0 else None,
                                 "ce_tokens": ce["tokens"]})
    else:
        for name in saes:
            report[name]["ce_loss"] = None
    return report, details


# ---------------------------------------------------------------------------------------------- report

_TABLE_KEYS = ("fvu", "head_mse", "torso_mse", "tail_mse", "max_token_error", "tail_max_token_error",
               "tail_coverage", "coverage", "l0", "latents_active_fraction", "ce_loss", "ce_loss_recovered",
               "general_fvu", "fvu_including_outliers", "max_token_error_including_outliers")


def write_tail_report(out_dir: str, report: dict, details: dict[str, TailEval], *, title: str = "Tail evaluation",
                      notes: list[str] | None = None) -> list[str]:
    """report.json (``report`` as given), report.md (SAEs side by side) and PNG plots: per-token error
    against token-frequency rank, and histograms of latent activation counts. Returns the plot files."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    names = list(details)
    lines = [f"# {title}", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in _TABLE_KEYS:
        if any(report[n].get(key) is not None for n in names):
            cells = [_fmt(report[n].get(key)) for n in names]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [""] + (notes or [])
    plots = _plots(out_dir, details)
    lines += [""] + [f"![{p}]({p})" for p in plots]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return plots


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plots(out_dir: str, details: dict[str, TailEval]) -> list[str]:
    """The PNG plots written into ``out_dir``; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = []
    for name, draw in (("error_vs_frequency.png", _plot_error_vs_frequency),
                       ("activation_counts.png", _plot_activation_counts)):
        fig, ax = plt.subplots(figsize=(7, 4))
        draw(ax, details)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        plots.append(name)
    return plots


def _plot_error_vs_frequency(ax, details: dict[str, TailEval]) -> None:
    for name, d in details.items():
        r = d.ranks.double() + 1
        edges = torch.logspace(0, math.log10(float(r.max()) + 1), 25, dtype=torch.float64)
        which = torch.bucketize(r, edges)
        xs, ys = [], []
        for b in torch.unique(which).tolist():
            sel = which == b
            if int(sel.sum()) >= 3:
                xs.append(float(r[sel].mean()))
                ys.append(float(d.errors[sel].double().mean()))
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    first = next(iter(details.values()))
    for b in (1, 2):  # where the torso and the tail start
        in_bin = first.ranks[first.bins == b]
        if len(in_bin):
            ax.axvline(float(in_bin.min()) + 1, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token frequency rank in the general corpus (1 = most frequent)")
    ax.set_ylabel("mean squared error per token")
    ax.set_title("reconstruction error vs token frequency (dashed: torso, tail start)")
    ax.legend()


def _plot_activation_counts(ax, details: dict[str, TailEval]) -> None:
    top = max(float(d.latent_counts.max()) for d in details.values())
    edges = torch.logspace(0, math.log10(top + 1), 40).numpy()
    for name, d in details.items():
        c = d.latent_counts
        ax.hist(c[c > 0].numpy(), bins=edges, histtype="step", lw=1.5,
                label=f"{name} ({int((c == 0).sum())} never active)")
    ax.set_xscale("log")
    ax.set_xlabel("activations per latent on the evaluation tokens")
    ax.set_ylabel("latents")
    ax.legend()


def check_tail_options(*, ce_sequences: int, coverage_threshold: float) -> None:
    """UsageError for the evaluation flags, before anything is loaded."""
    if ce_sequences < 0:
        raise UsageError(f"--ce-sequences must be >= 0, got {ce_sequences}")
    if not coverage_threshold > 0:
        raise UsageError(f"--coverage-threshold must be > 0, got {coverage_threshold}")


def tail_notes(outlier_factor: float, coverage_threshold: float) -> list[str]:
    """The lines of report.md that say how the metrics were measured."""
    return [
        "Per-token error: ||x - x_hat||^2 in the model's raw units. head/torso/tail: the distinct token ids of "
        "the evaluation text ordered by their count in the general corpus, cut into thirds of ids.",
        f"Tokens with norm > {outlier_factor} x median are excluded from every metric except the "
        "`*_including_outliers` ones." if outlier_factor > 0 else "No token is excluded.",
        f"tail_coverage: fraction of tail tokens on which one latent contributes at least "
        f"{coverage_threshold} x ||x - b_dec||. ce_loss: next-token cross-entropy with the SAE spliced in.",
    ]


def summary(report: dict, keys=SUMMARY_KEYS) -> dict:
    """{SAE name: {key: value}} of a tail report, as the commands print it."""
    return {name: {k: metrics.get(k) for k in keys} for name, metrics in report.items() if name != "meta"}
