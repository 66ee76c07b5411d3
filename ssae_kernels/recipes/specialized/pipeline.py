"""The Specialized SAE recipe end to end (``ssae specialized``; Muhamed, Diab, Smith, arXiv 2411.00743):

1. a general TopK SAE on the general corpus (or ``--general DIR`` to reuse one);
2. selection: the corpus chunks nearest to a few seed texts (dense retrieval with all-MiniLM-L6-v2
   through the fused ``topk_encode``; ``--strategy bm25`` for BM25), never near-duplicates of the
   evaluation text;
3. finetuning the general SAE on the selected text's activations, plus a replayed share of the general
   activations (``--replay``), with ERM and with TERM (``--tilt``);
4. the tail evaluation of all of them on held-out subdomain text: OUT/report.json (keys ``general``,
   ``ssae_erm``, ``ssae_term``, ``meta``), OUT/report.md and plots.

Activations and chunk embeddings are cached under OUT/cache, and a general SAE trained in OUT/general is
reused, so a rerun (e.g. with another tilt) only redoes what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch

from ... import models, retrieval
from ...activations import token_chunks
from ...evaluate import reconstruction_metrics
from ...sae import SAE
from ...trainer import TrainConfig, Trainer, new_sae
from ..common import (HelpFormatter, UsageError, add_model_args, add_out_args, check_positive, check_sources,
                      config_from_args, dead_tokens_for, harvest_cached, keep_mask, run_settings, set_threads)
from ..rundir import open_run
from .corpus import BUILTIN_CORPUS, BUILTIN_EVAL, BUILTIN_SEEDS, read_seeds, read_source
from .finetune import (calibrate_tilt, check_finetune_options, finetune, from_general, parse_tilt,
                       scale_for_finetuning, with_replay)
from .selection import STRATEGIES, check_retrieval, select, write_selection
from .tail import SUMMARY_KEYS, check_tail_options, evaluate_saes, summary, tail_notes, token_counts, write_tail_report

HELD_OUT_EVERY = 20  # every 20th general document is held out of all training, to measure FVU on general text
HELD_OUT_TOKENS = 8192  # activations of those documents to harvest at most


@dataclass(kw_only=True)
class SpecializedConfig:
    out: str
    model: str = models.BUILTIN
    layer: int = 15
    context: int = 256
    corpus: str = BUILTIN_CORPUS
    seeds: str = BUILTIN_SEEDS
    eval_text: str = BUILTIN_EVAL
    text_field: str = "text"
    # the general SAE
    general: str | None = None
    general_tokens: int = 60_000
    latents: int = 4608
    k: int = 32
    general_steps: int = 300
    batch_size: int = 4096
    # selection
    strategy: str = "dense"
    aggregate: str = "max"
    search: str = "exact"
    select_top: int = 200
    chunk_chars: int = 1000
    embedder: str | None = None
    select_tokens: int = 60_000
    # finetuning
    finetune_steps: int = 300
    finetune_batch_size: int = 2048
    finetune_lr: float | None = None
    tilt: float | str = "auto"
    tilt_ess: float = 0.25
    replay: float = 0.5
    extra_tilts: tuple[float, ...] = ()
    control: bool = False
    # evaluation
    eval_tokens: int = 50_000
    ce_sequences: int = 16
    coverage_threshold: float = 0.2
    outlier_factor: float = 10.0
    seed: int = 0
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False


def check_config(cfg: SpecializedConfig) -> None:
    """UsageError for a bad setting or a missing optional package, before the run loads anything."""
    check_positive(context=cfg.context, general_tokens=cfg.general_tokens, latents=cfg.latents, k=cfg.k,
                   general_steps=cfg.general_steps, batch_size=cfg.batch_size, select_top=cfg.select_top,
                   chunk_chars=cfg.chunk_chars, select_tokens=cfg.select_tokens, finetune_steps=cfg.finetune_steps,
                   finetune_batch_size=cfg.finetune_batch_size, eval_tokens=cfg.eval_tokens)
    if cfg.k > cfg.latents:
        raise UsageError(f"--k {cfg.k} must not exceed --latents {cfg.latents}")
    check_retrieval(cfg.strategy, cfg.search, cfg.embedder)
    check_finetune_options(replay=cfg.replay, tilt=cfg.tilt, tilt_ess=cfg.tilt_ess)
    check_tail_options(ce_sequences=cfg.ce_sequences, coverage_threshold=cfg.coverage_threshold)


class Phases:
    """Seconds per named phase of a run; each phase is announced when it starts."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        print(f"[{t0 - self.started:7.1f}s] {name} ...", flush=True)
        yield
        self.seconds[name] = time.perf_counter() - t0


