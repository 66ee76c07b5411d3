"""``ssae train``: harvest a model's activations, train an SAE (TopK, BatchTopK, JumpReLU or ReLU) on them, evaluate
it on held-out documents."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

from .. import models, text
from .common import (HelpFormatter, UsageError, add_model_args, add_out_args, check_positive, check_sources, config_from_args,
                     dead_tokens_for, harvest_cached_layers, keep_mask, require_package, run_settings, set_threads)
from ..sae import ARCHITECTURES, SAE_CLASSES
from ..trainer import OPTIMIZER_STATES, OPTIMIZERS
from .rundir import open_run

# Settings a resumed run may change; every other one must match the run's, or the report would describe a
# run that never happened.
# (Both optimizers leave torch.optim.Adam's state in a checkpoint, so either resumes the other's; a
# checkpoint holds the whole dictionary whatever the processes split.)
MAY_CHANGE_ON_RESUME = frozenset({"steps", "checkpoint_every", "threads", "device", "log_to", "ce_sequences",
                                  "activation_cache", "optimizer", "optimizer_state", "shard"})
SHARDINGS = ("batch", "latents")
SUMMARY_KEYS = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "tokens", "passes", "tokens_per_s",
                "total_seconds")


@dataclass
class TrainRunConfig:
    out: str
    model: str = models.BUILTIN
    layer: int = 15
    layers: tuple[int, ...] | None = None  # several layers, one SAE each, from one forward pass (replaces layer)
    distribute_layers: bool = False
    text: str = text.BUILTIN
    text_field: str = "text"
    max_tokens: int = 100_000
    context: int = 256
    eval_fraction: float = 0.05
    eval_min_tokens: int = 5000
    activation_cache: str | None = None
    latents: int = 4608
    k: int = 32
    arch: str = "topk"
    max_k: int | None = None
    bandwidth: float | None = None
    l1_coef: float | None = None
    steps: int = 800
    batch_size: int = 4096
    lr: float | None = None
    optimizer: str = "adam"
    optimizer_state: str = "float32"
    tilt: float = 0.0
    streaming_term: bool = False
    outlier_factor: float = 10.0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 500
    log_to: tuple[str, ...] = ()
    ce_sequences: int = 16
    seed: int = 0
    shard: str = "batch"
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False



def add_subcommands(sub) -> None:
    p = sub.add_parser("train", help="train an SAE (TopK, BatchTopK, JumpReLU, ReLU) on a model's activations, "
                                     "evaluate, report",
                       description="Harvests the residual stream after --layer, trains an SAE of architecture "
                                   "--arch on it and evaluates it on held-out documents.", formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--layers", type=_layer_list, default=None,
                   help="several layers, e.g. 6,10,15: one SAE each (in OUT/layer-L), trained on activations "
                        "harvested together in one forward pass (replaces --layer)")
    p.add_argument("--distribute-layers", action="store_true",
                   help="under torchrun, with --layers: each process trains its own layers (rank r takes every "
                        "world-th layer from the r-th) instead of all of them sharing each layer")
    p.add_argument("--text", default=text.BUILTIN,
                   help="text: 'builtin:python-docs', a .txt/.jsonl/.parquet file or directory, or a hub dataset name")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/hub records")
    p.add_argument("--max-tokens", type=int, default=100_000, help="activations to harvest for training")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="fraction of documents held out for evaluation")
    p.add_argument("--eval-min-tokens", type=int, default=5000,
                   help="hold out more documents until they give at least this many evaluation tokens")
    p.add_argument("--activation-cache", default=None, help="directory to reuse (or write) harvested activations")
    p.add_argument("--latents", type=int, default=4608, help="dictionary size M")
    p.add_argument("--k", type=int, default=32,
                   help="active latents per token: exactly (topk), on average (batchtopk), the target mean L0 "
                        "(jumprelu) or the mean L0 at initialisation (relu, whose --l1-coef sets where it goes)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="topk",
                   help="topk: k latents per token; batchtopk: the batch's N*k largest, shared across its tokens, "
                        "encoded after training with the batch threshold it estimated; jumprelu: learned "
                        "per-latent thresholds, an L0 penalty towards k; relu: ReLU with an L1 penalty")
    p.add_argument("--max-k", type=int, default=None,
                   help="all but topk: the most latents one token may keep (default 4 k)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="jumprelu: width of the thresholds' straight-through kernel, in normalised "
                        "pre-activation units (default 0.05)")
    p.add_argument("--l1-coef", type=float, default=None,
                   help="relu: weight of the L1 penalty sum_m z_m |W_dec[m]| at the normalised scale (default 1.5: "
                        "L0 about 34 on the built-in model)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    p.add_argument("--lr", type=float, default=None, help="learning rate (None: 2e-4 / sqrt(M / 2^14))")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam: every row each step; sparse-adam: only the rows the batch touched, same state "
                        "(docs/design.md)")
    p.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default="float32",
                   help="dtype of Adam's moments; bfloat16 (with --optimizer sparse-adam) halves them, stored with "
                        "stochastic rounding")
    p.add_argument("--tilt", type=float, default=0.0, help="TERM tilt t (0: ERM)")
    p.add_argument("--streaming-term", action="store_true", help="TERM's stochastic form with a running normalizer")
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="exclude tokens whose norm exceeds this many times the median (0: keep all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of the SAE kernels")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--log-to", nargs="*", default=[], choices=("tensorboard", "wandb"),
                   help="also log metrics to TensorBoard (OUT/tensorboard) and/or wandb (installed separately)")
    p.add_argument("--ce-sequences", type=int, default=16, help="held-out sequences for the downstream loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    p.add_argument("--shard", choices=SHARDINGS, default="batch",
                   help="under torchrun, what the processes split: batch (data parallel: each trains on its share "
                        "of every batch, gradients all-reduced) or latents (each holds --latents / world of the "
                        "dictionary, for dictionaries larger than one device; topk only)")
    add_out_args(p, "checkpoint, sae/, report.json, report.md, plots", resume=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_handler)


def _layer_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers separated by commas (e.g. 6,10,15), got {value!r}")


def _handler(args) -> None:
    cfg = config_from_args(TrainRunConfig, args)
    cfg.log_to = tuple(cfg.log_to)
    report = run(cfg)
    if not report:  # a rank other than 0
        return
    if "by_layer" in report:
        print(json.dumps(report["by_layer"], indent=2))
    else:
        print(json.dumps({k: report[k] for k in SUMMARY_KEYS}, indent=2))
    print(f"report: {os.path.join(cfg.out, 'report.md')}")


def check(cfg: TrainRunConfig) -> None:
    """Everything that can be checked before the model is loaded."""
    check_positive(latents=cfg.latents, k=cfg.k, steps=cfg.steps, batch_size=cfg.batch_size,
                   max_tokens=cfg.max_tokens, checkpoint_every=cfg.checkpoint_every)
    if cfg.k > cfg.latents:
        raise UsageError(f"--k {cfg.k} must not exceed --latents {cfg.latents}")
    if cfg.max_k is not None and cfg.arch == "topk":
        raise UsageError("--max-k does not apply to --arch topk (it keeps exactly --k per token)")
    for option, arch in (("bandwidth", "jumprelu"), ("l1_coef", "relu")):
        value = getattr(cfg, option)
        flag = "--" + option.replace("_", "-")
        if value is not None and cfg.arch != arch:
            raise UsageError(f"{flag} applies to --arch {arch} only, not {cfg.arch}")
        if value is not None and (not 0 <= value < float("inf") or (option == "bandwidth" and value == 0)):
            raise UsageError(f"{flag} must be a {'positive' if option == 'bandwidth' else 'non-negative'} finite "
                             f"number, got {value}")
    from ..data_parallel import unsupported, world_size

    tilted = bool(cfg.tilt or cfg.streaming_term)
    if cfg.shard not in SHARDINGS:
        raise UsageError(f"--shard must be one of {SHARDINGS}, got {cfg.shard!r}")
    if cfg.shard == "latents":
        if cfg.arch != "topk" or cfg.optimizer != "adam":
            raise UsageError(f"--shard latents trains --arch topk with --optimizer adam, not --arch {cfg.arch} "
                             f"with --optimizer {cfg.optimizer}")
        if world_size() > cfg.latents:
            raise UsageError(f"--shard latents: {world_size()} processes cannot share --latents {cfg.latents}")
    if cfg.layers is not None:
        if not cfg.layers or len(set(cfg.layers)) != len(cfg.layers) or min(cfg.layers) < 0:
            raise UsageError(f"--layers must name distinct layers >= 0, got {','.join(map(str, cfg.layers))}")
    if cfg.distribute_layers:
        if world_size() > len(cfg.layers or (cfg.layer,)):
            raise UsageError(f"--distribute-layers: {world_size()} processes for {len(cfg.layers or (cfg.layer,))} "
                             "layer(s); every process needs a layer of its own (fewer processes, or more --layers)")
        if cfg.shard != "batch":
            raise UsageError("--distribute-layers gives each process whole layers: it excludes --shard latents")
    shares = world_size() > 1 and not cfg.distribute_layers
    missing = shares and cfg.shard == "batch" and unsupported(SAE_CLASSES[cfg.arch], cfg.optimizer, tilted)
    if missing:
        raise UsageError(f"under torchrun (data parallel), ssae train does not support {missing} yet")
    if cfg.arch == "jumprelu" and cfg.optimizer == "sparse-adam":
        raise UsageError("--optimizer sparse-adam cannot train --arch jumprelu (its thresholds learn from latents "
                         "outside the code): use --optimizer adam")
    if cfg.max_k is not None and not cfg.k <= cfg.max_k <= cfg.latents:
        raise UsageError(f"--max-k {cfg.max_k} must lie in [--k, --latents] = [{cfg.k}, {cfg.latents}]")
    if cfg.context < 2:
        raise UsageError(f"--context must be >= 2, got {cfg.context}")
    if not 0 < cfg.eval_fraction < 1:
        raise UsageError(f"--eval-fraction must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.eval_min_tokens < 0 or cfg.ce_sequences < 0 or cfg.outlier_factor < 0:
        raise UsageError("--eval-min-tokens, --ce-sequences and --outlier-factor must be >= 0")
    if cfg.layer < 0:
        raise UsageError(f"--layer must be >= 0, got {cfg.layer}")
    if cfg.optimizer_state != "float32" and cfg.optimizer != "sparse-adam":
        raise UsageError(f"--optimizer-state {cfg.optimizer_state} needs --optimizer sparse-adam (torch.optim.Adam, "
                         f"--optimizer {cfg.optimizer}, keeps its moments in float32)")
    for sink, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if sink in cfg.log_to:
            require_package(package, f"--log-to {sink}")
    check_sources(cfg.model, (cfg.text,), cfg.text_field)


def check_memory(cfg: TrainRunConfig, d_in: int, world: int = 1, layers: int = 1) -> None:
    """UsageError before anything of the SAE's size is allocated when the memory planner says the run does
    not fit in what the device has free (the process itself, with the model loaded, already runs). With
    --shard latents, each of the ``world`` ranks plans for its share of the latents; the activations of
    ``layers`` layers are held at once."""
    from .. import memory

    free = memory.available_bytes(cfg.device)
    if free is None:
        return
    # a threshold architecture's code is max_k wide (SAEConfig's default: 4 k)
    width = cfg.k if cfg.arch == "topk" else cfg.max_k or min(cfg.latents, 4 * cfg.k)
    latents = -(-cfg.latents // world) if cfg.shard == "latents" else cfg.latents
    planned = memory.plan(latents, d_in, cfg.batch_size, width, compute_dtype=cfg.dtype, device=cfg.device,
                          optimizer=cfg.optimizer, optimizer_state=cfg.optimizer_state,
                          dataset_tokens=cfg.max_tokens * layers, runtime_bytes=0)
    if planned.total > free:
        raise UsageError(
            f"--latents {cfg.latents} at d_in {d_in} with --batch-size {cfg.batch_size} and --max-tokens "
            f"{cfg.max_tokens} needs {planned.total / 1e9:.1f} GB by the memory planner (ssae plan --latents "
            f"{cfg.latents} --d {d_in} --batch {cfg.batch_size} --k {width} --dtype {cfg.dtype} --optimizer "
            f"{cfg.optimizer} --optimizer-state {cfg.optimizer_state} --tokens {cfg.max_tokens}), but {free / 1e9:.1f} GB are free on {cfg.device}")


def split_documents(docs: list[str], token_counts: list[int], eval_fraction: float,
                    min_eval_tokens: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: a fixed pseudo-random set holding at least ``eval_fraction`` of the
    documents and at least ``min_eval_tokens`` tokens, never more than half of all tokens."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist()
    want_docs = max(1, round(eval_fraction * len(docs)))
    held, tokens = set(), 0
    for i in order:
        if len(held) >= want_docs and tokens >= min_eval_tokens:
            break
        held.add(i)
        tokens += token_counts[i]
    total = sum(token_counts)
    if len(held) == len(docs) or tokens > total / 2 or tokens < min_eval_tokens:
        raise UsageError(f"the text holds {len(docs)} documents and {total} tokens: too few to hold out "
                         f"{eval_fraction:.0%} of the documents and {min_eval_tokens} tokens for evaluation "
                         "(lower --eval-fraction or --eval-min-tokens, or give more text)")
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def layer_dirs(cfg: TrainRunConfig) -> dict[int, str]:
    """layer -> the directory of its SAE, checkpoint and report: --out itself for one layer, --out/layer-L for
    each of several."""
    layers = cfg.layers or (cfg.layer,)
    return {layer: cfg.out if len(layers) == 1 else os.path.join(cfg.out, f"layer-{layer}") for layer in layers}


def run(cfg: TrainRunConfig) -> dict:
    """Trains and evaluates; writes OUT/sae, OUT/report.json (returned), report.md and plots (with several
    --layers, those of each layer in OUT/layer-L and a summary in OUT/report.json). Under torchrun with more
    than one process the ranks share each layer's training (--shard) or, with --distribute-layers, the
    layers: rank 0 holds the run directory, the ranks that train a layer write its files, and ranks other
    than 0 return an empty dict."""
    check(cfg)
    set_threads(cfg.threads)
    from ..data_parallel import from_environment
    from ..trainer import recover_checkpoint

    def has_checkpoint(out):
        return any(recover_checkpoint(directory) for directory in layer_dirs(cfg).values())

    ranks, device = from_environment(cfg.device)
    try:
        with contextlib.ExitStack() as stack:
            failed = False
            if ranks is None or ranks.writes:
                try:
                    stack.enter_context(open_run(cfg.out, "train", run_settings(cfg), resume=cfg.resume,
                                                 overwrite=cfg.overwrite, may_change=MAY_CHANGE_ON_RESUME,
                                                 has_checkpoint=has_checkpoint))
                except BaseException:
                    failed = True
                    if ranks is not None:
                        ranks.any(True)
                    raise
            if ranks is not None and ranks.any(failed):
                raise UsageError("rank 0 could not open the run directory (its error says why)")
            return _train(dataclasses.replace(cfg, device=device), ranks)
    finally:
        if ranks is not None:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainRunConfig, ranks=None) -> dict:
    """``run``'s work on one rank (``ranks``: the processes of a torchrun launch, or None)."""
    from ..activations import harvest_layers

    started = time.perf_counter()
    writes = ranks is None or ranks.writes
    dirs = layer_dirs(cfg)
    mine = list(dirs)  # the layers this rank trains (with --distribute-layers, its share of them)
    if ranks is not None and cfg.distribute_layers:
        mine = mine[ranks.rank::ranks.world]
    # the rank that writes a layer's files: its own with --distribute-layers, else rank 0
    writes_layers = writes or (ranks is not None and cfg.distribute_layers)
    model, tokenizer = models.load_model(cfg.model, device=cfg.device, progress=not cfg.quiet and writes)
    for layer in dirs:
        models.check_layer(model, layer)
    shares = ranks is not None and not cfg.distribute_layers  # the ranks share each layer's training
    check_memory(cfg, model.config.hidden_size, ranks.world if shares else 1, len(mine))
    docs = text.read_texts(cfg.text, field=cfg.text_field)
    counts = [len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    train_docs, eval_docs = split_documents(docs, counts, cfg.eval_fraction, cfg.eval_min_tokens)
    caches = {layer: cfg.activation_cache if len(dirs) == 1 or not cfg.activation_cache
              else os.path.join(cfg.activation_cache, f"layer-{layer}") for layer in mine}
    if shares and not writes:
        ranks.barrier()  # rank 0 harvests first, into the activation cache when there is one
    data = harvest_cached_layers(model, tokenizer, train_docs, caches, context=cfg.context, max_tokens=cfg.max_tokens,
                                 progress=not cfg.quiet and writes, model_name=cfg.model)
    if shares and writes:
        ranks.barrier()
    harvest_seconds = time.perf_counter() - started
    reports, eval_data = {}, None
    for layer in mine:
        sae, trainer, keep, done = _train_layer(cfg, ranks if shares else None, data[layer].acts, dirs[layer],
                                          progress=not cfg.quiet and writes)
        if not writes_layers:
            continue
        if eval_data is None:  # the held-out activations of every layer this rank evaluates, in one pass
            eval_data = harvest_layers(model, tokenizer, eval_docs, mine, context=cfg.context,
                                       progress=not cfg.quiet and writes)
        reports[layer] = _evaluate(cfg, model, tokenizer, eval_docs, eval_data[layer], layer, sae, trainer, keep,
                                   dirs[layer], ranks, {**done, "harvest_seconds": harvest_seconds}, started)
    if ranks is not None and cfg.distribute_layers:
        ranks.barrier()  # every layer's report is written
    if not writes:
        return {}
    if len(dirs) == 1:
        return reports[cfg.layers[0] if cfg.layers else cfg.layer]
    return _summarise(cfg, dirs, started)


def _train_layer(cfg: TrainRunConfig, ranks, acts, out: str, *, progress: bool):
    """Trains one layer's SAE in ``out`` (``ranks``: the processes that share its training, or None); returns
    (the whole SAE on the rank that writes it, else None; its Trainer; the training rows kept; its
    train_seconds and latents_per_rank)."""
    from ..data_parallel import DataParallel
    from ..trainer import TrainConfig, Trainer, new_sae, recover_checkpoint

    keep = keep_mask(acts, cfg.outlier_factor)
    acts = acts[keep].to(cfg.device)
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                            optimizer_state=cfg.optimizer_state, tilt=cfg.tilt,
                            streaming_term=cfg.streaming_term, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                            log_to=cfg.log_to)
    sae = new_sae(acts, cfg.latents, cfg.k, seed=cfg.seed, compute_dtype=cfg.dtype, arch=cfg.arch,
                  max_k=cfg.max_k, bandwidth=cfg.bandwidth, l1_coef=cfg.l1_coef,
                  dead_tokens=dead_tokens_for(cfg.steps, cfg.batch_size),
                  shard_group=ranks.group if ranks is not None and cfg.shard == "latents" else None).to(cfg.device)
    dp = DataParallel(ranks.group) if ranks is not None and cfg.shard == "batch" else None
    trainer = Trainer(sae, acts, train_cfg, out, progress=progress, data_parallel=dp)
    # A resumed run that died before its first checkpoint starts again from step 0.
    trainer.begin(resume=cfg.resume and recover_checkpoint(out) is not None)
    started = time.perf_counter()
    trainer.train()
    done = {"train_seconds": time.perf_counter() - started, "latents_per_rank": len(sae.latents)}
    if trainer.sharded:  # the whole dictionary, on rank 0's host
        sae = sae.gathered()
        sae = sae and sae.to(cfg.device)
    return sae if trainer.writes else None, trainer, keep, done


