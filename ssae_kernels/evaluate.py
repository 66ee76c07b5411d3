"""Evaluating an SAE: reconstruction, sparsity, latent usage, and the LM loss with the SAE spliced in."""

from __future__ import annotations

import contextlib
import json
import os

import torch
from tqdm.auto import tqdm

from .models import decoder_layers
from .sae import SAE


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, *, batch_size: int = 4096,
                           dense_threshold: float = 0.1) -> dict:
    """FVU, L0, and per-latent firing frequencies over ``acts`` [T, d] (raw activations)."""
    err = torch.zeros((), dtype=torch.float64)
    mean = acts.double().mean(0)
    var = ((acts.double() - mean) ** 2).sum()
    active = 0
    fires = torch.zeros(sae.cfg.num_latents, dtype=torch.int64)
    for batch in acts.split(batch_size):
        values, indices = sae.encode(batch)
        err += ((sae.decode(values, indices) - batch).double() ** 2).sum()
        on = values > 0
        active += int(on.sum())
        fires += torch.bincount(indices[on], minlength=sae.cfg.num_latents)
    freq = fires.double() / acts.shape[0]
    return {"fvu": float(err / var), "l0": active / acts.shape[0],
            "never_fired_fraction": float((fires == 0).double().mean()),
            "dense_fraction": float((freq > dense_threshold).double().mean()),
            "latent_frequency": freq}


@contextlib.contextmanager
def splice(model, layer: int, replace):
    """Within the block, decoder layer ``layer``'s output hidden states h [B, S, d] become replace(h)."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (replace(output[0]),) + tuple(output[1:])
        return replace(output)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def downstream_losses(model, saes: dict[str, SAE], chunks: list[list[int]], layer: int, *,
                      batch_size: int = 8, progress: bool = True) -> dict:
    """Next-token cross-entropy on ``chunks`` with the model as is (``clean``), with decoder layer
    ``layer``'s output replaced by each SAE's reconstruction, and zero-ablated (positions after the
    first, as in training). One forward pass per variant: {name: ce} plus ``clean``, ``zero`` and
    ``tokens`` (the number of predicted tokens)."""
    def sae_replace(sae):
        def replace(h):
            out = h.clone()
            flat = h[:, 1:].reshape(-1, h.shape[-1]).float()
            out[:, 1:] = sae(flat).reshape(h.shape[0], h.shape[1] - 1, h.shape[-1]).to(h.dtype)
            return out
        return replace

    def zero_replace(h):
        out = h.clone()
        out[:, 1:] = 0
        return out

    variants = {"clean": None, "zero": zero_replace, **{n: sae_replace(s) for n, s in saes.items()}}
    totals = dict.fromkeys(variants, 0.0)
    count = 0
    device = next(model.parameters()).device
    bar = tqdm(total=len(chunks), desc="downstream loss", unit="seq", disable=not progress)
    for start in range(0, len(chunks), batch_size):
        batch = [c for c in chunks[start:start + batch_size] if len(c) >= 3]  # shorter ones predict nothing
        if batch:
            width = min(len(c) for c in batch)  # equal lengths: no padding in the loss
            ids = torch.tensor([c[:width] for c in batch], device=device)
            for name, replace in variants.items():
                with splice(model, layer, replace) if replace is not None else contextlib.nullcontext():
                    logits = model(input_ids=ids, use_cache=False).logits[:, 1:-1].float()
                # positions 1.. predict their next token (position 0 is left untouched everywhere)
                totals[name] += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1), reduction="sum"))
            count += ids[:, 2:].numel()
        bar.update(len(chunks[start:start + batch_size]))
    bar.close()
    ce = {k: v / max(count, 1) for k, v in totals.items()}
    ce["tokens"] = count
    return ce


def downstream_loss(model, sae: SAE, chunks: list[list[int]], layer: int, *, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """:func:`downstream_losses` of one SAE, with ``ce_loss_recovered`` = (CE_zero - CE_sae) / (CE_zero - CE_clean)."""
    ce = downstream_losses(model, {"sae": sae}, chunks, layer, batch_size=batch_size, progress=progress)
    gap = ce["zero"] - ce["clean"]
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
            # undefined (None) when zero-ablating the layer does not hurt the model
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap > 0 else None,
            "ce_tokens": ce["tokens"]}


def write_report(out_dir: str, report: dict, *, metrics_file: str | None = None,
                 latent_frequency: torch.Tensor | None = None) -> None:
    """report.json, report.md and PNG plots (training curves, latent-frequency histogram)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["# SAE training report", "", "| metric | value |", "|---|---|"]
    for key, value in report.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"| {key} | {value} |")
    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None and metrics_file and os.path.exists(metrics_file):
        records = [json.loads(line) for line in open(metrics_file) if line.strip()]
        if records:
            fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
            steps = [r["step"] for r in records]
            for ax, key, label in zip(axes, ("fvu", "l0", "dead_fraction"), ("FVU (batch)", "L0", "dead fraction")):
                ax.plot(steps, [r[key] for r in records])
                ax.set_xlabel("step")
                ax.set_title(label)
            axes[0].set_yscale("log")
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, "training_curves.png"), dpi=100)
            plt.close(fig)
            plots.append("training_curves.png")
    if plt is not None and latent_frequency is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        freq = latent_frequency.double()
        ax.hist(torch.log10(freq[freq > 0]).numpy(), bins=60)
        ax.set_xlabel("log10 firing frequency (eval tokens)")
        ax.set_ylabel("latents")
        ax.set_title(f"{int((freq == 0).sum())} latents never fired")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "latent_frequency.png"), dpi=100)
        plt.close(fig)
        plots.append("latent_frequency.png")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
