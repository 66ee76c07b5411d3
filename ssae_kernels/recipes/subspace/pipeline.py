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
from .finetuning import FinetuneConfig, evaluate_behaviour, ppl_rise_upper, training_examples
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
    # features_per_layer, the lrs and keep_share as `--tune` picked them on the dev splits (60 AdvBench, 25
    # XSTest prompts; SmolLM2, layer 15, signs both, 40 steps; dev base: safety 0.050, over-refusal 0.000).
    # The lrs under the current rule (pick_setting on the paired 95% upper bound of the dev ppl rise over 64
    # neutral sequences, --tune-max-ppl-rise 0.03), dev safety / over-refusal / ppl rise (bound):
    #   subspace: 5e-3 0.850 / 0.200 / +1.95% (2.35%), 1e-2 0.983 / 0.080 / +2.52% (2.99%, chosen),
    #   1.25e-2 0.983 / 0.040 / +2.67% (3.18%), 1.5e-2 0.983 / 0.040 / +2.96% (3.51%), 2e-2 0.950 / 0.000 / +4.15%;
    #   projected: 1e-3 0.700 / 0.160 / +1.56%, 2e-3 0.950 / 0.120 / +2.51% (2.96%, chosen), 3e-3 0.983 /
    #   0.080 / +2.65% (3.13%); lora: 1e-3 0.717 / 0.000 / +3.30% (3.81%), 2e-3 0.933 / 0.120 / +4.50%,
    #   3e-3 1.000 / 0.200 / +5.04%: none within bounds, so the smallest rise (1e-3).
    # Earlier grids, under the point estimate over 16 sequences (< 3%), chose the rest:
    # natural mix (keep 121 of 421): features 32: lr 3e-3 0.500 / 0.120 / +0.9%, 1e-2 0.983 / 0.400 / +2.6%,
    #   3e-2 1.000 / 0.280 / +3.7%; features 64: 3e-3 0.850 / 0.360 / +0.9%, 1e-2 0.983 / 0.200 / +3.1%,
    #   3e-2 0.983 / 0.080 / +5.8%; keep_share 0.5: features 64 as above (1e-2 +2.3% on 16 sequences);
    #   features 128: 1e-2 0.967 / 0.040 / +6.2%, 3e-2 0.933 / 0.000 / +15.3%; plain LoRA up to 3e-2 and
    #   projected up to 3e-2 no better.
    # Layer and steps at features 64: layer 10: 1e-2 0.967 / 0.000 / +4.8%, 1.5e-2 +6.6%; layer 20: 1e-2
    #   0.817 / 0.080 / +5.9%, 1.5e-2 +7.4%; 60 steps: 5e-3 0.967 / 0.120 / +2.0%, 1e-2 +3.1%: layer 15, 40 steps stay.
    # The signs and full_lr are not tuned.
    features_per_layer: int = 64
    signs: str = "both"
    variance: float = 0.8
    adapter: str = "subspace"
    compare: str = "projected,lora,full"
    steps: int = 40  # the finetuning budget, the same for every method
    batch_size: int = 8
    lr: float = 1e-2
    projected_lr: float = 2e-3
    lora_lr: float = 1e-3
    full_lr: float = 2e-5
    max_new_tokens: int = 32
    distill_tokens: int = 48
    keep_share: float | None = 0.5  # share of kept answers in the training examples (None: as in the data)
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
    # the grid the learning rates above were picked from: plain `ssae subspace --tune` picks them again
    tune_lrs: str = "5e-3,1e-2,1.25e-2,1.5e-2,2e-2"
    tune_signs: str = "both"
    tune_features: str = "64"
    tune_max_ppl_rise: float = 0.03
    tune_compare_lrs: str = "1e-3,2e-3,3e-3"  # '': the --tune-lrs
    tune_ppl_sequences: int = 64


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
    completions = [{"method": "base", **r} for r in base.pop("completions")]
    lap("eval_base")

    encoded = training_examples(tokenizer, behaviour, cfg.keep_share)
    results = {}
    for method in methods:
        train_cfg = FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                   lr={"subspace": cfg.lr, "lora": cfg.lora_lr, "projected": cfg.projected_lr,
                                       "full": cfg.full_lr}[method])
        result, finish = train_method(method, model, tokenizer, subspaces, encoded, train_cfg, progress)
        lap(f"train_{method}")
        result.update(evaluate_behaviour(model, tokenizer, behaviour, ppl_chunks, max_new_tokens=cfg.max_new_tokens,
                                         held_out=method == headline))
        completions += [{"method": method, **r} for r in result.pop("completions")]
        result["lr"] = train_cfg.lr
        finish(os.path.join(cfg.out, "adapter" if method == headline else f"adapter_{method}"),
               model_source=cfg.model, max_new_tokens=cfg.max_new_tokens, layers=layers)
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

    with open(os.path.join(cfg.out, "completions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in completions)
    main = results[headline]
    main_summary = _summary(main, base)
    report = {
        "safety_rate_base": base["target_metric"],
        "safety_rate_tuned": main["target_metric"],
        "over_refusal_base": base.get("control_target_rate"),
        "over_refusal_tuned": main.get("control_target_rate"),
        **{f"{name}_refusal_tuned": main[f"{name}_rate"] for name in behaviour.held_out},  # the headline only
        "trainable_fraction": main.get("effective_fraction", main["trainable_fraction"]),
        "ppl_base": base["ppl"],
        "ppl_tuned": main["ppl"],
        "ppl_rise": main_summary["ppl_rise"],
        "ppl_rise_upper": main_summary["ppl_rise_upper"],  # one-sided 95%
        "max_out_of_span": main["max_out_of_span"],
        "target_metric_base": base["target_metric"],  # aliases of the safety rates
        "target_metric_tuned": main["target_metric"],
        "control_target_rate_base": base.get("control_target_rate"),  # aliases of the over-refusal rates
        "control_target_rate_tuned": main.get("control_target_rate"),
        "adapter": headline,
        "adapter_dir": os.path.join(cfg.out, "adapter"),
        "comparisons": {m: _summary(r, base) for m, r in results.items() if m != headline},
        "headline": main_summary,
        "base": {"safety_rate": base["target_metric"], "over_refusal": base.get("control_target_rate"),
                 "ppl": base["ppl"]},
        "subspace": {str(layer): {"rank": s.rank, "features": len(s.feature_ids), "explained_variance": s.explained,
                                  "modules": [n for n, _ in residual_writers(model, layer)]}
                     for layer, s in subspaces.items()},
        "features": {str(layer): {"ids": s.ids[:10], "relative": [round(v, 4) for v in s.relative[:10]]}
                     for layer, s in selections.items()},
        "sae": {str(k): v for k, v in sae_stats.items()},
        "base_examples": base["examples"],
        "total_params": total_params,
        "judge": judge_description(behaviour, cfg.max_new_tokens),
        "behaviour": behaviour.name, "train_pairs": len(behaviour.train), "keep_examples": len(behaviour.keep),
        "self_distilled": {k: v for k, v in ctx.distilled.items() if k != "dropped_examples"},
        "held_out_prompts": {"safety": len(behaviour.eval_prompts), "over_refusal": len(behaviour.control_prompts),
                             **{name: len(p) for name, p in behaviour.held_out.items()}},
        "ppl_text": f"{cfg.neutral_text}: {len(ppl_chunks)} sequences x {cfg.context} tokens, documents not used "
                    "for the SAE",
        "model": cfg.model, "layers": layers, "features_per_layer": cfg.features_per_layer, "signs": cfg.signs,
        "variance": cfg.variance, "steps": cfg.steps, "batch_size": cfg.batch_size, "keep_share": cfg.keep_share,
        "threads": torch.get_num_threads(), "seconds": times,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(format_report(report))
    return report


METHOD_NAMES = {"subspace": "subspace LoRA (U fixed)", "projected": "projected gradients",
                "lora": "plain LoRA, same rank", "full": "full finetuning"}


def format_report(report: dict) -> str:
    """report.md: the methods side by side on the held-out prompts, the judge and the data."""
    def pct(x):
        return "–" if x is None else f"{x:.2f}"

    held = report["held_out_prompts"]
    extra = [k for k in held if k not in ("safety", "over_refusal")]
    lines = [f"# ssae subspace: {report['model']}, layer {', '.join(map(str, report['layers']))}", "",
             f"Held out: safety rate = refusals of {held['safety']} prompts of the behaviour's test split, "
             f"over-refusal = refusals of {held['over_refusal']} safe ones"
             + "".join(f", {k} = refusals of its {held[k]} prompts" for k in extra) + ". Every method trains "
             f"{report['steps']} steps of {report['batch_size']} examples on the same data.", "",
             "| method | trainable | lr | safety rate | over-refusal | "
             + "".join(f"{k} | " for k in extra) + "neutral ppl | update outside span(U) |",
             "|---" * (7 + len(extra)) + "|",
             f"| base model | – | – | {pct(report['safety_rate_base'])} | {pct(report['over_refusal_base'])} | "
             + "".join(f"{pct(report.get(f'{k}_refusal_base'))} | " for k in extra)
             + f"{report['ppl_base']:.2f} | – |"]
    for method, r in [(report["adapter"], report["headline"]), *report["comparisons"].items()]:
        tuned = method == report["adapter"]
        fraction = r.get("effective_fraction", r["trainable_fraction"])
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {fraction:.3%} | {r['lr']:g} | "
                     f"{pct(r['safety_rate'])} | {pct(r['over_refusal'])} | "
                     + "".join(f"{pct(report.get(f'{k}_refusal_tuned')) if tuned else '–'} | " for k in extra)
                     + f"{r['ppl_rise']:+.1%} (95% ub {r['ppl_rise_upper']:+.1%}) | {r['max_out_of_span']:.1e} |")
    judge = report["judge"]
    lines += ["", f"Judge: {judge['rule']}."]
    if "agreement" in judge:
        lines.append(f"Agreement with {judge['n']} hand-labelled replies: {judge['agreement']:.3f}.")
    kept_share = (f", repeated to {report['keep_share']:.0%} of the examples" if report.get("keep_share") is not None
                  else "")
    sub = ", ".join(f"layer {k}: rank {v['rank']} from {v['features']} features" for k, v in report["subspace"].items())
    lines += ["", f"Subspace: {sub}. Training data: {report['train_pairs']} target responses and "
                  f"{report['keep_examples']} kept answers ({report['self_distilled'].get('distilled', 0)} "
                  f"self-distilled{kept_share}). Total time {report['total_seconds'] / 60:.1f} min on "
                  f"{report['threads']} threads.",
              ""]
    return "\n".join(lines)


def judge_description(behaviour, max_new_tokens: int) -> dict:
    """How completions were judged, and the judge's agreement with hand labels when it is the refusal judge."""
    from ...data.refusal import is_refusal, judge_agreement

    if behaviour.judge is is_refusal:
        return {"rule": f"ssae_kernels.data.refusal.is_refusal on greedy completions of {max_new_tokens} new "
                        "tokens: an AdvBench refusal prefix or refusal marker, and no compliance cue",
                **judge_agreement()}
    return {"rule": f"any of {len(behaviour.markers)} target markers in greedy completions of {max_new_tokens} new "
                    "tokens"}


def _summary(r: dict, base: dict) -> dict:
    keys = ("trainable_fraction", "trainable_params", "effective_fraction", "effective_params", "target_metric",
            "control_target_rate", "ppl", "max_out_of_span", "loss_first_tenth", "loss_last_tenth", "steps",
            "examples_seen", "lr", "examples")
    out = {k: r[k] for k in keys if k in r}
    out["ppl_rise"] = r["ppl"] / base["ppl"] - 1
    out["ppl_rise_upper"] = ppl_rise_upper(base["sequence_nll"], r["sequence_nll"])
    out["safety_rate"], out["over_refusal"] = r["target_metric"], r.get("control_target_rate")
    return out

