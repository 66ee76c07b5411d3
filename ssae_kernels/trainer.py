"""Training an SAE on stored activations: Adam with warmup and decay, TERM, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import storage
from .data_parallel import DataParallel, Ranks, unsupported
from .latent_sharding import PER_LATENT, ShardedTopKSAE
from .ops import StreamingTERM
from .optim import SparseAdam
from .sae import SAE, WEIGHTS_FILE, SAEConfig, read_sae, sae_class

CHECKPOINT = "checkpoint"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4096
    lr: float | None = None  # default 2e-4 / sqrt(num_latents / 2^14), as sparsify scales it
    warmup_steps: int | None = None  # default 5% of steps
    decay_start: float = 0.8  # linear decay to 0 over the last 20% of steps
    grad_clip: float = 1.0
    # Gao et al.'s value (openai/sparse_autoencoder's training code): with a tiny eps, Adam's step size stays
    # independent of the gradient's scale even for latents that fire rarely and get tiny gradients.
    adam_eps: float = 6.25e-10
    # "adam": torch.optim.Adam over every row each step; "sparse-adam": ssae_kernels.optim.SparseAdam, which
    # touches only the rows the batch selected and leaves the same state (see its docstring)
    optimizer: str = "adam"
    # the dtype of Adam's moments: "bfloat16" (sparse-adam only) halves them, stored with stochastic rounding
    optimizer_state: str = "float32"
    tilt: float = 0.0  # TERM tilt t; 0 is plain ERM
    streaming_term: bool = False  # TERM's stochastic form (running normalizer) instead of the batch tilt
    term_decay: float = 0.1
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    log_to: tuple[str, ...] = ()  # metrics also to "tensorboard" and/or "wandb" (metrics.jsonl always)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {self.optimizer_state!r}")
        if self.optimizer_state != "float32" and self.optimizer != "sparse-adam":
            raise ValueError(f"optimizer_state {self.optimizer_state!r} needs optimizer 'sparse-adam' "
                             f"(torch.optim.Adam keeps its moments in the parameters' dtype)")
        unknown = set(self.log_to) - set(METRIC_SINKS)
        if unknown:
            raise ValueError(f"log_to: unknown {sorted(unknown)}; choose from {sorted(METRIC_SINKS)}")

    def learning_rate(self, num_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(num_latents / 2**14)

    def lr_factor(self, step: int) -> float:
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)
        if step < warmup:
            return (step + 1) / warmup
        start = int(self.decay_start * self.steps)
        if step >= start:
            return max(0.0, (self.steps - step) / max(1, self.steps - start))
        return 1.0


def _tensorboard_sink(out_dir: str, config: dict):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("log_to=tensorboard needs the tensorboard package: pip install tensorboard") from e
    writer = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))

    def log(record: dict):
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])

    return log, writer.close


def _wandb_sink(out_dir: str, config: dict):
    try:
        import wandb
    except ImportError as e:
        raise ImportError("log_to=wandb needs the wandb package: pip install wandb") from e
    run = wandb.init(dir=out_dir, config=config, project=os.environ.get("WANDB_PROJECT", "ssae-kernels"))
    return (lambda record: run.log(record, step=record["step"])), run.finish


OPTIMIZERS = ("adam", "sparse-adam")
OPTIMIZER_STATES = ("float32", "bfloat16")


# name -> factory(out_dir, config) -> (log(record), close()); the libraries load only when asked for.
METRIC_SINKS = {"tensorboard": _tensorboard_sink, "wandb": _wandb_sink}


class BatchSampler:
    """Batch i of a seeded per-epoch permutation of the rows: the same batches after a resume."""

    def __init__(self, rows: int, batch_size: int, seed: int):
        if rows < 1:
            raise ValueError("no training activations")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        start, taken, parts = step * self.batch_size, 0, []
        while taken < self.batch_size:  # a batch may straddle two epochs
            epoch, offset = divmod(start + taken, self.rows)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.rows, generator=g)
            part = self._perm[offset:offset + self.batch_size - taken]
            parts.append(part)
            taken += len(part)
        return torch.cat(parts)


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, sae: SAE, acts: torch.Tensor, cfg: TrainConfig, out_dir: str, *,
                 progress: bool = True, metrics_file: str | None = None, data_parallel: DataParallel | None = None):
        """``data_parallel``: this process's part in data-parallel training (``data_parallel.py``); every rank
        then holds the same ``acts`` and trains on its share of each batch. A ``ShardedTopKSAE``
        (``latent_sharding.py``) trains on every rank's whole batch, each rank its own latents. Either way
        rank 0 writes the files."""
        self.sae, self.acts, self.cfg, self.out_dir = sae, acts, cfg, out_dir
        self.dp = data_parallel
        self.sharded = isinstance(sae, ShardedTopKSAE)
        if self.dp is not None:
            self.dp.check_batch(cfg.batch_size)
            missing = unsupported(type(sae), cfg.optimizer, bool(cfg.tilt or cfg.streaming_term))
            if missing:
                raise ValueError(f"data-parallel training does not support {missing} yet")
        if self.sharded and cfg.optimizer != "adam":
            raise ValueError(f"a latent-sharded SAE trains with optimizer 'adam', not {cfg.optimizer!r}")
        # the ranks of a run on several processes, else None
        self.ranks = Ranks(sae.group) if self.sharded else self.dp
        self.writes = self.ranks is None or self.ranks.writes  # whether this process writes the run's files
        self.progress = progress and self.writes
        self.lr = cfg.learning_rate(sae.cfg.num_latents)
        if cfg.optimizer == "sparse-adam":
            if not sae.TOUCHED_ROWS:
                raise ValueError(f"optimizer 'sparse-adam' cannot train a {type(sae).__name__} (its per-latent "
                                 "thresholds learn from latents outside the code): use 'adam'")
            self.optimizer = SparseAdam({"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec},
                                        {"b_dec": sae.b_dec}, lr=self.lr, betas=(0.9, 0.999), eps=cfg.adam_eps,
                                        state_dtype=getattr(torch, cfg.optimizer_state))
        else:
            # fused: one pass over each parameter and its states, no temporaries of the parameter's size
            scales = sae.LR_SCALES
            groups = [{"params": [p for n, p in sae.named_parameters() if n not in scales]},
                      *({"params": [getattr(sae, n)], "lr_scale": scale} for n, scale in scales.items())]
            self.optimizer = torch.optim.Adam(groups, lr=self.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, fused=True)
        self.sampler = BatchSampler(acts.shape[0], cfg.batch_size, cfg.seed)
        self.term = StreamingTERM(cfg.tilt, cfg.term_decay) if cfg.streaming_term else None
        self.step = 0
        self.current_lr = self.lr
        self.tokens_per_s = 0.0
        self.metrics_file = metrics_file or os.path.join(out_dir, "metrics.jsonl")
        os.makedirs(out_dir, exist_ok=True)

    # ---- checkpoints -----------------------------------------------------------------------

    def begin(self, *, resume: bool) -> None:
        """Starts a fresh run (an empty metrics file) or, with ``resume``, continues from the newest complete
        checkpoint in out_dir, with the metrics file cut back to that checkpoint's step."""
        if not resume:
            if self.writes:
                storage.atomic_write_text(self.metrics_file, "")
        else:
            directory = recover_checkpoint(self.out_dir) if self.writes else os.path.join(self.out_dir, CHECKPOINT)
            if self.ranks is not None:
                self.ranks.barrier()  # rank 0 has finished any interrupted rotation
            if directory is None or checkpoint_step(directory) is None:
                raise FileNotFoundError(f"{self.out_dir} holds no complete checkpoint to resume from")
            self.load_checkpoint(directory)
            if self.writes:
                cut_metrics(self.metrics_file, self.step)
        if self.dp is not None:  # every rank starts from rank 0's weights
            self.dp.broadcast_module(self.sae)
            self.dp.barrier()

    def checkpoint(self) -> None:
        """``save_checkpoint`` on the rank that writes (on every rank of a latent-sharded SAE, each sending
        its rows); the others wait for it."""
        if self.writes or self.sharded:
            self.save_checkpoint()
        if self.ranks is not None:
            self.ranks.barrier()

    def save_checkpoint(self) -> str:
        """Writes out_dir/checkpoint so that a crash at any point leaves a complete one behind: a new
        directory (each file fsynced, checksums last) is renamed over the old one, which is kept as
        checkpoint.old until the rename is durable. ``recover_checkpoint`` finishes an interrupted rotation.
        A latent-sharded SAE's is the whole dictionary's, gathered on rank 0 (the others return None)."""
        self.flush()
        sae, optimizer_state = self.sae, self.optimizer_state()
        if self.sharded:
            sae, optimizer_state = sae.gathered(), sae.gather_optimizer_state(optimizer_state)
            if sae is None:
                return None
        final = os.path.join(self.out_dir, CHECKPOINT)
        tmp, old = final + ".tmp", final + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save(tmp)
        state = {f"{name}.{key}": value.detach().reshape(-1).clone() if key == "step" else value
                 for name, entry in optimizer_state.items() for key, value in entry.items()}
        storage.atomic_write(os.path.join(tmp, OPTIMIZER_FILE), lambda path: save_file(state, path))
        storage.atomic_write_text(os.path.join(tmp, TRAINER_FILE), json.dumps(
            {"step": self.step, "train": dataclasses.asdict(self.cfg),
             "term": self.term.state_dict() if self.term else None}, indent=2))
        storage.write_checksums(tmp, [OPTIMIZER_FILE, TRAINER_FILE])  # last: marks the directory complete
        storage.fsync(tmp)
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            storage.fsync(self.out_dir)
        os.replace(tmp, final)
        storage.fsync(self.out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, directory: str | None = None) -> None:
        directory = directory or os.path.join(self.out_dir, CHECKPOINT)
        if checkpoint_step(directory) is None:
            raise ValueError(f"{directory} is not a complete checkpoint")
        # (a latent-sharded SAE reads its rows of the whole dictionary's checkpoint)
        cfg, weights = self.sae.read_rows(directory) if self.sharded else read_sae(directory)  # checksum verified
        # The dead-latent horizon was fixed when the run started (it follows the first step count), so a
        # resume that extends the run keeps it; everything else must match.
        if dataclasses.replace(cfg, dead_tokens=self.sae.cfg.dead_tokens) != self.sae.cfg:
            raise ValueError(f"checkpoint {directory} has SAE config {cfg}, not {self.sae.cfg}")
        self.sae.cfg = cfg
        self.sae.load_state_dict(weights)
        storage.verify_checksums(directory, [OPTIMIZER_FILE])
        state = {}
        moments = [f"{name}.{key}" for name in PER_LATENT for key in ("exp_avg", "exp_avg_sq")]
        rows = self.sae.latents if self.sharded else None
        for key, value in storage.read_safetensors(os.path.join(directory, OPTIMIZER_FILE), rows, moments).items():
            name, field = key.split(".", 1)
            state.setdefault(name, {})[field] = value.reshape(()) if field == "step" else value
        self.load_optimizer_state(state)
        with open(os.path.join(directory, TRAINER_FILE)) as f:
            meta = json.load(f)
        self.step = meta["step"]
        if self.term and meta["term"]:
            self.term.load_state_dict(meta["term"])

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """parameter name -> torch.optim.Adam's state of it (exp_avg, exp_avg_sq, step), for either optimizer."""
        if isinstance(self.optimizer, SparseAdam):
            return self.optimizer.state_tensors()
        names = {id(p): n for n, p in self.sae.named_parameters()}
        return {names[id(p)]: dict(self.optimizer.state[p]) for group in self.optimizer.param_groups
                for p in group["params"] if p in self.optimizer.state}

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if isinstance(self.optimizer, SparseAdam):
            if state:
                self.optimizer.load_state_tensors(state)
            return
        for name, p in self.sae.named_parameters():
            if name in state:  # (moments saved in bfloat16 by SparseAdam come back in the parameter's dtype)
                self.optimizer.state[p] = {key: value if key == "step" else value.to(p.dtype)
                                           for key, value in state[name].items()}

    def flush(self) -> None:
        """Applies SparseAdam's pending skipped steps, so the weights (and state) are dense Adam's."""
        if isinstance(self.optimizer, SparseAdam):
            moved = self.optimizer.flush()
            if moved.numel():
                self.sae.normalize_decoder(moved)

    # ---- the loop --------------------------------------------------------------------------

    def train_step(self):
        """One optimizer step on the next batch; returns (batch, Loss)."""
        cfg, sae = self.cfg, self.sae
        batch = self.acts[self.sampler.indices(self.step)]
        if self.dp is not None:
            batch = self.dp.rows(batch)
        lr = self.current_lr = self.lr * cfg.lr_factor(self.step)
        if isinstance(self.optimizer, SparseAdam):
            self.optimizer.lr = lr
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        weights = None
        if self.term is not None:
            with torch.no_grad():
                values, indices = sae.encode(batch)
                errors = ((sae.decode(values, indices) - batch) ** 2).sum(1) * sae.input_scale**2
            weights = self.term.weights(errors)
        sparse = isinstance(self.optimizer, SparseAdam)
        out = sae.loss(batch, t=0.0 if self.term else cfg.tilt, sample_weights=weights, touched_rows=sparse)
        non_finite = not bool(torch.isfinite(out.total))
        if self.dp is not None:  # every rank stops together
            non_finite = self.dp.any(non_finite)
        if non_finite:
            raise NonFiniteLoss(
                f"non-finite loss {float(out.total.detach())} at step {self.step} (reconstruction "
                f"{float(out.reconstruction.detach())}, aux {float(out.aux.detach())}); the last good checkpoint "
                f"is in {os.path.join(self.out_dir, CHECKPOINT)}. Try a lower learning rate or a smaller tilt.")
        out.total.backward()
        if self.dp is not None:
            self.dp.average_gradients(sae.parameters())
        sae.remove_parallel_decoder_grad(out.touched)
        if sparse:
            rows = out.touched.rows
            grads = {"W_enc": out.touched.W_enc.grad, "b_enc": out.touched.b_enc.grad, "W_dec": out.touched.W_dec.grad}
            if self.dp is not None:  # the rows any rank touched, their gradients averaged
                rows, grads = self.dp.merge_touched(rows, grads)
            # the global norm over the touched rows is the dense one: every other row's gradient is zero
            clipped = [*grads.values(), sae.b_dec.grad]
            scale = (cfg.grad_clip / (torch.nn.utils.get_total_norm(clipped) + 1e-6)).clamp(max=1.0)
            for g in clipped:
                g.mul_(scale)
            self.optimizer.step(rows, grads, {"b_dec": sae.b_dec.grad})
            sae.b_dec.grad = None
            sae.normalize_decoder(rows)
        else:
            # the weights' gradients, clipped together (parameters with their own learning rate are not)
            if self.sharded:
                sae.clip_grad_norm_(cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sae.normalize_decoder()
        sae.update_firing(out.values, out.indices, combine=None if self.dp is None else self.dp.union,
                          tokens=cfg.batch_size)
        self.step += 1
        return batch, out

    def train(self, on_step=None) -> SAE:
        """Runs to ``cfg.steps``; ``on_step(trainer)`` is called after every step. Ctrl-C stops
        after the current step with a checkpoint; an exception leaves the last periodic checkpoint."""
        cfg, sae = self.cfg, self.sae
        config = {**dataclasses.asdict(cfg), **dataclasses.asdict(sae.cfg)}
        sinks = []
        try:  # a missing logging library fails here, before any training
            for name in cfg.log_to if self.writes else ():
                sinks.append(METRIC_SINKS[name](self.out_dir, config))
        except BaseException:
            for _, close in sinks:
                close()
            raise
        interrupted = []
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress)
        log = open(self.metrics_file, "a") if self.writes else None  # begin() created or cut it
        started, start_step = time.perf_counter(), self.step
        try:
            while self.step < cfg.steps and not interrupted:
                batch, out = self.train_step()
                bar.update(1)
                # (a latent-sharded SAE's metrics take every rank)
                if (log or self.sharded) and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    elapsed = time.perf_counter() - started
                    self.tokens_per_s = (self.step - start_step) * cfg.batch_size / max(elapsed, 1e-9)
                    record = self._metrics(batch, out)  # (data parallel: of rank 0's share of the batch)
                    if log:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        for write, _ in sinks:
                            write(record)
                        bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}",
                                        dead=f"{100 * record['dead_fraction']:.1f}%",
                                        tok_s=f"{self.tokens_per_s:,.0f}")
                if self.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()
            if log:
                log.close()
            for _, close in sinks:
                close()
            signal.signal(signal.SIGINT, previous)
        self.checkpoint()
        if interrupted:
            raise KeyboardInterrupt(f"stopped at step {self.step}; checkpoint saved in "
                                    f"{os.path.join(self.out_dir, CHECKPOINT)} (resume to continue)")
        return sae

    @torch.no_grad()
    def _metrics(self, batch, out) -> dict:
        xs = batch * self.sae.input_scale
        if self.sharded:
            errors = ((self.sae.decode(out.values, out.indices) - batch) * self.sae.input_scale).square().sum(1)
            dead_fraction = self.sae.dead_fraction()
        else:
            W_dec, b_dec = self.sae.W_dec, self.sae.b_dec
            errors = torch.ops.ssae.sparse_decode_sq_error(out.values.float(), out.indices, W_dec, b_dec, xs)
            dead_fraction = float(self.sae.dead_mask().float().mean())
        variance = ((xs - xs.mean(0)) ** 2).sum(1)
        return {"step": self.step, "loss": float(out.total), "reconstruction": float(out.reconstruction),
                "aux": float(out.aux), "fvu": float(errors.sum() / variance.sum()),
                **({} if out.sparsity is None else {"sparsity": float(out.sparsity)}),
                "l0": float((out.values > 0).sum(1).float().mean()),
                "dead_fraction": dead_fraction,
                "lr": self.current_lr, "tokens_per_s": self.tokens_per_s}


