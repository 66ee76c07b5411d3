"""SAE training throughput from cached activations: our TopKSAE vs the same trainer with the dense
PyTorch formulation of the SAE (N x M pre-activations, torch.topk, dense decode).

Both run the identical Trainer loop (Adam, decoder renormalisation, gradient projection, clipping,
dead-latent tracking), interleaved step by step in one process. Activations: an activation cache
written by ``ssae train --activation-cache DIR`` (``--activations DIR``), or synthetic ones of the
SmolLM2-135M width.

    python benchmarks/bench_train.py [--activations DIR] [--latents 4608] [--k 32] [--batch-size 4096]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from ssae_kernels.activations import load_activations  # noqa: E402
from ssae_kernels.sae import Loss, TopKSAE  # noqa: E402
from ssae_kernels.trainer import TrainConfig, Trainer, new_sae  # noqa: E402


class DenseTopKSAE(TopKSAE):
    """The same SAE computed the way SAE libraries do today: dense pre-activations, dense decode."""

    def loss(self, x, *, t=0.0, sample_weights=None):
        xs = x * self.input_scale
        pre = (xs - self.b_dec) @ self.W_enc.T + self.b_enc
        top = pre.topk(self.cfg.k, dim=1)
        values = torch.relu(top.values)
        code = torch.zeros_like(pre).scatter(1, top.indices, values)
        x_hat = code @ self.W_dec + self.b_dec
        errors = ((x_hat - xs) ** 2).sum(1)
        recon = errors.mean() if t == 0 else (torch.logsumexp(t * errors, 0) - torch.log(torch.tensor(float(len(errors))))) / t
        dead = self.dead_mask()
        aux = torch.zeros(())
        if dead.any():
            k_aux = min(self.cfg.k_aux, int(dead.sum()))
            aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
            aux_hat = torch.zeros_like(pre).scatter(1, aux_top.indices, torch.relu(aux_top.values)) @ self.W_dec
            residual = (xs - x_hat).detach()
            aux = ((aux_hat - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
        return Loss(recon + self.cfg.aux_coef * aux, recon, aux, values.detach(), top.indices)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activations", default=None, help="activation cache directory (default: synthetic)")
    parser.add_argument("--d", type=int, default=576, help="width of synthetic activations")
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(harness.BENCH_DIR / "results"))
    args = parser.parse_args(argv)
    threads = harness.set_threads(args.threads)
    if args.activations:
        acts = load_activations(args.activations).acts
        source = args.activations
    else:
        g = torch.Generator().manual_seed(0)
        acts = torch.randn(200_000, args.d, generator=g) * 2 + torch.randn(args.d, generator=g)
        source = "synthetic"
    cfg = TrainConfig(steps=10**9, batch_size=args.batch_size, checkpoint_every=10**9)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("ssae", TopKSAE), ("dense", DenseTopKSAE)):
            sae = new_sae(acts, args.latents, args.k)
            sae.__class__ = cls  # identical initial weights for both
            trainers[name] = Trainer(sae, acts, cfg, f"{tmp}/{name}", progress=False)
        samples = harness.time_interleaved({n: t.train_step for n, t in trainers.items()},
                                           warmup=2, repeats=args.repeats)
    tokens_per_s = {n: args.batch_size / harness.median(s) for n, s in samples.items()}
    speedup = harness.median([d / s for s, d in zip(samples["ssae"], samples["dense"])])
    shape = {"N": args.batch_size, "d": acts.shape[1], "M": args.latents, "k": args.k}
    env = harness.environment(threads)
    run_id = harness.new_run_id()
    records = [harness.make_record(benchmark="train", op="train_step", provider=n, shape=shape, dtype="float32",
                                   device="cpu", versions=env, samples_s=s, run_id=run_id,
                                   extra={"tokens_per_s": tokens_per_s[n], "activations": source})
               for n, s in samples.items()]
    harness.append_records(Path(args.out) / "train.json", records)
    table = (f"| SAE | tokens/s | step ms |\n|---|---|---|\n" +
             "\n".join(f"| {n} | {tokens_per_s[n]:,.0f} | {1e3 * harness.median(s):.0f} |" for n, s in samples.items()) +
             f"\n\nssae ÷ dense throughput: **{speedup:.2f}×** (median of per-round ratios, {args.repeats} "
             f"interleaved rounds, {threads} threads, {shape}, activations: {source})")
    print(table)
    (Path(args.out) / "train.md").write_text("# SAE training throughput (cached activations)\n\n" + table + "\n")
    return records


if __name__ == "__main__":
    main()