@dataclass
class Texts:
    """What the recipe reads, and the corpus cut into chunks."""
    general_docs: list[str]
    eval_docs: list[str]
    seeds: list[str]
    train_chunks: list[retrieval.Chunk]  # general-corpus chunks the SAEs may train on
    held_chunks: list[retrieval.Chunk]  # chunks of the held-out general documents
    counts: torch.Tensor  # token counts of train_chunks: what head, torso and tail are measured against


def read_texts(cfg: SpecializedConfig, tokenizer) -> Texts:
    """The corpus cut into chunks; chunks that near-duplicate the evaluation text are dropped."""
    general_docs = read_source(cfg.corpus, field=cfg.text_field)
    eval_docs = read_source(cfg.eval_text, field=cfg.text_field)
    seeds = read_seeds(cfg.seeds, field=cfg.text_field)
    chunks = retrieval.chunk_documents(general_docs, max_chars=cfg.chunk_chars)
    eval_chunks = retrieval.chunk_documents(eval_docs, max_chars=cfg.chunk_chars)
    dup = retrieval.near_duplicates([c.text for c in chunks], [c.text for c in eval_chunks]).tolist()
    held_docs = set(range(HELD_OUT_EVERY - 1, len(general_docs), HELD_OUT_EVERY))
    train_chunks = [c for c, x in zip(chunks, dup) if not x and c.doc not in held_docs]
    held_chunks = [c for c, x in zip(chunks, dup) if not x and c.doc in held_docs]
    return Texts(general_docs, eval_docs, seeds, train_chunks, held_chunks,
                 token_counts(tokenizer, [c.text for c in train_chunks]))


def run(cfg: SpecializedConfig) -> dict:
    """Runs the recipe into ``cfg.out``; returns report.json's content."""
    set_threads(cfg.threads)
    check_config(cfg)
    check_sources(cfg.model)
    # The caches are keyed by a hash of their inputs, so a replaced run may reuse them.
    with open_run(cfg.out, "specialized", run_settings(cfg), overwrite=cfg.overwrite, keep=("cache",)):
        return _run(cfg)