def _evaluate(cfg: TrainRunConfig, model, tokenizer, eval_docs, eval_data, layer: int, sae, trainer, keep, out: str,
              ranks, timings: dict, started: float) -> dict:
    """Saves a trained SAE in out/sae, evaluates it on the held-out documents and writes its report
    (``timings``: its train_seconds, harvest_seconds and latents_per_rank)."""
    from ..activations import token_chunks
    from ..evaluate import downstream_loss, reconstruction_metrics, write_report

    sae.save(os.path.join(out, "sae"))
    eval_keep = keep_mask(eval_data.acts, cfg.outlier_factor)
    recon = reconstruction_metrics(sae, eval_data.acts[eval_keep].to(cfg.device))
    recon_all = reconstruction_metrics(sae, eval_data.acts.to(cfg.device))
    chunks = token_chunks(tokenizer, eval_docs, cfg.context)[: cfg.ce_sequences]
    ce = downstream_loss(model, sae, chunks, layer, progress=not cfg.quiet and (ranks is None or ranks.writes))
    tokens = trainer.step * cfg.batch_size
    rows = int(keep.sum())
    report = {
        "fvu": recon["fvu"], "l0": recon["l0"], "k": cfg.k, "num_latents": cfg.latents,
        "dead_fraction": float(sae.dead_mask().float().mean()),
        "never_fired_on_eval_fraction": recon["never_fired_fraction"],
        "dense_fraction": recon["dense_fraction"],
        "ce_loss_recovered": ce["ce_loss_recovered"], "ce_clean": ce["ce_clean"], "ce_sae": ce["ce_sae"],
        "ce_zero_ablation": ce["ce_zero"], "ce_tokens": ce["ce_tokens"],
        "fvu_including_outliers": recon_all["fvu"],
        "outliers_excluded_fraction": float(1 - keep.double().mean()),
        "outlier_rule": f"tokens with norm > {cfg.outlier_factor} x median excluded from training and fvu"
        if cfg.outlier_factor > 0 else "none",
        "tokens": tokens, "unique_training_tokens": rows, "passes": tokens / rows,
        "eval_documents": len(eval_docs), "eval_tokens": int(eval_keep.sum()), "tokens_per_s": trainer.tokens_per_s,
        **{key: timings[key] for key in ("train_seconds", "harvest_seconds")},
        "total_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
        "world_size": 1 if ranks is None else ranks.world, "rank": 0 if ranks is None else ranks.rank,
        "latents_per_rank": timings["latents_per_rank"],
        **run_settings(cfg), "layer": layer, "steps": trainer.step,
    }
    write_report(out, report, metrics_file=trainer.metrics_file, latent_frequency=recon["latent_frequency"])
    return report


def _summarise(cfg: TrainRunConfig, dirs: dict[int, str], started: float) -> dict:
    """OUT/report.json and report.md of a run over several layers: each layer's summary, read from its report."""
    layers = {}
    for layer, directory in dirs.items():
        with open(os.path.join(directory, "report.json")) as f:
            layers[str(layer)] = {key: value for key, value in json.load(f).items() if key in SUMMARY_KEYS}
    report = {**run_settings(cfg), "by_layer": layers, "total_seconds": time.perf_counter() - started}
    lines = ["# SAE training report: one SAE per layer", "",
             "| layer | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for layer, summary in layers.items():
        lines.append(f"| [{layer}](layer-{layer}/report.md) | " + " | ".join(
            f"{summary[key]:.4g}" if isinstance(summary[key], float) else str(summary[key]) for key in SUMMARY_KEYS)
            + " |")
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report
