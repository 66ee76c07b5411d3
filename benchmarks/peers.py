"""Peer SAE libraries as baselines for the training-step benchmark.

Each peer is driven through its own public classes, the way its trainer runs one step:
encode -> top-k -> decode -> reconstruction loss -> backward (no optimizer step, aux losses off).

Peers (pip install --constraint <file pinning torch==2.13.0> eai-sparsify sae-lens):
- "eai-sparsify": sparsify.SparseCoder + SparseCoderConfig(activation="topk"); loss = forward(x).fvu,
  which is what sparsify's trainer backpropagates when auxk_alpha=0 and multi_topk=False
  (sum of squared error / total variance of the batch: the same math as the per-row mean up to a constant).
  Without a GPU its Triton sparse decoder fails ("0 active drivers"), so SPARSIFY_DISABLE_TRITON=1 must be
  set before sparsify is first imported: this module sets it (unless already set) when CUDA is unavailable.
- "sae-lens": sae_lens.TopKTrainingSAE + TopKTrainingSAEConfig with the library defaults
  (dense N x M activations), through training_forward_pass, i.e. loss = mean over rows of per-row squared error.
- "sae-lens-sparse": the same with use_sparse_activations=True (COO activations + torch.sparse.mm decode),
  the config option SAELens documents for float32 without autocast.
For SAELens, aux_loss_coefficient=0 and dead_neuron_mask=None (no dead latents on a first step: its
trainer's mask is all False then), and rescale_acts_by_decoder_norm=False (its training default is True),
so that every peer computes z = ReLU(TopK((x - b_dec) W_enc^T + b_enc)), x_hat = z W_dec + b_dec.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

PEERS = ("eai-sparsify", "sae-lens", "sae-lens-sparse")


def _import_sparsify():
    # sparsify picks its decoder once, at import time.
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    import sparsify

    return sparsify


class PeerStep:
    """One peer SAE module and a `step(x)` running a single training forward + backward."""

    def __init__(self, name: str, module: torch.nn.Module, loss_fn, enc_weight: str, dec_weight: str):
        self.name = name
        self.module = module
        self._loss_fn = loss_fn
        self._enc, self._dec = enc_weight, dec_weight

    @property
    def encoder_weight(self) -> torch.nn.Parameter:
        # sparsify: [M, d] (nn.Linear layout); SAELens: W_enc is [d, M].
        return self.module.get_parameter(self._enc)

    @property
    def decoder_weight(self) -> torch.nn.Parameter:
        # both: [M, d]
        return self.module.get_parameter(self._dec)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.module.zero_grad(set_to_none=True)
        loss = self._loss_fn(x)
        loss.backward()
        return loss.detach()


def make_peer_step(
    name: str,
    *,
    d: int,
    M: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PeerStep:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "eai-sparsify":
            sparsify = _import_sparsify()
            cfg = sparsify.SparseCoderConfig(
                activation="topk", num_latents=M, k=k, multi_topk=False, skip_connection=False
            )
            sae = sparsify.SparseCoder(d, cfg, device=device, dtype=dtype)

            def loss_fn(x):
                # dead_mask=None: no AuxK term (sparsify's trainer passes None when auxk_alpha == 0).
                return sae(x, dead_mask=None).fvu

            return PeerStep(name, sae, loss_fn, "encoder.weight", "W_dec")

        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput  # the argument type of training_forward_pass

        cfg = TopKTrainingSAEConfig(
            d_in=d,
            d_sae=M,
            k=k,
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            aux_loss_coefficient=0.0,
            rescale_acts_by_decoder_norm=False,
            use_sparse_activations=(name == "sae-lens-sparse"),
        )
        sae = TopKTrainingSAE(cfg)

        def loss_fn(x):
            step_input = TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
            )
            return sae.training_forward_pass(step_input).loss

        return PeerStep(name, sae, loss_fn, "W_enc", "W_dec")


@functools.cache
def available_peers() -> dict[str, str | None]:
    """name -> None if a tiny CPU step runs, else a one-line reason."""
    out: dict[str, str | None] = {}
    for name in PEERS:
        try:
            with contextlib.redirect_stdout(None):  # sparsify prints its decoder choice on import
                p = make_peer_step(name, d=8, M=32, k=4)
                p.step(torch.randn(4, 8))
            out[name] = None
        except Exception as e:  # import errors and runtime failures alike
            msg = f"{type(e).__name__}: {e}".strip().splitlines()
            out[name] = msg[0] if msg else type(e).__name__
    return out


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="check the peers and time one step each")
    ap.add_argument("--N", type=int, default=32)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--M", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads={torch.get_num_threads()} N={a.N} d={a.d} M={a.M} k={a.k} float32")
    x = torch.randn(a.N, a.d, generator=torch.Generator().manual_seed(1))
    for name, why in available_peers().items():
        if why is not None:
            print(f"{name}: unavailable: {why}")
            continue
        p = make_peer_step(name, d=a.d, M=a.M, k=a.k)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            loss = p.step(x)
            times.append(time.perf_counter() - t0)
        ge, gd = p.encoder_weight.grad, p.decoder_weight.grad
        ok = all(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in (ge, gd))
        print(f"{name}: loss={loss.item():.4g} finite nonzero enc/dec grads={ok} "
              f"step times (s): {', '.join(f'{t:.3f}' for t in times)}")
