"""Sparse autoencoders on the fused ops, one base class and four activations:

    pre = W_enc (x - b_dec) + b_enc,   z = activation(pre),   x_hat = W_dec^T z + b_dec

with W_enc and W_dec both [num_latents, d_in].

- TopK (Gao et al. 2024): the k largest ReLU(pre) of each row.
- BatchTopK (Bussmann et al. 2024): trained on the N * k largest of the whole batch, encoded with the
  batch threshold estimated during training.
- JumpReLU (Rajamanoharan et al. 2024): pre where it exceeds a learned per-latent threshold; trained with
  straight-through pseudo-derivatives and a penalty that holds the mean L0 at the target k.
- ReLU: ReLU(pre) with an L1 penalty weighted by the decoder row norms.

Every code is sparse: at most ``max_k`` latents per row for the threshold activations, never an N x M
matrix. The parameters are float32 master weights; ``compute_dtype`` (float32 or bfloat16) is what the
kernels see.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from .ops import (batch_topk_encode, encode_selected, jumprelu_encode, sparse_decode, sparse_decode_mse,
                  threshold_encode, topk_encode)
from .initialization import geometric_median, random_unit_rows
from .storage import (MANIFEST, atomic_write, atomic_write_text, check_shapes, read_checksums, read_config,
                      read_safetensors, verify_weights, write_checksums)

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
    # "topk": k per row; "batchtopk": the N * k largest of the batch (k on average per row); "jumprelu": k is
    # the target mean L0; "relu": k is the mean L0 at initialisation (l1_coef sets where training takes it)
    arch: str = "topk"
    max_k: int | None = None  # all but topk: the most latents a row may keep; default 4 k (at most num_latents)
    bandwidth: float | None = None  # jumprelu: the pseudo-derivatives' kernel width, pre-activation units; default 0.05
    l1_coef: float | None = None  # relu: weight of the L1 penalty sum_m z_m |W_dec[m]|; default 1.5

    def __post_init__(self):
        for name in ("d_in", "num_latents", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.k > self.num_latents:
            raise ValueError(f"k = {self.k} must not exceed num_latents = {self.num_latents}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.arch == "topk" and self.max_k is not None:
            raise ValueError("max_k does not apply to arch 'topk' (a TopK SAE keeps exactly k per row)")
        if self.arch != "topk" and self.max_k is None:
            self.max_k = min(self.num_latents, 4 * self.k)
        for name, arch, default in (("bandwidth", "jumprelu", 0.05),
                                    ("l1_coef", "relu", 1.5)):
            value = getattr(self, name)
            if value is None:
                if self.arch == arch:
                    setattr(self, name, default)
            elif self.arch != arch:
                raise ValueError(f"{name} applies to arch {arch!r} only, not {self.arch!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf") \
                    or (name == "bandwidth" and value == 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'bandwidth' else 'non-negative'} "
                                 f"finite number, got {value!r}")
            else:
                setattr(self, name, float(value))
        if self.max_k is not None and not (isinstance(self.max_k, int) and self.k <= self.max_k <= self.num_latents):
            raise ValueError(f"max_k must be an int in [k, num_latents] = [{self.k}, {self.num_latents}], "
                             f"got {self.max_k!r}")
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)


@dataclass
class TouchedRows:
    """The latents a batch touched (sorted) and differentiable copies of their parameter rows, float32."""
    rows: torch.Tensor  # [R]
    W_enc: torch.Tensor  # [R, d]
    b_enc: torch.Tensor  # [R]
    W_dec: torch.Tensor  # [R, d]


class Selection(NamedTuple):
    """A training code: (values, indices) [N, width], which slots hold a latent (None: all of them) and, for
    JumpReLU, the per-row L0 with its pseudo-derivative."""
    values: torch.Tensor
    indices: torch.Tensor
    filled: torch.Tensor | None = None
    l0: torch.Tensor | None = None


@dataclass
class Loss:
    total: torch.Tensor
    reconstruction: torch.Tensor  # the (tilted) mean of per-row squared errors
    aux: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor  # latents (global numbering)
    touched: TouchedRows | None = None  # with loss(..., touched_rows=True): where the weight gradients are
    sparsity: torch.Tensor | None = None  # the architecture's penalty (JumpReLU, ReLU), included in total


class SAE(torch.nn.Module):
    """What every architecture shares: parameters, decoding, the loss, files. A subclass defines
    ``encode`` (inference) and ``_select`` (the training code), and ``_sparsity`` when it has a penalty."""

    EXTRA_TENSORS: dict[str, tuple[str, ...]] = {}  # state beyond the shared tensors: name -> shape as config keys
    LR_SCALES: dict[str, float] = {}  # parameter name -> its learning rate as a multiple of the weights' (Adam)
    TOUCHED_ROWS = True  # loss(touched_rows=True) serves it: it trains only rows of W_enc, b_enc, W_dec, and b_dec
    DATA_PARALLEL = True  # data_parallel.py serves it: a batch changes its state only through gradients, dead counts

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None, latents: range | None = None):
        """``latents``: the latents whose rows this module holds (all of them, but for a latent shard)."""
        super().__init__()
        self.cfg = cfg
        self.latents = range(cfg.num_latents) if latents is None else latents
        M, d = len(self.latents), cfg.d_in
        W_dec = random_unit_rows(cfg.num_latents, d, self.latents, generator)
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
        """(values, indices) of the active latents of each row of x [N, d_in] (raw activations); slots that
        hold no latent have value 0."""
        raise NotImplementedError

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.input_scale).to(self.compute_dtype)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        _, _, W_dec, b_dec = self._weights()
        return sparse_decode(values, indices, W_dec, b_dec).float() / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat of x [N, d_in], float32."""
        return self.decode(*self.encode(x))

    # ---- training ----------------------------------------------------------------------

    def loss(self, x: torch.Tensor, *, t: float = 0.0, sample_weights: torch.Tensor | None = None,
             touched_rows: bool = False) -> Loss:
        """Reconstruction loss at the normalised scale (per-row squared error, tilted mean with tilt t)
        plus the AuxK loss for dead latents and the architecture's sparsity penalty. x is raw;
        ``sample_weights`` (from StreamingTERM) replaces the tilt when given.

        With ``touched_rows``, the latents are selected without autograd and the loss is computed on
        gathered copies of the rows the batch touched (``Loss.touched``, leaves that require grad): the
        gradients of W_enc, b_enc and W_dec are then [R, ...] for R touched latents instead of [M, ...],
        for :class:`ssae_kernels.optim.SparseAdam`. Same value and gradients as without it."""
        W_enc, b_enc, W_dec, b_dec = self._weights()
        xs = self._scaled(x)
        dead = self.dead_mask().nonzero().squeeze(1)
        k_aux = min(self.cfg.k_aux, dead.numel())
        if not touched_rows:
            code = self._select(xs, W_enc, b_enc, b_dec)
            aux_values = aux_indices = None
            if dead.numel():
                aux_values, local = topk_encode(xs, W_enc[dead], b_enc[dead], k_aux, b_dec=b_dec)
                aux_indices = dead[local]
            return self._loss(xs, code, aux_values, aux_indices, W_dec, b_dec, t, sample_weights)

        if not self.TOUCHED_ROWS:
            raise NotImplementedError(f"a {type(self).__name__} trains its dense per-latent parameters with every "
                                      "row: use torch.optim.Adam (optimizer 'adam'), not the touched-rows loss")
        with torch.no_grad():
            _, indices, filled, _ = self._select(xs, W_enc, b_enc, b_dec)
            aux_indices = None
            if dead.numel():
                aux_indices = dead[topk_encode(xs, W_enc[dead], b_enc[dead], k_aux, b_dec=b_dec)[1]]
            rows = torch.unique(indices if aux_indices is None else torch.cat([indices.reshape(-1),
                                                                                aux_indices.reshape(-1)]))
        touched = TouchedRows(rows, *(p.detach()[rows].requires_grad_() for p in (self.W_enc, self.b_enc,
                                                                                   self.W_dec)))
        dt = self.compute_dtype
        W_enc_r, b_enc_r, W_dec_r = touched.W_enc.to(dt), touched.b_enc.to(dt), touched.W_dec.to(dt)
        local = torch.searchsorted(rows, indices)
        values = encode_selected(xs, W_enc_r, b_enc_r, local, b_dec=b_dec)
        if filled is not None:  # empty slots (index 0) carry nothing
            values = torch.where(filled, values, torch.zeros((), dtype=values.dtype, device=values.device))
        aux_values = aux_local = None
        if aux_indices is not None:
            aux_local = torch.searchsorted(rows, aux_indices)
            aux_values = encode_selected(xs, W_enc_r, b_enc_r, aux_local, b_dec=b_dec)
        out = self._loss(xs, Selection(values, local, filled), aux_values, aux_local, W_dec_r, b_dec, t,
                         sample_weights)
        out.indices, out.touched = indices, touched
        return out

    def _select(self, xs, W_enc, b_enc, b_dec) -> Selection:
        """The training code of the normalised inputs xs."""
        raise NotImplementedError

    def _sparsity(self, code: Selection, W_dec: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        """The sparsity penalty of a training code decoded by W_dec (its rows at code.indices) with
        reconstruction loss ``recon``, or None."""
        return None

    def _loss(self, xs, code, aux_values, aux_indices, W_dec, b_dec, t, sample_weights) -> Loss:
        """The loss from a code (and AuxK's code of dead latents, or None) decoded with W_dec."""
        values, indices = code.values, code.indices
        if sample_weights is None:
            recon = sparse_decode_mse(values, indices, W_dec, b_dec, xs, t=t)
        else:
            errors = torch.ops.ssae.sparse_decode_sq_error(values, indices, W_dec, b_dec, xs)
            recon = (sample_weights * errors).mean()
        aux = torch.zeros((), device=xs.device)
        if aux_values is not None:  # (selected by the fused encode on the dead rows only, never N x M)
            with torch.no_grad():
                residual = (xs.float() - sparse_decode(values, indices, W_dec, b_dec).float())
            aux = aux_loss(residual, sparse_decode(aux_values, aux_indices, W_dec).float())
        total = recon + self.cfg.aux_coef * aux
        sparsity = self._sparsity(code, W_dec, recon)
        if sparsity is not None:
            total = total + sparsity
        return Loss(total, recon, aux, values, indices, sparsity=sparsity)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def update_firing(self, values: torch.Tensor, indices: torch.Tensor, *, combine=None, tokens: int | None = None):
        """Adds ``tokens`` (default: the code's rows) to every latent's count and restarts the latents that fired,
        an [M] bool mask that ``combine`` (data parallel: the union over the ranks) sees first."""
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        held = (values > 0) & (indices >= self.latents.start) & (indices < self.latents.stop)
        fired[indices[held] - self.latents.start] = True
        if combine is not None:
            fired = combine(fired)
        self.tokens_since_fired += values.shape[0] if tokens is None else tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def normalize_decoder(self, rows: torch.Tensor | None = None) -> None:
        """Decoder rows (all, or those in ``rows``) back to unit norm, after each optimizer step."""
        if rows is None:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            # divided in place: a second [R, d] allocation would cost its page faults again (~0.1 s at R = 10^5)
            W = self.W_dec.index_select(0, rows)
            W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.index_copy_(0, rows, W)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self, touched: TouchedRows | None = None) -> None:
        """Drops the gradient component along each decoder row, which the renormalisation would undo
        (of W_dec, or of the touched rows' copy)."""
        W = self.W_dec if touched is None else touched.W_dec
        grad = W.grad
        if grad is not None:
            # grad -= <grad, w> w / |w|^2 per row, without an [M, d] temporary (the batched 1 x d by d x 1
            # products and the in-place addcmul allocate O(M))
            dots = torch.bmm(grad.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)
            grad.addcmul_(W, dots / W.norm(dim=1, keepdim=True).square().clamp_min(1e-24), value=-1)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, *, target_norm: float | None = None) -> None:
        """b_dec from the geometric median of a sample x [n, d_in] and input_scale so that
        rows have mean norm sqrt(d_in) (or ``target_norm``)."""
        x = x.float()
        self.input_scale.fill_((target_norm or self.cfg.d_in**0.5) / x.norm(dim=1).mean().clamp_min(1e-12))
        self.b_dec.copy_(geometric_median(x * self.input_scale))

    # ---- files -------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """``directory/sae.safetensors`` and ``directory/cfg.json``, each written atomically and fsynced, and
        the sha256 of the weights in ``directory/checksums.json`` (verified by ``load``)."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # A stale checksum of the old weights goes first: a crash between the writes below then leaves a
        # directory that loads unverified, never one that fails its check.
        try:
            manifest = read_checksums(directory)
        except ValueError:  # an unreadable manifest is replaced
            os.remove(os.path.join(directory, MANIFEST))
            manifest = None
        if manifest is not None and manifest.pop(WEIGHTS_FILE, None) is not None:
            atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
        atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda p: save_file(tensors, p))
        atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(dataclasses.asdict(self.cfg), indent=2))
        write_checksums(directory, [WEIGHTS_FILE])

    @classmethod
    def load(cls, directory: str, device: str | torch.device = "cpu") -> "SAE":
        """Loads our format, checked: the weights against ``checksums.json`` (CorruptFileError; directories written
        before checksums existed load unchecked), ``cfg.json`` (ValueError naming a missing, unknown or invalid
        key) and every tensor's shape against the config (ValueError). The class follows cfg.json's ``arch``.
        SAELens and sparsify directories are read by ``ssae_kernels.formats.load_sae``."""
        cfg, tensors = read_sae(directory)
        with torch.device("meta"):  # no random initialisation of what the file replaces
            sae = sae_class(cfg)(cfg)
        sae.load_state_dict(tensors, assign=True)
        return sae.to(device)


