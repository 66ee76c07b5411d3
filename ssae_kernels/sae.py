"""TopK sparse autoencoder (Gao et al. 2024) on the fused ops.

    z = ReLU(TopK(W_enc (x - b_dec) + b_enc)),  x_hat = W_dec^T z + b_dec

with W_enc and W_dec both [num_latents, d_in]. The parameters are float32
master weights; ``compute_dtype`` (float32 or bfloat16) is what the kernels see.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from .ops import sparse_decode, sparse_decode_mse, topk_encode

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


@dataclass
class SAEConfig:
    d_in: int
    num_latents: int
    k: int
    k_aux: int | None = None  # latents in the AuxK loss; default d_in // 2 (Gao et al.)
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
    compute_dtype: str = "float32"

    def __post_init__(self):
        for name in ("d_in", "num_latents", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.k > self.num_latents:
            raise ValueError(f"k = {self.k} must not exceed num_latents = {self.num_latents}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)


@dataclass
class Loss:
    total: torch.Tensor
    reconstruction: torch.Tensor  # the (tilted) mean of per-row squared errors
    aux: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


class TopKSAE(torch.nn.Module):
    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        M, d = cfg.num_latents, cfg.d_in
        W_dec = torch.randn(M, d, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.clone())  # encoder starts as the decoder's transpose
        self.b_enc = torch.nn.Parameter(torch.zeros(M))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        # Inputs are multiplied by input_scale before encoding (and x_hat divided by it), so
        # training can work at a normalised scale while the module maps raw activations.
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(M, dtype=torch.int64))

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.compute_dtype)

    def _weights(self):
        dt = self.compute_dtype
        return tuple(p.to(dt) for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec))

    # ---- inference ---------------------------------------------------------------------

    def encode(self, x: torch.Tensor):
        """(values, indices) of the k active latents per row of x [N, d_in] (raw activations)."""
        W_enc, b_enc, _, b_dec = self._weights()
        return topk_encode((x * self.input_scale).to(self.compute_dtype), W_enc, b_enc, self.cfg.k, b_dec=b_dec)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        _, _, W_dec, b_dec = self._weights()
        return sparse_decode(values, indices, W_dec, b_dec).float() / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat of x [N, d_in], float32."""
        return self.decode(*self.encode(x))

    # ---- training ----------------------------------------------------------------------

    def loss(self, x: torch.Tensor, *, t: float = 0.0, sample_weights: torch.Tensor | None = None) -> Loss:
        """Reconstruction loss at the normalised scale (per-row squared error, tilted mean with tilt t)
        plus the AuxK loss for dead latents. x is raw; ``sample_weights`` (from StreamingTERM)
        replaces the tilt when given."""
        W_enc, b_enc, W_dec, b_dec = self._weights()
        xs = (x * self.input_scale).to(self.compute_dtype)
        values, indices = topk_encode(xs, W_enc, b_enc, self.cfg.k, b_dec=b_dec)
        if sample_weights is None:
            recon = sparse_decode_mse(values, indices, W_dec, b_dec, xs, t=t)
        else:
            errors = torch.ops.ssae.sparse_decode_sq_error(values, indices, W_dec, b_dec, xs)
            recon = (sample_weights * errors).mean()
        aux = self._aux_loss(xs, values, indices, W_enc, b_enc, W_dec, b_dec)
        return Loss(recon + self.cfg.aux_coef * aux, recon, aux, values, indices)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def _aux_loss(self, xs, values, indices, W_enc, b_enc, W_dec, b_dec):
        dead = self.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return torch.zeros((), device=xs.device)
        # The top-k_aux pre-activations among dead latents only: the fused encode on their
        # rows, never the N x M matrix.
        k_aux = min(self.cfg.k_aux, dead.numel())
        with torch.no_grad():
            residual = (xs.float() - sparse_decode(values, indices, W_dec, b_dec).float())
        aux_values, aux_local = topk_encode(xs, W_enc[dead], b_enc[dead], k_aux, b_dec=b_dec)
        aux_hat = sparse_decode(aux_values, aux_local, W_dec[dead]).float()
        total_variance = ((residual - residual.mean(0)) ** 2).sum().clamp_min(1e-12)
        return ((aux_hat - residual) ** 2).sum() / total_variance

    @torch.no_grad()
    def update_firing(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.tokens_since_fired += values.shape[0]
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows back to unit norm (after each optimizer step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drops the gradient component along each decoder row, which the renormalisation would undo."""
        if self.W_dec.grad is not None:
            W = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.grad -= (self.W_dec.grad * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, *, target_norm: float | None = None) -> None:
        """b_dec from the geometric median of a sample x [n, d_in] and input_scale so that
        rows have mean norm sqrt(d_in) (or ``target_norm``)."""
        x = x.float()
        self.input_scale.fill_((target_norm or self.cfg.d_in**0.5) / x.norm(dim=1).mean().clamp_min(1e-12))
        self.b_dec.copy_(geometric_median(x * self.input_scale))

    # ---- files -------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """``directory/cfg.json`` and ``directory/sae.safetensors`` (written atomically)."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic(os.path.join(directory, WEIGHTS_FILE), lambda p: save_file(tensors, p))
        _atomic(os.path.join(directory, CONFIG_FILE), lambda p: _write_text(p, json.dumps(dataclasses.asdict(self.cfg), indent=2)))

    @classmethod
    def load(cls, directory: str, device: str | torch.device = "cpu") -> "TopKSAE":
        """Loads our format; SAELens and sparsify directories are read by ``ssae_kernels.formats.load_sae``."""
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            cfg = SAEConfig(**json.load(f))
        sae = cls(cfg)
        sae.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE), device=str(device)))
        return sae.to(device)


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x."""
    point = x.mean(0)
    for _ in range(iters):
        dist = (x - point).norm(dim=1).clamp_min(1e-8)
        new = (x / dist[:, None]).sum(0) / (1 / dist).sum()
        if (new - point).norm() <= tol * point.norm().clamp_min(1e-8):
            return new
        point = new
    return point


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
