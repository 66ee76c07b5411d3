"""The ``ssae subspace`` subcommand: its flags (defaults from :class:`SubspaceConfig`) and its handler."""

from __future__ import annotations

import argparse
import json
import os

from ..common import HelpFormatter, add_model_args, add_threads_arg, config_from_args
from .evaluation import evaluate_adapter, write_evaluation
from .pipeline import SubspaceConfig, run
from .stages import ADAPTERS, SIGNS

# What the handler prints of report.json.
SUMMARY_KEYS = ("safety_rate_base", "safety_rate_tuned", "over_refusal_base", "over_refusal_tuned",
                "xstest_unsafe_refusal_tuned", "trainable_fraction", "ppl_base", "ppl_tuned", "max_out_of_span",
                "total_seconds")


def add_subcommands(sub) -> None:
    """Registers ``ssae subspace`` on the CLI's subparsers (it sets ``args.handler``)."""
    p = sub.add_parser("subspace", formatter_class=HelpFormatter,
                       help="SAE-feature subspace finetuning (SAILS): select features, build the subspace, "
                            "finetune inside it, evaluate against LoRA and full finetuning")
    add_args(p)
    p.set_defaults(handler=_handler)
    actions = p.add_subparsers(dest="subspace_action", metavar="{eval}",
                               description="without one: the run (select, build, finetune, evaluate)")
    e = actions.add_parser("eval", formatter_class=HelpFormatter,
                           help="refusal rate of a saved adapter (OUT/adapter of a run) on a CSV file of prompts")
    e.add_argument("--adapter", required=True, help="adapter directory written by ssae subspace (OUT/adapter)")
    e.add_argument("--prompts", required=True, help="CSV file with a header row")
    e.add_argument("--column", required=True, help="the column of --prompts that holds the prompts")
    e.add_argument("--out", required=True, help="JSON file to write: refusal_rate, n and every reply")
    e.add_argument("--model", default=None, help="the base model (default: the one the adapter was trained on)")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per prompt (default: the run's)")
    e.add_argument("--device", default="cpu", help="torch device")
    add_threads_arg(e)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(handler=_eval_handler)


def add_args(p: argparse.ArgumentParser) -> None:
    D = SubspaceConfig  # the single source of the defaults
    add_model_args(p, layer=False)
    p.add_argument("--layers", default=D.layers, help="comma-separated decoder layers whose residual stream is used")
    p.add_argument("--sae", nargs="*", default=D.sae,
                   help="SAE directories, one per layer in --layers order (ours, SAELens or sparsify); "
                        "none: train one per layer here")
    p.add_argument("--behaviour", default=D.behaviour,
                   help="'builtin:advbench' (AdvBench and XSTest splits) or a JSONL file of paired responses "
                        "(see ssae_kernels/data/behaviour.py)")
    p.add_argument("--neutral-text", default=D.neutral_text,
                   help="neutral text for SAE training and perplexity (documents are split between the two)")
    p.add_argument("--features-per-layer", type=int, default=D.features_per_layer, help="top latents kept per layer")
    p.add_argument("--signs", choices=SIGNS, default=D.signs,
                   help="'target': latents more active on target responses only (SAILS' selection); 'both': the "
                        "largest |score| of either behaviour, so the adapter can also lower contrast latents")
    p.add_argument("--variance", type=float, default=D.variance,
                   help="fraction of the directions' variance kept by PCA")
    p.add_argument("--adapter", choices=ADAPTERS, default=D.adapter,
                   help="(a) 'subspace': LoRA with output factor U, or (b) 'projected': projected gradients on the "
                        "full weights")
    p.add_argument("--compare", default=D.compare,
                   help="comparison methods to run as well: any of projected, lora, full, subspace ('' for none)")
    p.add_argument("--steps", type=int, default=D.steps,
                   help="finetuning steps, the same budget for every method (batches from shuffled passes)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="examples per finetuning step")
    p.add_argument("--keep-share", type=_share, default=D.keep_share,
                   help="share of kept (ordinary) answers in the training examples, reached by repeating them; "
                        "'none': as many as the data has")
    p.add_argument("--distill-tokens", type=int, default=D.distill_tokens,
                   help="tokens of the base model's own answers to the kept prompts (self-distillation)")
    p.add_argument("--lr", type=float, default=D.lr, help="learning rate of the subspace adapter")
    p.add_argument("--lora-lr", type=float, default=D.lora_lr, help="learning rate of plain LoRA")
    p.add_argument("--projected-lr", type=float, default=D.projected_lr,
                   help="learning rate of projected-gradient training")
    p.add_argument("--full-lr", type=float, default=D.full_lr, help="learning rate of full finetuning")
    p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens,
                   help="tokens generated per evaluated prompt")
    p.add_argument("--ppl-sequences", type=int, default=D.ppl_sequences, help="neutral sequences for perplexity")
    p.add_argument("--context", type=int, default=D.context, help="tokens per neutral sequence")
    p.add_argument("--sae-tokens", type=int, default=D.sae_tokens,
                   help="activations harvested to train each SAE (without --sae)")
    p.add_argument("--sae-latents", type=int, default=D.sae_latents, help="latents of each SAE trained here")
    p.add_argument("--sae-k", type=int, default=D.sae_k, help="active latents per token of each SAE trained here")
    p.add_argument("--sae-steps", type=int, default=D.sae_steps, help="training steps of each SAE trained here")
    p.add_argument("--sae-batch-size", type=int, default=D.sae_batch_size,
                   help="activations per training step of each SAE trained here")
    p.add_argument("--device", default=D.device, help="torch device of the model and the SAEs")
    p.add_argument("--seed", type=int, default=D.seed,
                   help="seed of SAE training, LoRA initialisation and the order of training examples")
    p.add_argument("--out", help="run directory (report.json, completions.jsonl, features.json, subspace, adapter/) "
                                 "(required for the run)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that OUT holds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tune", action="store_true",
                   help="instead of the run: evaluate --tune-signs x --tune-features x --tune-lrs (subspace "
                        "adapter; projected gradients and plain LoRA of --compare over --tune-compare-lrs) on the "
                        "behaviour's dev split only, print the table and the chosen flags, write OUT/tune.json")
    p.add_argument("--tune-lrs", default=D.tune_lrs, help="learning rates tried by --tune")
    p.add_argument("--tune-signs", default=D.tune_signs, help="--signs values tried by --tune")
    p.add_argument("--tune-features", default=D.tune_features, help="--features-per-layer values tried by --tune")
    p.add_argument("--tune-max-ppl-rise", type=float, default=D.tune_max_ppl_rise,
                   help="--tune only picks settings whose dev neutral perplexity rise has a 95%% upper confidence "
                        "bound below this")
    p.add_argument("--tune-compare-lrs", default=D.tune_compare_lrs,
                   help="learning rates tried by --tune for the comparison methods ('': the --tune-lrs)")
    p.add_argument("--tune-ppl-sequences", type=int, default=D.tune_ppl_sequences,
                   help="neutral sequences for dev perplexity in --tune, after the --ppl-sequences reported on")


def _share(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _eval_handler(args: argparse.Namespace) -> None:
    result = evaluate_adapter(args.adapter, args.prompts, args.column, model=args.model,
                              max_new_tokens=args.max_new_tokens, device=args.device, threads=args.threads,
                              progress=not args.quiet)
    write_evaluation(result, args.out)
    print(json.dumps({k: result[k] for k in ("refusal_rate", "n")}))
    print(f"evaluation: {args.out}")


def _handler(args: argparse.Namespace) -> None:
    cfg = config_from_args(SubspaceConfig, args)
    report = run(cfg)
    if cfg.tune:
        print(f"tuning report: {os.path.join(cfg.out, 'tune.json')}")
        return
    print(json.dumps({k: report[k] for k in SUMMARY_KEYS if k in report}, indent=2))
    print(f"report: {os.path.join(cfg.out, 'report.json')}")
