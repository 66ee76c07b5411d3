"""Finetuning a general SAE on subdomain activations: the general SAE as a start (any format), its input
scale, the TERM tilt, replay of general activations, and the training run itself."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import warnings

import torch

from ...formats import detect_format, load_sae
from ...sae import SAE
from ...trainer import TrainConfig, Trainer
from ..common import UsageError, dead_tokens_for


def from_general(directory: str, device: str | torch.device = "cpu") -> SAE:
    """The general SAE of ``directory`` (ours, SAELens or sparsify) as the start of a finetune.

    Our checkpoints load unchanged. Other formats have no input scale; they get one (inputs scaled to
    mean norm sqrt(d) on the finetuning data, see ``match_scale``) so that a TERM tilt means the same for
    every SAE. A decoder whose rows are not unit-norm is renormalised by the first step."""
    sae = load_sae(directory, device)
    sae.foreign_format = detect_format(directory) != "ssae"
    norms = sae.W_dec.detach().norm(dim=1)
    if (norms - 1).abs().max() > 1e-3:
        warnings.warn(f"{directory}: decoder rows have norms in [{float(norms.min()):.3g}, "
                      f"{float(norms.max()):.3g}]; finetuning keeps them unit-norm from the first step")
    return sae


def scale_for_finetuning(general: SAE, acts: torch.Tensor) -> None:
    """``match_scale`` on the finetuning data for an SAE of another format, which has no input scale of its
    own (see ``from_general``); our SAEs keep theirs."""
    if getattr(general, "foreign_format", False) and float(general.input_scale) == 1.0:
        match_scale(general, acts)


@torch.no_grad()
def match_scale(sae: SAE, acts: torch.Tensor) -> float:
    """Gives an SAE with input_scale 1 the scale at which rows of ``acts`` have mean norm sqrt(d),
    rescaling b_enc and b_dec with it: the pre-activations scale uniformly, so the same latents are
    selected and x_hat is unchanged (up to rounding). Returns the scale."""
    s = float(math.sqrt(sae.cfg.d_in) / acts.float().norm(dim=1).mean().clamp_min(1e-12))
    sae.input_scale.fill_(s)
    sae.b_enc.mul_(s)
    sae.b_dec.mul_(s)
    return s


@torch.no_grad()
def calibrate_tilt(sae: SAE, acts: torch.Tensor, batch_size: int, *, ess: float = 0.25, batches: int = 8,
                   seed: int = 0) -> float:
    """The TERM tilt t at which the tilted weights softmax(t * loss) of a batch have an effective sample
    size (1 / sum w^2) of ``ess`` times the batch, on ``sae``'s per-token losses over ``acts`` (the
    training data, never the evaluation text).

    A tilt only means something relative to the spread of the losses: at the SAE's input scale (mean
    token norm sqrt(d)) per-token squared errors of SmolLM2 layer 15 have mean ~56 and std ~33, so
    t = 500 puts the whole batch's weight on its single worst token (ESS 1/2048) and the finetune learns
    from one token per step. Calibrating to an ESS fraction keeps TERM's emphasis on the worst tokens
    while still averaging over a real part of the batch."""
    if not 0 < ess < 1:
        raise ValueError(f"ess must be in (0, 1), got {ess}")
    g = torch.Generator().manual_seed(seed)
    n = min(acts.shape[0], batch_size * batches)
    x = acts[torch.randperm(acts.shape[0], generator=g)[:n]]
    losses = torch.cat([((sae(b) - b) ** 2).sum(1) * sae.input_scale ** 2 for b in x.split(4096)]).double()
    groups = [grp for grp in losses.split(batch_size) if len(grp) == batch_size] or [losses]

    def ess_fraction(t):
        return sum(float(1 / (torch.softmax(t * grp, 0) ** 2).sum()) / len(grp) for grp in groups) / len(groups)

    lo, hi = -12.0, 6.0  # log10 t; the ESS fraction falls monotonically with t
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess_fraction(10 ** mid) > ess else (lo, mid)
    return float(10 ** ((lo + hi) / 2))


def with_replay(acts: torch.Tensor, general_acts: torch.Tensor | None, fraction: float, *,
                seed: int = 0) -> torch.Tensor:
    """``acts`` followed by random rows of ``general_acts`` that make up ``fraction`` of the result (replay).

    Held-out subdomain text still holds general constructs (URLs, copyright lines, cross-references)
    that retrieval's chunks may lack entirely; a finetune on the chunks alone forgets them, and those
    tokens then carry the worst per-token errors. A share of the general SAE's training data keeps
    them in every batch. Rows are drawn without replacement (seeded); with too few general rows all
    are used and a warning says which fraction that gives."""
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return acts
    if general_acts is None or general_acts.shape[0] == 0:
        raise ValueError("replay needs general activations (the general SAE's training data)")
    if general_acts.shape[1] != acts.shape[1]:
        raise ValueError(f"general activations have width {general_acts.shape[1]}, not {acts.shape[1]}")
    n = int(round(fraction / (1 - fraction) * acts.shape[0]))
    if n > general_acts.shape[0]:
        warnings.warn(f"replay: {general_acts.shape[0]} general rows give a fraction of "
                      f"{general_acts.shape[0] / (general_acts.shape[0] + acts.shape[0]):.3f}, not {fraction}")
        n = general_acts.shape[0]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(general_acts.shape[0], generator=g)[:n].to(general_acts.device)
    return torch.cat([acts, general_acts[rows].to(acts.device, acts.dtype)])


def parse_tilt(value: str) -> float | str:
    """A TERM tilt: a number, or 'auto' (``calibrate_tilt``)."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tilt must be a number or 'auto', got {value!r}") from None


