"""What both modes of ``ssae subspace`` (the evaluated run and ``--tune``) are built from: checking the
flags, loading the model, behaviour pair (with its kept answers self-distilled) and neutral text, one SAE
per layer, the feature means, and training one method in place."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ... import models, text
from ...data.behaviour import BehaviourPair, load_behaviour
from ...models import check_layer
from ..common import UsageError, check_positive, dead_tokens_for, keep_mask, set_threads
from .adapters import (ProjectedGradient, attach_lora_adapters, attach_subspace_adapters, out_of_span,
                       residual_writers, save_adapter)
from .features import mean_feature_activations
from .finetuning import count_parameters, distill_keep, finetune
from .prompts import format_prompt

if TYPE_CHECKING:
    from .pipeline import SubspaceConfig

METHODS = ("subspace", "projected", "lora", "full")
ADAPTERS = ("subspace", "projected")
SIGNS = ("target", "both")


def parse_layers(spec: str) -> list[int]:
    """``--layers`` ("15" or "10,15") as sorted distinct layer indices."""
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {spec!r}") from None
    if not layers:
        raise UsageError("--layers is empty")
    return layers


def methods_of(cfg: SubspaceConfig) -> list[str]:
    """--adapter first (the headline), then the --compare methods not already run."""
    if cfg.adapter not in ADAPTERS:
        raise UsageError(f"--adapter must be one of {', '.join(ADAPTERS)}, got {cfg.adapter!r}")
    compare = [m for m in (s.strip() for s in cfg.compare.split(",")) if m]
    for m in compare:
        if m not in METHODS:
            raise UsageError(f"--compare: unknown method {m!r}; known: {', '.join(METHODS)}")
    return [cfg.adapter] + [m for m in compare if m != cfg.adapter]


def check_config(cfg: SubspaceConfig) -> None:
    """Every mistake in the flags that can be seen without loading anything, as a UsageError naming the flag."""
    methods_of(cfg)
    layers = parse_layers(cfg.layers)
    if cfg.sae is not None and len(cfg.sae) not in (0, len(layers)):
        raise UsageError(f"--sae needs one directory per layer ({len(layers)}), got {len(cfg.sae)}")
    if cfg.signs not in SIGNS:
        raise UsageError(f"--signs must be one of {', '.join(SIGNS)}, got {cfg.signs!r}")
    if not 0 < cfg.variance <= 1:
        raise UsageError(f"--variance must be in (0, 1], got {cfg.variance}")
    if cfg.keep_share is not None and not 0 <= cfg.keep_share < 1:
        raise UsageError(f"--keep-share must be in [0, 1), got {cfg.keep_share}")
    check_positive(features_per_layer=cfg.features_per_layer, steps=cfg.steps, batch_size=cfg.batch_size,
                   max_new_tokens=cfg.max_new_tokens, distill_tokens=cfg.distill_tokens,
                   ppl_sequences=cfg.ppl_sequences, tune_ppl_sequences=cfg.tune_ppl_sequences,
                   sae_tokens=cfg.sae_tokens, sae_latents=cfg.sae_latents, sae_k=cfg.sae_k,
                   sae_steps=cfg.sae_steps, sae_batch_size=cfg.sae_batch_size)
    if cfg.context < 2:
        raise UsageError(f"--context must be >= 2, got {cfg.context}")
    if not cfg.out:
        raise UsageError("--out is required")


def train_layer_sae(model, tokenizer, layer: int, texts: list[str], out_dir: str, *, max_tokens: int,
                    latents: int, k: int, steps: int, batch_size: int, seed: int = 0, progress: bool = False):
    """A TopK SAE for one layer's residual stream, trained here with the project's trainer;
    returns (sae, stats) with the FVU on 5% of the harvested tokens held out."""
    from ...activations import harvest
    from ...evaluate import reconstruction_metrics
    from ...trainer import TrainConfig, Trainer, new_sae

    data = harvest(model, tokenizer, texts, layer, context=256, max_tokens=max_tokens, progress=progress)
    acts = data.acts[keep_mask(data.acts, 10.0)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(acts.shape[0], generator=g)
    held = max(1, acts.shape[0] // 20)
    train, test = acts[perm[held:]], acts[perm[:held]]
    sae = new_sae(train, latents, k, seed=seed, dead_tokens=dead_tokens_for(steps, batch_size))
    cfg = TrainConfig(steps=steps, batch_size=min(batch_size, train.shape[0]), checkpoint_every=10**9, seed=seed)
    trainer = Trainer(sae, train, cfg, out_dir, progress=progress)
    trainer.begin(resume=False)
    trainer.train()
    sae.save(os.path.join(out_dir, "sae"))
    metrics = reconstruction_metrics(sae, test)
    return sae, {"fvu": metrics["fvu"], "tokens": int(acts.shape[0]), "outliers_excluded": len(data) - acts.shape[0],
                 "latents": latents, "k": k, "steps": steps}


@dataclass
class Setup:
    model: object
    tokenizer: object
    behaviour: BehaviourPair
    saes: dict
    sae_stats: dict
    neutral_chunks: list  # token chunks of neutral documents the SAE never saw (perplexity)
    distilled: dict  # counts of the self-distilled kept answers (distill_keep)
    layers: list
    methods: list
    total_params: int


def setup(cfg: SubspaceConfig, lap) -> Setup:
    """Model, behaviour pair (kept answers self-distilled), neutral text and one SAE per layer (loaded or
    trained here): what both the run and the tuning start from."""
    from ...activations import token_chunks
    from ...formats import load_sae

    check_config(cfg)
    set_threads(cfg.threads)
    methods, layers = methods_of(cfg), parse_layers(cfg.layers)
    progress = not cfg.quiet
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, tokenizer = models.load_model(cfg.model, device=cfg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        check_layer(model, layer)
    behaviour = load_behaviour(cfg.behaviour)
    docs = text.read_texts(cfg.neutral_text)
    if len(docs) < 2:
        raise UsageError(f"--neutral-text {cfg.neutral_text!r} needs at least two documents")
    sae_docs, ppl_docs = docs[0::2], docs[1::2]  # disjoint: perplexity is measured on unseen documents
    neutral_chunks = token_chunks(tokenizer, ppl_docs, cfg.context)
    total_params = count_parameters(model)
    lap("load")
    distilled = distill_keep(model, tokenizer, behaviour, max_new_tokens=cfg.distill_tokens)
    if distilled["distilled"] + distilled["dropped"]:
        print(f"[subspace] self-distilled {distilled['distilled']} kept answers "
              f"({distilled['dropped']} dropped: empty or judged refusals)", flush=True)
        lap("distill")

    # SAEs: given, or trained here on neutral text plus the training split's formatted examples
    saes, sae_stats = {}, {}
    for i, layer in enumerate(layers):
        if cfg.sae:
            saes[layer] = load_sae(cfg.sae[i], cfg.device)
            sae_stats[layer] = {"source": cfg.sae[i]}
        else:
            chat = [format_prompt(tokenizer, e.prompt) + r for e in behaviour.train + behaviour.keep
                    for r in (e.target, e.contrast) if r is not None]
            saes[layer], sae_stats[layer] = train_layer_sae(
                model, tokenizer, layer, chat + sae_docs, os.path.join(cfg.out, f"sae_layer{layer}"),
                max_tokens=cfg.sae_tokens, latents=cfg.sae_latents, k=cfg.sae_k, steps=cfg.sae_steps,
                batch_size=cfg.sae_batch_size, seed=cfg.seed, progress=progress)
        if saes[layer].cfg.d_in != model.config.hidden_size:
            raise UsageError(f"--sae: the SAE of layer {layer} has d_in = {saes[layer].cfg.d_in}, the model's "
                             f"width is {model.config.hidden_size}")
    lap("sae")
    return Setup(model, tokenizer, behaviour, saes, sae_stats, neutral_chunks, distilled, layers, methods,
                 total_params)


def stopwatch():
    """(times dict, lap(name)) printing each stage's seconds."""
    times: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        times[name] = round(now - clock[0], 2)
        clock[0] = now
        print(f"[subspace] {name}: {times[name]:.1f} s", flush=True)
    return times, lap


