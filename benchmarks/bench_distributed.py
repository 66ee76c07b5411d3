"""Training across processes on one machine: step times and bytes communicated per step.

The same TopK SAE training step (the whole Trainer step) on synthetic activations, run:

- ``one process``: 1 process x ``--threads`` threads (the baseline of every row);
- ``data parallel``, ``--world`` processes x (threads / world) threads, gloo (``ssae_kernels.data_parallel``):
  with Adam, the gradients are exchanged by one dense all-reduce; with SparseAdam, by an all-gather of the
  rows each rank touched (``DataParallel.merge_touched``). The time of the exchange alone is recorded too;
- ``latent sharded``: each rank holds M / R latents (``ssae_kernels.latent_sharding``);
- ``sharded ops``: the encode + decode + backward alone, latent-sharded (``ssae_kernels.distributed``),
  against the same ops in one process.

The one-process baselines run in this process, the others in spawned ones; a median over ``--repeats`` timed
steps after ``--warmup``. Bytes per step are counted from the collectives each mode issues (per rank, what a
ring algorithm sends: all-reduce 2 (R-1)/R x size, all-gather (R-1)/R x the gathered size; for the touched
rows, the largest rank's count measured in the run), and the markdown adds a projection for 8 GPUs on
NVLink from those counts.

    python benchmarks/bench_distributed.py [--latents 4608] [--d 576] [--k 32] [--batch 4096] [--world 2]
                                           [--threads 2] [--out benchmarks/results] [--md distributed.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# an NVLink-4 port pair as a GPU sees it: 450 GB/s each way (H100/H200 SXM), for the projection only
NVLINK_BYTES_PER_S = 450e9


def _acts(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(256, d, generator=g) * 3
    return centres[torch.randint(0, 256, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _trainer(a, out_dir, data_parallel=None, optimizer="adam", shard_group=None):
    from ssae_kernels.trainer import TrainConfig, Trainer, new_sae

    acts = _acts(4 * a["batch"], a["d"])
    sae = new_sae(acts, a["latents"], a["k"], shard_group=shard_group)
    steps = a["warmup"] + a["repeats"]
    trainer = Trainer(sae, acts, TrainConfig(steps=steps, batch_size=a["batch"], checkpoint_every=10**9,
                                             optimizer=optimizer), out_dir, progress=False, data_parallel=data_parallel)
    trainer.begin(resume=False)
    return trainer


def _time_steps(trainer, a) -> list[float]:
    times = []
    for i in range(a["warmup"] + a["repeats"]):
        started = time.perf_counter()
        trainer.train_step()
        if i >= a["warmup"]:
            times.append(time.perf_counter() - started)
    return times


def _one_process(a, threads, optimizer="adam") -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        return {"step_s": _time_steps(_trainer(a, tmp, optimizer=optimizer), a)}


def _init(rank, a, threads):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{a['init_file']}", rank=rank, world_size=a["world"],
                            timeout=datetime.timedelta(minutes=5))


class _TimedExchange:
    """Times the gradient exchange of a DataParallel (the dense all-reduce or the touched-rows all-gather) and
    records the largest rank's touched-row count."""

    def __init__(self, dp):
        self.seconds, self.rows = [], []
        for name in ("average_gradients", "merge_touched"):
            setattr(dp, name, self._timed(getattr(dp, name), dp))

    def _timed(self, fn, dp):
        def timed(*args):
            dist.barrier()  # the exchange starts when every rank is ready for it
            started = time.perf_counter()
            out = fn(*args)
            self.seconds.append(time.perf_counter() - started)
            if fn.__name__ == "merge_touched":
                count = torch.tensor([args[0].numel()])
                dist.all_reduce(count, op=dist.ReduceOp.MAX)
                self.rows.append(int(count))
            return out
        return timed


def _data_parallel_worker(rank, a, threads, result_file, optimizer="adam"):
    from ssae_kernels.data_parallel import DataParallel

    _init(rank, a, threads)
    try:
        dp = DataParallel()
        exchange = _TimedExchange(dp)
        with tempfile.TemporaryDirectory() as tmp:
            times = _time_steps(_trainer(a, tmp, dp, optimizer=optimizer), a)
        if rank == 0:  # (a SparseAdam step also all-reduces b_dec's gradient: its exchange is the sum of both)
            per_step = len(exchange.seconds) // (a["warmup"] + a["repeats"])
            exchange_s = [sum(exchange.seconds[i:i + per_step]) for i in range(0, len(exchange.seconds), per_step)]
            Path(result_file).write_text(json.dumps({"step_s": times, "exchange_s": exchange_s[a["warmup"]:],
                                                     "touched_rows": exchange.rows[a["warmup"]:]}))
    finally:
        dist.destroy_process_group()


def _sparse_data_parallel_worker(rank, a, threads, result_file):
    _data_parallel_worker(rank, a, threads, result_file, optimizer="sparse-adam")