def _run(cfg: SpecializedConfig) -> dict:
    progress = not cfg.quiet
    phase = Phases()
    with phase("load_model"):
        model, tokenizer = models.load_model(cfg.model)
        models.check_layer(model, cfg.layer)

    def harvest(name: str, docs: list[str], max_tokens: int):  # activations of docs, cached in OUT/cache/name
        return harvest_cached(model, tokenizer, docs, cfg.layer, context=cfg.context, max_tokens=max_tokens,
                              cache=os.path.join(cfg.out, "cache", name), progress=progress, model_name=cfg.model,
                              check_key=True)

    def keep(acts: torch.Tensor) -> torch.Tensor:
        return keep_mask(acts, cfg.outlier_factor)

    with phase("corpus"):
        texts = read_texts(cfg, tokenizer)

    def harvest_general():  # the general SAE's training activations, in a seeded order of chunks
        order = torch.randperm(len(texts.train_chunks), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        data = harvest("general", [texts.train_chunks[i].text for i in order], cfg.general_tokens)
        return data.acts[keep(data.acts)]

    general, general_acts, general_info = general_sae(cfg, harvest_general, phase, progress)

    with phase("select"):
        selection = select(texts.general_docs, texts.seeds, top=cfg.select_top, strategy=cfg.strategy,
                           aggregate=cfg.aggregate, exclude_docs=texts.eval_docs, chunk_chars=cfg.chunk_chars,
                           allowed_docs={c.doc for c in texts.train_chunks}, embedder=cfg.embedder,
                           embedding_cache=os.path.join(cfg.out, "cache", "chunk_embeddings.safetensors"),
                           search=cfg.search, progress=progress)
        write_selection(os.path.join(cfg.out, "select"), selection, seeds=texts.seeds)

    with phase("harvest_selected"):
        selected = harvest("selected", selection.texts, cfg.select_tokens)
        selected_acts = selected.acts[keep(selected.acts)]
        scale_for_finetuning(general, selected_acts)
        tune_acts = with_replay(selected_acts, general_acts, cfg.replay, seed=cfg.seed)

    tilt = cfg.tilt
    if tilt == "auto":
        with phase("calibrate_tilt"):
            tilt = calibrate_tilt(general, tune_acts, cfg.finetune_batch_size, ess=cfg.tilt_ess, seed=cfg.seed)
        print(f"TERM tilt t = {tilt:.4g} (effective sample size {cfg.tilt_ess:.0%} of a batch)")
    saes, finetunes = finetune_all(cfg, general, tune_acts, tilt, general_acts, phase, progress)

    with phase("harvest_eval"):
        eval_data = harvest("eval", texts.eval_docs, cfg.eval_tokens)
        held = harvest("general_heldout", [c.text for c in texts.held_chunks], HELD_OUT_TOKENS) \
            if texts.held_chunks else None

    with phase("evaluate"):
        ce_chunks = token_chunks(tokenizer, texts.eval_docs, cfg.context)[: cfg.ce_sequences]
        report, details = evaluate_saes(saes, eval_data.acts, eval_data.tokens, texts.counts,
                                        keep=keep(eval_data.acts), coverage_threshold=cfg.coverage_threshold,
                                        model=model, chunks=ce_chunks, layer=cfg.layer, progress=progress)
        if held is not None:
            held_acts = held.acts[keep(held.acts)]
            for name, sae in saes.items():
                report[name]["general_fvu"] = reconstruction_metrics(sae, held_acts)["fvu"]

    with phase("features"):  # the new tail features: ssae_term's latents with no match in the general SAE
        tail_features = write_tail_features(cfg, model, tokenizer, texts.eval_docs, eval_data, general,
                                            saes["ssae_term"], progress)

    bar = bar_check(report, time.perf_counter() - phase.started)
    report["meta"] = {
        "bar": bar, "phases_seconds": phase.seconds, "general_sae": general_info, "finetunes": finetunes,
        "selection": selection.meta, "model": cfg.model, "layer": cfg.layer, "corpus": cfg.corpus,
        "eval_text": cfg.eval_text, "seeds": texts.seeds, "latents": general.cfg.num_latents, "k": general.cfg.k,
        "eval_tokens": report["general"]["tokens"],
        "general_heldout_tokens": None if held is None else int(keep(held.acts).sum()),
        "threads": torch.get_num_threads(), "coverage_threshold": cfg.coverage_threshold,
        "outlier_factor": cfg.outlier_factor, "tilt": tilt, "tilt_option": cfg.tilt, "tilt_ess": cfg.tilt_ess,
        "replay": cfg.replay, "tail_features": tail_features,
    }
    write_tail_report(cfg.out, report, details, title="Specialized SAE recipe",
                      notes=recipe_notes(cfg, tilt, bar, report, phase.seconds))
    return report


def write_tail_features(cfg: SpecializedConfig, model, tokenizer, eval_docs, eval_data, general: SAE, tuned: SAE,
                        progress: bool) -> dict:
    """OUT/features: the feature browser's comparison of the finetuned SAE with the general one on the
    held-out subdomain text (``ssae features --compare``), from the activations the evaluation harvested."""
    from ...features import codes_of_activations
    from ..features import FeaturesConfig, write_comparison

    out = os.path.join(cfg.out, "features")
    codes = codes_of_activations(tuned, eval_data.acts, eval_data.tokens, token_chunks(tokenizer, eval_docs, cfg.context))
    features_cfg = FeaturesConfig(out=out, quiet=not progress)
    written = write_comparison(features_cfg, model, tokenizer, codes, general, tuned)
    return {"page": "features/index.html", "novel_latents": written["novel"], "novel_below": features_cfg.novel_below,
            "bytes": written["bytes"]}


def general_sae(cfg: SpecializedConfig, harvest_general, phase: Phases, progress: bool):
    """(general SAE, its training activations or None, how it was obtained): ``--general``, the SAE an earlier
    run trained in OUT/general, or one trained here. Its activations are harvested when training, replay or
    the control run need them."""
    general_dir = os.path.join(cfg.out, "general")
    if cfg.general or os.path.isfile(os.path.join(general_dir, "sae", "cfg.json")):
        source = cfg.general or os.path.join(general_dir, "sae")
        print(f"reusing the general SAE in {source}")
        general, general_acts = from_general(source), None
        if cfg.replay > 0 or cfg.control:
            with phase("harvest_replay"):  # cached when this run trained the general SAE
                general_acts = harvest_general()
        return general, general_acts, {"reused": source}
    with phase("harvest_general"):
        general_acts = harvest_general()
    with phase("train_general"):
        general, tokens_per_s = train_general(cfg, general_acts, general_dir, progress)
    return general, general_acts, {"trained": general_dir, "steps": cfg.general_steps, "batch_size": cfg.batch_size,
                                   "unique_tokens": int(general_acts.shape[0]), "tokens_per_s": tokens_per_s}


def train_general(cfg: SpecializedConfig, acts: torch.Tensor, out_dir: str, progress: bool):
    """(the general SAE trained on ``acts`` and saved in ``out_dir/sae``, its tokens per second)."""
    sae = new_sae(acts, cfg.latents, cfg.k, seed=cfg.seed, dead_tokens=dead_tokens_for(cfg.general_steps,
                                                                                        cfg.batch_size))
    trainer = Trainer(sae, acts, TrainConfig(steps=cfg.general_steps, batch_size=cfg.batch_size, seed=cfg.seed),
                      out_dir, progress=progress)
    trainer.begin(resume=False)
    trainer.train()
    sae.save(os.path.join(out_dir, "sae"))
    return sae, trainer.tokens_per_s


def finetune_all(cfg: SpecializedConfig, general: SAE, tune_acts: torch.Tensor, tilt: float,
                 general_acts: torch.Tensor | None, phase: Phases, progress: bool) -> tuple[dict, dict]:
    """({name: SAE} of the general SAE and every finetune of it, {name: how it was finetuned}): ERM and TERM
    on ``tune_acts``, the ``--extra-tilts``, and with ``--control`` more steps on general data alone."""
    runs = [("ssae_erm", 0.0, tune_acts), ("ssae_term", tilt, tune_acts)]
    runs += [(f"ssae_term_t{t:g}", t, tune_acts) for t in cfg.extra_tilts]
    if cfg.control:  # separates the effect of the subdomain data from that of more steps
        runs.append(("general_continued", 0.0, general_acts))
    saes, finetunes = {"general": general}, {}
    for name, run_tilt, run_acts in runs:
        if run_acts is None:
            print(f"skipping {name}: needs the general activations (no --general)")
            continue
        with phase(f"finetune_{name}"):
            train = TrainConfig(steps=cfg.finetune_steps, batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
                                tilt=run_tilt, seed=cfg.seed)
            trainer = finetune(general, run_acts, train, os.path.join(cfg.out, name), progress=progress)
            saes[name] = trainer.sae
            finetunes[name] = {"tilt": run_tilt, "steps": trainer.step, "batch_size": cfg.finetune_batch_size,
                               "training_tokens": int(run_acts.shape[0]), "tokens_per_s": trainer.tokens_per_s,
                               "replay": cfg.replay if run_acts is tune_acts else None}
    return saes, finetunes


def bar_check(report: dict, total_seconds: float) -> dict:
    """The recipe's bar: SSAE-TERM's tail error at least 10% below the general SAE's, its worst token error
    lower, all of it in under 30 minutes."""
    g, t = report["general"], report["ssae_term"]
    reduction = 1 - t["tail_mse"] / g["tail_mse"]
    return {"tail_mse_reduction_term_vs_general": reduction,
            "tail_mse_reduced_by_10_percent": reduction >= 0.10,
            "max_token_error_lower": t["max_token_error"] < g["max_token_error"],
            "under_30_minutes": total_seconds < 1800, "total_seconds": total_seconds}


def recipe_notes(cfg: SpecializedConfig, tilt: float, bar: dict, report: dict, phases: dict[str, float]) -> list[str]:
    """report.md's notes: how the metrics and the finetunes were made, the bar and the phases' times."""
    g, t = report["general"], report["ssae_term"]
    how_tilt = f"auto: effective sample size {cfg.tilt_ess:.0%} of a batch" if cfg.tilt == "auto" else "given"
    return tail_notes(cfg.outlier_factor, cfg.coverage_threshold) + [
        f"general_fvu: FVU on held-out general-corpus text (every {HELD_OUT_EVERY}th document, never trained on).",
        f"TERM tilt t = {tilt:.4g} ({how_tilt}) "
        f"on per-token squared errors at the SAE's input scale (mean token norm sqrt(d)); decoder rows kept "
        f"unit-norm; finetunes start from the general SAE's weights.",
        f"Finetuning data: the selected text plus {cfg.replay:.0%} replayed general-corpus activations "
        f"(the general SAE's training data), for both SSAE-ERM and SSAE-TERM.",
        f"New tail features: [features/index.html](features/index.html), the "
        f"{report['meta']['tail_features']['novel_latents']} SSAE-TERM latents whose decoder direction has no "
        f"match in the general SAE (max cosine < {report['meta']['tail_features']['novel_below']:g}), ranked by "
        "their activation on the held-out text.",
        "", "## Bar", "",
        f"- SSAE-TERM tail_mse vs general: {100 * bar['tail_mse_reduction_term_vs_general']:.1f}% lower "
        f"(bar: >= 10%): {'met' if bar['tail_mse_reduced_by_10_percent'] else 'NOT met'}",
        f"- SSAE-TERM max_token_error {t['max_token_error']:.4g} vs general {g['max_token_error']:.4g}: "
        f"{'lower' if bar['max_token_error_lower'] else 'NOT lower'}",
        f"- wall time {bar['total_seconds'] / 60:.1f} min (bar: < 30 min)", "", "## Phases (seconds)", "",
    ] + [f"- {k}: {v:.0f}" for k, v in phases.items()]


def add_specialized_args(p: argparse.ArgumentParser) -> None:
    d = SpecializedConfig
    add_out_args(p, "general/, select/, ssae_erm/, ssae_term/, features/, report.json, report.md, plots; cache/ "
                    "survives --overwrite")
    add_model_args(p)
    p.add_argument("--context", type=int, default=d.context, help="tokens per sequence")
    p.add_argument("--corpus", default=d.corpus, help="general corpus (a text source)")
    p.add_argument("--seeds", default=d.seeds, help="seed texts of the subdomain")
    p.add_argument("--eval-text", default=d.eval_text, help="held-out subdomain text (never trained on)")
    p.add_argument("--text-field", default=d.text_field, help="field holding the text in .jsonl/.parquet records")
    g = p.add_argument_group("general SAE")
    g.add_argument("--general", default=d.general, help="reuse this general SAE (ours, SAELens or sparsify)")
    g.add_argument("--general-tokens", type=int, default=d.general_tokens,
                   help="general-corpus activations to harvest")
    g.add_argument("--latents", type=int, default=d.latents, help="dictionary size M of the general SAE")
    g.add_argument("--k", type=int, default=d.k, help="active latents per token")
    g.add_argument("--general-steps", type=int, default=d.general_steps, help="training steps of the general SAE")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="tokens per step of the general SAE")
    g = p.add_argument_group("selection")
    g.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="dense retrieval with sentence embeddings, or lexical BM25")
    g.add_argument("--aggregate", choices=retrieval.AGGREGATES, default=d.aggregate,
                   help="a chunk's score over the seeds: max (union of per-seed neighbours) or mean (centroid)")
    g.add_argument("--search", choices=retrieval.SEARCHES, default=d.search,
                   help="exact (fused topk_encode) or faiss (approximate, for corpora too large to scan)")
    g.add_argument("--select-top", type=int, default=d.select_top, help="chunks to select")
    g.add_argument("--chunk-chars", type=int, default=d.chunk_chars, help="maximum characters per chunk")
    g.add_argument("--embedder", default=d.embedder,
                   help="sentence-embedding model directory (default all-MiniLM-L6-v2)")
    g.add_argument("--select-tokens", type=int, default=d.select_tokens,
                   help="selected-text activations to harvest at most")
    g = p.add_argument_group("finetuning")
    g.add_argument("--finetune-steps", type=int, default=d.finetune_steps, help="steps of each finetune")
    g.add_argument("--finetune-batch-size", type=int, default=d.finetune_batch_size, help="tokens per finetuning step")
    g.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="default: the general SAE's default")
    g.add_argument("--tilt", type=parse_tilt, default=d.tilt,
                   help="TERM tilt t of the TERM finetune, or 'auto': the t at which a batch's tilted weights have "
                        "an effective sample size of --tilt-ess x the batch on the general SAE's errors over the "
                        "selected data (t = 500 is a pure max at this loss scale: see the notes)")
    g.add_argument("--tilt-ess", type=float, default=d.tilt_ess, help="effective-sample-size fraction for --tilt auto")
    g.add_argument("--replay", type=float, default=d.replay,
                   help="fraction of every finetune's rows drawn from the general SAE's training activations "
                        "(replay). The selected chunks can lack general constructs that held-out subdomain text "
                        "still has (URLs: none in the 200 default chunks, 3 in the evaluation text); without "
                        "replay the finetune forgets them and they carry the worst per-token errors. 0.5 had "
                        "the lowest worst-token error on validation data (a held-out part of the selected "
                        "text and held-out general text) among 0, 0.25, 0.5. 0: none")
    g.add_argument("--extra-tilts", type=float, nargs="*", default=d.extra_tilts,
                   help="further TERM finetunes with these tilts, reported as ssae_term_t<T>")
    g.add_argument("--control", action="store_true",
                   help="also continue the general SAE on general data for the finetuning budget "
                        "(separates the effect of the subdomain data from that of more steps)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="evaluation activations to harvest at most")
    g.add_argument("--ce-sequences", type=int, default=d.ce_sequences,
                   help="held-out sequences for the downstream loss (0: skip)")
    g.add_argument("--coverage-threshold", type=float, default=d.coverage_threshold,
                   help="a latent covers a token when its contribution is at least this fraction of ||x - b_dec||")
    g.add_argument("--outlier-factor", type=float, default=d.outlier_factor,
                   help="exclude tokens whose norm exceeds this many times the median (0: keep all)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every initialisation and batch order")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _specialized_command(args: argparse.Namespace) -> None:
    cfg = config_from_args(SpecializedConfig, args)
    report = run(cfg)
    print(json.dumps(summary(report, SUMMARY_KEYS + ("general_fvu",)), indent=2))
    print(json.dumps(report["meta"]["bar"], indent=2))
    print(f"report: {os.path.join(cfg.out, 'report.md')}")


def add_subcommand(sub) -> None:
    """Registers ``ssae specialized``."""
    p = sub.add_parser("specialized", help="the Specialized SAE recipe end to end: general SAE, selection, "
                                           "ERM and TERM finetunes, tail evaluation",
                       formatter_class=HelpFormatter)
    add_specialized_args(p)
    p.set_defaults(handler=_specialized_command)