def feature_means(ctx: Setup, progress: bool):
    """(target means, contrast means) of every SAE latent over the training split's responses."""
    target_pairs = [(e.prompt, e.target) for e in ctx.behaviour.train]
    contrast_pairs = [(e.prompt, e.contrast) for e in ctx.behaviour.train]
    return (mean_feature_activations(ctx.model, ctx.tokenizer, ctx.saes, target_pairs, progress=progress),
            mean_feature_activations(ctx.model, ctx.tokenizer, ctx.saes, contrast_pairs, progress=progress))


def train_method(method, model, tokenizer, subspaces, encoded, cfg, progress):
    """Trains one method in place on ``model``; returns (result dict, finish(adapter_dir, **info)), where
    finish saves the adapter (not for full finetuning) with :func:`~.adapters.save_adapter` when
    ``adapter_dir`` is given, and restores the base model."""
    ranks = {layer: s.rank for layer, s in subspaces.items()}
    if method in ("subspace", "lora"):
        adapters = (attach_subspace_adapters(model, subspaces) if method == "subspace"
                    else attach_lora_adapters(model, ranks, seed=cfg.seed))
        stats = finetune(model, tokenizer, encoded, adapters.parameters(), cfg, progress=progress, desc=method)
        spans = out_of_span(adapters.delta_weights(), subspaces)
        result = {**stats, "trainable_params": adapters.num_trainable(), "max_out_of_span": max(spans.values()),
                  "out_of_span": spans}

        def finish(adapter_dir=None, **info):
            if adapter_dir:
                save_adapter(adapter_dir, method, adapters.state_dict(), model, **info)
            adapters.remove()
        return result, finish
    if method == "projected":
        pg = ProjectedGradient(model, subspaces)
        stats = finetune(model, tokenizer, encoded, pg.parameters(), cfg, after_step=pg.after_step,
                         progress=progress, desc=method)
        spans = out_of_span(pg.delta_weights(), subspaces)
        result = {**stats, "trainable_params": pg.num_trainable(), "effective_params": pg.num_effective(),
                  "max_out_of_span": max(spans.values()), "out_of_span": spans}

        def finish(adapter_dir=None, **info):
            if adapter_dir:
                save_adapter(adapter_dir, method, {f"{k}.delta": v for k, v in pg.delta_weights().items()}, model,
                             **info)
            pg.restore()
        return result, finish
    if method == "full":
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        stats = finetune(model, tokenizer, encoded, params, cfg, progress=progress, desc=method)
        deltas = {}
        for layer in subspaces:
            for name, module in residual_writers(model, layer):
                key = next(k for k, v in model.state_dict().items() if v.data_ptr() == module.weight.data_ptr())
                deltas[name] = module.weight.detach().double() - saved[key].double()
        spans = out_of_span(deltas, subspaces)
        result = {**stats, "trainable_params": sum(p.numel() for p in params),
                  "max_out_of_span": max(spans.values()), "out_of_span": spans}

        def finish(adapter_dir=None, **info):  # the whole model is the update: not saved
            with torch.no_grad():
                model.load_state_dict(saved)
            for p in params:
                p.requires_grad_(False)
        return result, finish
    raise ValueError(f"unknown method {method!r}")