def _latent_sharded_worker(rank, a, threads, result_file):
    _init(rank, a, threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            times = _time_steps(_trainer(a, tmp, shard_group=dist.group.WORLD), a)
        if rank == 0:
            Path(result_file).write_text(json.dumps({"step_s": times}))
    finally:
        dist.destroy_process_group()


def _op_step(encode, decode, x, W_enc, b_enc, W_dec, b_dec, k):
    leaves = [t.detach().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
    values, indices = encode(x, leaves[0], leaves[1], k, leaves[3])
    x_hat = decode(values, indices, leaves[2], leaves[3])
    ((x_hat - x) ** 2).sum().backward()


def _op_data(a):
    g = torch.Generator().manual_seed(1)
    N, d, M = a["batch"], a["d"], a["latents"]
    return (torch.randn(N, d, generator=g), torch.randn(M, d, generator=g) / d**0.5, torch.zeros(M),
            torch.randn(M, d, generator=g) / d**0.5, torch.zeros(d))


def _ops_one_process(a, threads) -> dict:
    import ssae_kernels

    torch.set_num_threads(threads)
    data = _op_data(a)
    return {"step_s": harness.time_fn(
        lambda: _op_step(lambda x, W, b, k, bd: ssae_kernels.topk_encode(x, W, b, k, b_dec=bd),
                         ssae_kernels.sparse_decode, *data, a["k"]), warmup=a["warmup"], repeats=a["repeats"])}


def _sharded_ops_worker(rank, a, threads, result_file):
    from ssae_kernels.distributed import sharded_sparse_decode, sharded_topk_encode

    _init(rank, a, threads)
    try:
        x, W_enc, b_enc, W_dec, b_dec = _op_data(a)
        share = a["latents"] // a["world"]
        rows = slice(rank * share, a["latents"] if rank == a["world"] - 1 else (rank + 1) * share)

        def step():
            _op_step(lambda x, W, b, k, bd: sharded_topk_encode(x, W, b, k, b_dec=bd), sharded_sparse_decode,
                     x, W_enc[rows], b_enc[rows], W_dec[rows], b_dec, a["k"])
            dist.barrier()  # a step ends when every rank has finished it

        times = harness.time_fn(step, warmup=a["warmup"], repeats=a["repeats"])
        if rank == 0:
            Path(result_file).write_text(json.dumps({"step_s": times}))
    finally:
        dist.destroy_process_group()


def _spawn(worker, a, threads) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        a = {**a, "init_file": os.path.join(tmp, "init")}
        result = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(a, threads, result), nprocs=a["world"], join=True)
        return json.loads(Path(result).read_text())


def bytes_per_step(a, touched_rows: int = 0) -> dict:
    """Bytes one rank sends per step, per mode (ring collectives; float32 gradients and scores, int64 indices).
    ``touched_rows``: the largest rank's count of touched latents, to which the all-gather is padded."""
    R, N, d, M, k = a["world"], a["batch"], a["d"], a["latents"], a["k"]
    params = 2 * M * d + M + d
    ring_reduce, ring_gather = 2 * (R - 1) / R, (R - 1) / R
    sharded_ops = ring_gather * R * N * k * 12 + ring_reduce * 4 * (N * d + N * k + d)
    return {
        # every gradient, flattened; plus the fired-latent union (int32 [M]) and the non-finite flag
        "data parallel, dense all-reduce": ring_reduce * 4 * (params + M + 1),
        # the counts (8 B), the touched rows' ids (8 B) and gradients (4 (2d + 1) B), gathered from every rank;
        # b_dec's gradient, the fired-latent union and the flag all-reduced
        "data parallel, touched rows": ring_gather * R * (8 + touched_rows * (8 + 4 * (2 * d + 1)))
        + ring_reduce * 4 * (d + M + 1),
        # encode: all-gather of [N, k] scores (4 B) and indices (8 B) from each rank; decode: all-reduce of
        # x_hat [N, d]; backward: all-reduce of the values' [N, k] and b_dec's [d] gradients
        "sharded ops": sharded_ops,
        # the sharded ops, AuxK's count of dead latents (8 B), the gradient norm (8 B) and the dead count (8 B)
        "latent sharded": sharded_ops + ring_gather * R * 8 + ring_reduce * 16,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the one-process baseline, shared by the ranks")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    p.add_argument("--out", default=str(harness.BENCH_DIR / "results"))
    p.add_argument("--md", default="distributed.md", help="name of the markdown table written in --out")
    args = p.parse_args(argv)
    if args.repeats < harness.MIN_REPEATS:
        p.error(f"--repeats must be at least {harness.MIN_REPEATS}")
    if args.batch % args.world:
        p.error(f"--batch {args.batch} must be a multiple of --world {args.world}")
    a = {key: getattr(args, key) for key in ("latents", "d", "k", "batch", "world", "warmup", "repeats")}
    per_rank = max(1, args.threads // args.world)
    env = harness.environment(args.threads)
    shape = {"N": args.batch, "d": args.d, "M": args.latents, "k": args.k}
    print(f"distributed: {env['cpu']}, {args.world} ranks x {per_rank} threads against 1 process x {args.threads} "
          f"threads, shape {shape}", flush=True)

    runs = {
        "training step (Adam), one process": _one_process(a, args.threads),
        "training step (Adam), data parallel, dense all-reduce": _spawn(_data_parallel_worker, a, per_rank),
        "training step (SparseAdam), one process": _one_process(a, args.threads, optimizer="sparse-adam"),
        "training step (SparseAdam), data parallel, touched rows": _spawn(_sparse_data_parallel_worker, a, per_rank),
        "training step (Adam), latent sharded": _spawn(_latent_sharded_worker, a, per_rank),
        "encode + decode + backward, one process": _ops_one_process(a, args.threads),
        "encode + decode + backward, sharded ops": _spawn(_sharded_ops_worker, a, per_rank),
    }
    touched = runs["training step (SparseAdam), data parallel, touched rows"]["touched_rows"]
    sent = bytes_per_step(a, max(touched))
    medians = {name: statistics.median(r["step_s"]) for name, r in runs.items()}
    rows = []  # (step, mode, baseline)
    for what, mode in (("training step (Adam)", "data parallel, dense all-reduce"),
                       ("training step (SparseAdam)", "data parallel, touched rows"),
                       ("training step (Adam)", "latent sharded"),
                       ("encode + decode + backward", "sharded ops")):
        rows.append((what, mode, f"{what}, one process"))
    run_id = harness.new_run_id()
    records = []
    for what, mode, baseline in rows:
        run = runs[f"{what}, {mode}"]
        extra = {"world": args.world, "threads_per_rank": per_rank, "baseline_threads": args.threads,
                 "bytes_sent_per_rank": sent[mode], "baseline_median_s": medians[baseline]}
        if "exchange_s" in run:
            extra["exchange_median_s"] = statistics.median(run["exchange_s"])
        if "touched_rows" in run and run["touched_rows"]:
            extra["touched_rows_max"] = max(run["touched_rows"])
        records.append(harness.make_record(benchmark="distributed", op=what, provider=mode, shape=shape,
                                           dtype="float32", device="cpu", versions=env, run_id=run_id,
                                           samples_s=run["step_s"], extra=extra))
    out = Path(args.out)
    harness.append_records(out / "distributed.json", records)
    command = "python benchmarks/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Training across processes on one machine", "", f"`{command.strip()}`", "",
             f"{env['cpu']}; {args.world} ranks x {per_rank} threads (gloo) against 1 process x {args.threads} "
             f"threads; N={args.batch}, d={args.d}, M={args.latents}, k={args.k}; median of {args.repeats} steps "
             f"after {args.warmup}; run {run_id}.", "",
             "| step | mode | ms | one process ms | ratio | gradient exchange ms | MB sent per rank per step | "
             "8 x NVLink projection, ms |", "|---|---|---|---|---|---|---|---|"]
    for record in records:
        what, mode, extra = record["op"], record["provider"], record["extra"]
        t, base = record["median_s"], extra["baseline_median_s"]
        projected = bytes_per_step({**a, "world": 8}, extra.get("touched_rows_max", 0))[mode] / NVLINK_BYTES_PER_S
        exchange = f"{extra['exchange_median_s'] * 1e3:.1f}" if "exchange_median_s" in extra else "-"
        lines.append(f"| {what} | {mode} | {t * 1e3:.1f} | {base * 1e3:.1f} | {t / base:.2f} | {exchange} | "
                     f"{extra['bytes_sent_per_rank'] / 1e6:.1f} | {projected * 1e3:.3f} |")
        print(lines[-1], flush=True)
    if touched:
        lines += ["", f"Touched rows: the largest rank's count of latents its share of the batch touched, "
                  f"{min(touched)}-{max(touched)} of M = {args.latents} over the timed steps."]
    lines += ["", "Ratio: the mode's median step time over the one-process median of the same step and optimizer "
              "(below 1: faster). Gradient exchange: the time of the data-parallel gradient collectives alone "
              "(after a barrier). Bytes: what "
              "one rank sends in the step's collectives, counted from their sizes (ring all-reduce 2 (R-1)/R x "
              "the buffer, all-gather (R-1)/R x the gathered tensor). The projection divides the same count at "
              f"R = 8 by {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s (one NVLink-4 direction): the communication time "
              "alone, assuming no overlap with compute and ignoring latency; for the touched rows it keeps the count "
              "measured here (at R = 8 each rank's share of the batch is smaller and touches fewer rows, so this "
              "overstates them).", ""]
    (out / args.md).write_text("\n".join(lines))
    print(f"wrote {out / args.md}")
    return records


if __name__ == "__main__":
    main()