def read_sae(directory: str, latents: range | None = None) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an SAE directory, checked as ``SAE.load`` says; with ``latents``, the per-latent
    tensors are read at those latents only."""
    cfg_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    cfg = read_config(cfg_path, SAEConfig, ("d_in", "num_latents", "k"))
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path}: missing ({directory} has {CONFIG_FILE} but no weights)")
    verify_weights(directory, WEIGHTS_FILE)
    spec = {"W_enc": ("num_latents", "d_in"), "W_dec": ("num_latents", "d_in"), "b_enc": ("num_latents",),
            "b_dec": ("d_in",), "input_scale": (), "tokens_since_fired": ("num_latents",),
            **sae_class(cfg).EXTRA_TENSORS}
    tensors = read_safetensors(weights_path, latents, [n for n, keys in spec.items() if keys[:1] == ("num_latents",)])
    check_shapes(weights_path, tensors, spec, {"d_in": cfg.d_in, "num_latents": len(latents or range(cfg.num_latents))},
                 cfg_path)
    return cfg, tensors


class TopKSAE(SAE):
    """TopK (Gao et al. 2024): the k largest ReLU(pre) of every row."""

    def encode(self, x: torch.Tensor):
        """(values, indices) [N, k] of the k active latents per row of x [N, d_in] (raw activations)."""
        W_enc, b_enc, _, b_dec = self._weights()
        return topk_encode(self._scaled(x), W_enc, b_enc, self.cfg.k, b_dec=b_dec)

    def _select(self, xs, W_enc, b_enc, b_dec):
        return Selection(*topk_encode(xs, W_enc, b_enc, self.cfg.k, b_dec=b_dec))


class ThresholdSAE(SAE):
    """The architectures whose inference code is every latent above a threshold, at most ``max_k`` per row."""

    def _threshold(self):
        """The threshold of inference: a float, or a 0-d or [M] tensor in the compute dtype."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor):
        """(values, indices) [N, max_k] of the latents above their thresholds, largest first (value 0 and index 0
        past a row's count)."""
        W_enc, b_enc, _, b_dec = self._weights()
        values, indices, _ = threshold_encode(self._scaled(x), W_enc, b_enc, self._threshold(), self.cfg.max_k,
                                              b_dec=b_dec)
        return values, indices