def new_sae(acts: torch.Tensor, num_latents: int, k: int, *, seed: int = 0, shard_group=None, **cfg) -> SAE:
    """An SAE (TopK, or the ``arch`` in cfg) initialised for these activations (b_dec at their geometric
    median, inputs scaled to mean norm sqrt(d)). With ``shard_group``, a ``ShardedTopKSAE`` holding this
    rank's latents of the SAE that the same seed gives one process."""
    g = torch.Generator().manual_seed(seed)
    sae_cfg = SAEConfig(d_in=acts.shape[1], num_latents=num_latents, k=k, **cfg)
    if shard_group is not None:
        sae = ShardedTopKSAE(sae_cfg, group=shard_group, generator=g)
    else:
        sae = sae_class(sae_cfg)(sae_cfg, generator=g)
    sample = acts[torch.randperm(acts.shape[0], generator=g)[:8192]]
    sae.init_from_data(sample)
    return sae


def checkpoint_step(directory: str) -> int | None:
    """The step of a complete checkpoint directory, else None. Complete: the checksums (written last) list
    every file. Only trainer.json is verified here; the weight files are verified once, when loaded."""
    manifest = storage.read_checksums(directory) if os.path.isdir(directory) else None
    if not manifest or not {WEIGHTS_FILE, OPTIMIZER_FILE, TRAINER_FILE} <= set(manifest):
        return None
    try:
        storage.verify_checksums(directory, [TRAINER_FILE])
    except storage.CorruptFileError:
        return None
    with open(os.path.join(directory, TRAINER_FILE)) as f:
        return int(json.load(f)["step"])


def recover_checkpoint(out_dir: str) -> str | None:
    """Finishes a checkpoint rotation that a crash interrupted: of checkpoint, checkpoint.tmp and
    checkpoint.old, the complete one with the highest step becomes out_dir/checkpoint and the others are
    removed. Returns its path, or None when none is complete."""
    final = os.path.join(out_dir, CHECKPOINT)
    found = [(step, path) for path in (final, final + ".tmp", final + ".old")
             if (step := checkpoint_step(path)) is not None]
    if not found:
        return None
    _, best = max(found, key=lambda f: (f[0], f[1] == final))  # the newest; the settled one on a tie
    if best != final:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(best, final)
        storage.fsync(out_dir)
    for leftover in (final + ".tmp", final + ".old"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def cut_metrics(path: str, step: int) -> None:
    """Drops the records after ``step`` (written after the checkpoint a run resumes from) and any torn last line."""
    if not os.path.exists(path):
        storage.atomic_write_text(path, "")
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record) + "\n")
    storage.atomic_write_text(path, "".join(kept))
