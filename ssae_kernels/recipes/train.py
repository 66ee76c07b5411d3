"""``ssae train``: harvest a model's activations, train an SAE (TopK, BatchTopK, JumpReLU or ReLU) on them, evaluate
it on held-out documents."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

from .. import models, text
from .common import (HelpFormatter, UsageError, add_model_args, add_out_args, check_positive, check_sources, config_from_args,
                     dead_tokens_for, harvest_cached, keep_mask, require_package, run_settings, set_threads)
from ..sae import ARCHITECTURES, SAE_CLASSES
from ..trainer import OPTIMIZER_STATES, OPTIMIZERS
from .rundir import open_run

# Settings a resumed run may change; every other one must match the run's, or the report would describe a
# run that never happened.
# (Both optimizers leave torch.optim.Adam's state in a checkpoint, so either resumes the other's.)
MAY_CHANGE_ON_RESUME = frozenset({"steps", "checkpoint_every", "threads", "device", "log_to", "ce_sequences",
                                  "activation_cache", "optimizer", "optimizer_state"})
SUMMARY_KEYS = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "tokens", "passes", "tokens_per_s",
                "total_seconds")


@dataclass
class TrainRunConfig:
    out: str
    model: str = models.BUILTIN
    layer: int = 15
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
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False



def add_subcommands(sub) -> None:
    p = sub.add_parser("train", help="train an SAE (TopK, BatchTopK, JumpReLU, ReLU) on a model's activations, "
                                     "evaluate, report",
                       description="Harvests the residual stream after --layer, trains an SAE of architecture "
                                   "--arch on it and evaluates it on held-out documents.", formatter_class=HelpFormatter)
    add_model_args(p)
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
    add_out_args(p, "checkpoint, sae/, report.json, report.md, plots", resume=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_handler)


def _handler(args) -> None:
    cfg = config_from_args(TrainRunConfig, args)
    cfg.log_to = tuple(cfg.log_to)
    report = run(cfg)
    if not report:  # a data-parallel rank other than 0
        return
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
    missing = world_size() > 1 and unsupported(SAE_CLASSES[cfg.arch], cfg.optimizer, tilted)
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


def check_memory(cfg: TrainRunConfig, d_in: int) -> None:
    """UsageError before anything of the SAE's size is allocated when the memory planner says the run does
    not fit in what the device has free (the process itself, with the model loaded, already runs)."""
    from .. import memory

    free = memory.available_bytes(cfg.device)
    if free is None:
        return
    # a threshold architecture's code is max_k wide (SAEConfig's default: 4 k)
    width = cfg.k if cfg.arch == "topk" else cfg.max_k or min(cfg.latents, 4 * cfg.k)
    planned = memory.plan(cfg.latents, d_in, cfg.batch_size, width, compute_dtype=cfg.dtype, device=cfg.device,
                          optimizer=cfg.optimizer, optimizer_state=cfg.optimizer_state,
                          dataset_tokens=cfg.max_tokens, runtime_bytes=0)
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


def run(cfg: TrainRunConfig) -> dict:
    """Trains and evaluates; writes OUT/sae, OUT/report.json (returned), report.md and plots. Under torchrun
    with more than one process, trains data-parallel (``data_parallel.py``): rank 0 holds the run directory,
    writes every file and evaluates; the other ranks return an empty dict."""
    check(cfg)
    set_threads(cfg.threads)
    from ..data_parallel import from_environment
    from ..trainer import recover_checkpoint

    dp, device = from_environment(cfg.device)
    try:
        with contextlib.ExitStack() as stack:
            failed = False
            if dp is None or dp.writes:
                try:
                    stack.enter_context(open_run(cfg.out, "train", run_settings(cfg), resume=cfg.resume,
                                                 overwrite=cfg.overwrite, may_change=MAY_CHANGE_ON_RESUME,
                                                 has_checkpoint=recover_checkpoint))
                except BaseException:
                    failed = True
                    if dp is not None:
                        dp.any(True)
                    raise
            if dp is not None and dp.any(failed):
                raise UsageError("rank 0 could not open the run directory (its error says why)")
            return _train(dataclasses.replace(cfg, device=device), dp)
    finally:
        if dp is not None:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainRunConfig, dp=None) -> dict:
    from ..activations import harvest, token_chunks
    from ..evaluate import downstream_loss, reconstruction_metrics, write_report
    from ..trainer import TrainConfig, Trainer, new_sae, recover_checkpoint

    writes = dp is None or dp.writes
    progress = not cfg.quiet and writes
    started = time.perf_counter()
    model, tokenizer = models.load_model(cfg.model, device=cfg.device, progress=progress)
    models.check_layer(model, cfg.layer)
    check_memory(cfg, model.config.hidden_size)
    docs = text.read_texts(cfg.text, field=cfg.text_field)
    counts = [len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    train_docs, eval_docs = split_documents(docs, counts, cfg.eval_fraction, cfg.eval_min_tokens)
    if dp is not None and not writes:
        dp.barrier()  # rank 0 harvests first, into the activation cache when there is one
    data = harvest_cached(model, tokenizer, train_docs, cfg.layer, context=cfg.context, max_tokens=cfg.max_tokens,
                          cache=cfg.activation_cache, progress=progress, model_name=cfg.model)
    if dp is not None and writes:
        dp.barrier()
    harvested = time.perf_counter()
    keep = keep_mask(data.acts, cfg.outlier_factor)
    acts = data.acts[keep].to(cfg.device)

    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                            optimizer_state=cfg.optimizer_state, tilt=cfg.tilt,
                            streaming_term=cfg.streaming_term, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                            log_to=cfg.log_to)
    sae = new_sae(acts, cfg.latents, cfg.k, seed=cfg.seed, compute_dtype=cfg.dtype, arch=cfg.arch,
                  max_k=cfg.max_k, bandwidth=cfg.bandwidth, l1_coef=cfg.l1_coef,
                  dead_tokens=dead_tokens_for(cfg.steps, cfg.batch_size)).to(cfg.device)
    trainer = Trainer(sae, acts, train_cfg, cfg.out, progress=progress, data_parallel=dp)
    # A resumed run that died before its first checkpoint starts again from step 0.
    trainer.begin(resume=cfg.resume and recover_checkpoint(cfg.out) is not None)
    train_started = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - train_started
    if not writes:
        return {}
    sae.save(os.path.join(cfg.out, "sae"))
    eval_data = harvest(model, tokenizer, eval_docs, cfg.layer, context=cfg.context, progress=progress)
    eval_keep = keep_mask(eval_data.acts, cfg.outlier_factor)

    recon = reconstruction_metrics(sae, eval_data.acts[eval_keep].to(cfg.device))
    recon_all = reconstruction_metrics(sae, eval_data.acts.to(cfg.device))
    chunks = token_chunks(tokenizer, eval_docs, cfg.context)[: cfg.ce_sequences]
    ce = downstream_loss(model, sae, chunks, cfg.layer, progress=progress)
    tokens = trainer.step * cfg.batch_size
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
        "tokens": tokens, "unique_training_tokens": int(acts.shape[0]), "passes": tokens / acts.shape[0],
        "eval_documents": len(eval_docs), "eval_tokens": int(eval_keep.sum()), "tokens_per_s": trainer.tokens_per_s,
        "train_seconds": train_time, "harvest_seconds": harvested - started,
        "total_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
        "world_size": 1 if dp is None else dp.world,
        **run_settings(cfg), "steps": trainer.step,
    }
    write_report(cfg.out, report, metrics_file=trainer.metrics_file, latent_frequency=recon["latent_frequency"])
    return report
