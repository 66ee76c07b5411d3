"""``ssae subspace`` as a function: :class:`SubspaceConfig` holds every flag, :func:`run` does selection ->
subspace -> finetuning -> evaluation (or, with ``tune``, :func:`~.tuning.tune`) and writes the report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from ... import models, text
from ...data.behaviour import BUILTIN as BUILTIN_BEHAVIOUR
from .adapters import residual_writers, save_subspaces, subspaces_from_features
from .features import save_features, select_features
from .finetuning import FinetuneConfig, evaluate_behaviour, training_examples
from ..common import check_sources, run_settings
from ..rundir import open_run
from .stages import check_config, feature_means, setup, stopwatch, train_method
from .tuning import tune


@dataclass
class SubspaceConfig:
    """Every flag of ``ssae subspace`` (same names, ``--batch-size`` -> ``batch_size``); the flags' help
    explains each field, and these are their defaults."""

    out: str  # output directory: report.json, features.json, subspace.safetensors, adapters
    model: str = models.BUILTIN
    layers: str = "15"  # comma-separated
    sae: list[str] | None = None  # one directory per layer; None or []: train one per layer
    behaviour: str = BUILTIN_BEHAVIOUR
    neutral_text: str = text.BUILTIN
    features_per_layer: int = 32
    # signs and lr as `--tune` picked them on the dev split (rule in pick_setting; SmolLM2, layer 15,
    # 3 epochs; dev base: target 0.133, over-refusal 0.000). Dev target / over-refusal / ppl rise:
    # target 1e-3 0.267 / 0.000 / -0.1%, 3e-3 0.333 / 0.000 / +1.4%, 1e-2 0.933 / 0.400 / +4.9%;
    # both 1e-3 0.333 / 0.067 / +0.4%, 3e-3 0.800 / 0.200 / +2.1% (chosen), 1e-2 0.933 / 0.333 / +4.0%.
    # projected_lr and full_lr are not tuned (the comparison methods).
    signs: str = "both"
    variance: float = 0.8
    adapter: str = "subspace"
    compare: str = "projected,lora,full"
    epochs: int = 3
    batch_size: int = 8
    lr: float = 3e-3
    projected_lr: float = 1e-3
    full_lr: float = 2e-5
    max_new_tokens: int = 16
    ppl_sequences: int = 16
    context: int = 128
    sae_tokens: int = 24_000
    sae_latents: int = 2048
    sae_k: int = 32
    sae_steps: int = 300
    sae_batch_size: int = 1024
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False
    tune: bool = False
    tune_lrs: str = "1e-3,3e-3,1e-2"
    tune_signs: str = "target,both"
    tune_max_ppl_rise: float = 0.05


def run(cfg: SubspaceConfig) -> dict:
    """Selection -> subspace -> finetuning -> evaluation; writes ``cfg.out``/report.json and returns it.
    With ``cfg.tune``, :func:`~.tuning.tune` instead (hyperparameters chosen on the dev split)."""
    check_config(cfg)
    check_sources(cfg.model, (cfg.neutral_text,))
    with open_run(cfg.out, "subspace", run_settings(cfg), overwrite=cfg.overwrite):
        return tune(cfg) if cfg.tune else _run(cfg)


def _run(cfg: SubspaceConfig) -> dict:
    started = time.perf_counter()
    times, lap = stopwatch()
    progress = not cfg.quiet
    ctx = setup(cfg, lap)
    model, tokenizer, behaviour, saes, sae_stats = ctx.model, ctx.tokenizer, ctx.behaviour, ctx.saes, ctx.sae_stats
    layers, methods, total_params, headline = ctx.layers, ctx.methods, ctx.total_params, cfg.adapter
    ppl_chunks = ctx.neutral_chunks[: cfg.ppl_sequences]

    mean_t, mean_c = feature_means(ctx, progress)
    selections = select_features(mean_t, mean_c, per_layer=cfg.features_per_layer, signs=cfg.signs)
    save_features(os.path.join(cfg.out, "features.json"), selections)
    lap("selection")

    subspaces = subspaces_from_features(saes, selections, cfg.variance)
    save_subspaces(os.path.join(cfg.out, "subspace.safetensors"), subspaces)
    for layer, sub in subspaces.items():
        print(f"[subspace] layer {layer}: {len(sub.feature_ids)} features -> r = {sub.rank} "
              f"({sub.explained:.1%} of their variance)", flush=True)
    lap("subspace")

    base = evaluate_behaviour(model, tokenizer, behaviour, ppl_chunks, max_new_tokens=cfg.max_new_tokens)
    lap("eval_base")

    encoded = training_examples(tokenizer, behaviour)
    results = {}
    for method in methods:
        train_cfg = FinetuneConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                                   lr={"subspace": cfg.lr, "lora": cfg.lr, "projected": cfg.projected_lr,
                                       "full": cfg.full_lr}[method])
        result, cleanup = train_method(method, model, tokenizer, subspaces, encoded, train_cfg, progress)
        lap(f"train_{method}")
        result.update(evaluate_behaviour(model, tokenizer, behaviour, ppl_chunks, max_new_tokens=cfg.max_new_tokens))
        result["lr"] = train_cfg.lr
        cleanup(cfg.out)
        lap(f"eval_{method}")
        result["trainable_fraction"] = result["trainable_params"] / total_params
        over = (base.get("control_target_rate", 0.0), result.get("control_target_rate", 0.0))
        print(f"[subspace] {method}: target {base['target_metric']:.3f} -> {result['target_metric']:.3f}, "
              f"over-refusal {over[0]:.3f} -> {over[1]:.3f}, "
              f"ppl {result['ppl'] / base['ppl'] - 1:+.2%}, trainable {result['trainable_fraction']:.3%}, "
              f"max out-of-span {result['max_out_of_span']:.1e}", flush=True)
        if "effective_params" in result:
            result["effective_fraction"] = result["effective_params"] / total_params
        results[method] = result

    main = results[headline]
    report = {
        "trainable_fraction": main.get("effective_fraction", main["trainable_fraction"]),
        "target_metric_base": base["target_metric"],
        "target_metric_tuned": main["target_metric"],
        "ppl_base": base["ppl"],
        "ppl_tuned": main["ppl"],
        "ppl_rise": main["ppl"] / base["ppl"] - 1,
        "max_out_of_span": main["max_out_of_span"],
        "control_target_rate_base": base.get("control_target_rate"),
        "control_target_rate_tuned": main.get("control_target_rate"),
        "adapter": headline,
        "comparisons": {m: _summary(r, base) for m, r in results.items() if m != headline},
        "headline": _summary(main, base),
        "subspace": {str(layer): {"rank": s.rank, "features": len(s.feature_ids), "explained_variance": s.explained,
                                  "modules": [n for n, _ in residual_writers(model, layer)]}
                     for layer, s in subspaces.items()},
        "features": {str(layer): {"ids": s.ids[:10], "relative": [round(v, 4) for v in s.relative[:10]]}
                     for layer, s in selections.items()},
        "sae": {str(k): v for k, v in sae_stats.items()},
        "base_examples": base["examples"],
        "total_params": total_params,
        "target_metric_rule": f"fraction of greedy completions ({cfg.max_new_tokens} new tokens) of the "
                              f"{len(behaviour.eval_prompts)} held-out prompts containing any of "
                              f"{len(behaviour.markers)} target markers (ssae_kernels/data/behaviour.py)",
        "behaviour": behaviour.name, "train_pairs": len(behaviour.train), "keep_examples": len(behaviour.keep),
        "ppl_text": f"{cfg.neutral_text}: {len(ppl_chunks)} sequences x {cfg.context} tokens, documents not used "
                    "for the SAE",
        "model": cfg.model, "layers": layers, "features_per_layer": cfg.features_per_layer, "signs": cfg.signs,
        "variance": cfg.variance, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "threads": torch.get_num_threads(), "seconds": times,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _summary(r: dict, base: dict) -> dict:
    keys = ("trainable_fraction", "trainable_params", "effective_fraction", "effective_params", "target_metric",
            "control_target_rate", "ppl", "max_out_of_span", "loss_first_epoch", "loss_last_epoch", "steps", "lr",
            "examples")
    out = {k: r[k] for k in keys if k in r}
    out["ppl_rise"] = r["ppl"] / base["ppl"] - 1
    return out