def aux_loss(residual: torch.Tensor, aux_hat: torch.Tensor) -> torch.Tensor:
    """AuxK: how well the dead latents' top-k_aux code (decoded: aux_hat) fits what the live code leaves
    unexplained (residual), relative to the residual's variance."""
    return ((aux_hat - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum().clamp_min(1e-12)


def _filled(counts: torch.Tensor, width: int) -> torch.Tensor:
    """[N, width]: which slots of a threshold code hold a latent."""
    return torch.arange(width, device=counts.device) < counts.unsqueeze(1)


def _k_sparse_threshold(sae: SAE, x: torch.Tensor) -> float:
    """The N * k-th largest ReLU(pre) of a raw sample x [n, d_in] under the current weights: the threshold
    at which the sample's mean L0 is k."""
    W_enc, b_enc, _, b_dec = sae._weights()
    return float(batch_topk_encode(sae._scaled(x), W_enc, b_enc, sae.cfg.k, sae.cfg.max_k, b_dec=b_dec)[3])


class BatchTopKSAE(ThresholdSAE):
    """BatchTopK (Bussmann et al. 2024): trained on the N * k largest ReLU'd pre-activations of each batch
    (rows share the budget, at most ``max_k`` each; ``batch_topk_encode``), encoded with the batch
    threshold estimated in training: every latent above it, at most ``max_k`` per row
    (``threshold_encode``), so the number of active latents varies by token around k."""

    DATA_PARALLEL = False  # the batch threshold is a statistic of the whole batch
    THRESHOLD_DECAY = 0.9  # the estimate: an exponential moving average of the recent training batches' thresholds
    EXTRA_TENSORS = {"threshold": ()}

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        # at the normalised scale; NaN until the first training batch
        self.register_buffer("threshold", torch.full((), float("nan")))

    def _threshold(self):
        if not bool(torch.isfinite(self.threshold)):
            raise RuntimeError("this BatchTopK SAE has no threshold yet: it is estimated during training "
                               "(its code keeps the latents above it)")
        return self.threshold.to(self.compute_dtype)

    def _select(self, xs, W_enc, b_enc, b_dec):
        values, indices, counts, threshold = batch_topk_encode(xs, W_enc, b_enc, self.cfg.k, self.cfg.max_k,
                                                               b_dec=b_dec)
        with torch.no_grad():
            if bool(torch.isnan(self.threshold)):
                self.threshold.fill_(float(threshold))
            else:
                self.threshold.mul_(self.THRESHOLD_DECAY).add_((1 - self.THRESHOLD_DECAY) * float(threshold))
        return Selection(values, indices, _filled(counts, self.cfg.max_k))


class JumpReLUSAE(ThresholdSAE):
    """JumpReLU (Rajamanoharan et al. 2024): ``z_m = pre_m`` where it exceeds the learned threshold
    theta_m, else 0; at most ``max_k`` latents per row. Training adds a penalty on the batch's mean L0 whose
    multiplier adapts until L0 holds at k, and trains theta through the straight-through pseudo-derivatives of
    ``jumprelu_encode`` (kernel width ``bandwidth``). The thresholds start at the value that gives a
    data sample a mean L0 of k, so the code is k-sparse from the first step."""

    EXTRA_TENSORS = {"threshold": ("num_latents",), "l0_multiplier": ()}
    L0_RHO = 20.0  # weight of the quadratic term
    L0_GAIN = 0.05  # the multiplier's change per step per unit of relative L0 error
    # Adam moves a parameter by about lr per step: at the weights' rate, thresholds of order 1 could not
    # follow the pre-activations' scale within a run of a few thousand steps
    LR_SCALES = {"threshold": 10.0}
    TOUCHED_ROWS = False  # theta is trained through latents that are not in the code
    DATA_PARALLEL = False  # the L0 multiplier follows the batch's L0

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        self.threshold = torch.nn.Parameter(torch.zeros(cfg.num_latents))  # at the normalised scale
        self.register_buffer("l0_multiplier", torch.zeros(()))

    def _threshold(self):
        return self.threshold.detach().to(self.compute_dtype)

    def _select(self, xs, W_enc, b_enc, b_dec):
        code = jumprelu_encode(xs, W_enc, b_enc, self.threshold, self.cfg.max_k, bandwidth=self.cfg.bandwidth,
                               b_dec=b_dec)
        return Selection(code.values, code.indices, _filled(code.counts, self.cfg.max_k), code.l0)

    def _sparsity(self, code, W_dec, recon):
        # An augmented Lagrangian for the constraint L0 = k, in units of the reconstruction loss:
        # lambda * r + (rho / 2) (r - 1)^2 with r = L0 / k. The quadratic term answers a deviation at once;
        # the multiplier lambda integrates what remains (raised while L0 exceeds k, lowered while it falls
        # short), so L0 settles at k whichever way the reconstruction pulls the thresholds.
        ratio = code.l0.mean() / self.cfg.k
        penalty = float(self.l0_multiplier) * ratio + self.L0_RHO / 2 * (ratio - 1) ** 2
        with torch.no_grad():
            self.l0_multiplier.add_(self.L0_GAIN * (float(ratio) - 1))
        return recon.detach() * penalty

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, *, target_norm: float | None = None) -> None:
        super().init_from_data(x, target_norm=target_norm)
        self.threshold.fill_(_k_sparse_threshold(self, x))


class ReLUSAE(ThresholdSAE):
    """The standard SAE: ``z = ReLU(pre)``, at most ``max_k`` latents per row (the largest), trained with the
    penalty ``l1_coef * sum_m z_m |W_dec[m]|`` (mean over rows). b_enc starts at minus the value that gives a
    data sample a mean L0 of k, so training starts sparse; l1_coef sets the L0 it reaches."""

    def _threshold(self):
        return 0.0

    def _select(self, xs, W_enc, b_enc, b_dec):
        values, indices, counts = threshold_encode(xs, W_enc, b_enc, 0.0, self.cfg.max_k, b_dec=b_dec)
        return Selection(values, indices, _filled(counts, self.cfg.max_k))

    def _sparsity(self, code, W_dec, recon):
        norms = W_dec.float().norm(dim=1)
        return self.cfg.l1_coef * (code.values.float() * norms[code.indices]).sum(1).mean()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, *, target_norm: float | None = None) -> None:
        super().init_from_data(x, target_norm=target_norm)
        self.b_enc.fill_(-_k_sparse_threshold(self, x))


# SAEConfig.arch -> the model class
SAE_CLASSES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE, "relu": ReLUSAE}
ARCHITECTURES = tuple(SAE_CLASSES)


def sae_class(cfg: SAEConfig) -> type[SAE]:
    """The model class of an SAE config's architecture."""
    return SAE_CLASSES[cfg.arch]