def check_finetune_options(*, replay: float, tilt: float | str, tilt_ess: float) -> None:
    """UsageError for the finetuning flags, before anything is loaded."""
    if not 0 <= replay < 1:
        raise UsageError(f"--replay must be in [0, 1), got {replay}")
    if tilt == "auto" and not 0 < tilt_ess < 1:
        raise UsageError(f"--tilt-ess must be in (0, 1), got {tilt_ess}")


def start_finetune(general: SAE, *, dead_tokens: int | None = None) -> SAE:
    """A copy of ``general`` with identical parameters and input scale; the firing counters restart (a
    latent is dead after ``dead_tokens`` finetuning tokens without firing)."""
    sae = copy.deepcopy(general)
    if dead_tokens is not None:
        sae.cfg = dataclasses.replace(sae.cfg, dead_tokens=int(dead_tokens))
    sae.tokens_since_fired.zero_()
    return sae


def finetune(general: SAE, acts: torch.Tensor, cfg: TrainConfig, out_dir: str, *, progress: bool = True,
             resume: bool = False, dead_tokens: int | None = None) -> Trainer:
    """Trains a copy of ``general`` on ``acts`` with the training layer's Trainer (checkpoints in
    ``out_dir/checkpoint``, metrics in ``out_dir/metrics.jsonl``, resume), then saves ``out_dir/sae``.
    A latent is dead after ``dead_tokens`` tokens without firing (default: a tenth of the finetune's
    tokens, at most the general SAE's horizon). Returns the Trainer (``trainer.sae`` is the finetuned SAE)."""
    if acts.shape[1] != general.cfg.d_in:
        raise ValueError(f"activations have width {acts.shape[1]} but the SAE expects d_in = {general.cfg.d_in}")
    if dead_tokens is None:
        dead_tokens = dead_tokens_for(cfg.steps, cfg.batch_size, cap=general.cfg.dead_tokens)
    sae = start_finetune(general, dead_tokens=dead_tokens)
    trainer = Trainer(sae, acts, cfg, out_dir, progress=progress)
    trainer.begin(resume=resume)
    trainer.train()
    sae.save(os.path.join(out_dir, "sae"))
    return trainer
