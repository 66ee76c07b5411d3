#!/usr/bin/env python
"""The Specialized SAE recipe end to end (Muhamed, Diab, Smith, arXiv 2411.00743).

    python python/ssae_recipe.py --out runs/ssae

1. a general TopK SAE on the general corpus (or ``--general DIR`` to reuse one);
2. selection: the corpus chunks nearest to a few seed texts (dense retrieval with all-MiniLM-L6-v2
   through the fused ``topk_encode``; ``--strategy bm25`` for BM25), never near-duplicates of the
   evaluation text;
3. finetuning the general SAE on the selected text's activations, plus a replayed share of the general
   activations (``--replay``), with ERM and with TERM (``--tilt``);
4. the tail evaluation of all three on held-out subdomain text: OUT/report.json (keys ``general``,
   ``ssae_erm``, ``ssae_term``, ``meta``), OUT/report.md and plots.

Built-in offline default: SmolLM2-135M-Instruct (layer 15), general corpus = Python's documentation
plus the standard library's docstrings, subdomain = asyncio (see ``ssae_kernels.recipes.specialized``);
the evaluation text is a few asyncio modules held out of the corpus. ``--model``, ``--corpus``,
``--seeds`` and ``--eval-text`` take real models and corpora. Activations and chunk embeddings are
cached under OUT/cache, so a rerun (e.g. with another tilt) only redoes what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from ssae_kernels import models, retrieval
from ssae_kernels.activations import outlier_mask, token_chunks
from ssae_kernels.evaluate import reconstruction_metrics
from ssae_kernels.recipes import specialized as sp
from ssae_kernels.sae import TopKSAE
from ssae_kernels.trainer import TrainConfig, Trainer, new_sae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default=models.BUILTIN)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--corpus", default=sp.BUILTIN_CORPUS, help="general corpus (a text source)")
    p.add_argument("--seeds", default=sp.BUILTIN_SEEDS, help="seed texts of the subdomain")
    p.add_argument("--eval-text", default=sp.BUILTIN_EVAL, help="held-out subdomain text (never trained on)")
    p.add_argument("--text-field", default="text")
    # general SAE
    p.add_argument("--general", default=None, help="reuse this general SAE (ours, SAELens or sparsify)")
    p.add_argument("--general-tokens", type=int, default=60_000, help="general-corpus activations to harvest")
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--general-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step of the general SAE")
    # selection
    p.add_argument("--strategy", choices=("dense", "bm25"), default="dense")
    p.add_argument("--aggregate", choices=retrieval.AGGREGATES, default="max")
    p.add_argument("--search", choices=retrieval.SEARCHES, default="exact",
                   help="exact (fused topk_encode) or faiss (approximate, for corpora too large to scan)")
    p.add_argument("--select-top", type=int, default=200, help="chunks to select")
    p.add_argument("--chunk-chars", type=int, default=1000)
    p.add_argument("--embedder", default=None, help="sentence-embedding model directory (default all-MiniLM-L6-v2)")
    p.add_argument("--select-tokens", type=int, default=60_000, help="selected-text activations to harvest at most")
    # finetuning
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-batch-size", type=int, default=2048)
    p.add_argument("--finetune-lr", type=float, default=None, help="default: the general SAE's default")
    p.add_argument("--tilt", type=sp.parse_tilt, default="auto",
                   help="TERM tilt t of the TERM finetune, or 'auto' (default): the t at which a batch's tilted "
                        "weights have an effective sample size of --tilt-ess x the batch on the general SAE's "
                        "errors over the selected data (t = 500 is a pure max at this loss scale: see the notes)")
    p.add_argument("--tilt-ess", type=float, default=0.25)
    p.add_argument("--replay", type=float, default=0.5,
                   help="fraction of every finetune's rows drawn from the general SAE's training activations "
                        "(replay). The selected chunks can lack general constructs that held-out subdomain text "
                        "still has (URLs: none in the 200 default chunks, 3 in the evaluation text); without "
                        "replay the finetune forgets them and they carry the worst per-token errors. 0.5 had "
                        "the lowest worst-token error on validation data (a held-out part of the selected "
                        "text and held-out general text) among 0, 0.25, 0.5. 0: none")
    p.add_argument("--extra-tilts", type=float, nargs="*", default=[],
                   help="further TERM finetunes with these tilts, reported as ssae_term_t<T>")
    p.add_argument("--control", action="store_true",
                   help="also continue the general SAE on general data for the finetuning budget "
                        "(separates the effect of the subdomain data from that of more steps)")
    # evaluation
    p.add_argument("--eval-tokens", type=int, default=50_000)
    p.add_argument("--ce-sequences", type=int, default=16)
    p.add_argument("--coverage-threshold", type=float, default=0.2)
    p.add_argument("--outlier-factor", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.quiet
    started = time.perf_counter()
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name):
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - started:7.1f}s] {name} ...", flush=True)
        yield
        phases[name] = time.perf_counter() - t0

    def cache(name):
        return os.path.join(args.out, "cache", name)

    def keep(acts):
        return outlier_mask(acts, args.outlier_factor) if args.outlier_factor > 0 else \
            torch.ones(acts.shape[0], dtype=torch.bool)

    with phase("load_model"):
        model, tokenizer = models.load_model(args.model)
        models.check_layer(model, args.layer)

    with phase("corpus"):
        if args.corpus == sp.BUILTIN_CORPUS and args.eval_text == sp.BUILTIN_EVAL:
            general_docs, eval_docs = sp.builtin_split()
        else:
            general_docs = sp.read_source(args.corpus, field=args.text_field)
            eval_docs = sp.read_source(args.eval_text, field=args.text_field)
        seeds = sp.read_seeds(args.seeds, field=args.text_field)
        chunks = retrieval.chunk_documents(general_docs, max_chars=args.chunk_chars)
        eval_chunks = retrieval.chunk_documents(eval_docs, max_chars=args.chunk_chars)
        dup = retrieval.near_duplicates([c.text for c in chunks], [c.text for c in eval_chunks]).tolist()
        # every 20th document is held out of all training, to measure each SAE on general text
        held_docs = {d for d in range(len(general_docs)) if d % 20 == 19} if len(general_docs) >= 20 else set()
        train_chunks = [c for c, x in zip(chunks, dup) if not x and c.doc not in held_docs]
        held_chunks = [c for c, x in zip(chunks, dup) if not x and c.doc in held_docs]
        # token frequencies of the general corpus (its training part), for head/torso/tail
        counts = sp.token_counts(tokenizer, [c.text for c in train_chunks])

    general_dir = os.path.join(args.out, "general")
    general_acts = None  # the general SAE's training activations, when trained here (or needed for replay)

    def harvest_general():
        g = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(train_chunks), generator=g).tolist()
        return sp.harvest_cached(model, tokenizer, [train_chunks[i].text for i in order], args.layer,
                                 context=args.context, max_tokens=args.general_tokens, cache=cache("general"),
                                 progress=progress, model_name=args.model, check_key=True)

    if args.general or os.path.isfile(os.path.join(general_dir, "sae", "cfg.json")):
        source = args.general or os.path.join(general_dir, "sae")
        print(f"reusing the general SAE in {source}")
        general = sp.from_general(source)
        general_info = {"reused": source}
        if args.replay > 0 or args.control:
            with phase("harvest_replay"):  # general-corpus activations (cached when this run trained it)
                data = harvest_general()
                general_acts = data.acts[keep(data.acts)]
    else:
        with phase("harvest_general"):
            data = harvest_general()
        with phase("train_general"):
            general_acts = data.acts[keep(data.acts)]
            general = new_sae(general_acts, args.latents, args.k, seed=args.seed,
                              dead_tokens=min(1_000_000, args.general_steps * args.batch_size // 10))
            trainer = Trainer(general, general_acts, TrainConfig(steps=args.general_steps, batch_size=args.batch_size,
                                                         seed=args.seed), general_dir, progress=progress)
            open(trainer.metrics_file, "w").close()
            trainer.train()
            general.save(os.path.join(general_dir, "sae"))
        general_info = {"trained": general_dir, "steps": args.general_steps, "batch_size": args.batch_size,
                        "unique_tokens": int(general_acts.shape[0]), "tokens_per_s": trainer.tokens_per_s}

    with phase("select"):
        train_docs = {c.doc for c in train_chunks}
        selection = sp.select(general_docs, seeds, top=args.select_top, strategy=args.strategy,
                              aggregate=args.aggregate, exclude_docs=eval_docs, chunk_chars=args.chunk_chars,
                              allowed_docs=train_docs, embedder=args.embedder,
                              embedding_cache=cache("chunk_embeddings.safetensors"), search=args.search,
                              progress=progress)
        sp.write_selection(os.path.join(args.out, "select"), selection, seeds=seeds)

    with phase("harvest_selected"):
        sel_data = sp.harvest_cached(model, tokenizer, selection.texts, args.layer, context=args.context,
                                     max_tokens=args.select_tokens, cache=cache("selected"), progress=progress,
                                     model_name=args.model, check_key=True)
        sel_acts = sel_data.acts[keep(sel_data.acts)]
        if getattr(general, "foreign_format", False) and float(general.input_scale) == 1.0:
            sp.match_scale(general, sel_acts)
        # the finetuning data: the selected text plus the replayed share of general text
        tune_acts = sp.with_replay(sel_acts, general_acts, args.replay, seed=args.seed)

    saes: dict[str, TopKSAE] = {"general": general}
    finetunes = {}
    tilt = args.tilt
    if tilt == "auto":
        with phase("calibrate_tilt"):
            tilt = sp.calibrate_tilt(general, tune_acts, args.finetune_batch_size, ess=args.tilt_ess, seed=args.seed)
        print(f"TERM tilt t = {tilt:.4g} (effective sample size {args.tilt_ess:.0%} of a batch)")
    runs = [("ssae_erm", 0.0, tune_acts), ("ssae_term", tilt, tune_acts)]
    runs += [(f"ssae_term_t{t:g}", t, tune_acts) for t in args.extra_tilts]
    if args.control:
        runs.append(("general_continued", 0.0, general_acts))
    for name, run_tilt, run_acts in runs:
        if run_acts is None:
            print(f"skipping {name}: needs the general activations (no --general)")
            continue
        with phase(f"finetune_{name}"):
            cfg = TrainConfig(steps=args.finetune_steps, batch_size=args.finetune_batch_size, lr=args.finetune_lr,
                              tilt=run_tilt, seed=args.seed)
            trainer = sp.finetune(general, run_acts, cfg, os.path.join(args.out, name), progress=progress)
            saes[name] = trainer.sae
            finetunes[name] = {"tilt": run_tilt, "steps": trainer.step, "batch_size": args.finetune_batch_size,
                               "training_tokens": int(run_acts.shape[0]), "tokens_per_s": trainer.tokens_per_s,
                               "replay": args.replay if run_acts is tune_acts else None}

    with phase("harvest_eval"):
        eval_data = sp.harvest_cached(model, tokenizer, eval_docs, args.layer, context=args.context,
                                      max_tokens=args.eval_tokens, cache=cache("eval"), progress=progress,
                                      model_name=args.model, check_key=True)
        held_data = None
        if held_chunks:
            held_data = sp.harvest_cached(model, tokenizer, [c.text for c in held_chunks], args.layer,
                                          context=args.context, max_tokens=8192, cache=cache("general_heldout"),
                                          progress=progress, model_name=args.model, check_key=True)

    with phase("evaluate"):
        ce_chunks = token_chunks(tokenizer, eval_docs, args.context)[: args.ce_sequences]
        report, details = sp.evaluate_saes(saes, eval_data.acts, eval_data.tokens, counts,
                                           keep=keep(eval_data.acts), coverage_threshold=args.coverage_threshold,
                                           model=model, chunks=ce_chunks, layer=args.layer, progress=progress)
        if held_data is not None:
            held = held_data.acts[keep(held_data.acts)]
            for name, sae in saes.items():
                report[name]["general_fvu"] = reconstruction_metrics(sae, held)["fvu"]

    g, t = report["general"], report["ssae_term"]
    reduction = 1 - t["tail_mse"] / g["tail_mse"]
    total = time.perf_counter() - started
    bar = {"tail_mse_reduction_term_vs_general": reduction,
           "tail_mse_reduced_by_10_percent": reduction >= 0.10,
           "max_token_error_lower": t["max_token_error"] < g["max_token_error"],
           "under_30_minutes": total < 1800, "total_seconds": total}
    report["meta"] = {
        "bar": bar, "phases_seconds": phases, "general_sae": general_info, "finetunes": finetunes,
        "selection": selection.meta, "model": args.model, "layer": args.layer, "corpus": args.corpus,
        "eval_text": args.eval_text, "seeds": seeds, "latents": general.cfg.num_latents, "k": general.cfg.k,
        "eval_tokens": report["general"]["tokens"], "general_heldout_tokens": None if held_data is None else
        int(keep(held_data.acts).sum()), "threads": torch.get_num_threads(),
        "coverage_threshold": args.coverage_threshold, "outlier_factor": args.outlier_factor,
        "tilt": tilt, "tilt_option": args.tilt, "tilt_ess": args.tilt_ess, "replay": args.replay,
    }
    how_tilt = f"auto: effective sample size {args.tilt_ess:.0%} of a batch" if args.tilt == "auto" else "given"
    notes = sp._notes(args.outlier_factor, args.coverage_threshold) + [
        "general_fvu: FVU on held-out general-corpus text (every 20th document, never trained on).",
        f"TERM tilt t = {tilt:.4g} ({how_tilt}) "
        f"on per-token squared errors at the SAE's input scale (mean token norm sqrt(d)); decoder rows kept "
        f"unit-norm; finetunes start from the general SAE's weights.",
        f"Finetuning data: the selected text plus {args.replay:.0%} replayed general-corpus activations "
        f"(the general SAE's training data), for both SSAE-ERM and SSAE-TERM.",
        "", "## Bar", "",
        f"- SSAE-TERM tail_mse vs general: {100 * reduction:.1f}% lower (bar: >= 10%): "
        f"{'met' if bar['tail_mse_reduced_by_10_percent'] else 'NOT met'}",
        f"- SSAE-TERM max_token_error {t['max_token_error']:.4g} vs general {g['max_token_error']:.4g}: "
        f"{'lower' if bar['max_token_error_lower'] else 'NOT lower'}",
        f"- wall time {total / 60:.1f} min (bar: < 30 min)", "", "## Phases (seconds)", "",
    ] + [f"- {k}: {v:.0f}" for k, v in phases.items()]
    sp.write_tail_report(args.out, report, details, title="Specialized SAE recipe", notes=notes)
    print(json.dumps({n: {k: report[n].get(k) for k in ("fvu", "tail_mse", "max_token_error", "tail_coverage",
                                                        "ce_loss", "general_fvu")} for n in saes}, indent=2))
    print(json.dumps(bar, indent=2))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
