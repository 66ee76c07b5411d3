"""``ssae subspace --tune``: hyperparameters chosen on the behaviour's dev split, never on the eval prompts."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import torch

from ..common import UsageError
from .adapters import subspaces_from_features
from .features import select_features
from .finetuning import FinetuneConfig, evaluate_behaviour, ppl_rise_upper, training_examples
from .stages import SIGNS, feature_means, setup, stopwatch, train_method

if TYPE_CHECKING:
    from .pipeline import SubspaceConfig


def pick_setting(rows: list[dict], *, max_ppl_rise: float = 0.05, closest_if_none: bool = False,
                 rise: str = "ppl_rise") -> dict | None:
    """The rule by which :func:`tune` picks a setting from dev results: among rows whose neutral
    perplexity rise (the row's ``rise`` key: ``ppl_rise``, or ``ppl_rise_upper`` for its confidence bound)
    is below ``max_ppl_rise``, the highest dev target rate minus dev over-refusal (``control_target_rate``,
    0 without control prompts); ties go to the smaller rise, then to the earlier row. When no row keeps
    perplexity within bounds: None, or with ``closest_if_none`` (a comparison method needs some lr) the row
    of the smallest rise."""
    ok = [(i, r) for i, r in enumerate(rows) if r[rise] < max_ppl_rise]
    if not ok:
        return min(rows, key=lambda r: r[rise]) if closest_if_none and rows else None

    def key(item):
        i, r = item
        return (-(r["target_metric"] - r.get("control_target_rate", 0.0)), r[rise], i)
    return min(ok, key=key)[1]


def _positive_floats(spec: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {spec!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{flag} needs positive values, got {spec!r}")
    return values


def tune(cfg: SubspaceConfig) -> dict:
    """Evaluates the subspace adapter for every (--tune-signs, --tune-features, --tune-lrs) and, when projected
    gradients or plain LoRA are among the methods, each of them for every --tune-compare-lrs (default: the
    same lrs) at the chosen setting (so at the same rank), on the behaviour's **dev** split only (dev
    prompts, dev control prompts, and --tune-ppl-sequences neutral chunks after the ones
    :func:`~.pipeline.run` reports on). One SAE and one feature ranking serve every setting. Picks by
    :func:`pick_setting` on the 95% upper bound of the perplexity rise (:func:`~.finetuning.ppl_rise_upper`),
    prints the table and writes ``cfg.out``/tune.json."""
    started = time.perf_counter()
    times, lap = stopwatch()
    progress = not cfg.quiet
    lrs = _positive_floats(cfg.tune_lrs, "--tune-lrs")
    compare_lrs = _positive_floats(cfg.tune_compare_lrs, "--tune-compare-lrs") if cfg.tune_compare_lrs else lrs
    features_grid = [int(f) for f in _positive_floats(cfg.tune_features, "--tune-features")]
    signs_grid = [x.strip() for x in cfg.tune_signs.split(",") if x.strip()]
    for sg in signs_grid:
        if sg not in SIGNS:
            raise UsageError(f"--tune-signs: unknown value {sg!r} ({', '.join(SIGNS)})")
    if not signs_grid:
        raise UsageError("--tune-signs is empty")
    ctx = setup(cfg, lap)
    behaviour, model, tokenizer = ctx.behaviour, ctx.model, ctx.tokenizer
    behaviour.split_prompts("dev")  # fails early without a dev split
    # neutral chunks disjoint from the ones run() reports perplexity on
    dev_chunks = ctx.neutral_chunks[cfg.ppl_sequences: cfg.ppl_sequences + cfg.tune_ppl_sequences]
    if not dev_chunks:
        raise UsageError(f"--neutral-text has {len(ctx.neutral_chunks)} chunks of {cfg.context} tokens: none left "
                         f"for dev perplexity after the {cfg.ppl_sequences} reported ones")
    base = evaluate_behaviour(model, tokenizer, behaviour, dev_chunks, max_new_tokens=cfg.max_new_tokens, split="dev")
    lap("dev_base")
    base_summary = {"target_metric": base["target_metric"], "control_target_rate": base.get("control_target_rate"),
                    "ppl": base["ppl"]}
    print(f"[subspace] dev base: {base_summary}", flush=True)
    mean_t, mean_c = feature_means(ctx, progress)
    encoded = training_examples(tokenizer, behaviour, cfg.keep_share)
    subspaces, rows = {}, []

    def trial(method, setting, lr):
        signs, features = setting
        train_cfg = FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, lr=lr)
        torch.manual_seed(cfg.seed)
        result, finish = train_method(method, model, tokenizer, subspaces[setting], encoded, train_cfg, progress)
        dev = evaluate_behaviour(model, tokenizer, behaviour, dev_chunks, max_new_tokens=cfg.max_new_tokens,
                                 split="dev")
        finish()
        row = {"method": method, "signs": signs, "features_per_layer": features, "lr": lr,
               "rank": {str(k): s.rank for k, s in subspaces[setting].items()},
               "target_metric": dev["target_metric"], "control_target_rate": dev.get("control_target_rate", 0.0),
               "ppl": dev["ppl"], "ppl_rise": dev["ppl"] / base["ppl"] - 1,
               "ppl_rise_upper": ppl_rise_upper(base["sequence_nll"], dev["sequence_nll"]),
               "max_out_of_span": result["max_out_of_span"], "loss_last_tenth": result["loss_last_tenth"],
               "examples": dev["examples"]}
        rows.append(row)
        lap(f"{method} signs={signs} features={features} lr={lr:g}")
        print(f"[subspace] dev: target {row['target_metric']:.3f}, over-refusal {row['control_target_rate']:.3f}, "
              f"ppl {row['ppl_rise']:+.2%} (upper bound {row['ppl_rise_upper']:+.2%})", flush=True)
        with open(os.path.join(cfg.out, "tune_rows.json"), "w") as f:  # partial results of a long search
            json.dump({"base": base_summary, "rows": rows}, f, indent=2)
        return row

    for signs in signs_grid:
        for features in features_grid:
            selections = select_features(mean_t, mean_c, per_layer=features, signs=signs)
            subspaces[(signs, features)] = subspaces_from_features(ctx.saes, selections, cfg.variance)
            for lr in lrs:
                trial("subspace", (signs, features), lr)
    best = pick_setting([r for r in rows if r["method"] == "subspace"], max_ppl_rise=cfg.tune_max_ppl_rise,
                        rise="ppl_rise_upper")
    flags, outside = {}, []  # outside: comparison lrs none of which kept perplexity within bounds
    if best is not None:
        flags.update({"--signs": best["signs"], "--features-per-layer": best["features_per_layer"],
                      "--lr": best["lr"]})
        for method in (m for m in ("projected", "lora") if m in ctx.methods):  # at the chosen subspace's rank
            for lr in compare_lrs:
                trial(method, (best["signs"], best["features_per_layer"]), lr)
            chosen = pick_setting([r for r in rows if r["method"] == method], max_ppl_rise=cfg.tune_max_ppl_rise,
                                  closest_if_none=True, rise="ppl_rise_upper")
            flags[f"--{method}-lr"] = chosen["lr"]
            if chosen["ppl_rise_upper"] >= cfg.tune_max_ppl_rise:
                outside.append(f"--{method}-lr")
    report = {
        "split": "dev", "dev_prompts": len(behaviour.dev_prompts),
        "dev_control_prompts": len(behaviour.dev_control_prompts),
        "ppl_text": f"{cfg.neutral_text}: {len(dev_chunks)} sequences x {cfg.context} tokens after the "
                    f"{cfg.ppl_sequences} reported on",
        "rule": f"among settings whose dev ppl rise has a 95% upper bound < {cfg.tune_max_ppl_rise:.0%}: max dev "
                "target rate - dev over-refusal; ties: smaller bound, then the earlier setting",
        "base": base_summary,
        "rows": rows, "chosen": flags, "chosen_outside_ppl_bound": outside,
        "model": cfg.model, "layers": ctx.layers, "steps": cfg.steps,
        "seconds": times, "total_seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(cfg.out, "tune.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(format_tune_table(report))
    return report


def format_tune_table(report: dict) -> str:
    b = report["base"]
    lines = [f"dev split: {report['dev_prompts']} target prompts, {report['dev_control_prompts']} control prompts; "
             f"base: target {b['target_metric']:.3f}, over-refusal {b['control_target_rate'] or 0:.3f}, "
             f"ppl {b['ppl']:.2f}",
             f"{'method':<10} {'signs':<7} {'features':>8} {'lr':>7} {'rank':>5} {'target':>7} {'over-ref':>8} "
             f"{'ppl rise':>9} {'(95% ub)':>9} {'out-of-span':>12}"]
    for r in report["rows"]:
        rank = ",".join(map(str, r["rank"].values()))
        lines.append(f"{r['method']:<10} {r['signs']:<7} {r['features_per_layer']:>8} {r['lr']:>7g} {rank:>5} "
                     f"{r['target_metric']:>7.3f} {r['control_target_rate']:>8.3f} {r['ppl_rise']:>+9.2%} "
                     f"{r['ppl_rise_upper']:>+9.2%} "
                     f"{r['max_out_of_span']:>12.1e}")
    lines.append(f"rule: {report['rule']}")
    lines.append("chosen: " + (" ".join(f"{k} {v}" for k, v in report["chosen"].items()) or "none within bounds"))
    if report.get("chosen_outside_ppl_bound"):
        lines.append("no lr kept perplexity within bounds for " + ", ".join(report["chosen_outside_ppl_bound"])
                     + ": the one of the smallest rise")
    return "\n".join(lines)

