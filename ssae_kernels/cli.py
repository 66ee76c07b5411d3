"""The ``ssae`` command line: ``ssae train`` (more subcommands come with the recipes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import models, text


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=models.BUILTIN,
                   help="model: 'smollm2-135m' (built in, offline), a local directory (dir::file.gguf for GGUF) or a hub name")
    p.add_argument("--layer", type=int, default=15, help="decoder layer whose output (residual stream) is encoded")
    p.add_argument("--text", default=text.BUILTIN,
                   help="text: 'builtin:python-docs', a .txt/.jsonl/.parquet file or directory, or a hub dataset name")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/hub records")
    p.add_argument("--max-tokens", type=int, default=100_000, help="activations to harvest for training")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="fraction of documents held out for evaluation")
    p.add_argument("--activation-cache", default=None, help="directory to reuse (or write) harvested activations")
    p.add_argument("--latents", type=int, default=4608, help="dictionary size M")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(M / 2^14)")
    p.add_argument("--tilt", type=float, default=0.0, help="TERM tilt t (0: ERM)")
    p.add_argument("--streaming-term", action="store_true", help="TERM's stochastic form with a running normalizer")
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="exclude tokens whose norm exceeds this many times the median (0: keep all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of the SAE kernels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-to", nargs="*", default=[], choices=("tensorboard", "wandb"),
                   help="also log metrics to TensorBoard (OUT/tensorboard) and/or wandb (installed separately)")
    p.add_argument("--ce-sequences", type=int, default=16, help="held-out sequences for the downstream loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (checkpoint, sae/, report.json, report.md, plots)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    every = max(2, round(1 / eval_fraction))
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    if not held or not train:
        raise ValueError(f"{len(docs)} documents are too few to hold out {eval_fraction:.0%} for evaluation")
    return train, held


def run_train(args) -> dict:
    from .activations import harvest, load_activations, outlier_mask, save_activations, token_chunks
    from .evaluate import downstream_loss, reconstruction_metrics, write_report
    from .sae import TopKSAE
    from .trainer import CHECKPOINT, TrainConfig, Trainer, new_sae

    if args.k > args.latents:
        raise ValueError(f"--k {args.k} must not exceed --latents {args.latents}")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    model, tokenizer = models.load_model(args.model, device=args.device)
    models.check_layer(model, args.layer)
    train_docs, eval_docs = split_documents(text.read_texts(args.text, field=args.text_field), args.eval_fraction)

    cache = args.activation_cache
    if cache and os.path.exists(os.path.join(cache, "meta.json")):
        data = load_activations(cache)
        if data.layer != args.layer:
            raise ValueError(f"activation cache {cache} holds layer {data.layer}, not {args.layer}")
    else:
        data = harvest(model, tokenizer, train_docs, args.layer, context=args.context,
                       max_tokens=args.max_tokens, progress=progress, model_name=args.model)
        if cache:
            save_activations(cache, data)
    harvested = time.perf_counter()
    eval_data = harvest(model, tokenizer, eval_docs, args.layer, context=args.context,
                        max_tokens=max(2048, args.max_tokens // 10), progress=progress)

    keep = outlier_mask(data.acts, args.outlier_factor) if args.outlier_factor > 0 else torch.ones(len(data), dtype=torch.bool)
    acts = data.acts[keep].to(args.device)
    eval_keep = outlier_mask(eval_data.acts, args.outlier_factor) if args.outlier_factor > 0 else torch.ones(len(eval_data), dtype=torch.bool)

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, tilt=args.tilt,
                      streaming_term=args.streaming_term, checkpoint_every=args.checkpoint_every, seed=args.seed,
                      log_to=tuple(args.log_to))
    checkpoint = os.path.join(args.out, CHECKPOINT)
    if args.resume:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"--resume: no checkpoint in {args.out}")
        sae = TopKSAE.load(checkpoint, args.device)
    else:
        sae = new_sae(acts, args.latents, args.k, seed=args.seed, compute_dtype=args.dtype,
                      dead_tokens=min(1_000_000, args.steps * args.batch_size // 10)).to(args.device)
    trainer = Trainer(sae, acts, cfg, args.out, progress=progress)
    if args.resume:
        trainer.load_checkpoint()
    else:  # a fresh run starts a fresh metrics log
        open(trainer.metrics_file, "w").close()
    train_started = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - train_started
    sae.save(os.path.join(args.out, "sae"))

    recon = reconstruction_metrics(sae, eval_data.acts[eval_keep].to(args.device))
    recon_all = reconstruction_metrics(sae, eval_data.acts.to(args.device))
    chunks = token_chunks(tokenizer, eval_docs, args.context)[: args.ce_sequences]
    ce = downstream_loss(model, sae, chunks, args.layer, progress=progress)
    report = {
        "fvu": recon["fvu"], "l0": recon["l0"], "k": args.k, "num_latents": args.latents,
        "dead_fraction": float(sae.dead_mask().float().mean()),
        "never_fired_on_eval_fraction": recon["never_fired_fraction"],
        "dense_fraction": recon["dense_fraction"],
        "ce_loss_recovered": ce["ce_loss_recovered"], "ce_clean": ce["ce_clean"], "ce_sae": ce["ce_sae"],
        "ce_zero_ablation": ce["ce_zero"], "ce_tokens": ce["ce_tokens"],
        "fvu_including_outliers": recon_all["fvu"],
        "outliers_excluded_fraction": float(1 - keep.double().mean()),
        "outlier_rule": f"tokens with norm > {args.outlier_factor} x median excluded from training and fvu"
        if args.outlier_factor > 0 else "none",
        "tokens": trainer.step * args.batch_size, "unique_training_tokens": int(acts.shape[0]),
        "eval_tokens": int(eval_keep.sum()), "tokens_per_s": trainer.tokens_per_s,
        "train_seconds": train_time, "harvest_seconds": harvested - started,
        "total_seconds": time.perf_counter() - started,
        "model": args.model, "layer": args.layer, "text": args.text, "tilt": args.tilt, "steps": trainer.step,
        "batch_size": args.batch_size, "dtype": args.dtype, "threads": torch.get_num_threads(),
    }
    write_report(args.out, report, metrics_file=trainer.metrics_file, latent_frequency=recon["latent_frequency"])
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ssae", description="Sparse autoencoders on fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="train a TopK SAE on a model's activations, evaluate, report"))
    from .recipes import specialized  # ssae select / finetune / eval (each sets args.run)

    specialized.add_subcommands(sub)
    from . import subspace  # ssae subspace (sets args.run)

    subspace.add_subcommand(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            report = run_train(args)
            print(json.dumps({k: report[k] for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered",
                                                     "tokens", "tokens_per_s", "total_seconds")}, indent=2))
            print(f"report: {os.path.join(args.out, 'report.md')}")
        elif getattr(args, "run", None) is not None:
            args.run(args)
    except KeyboardInterrupt as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"ssae {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
