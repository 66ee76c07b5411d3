"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) sparse autoencoders on the fused ops.

    z = ReLU(TopK(W_enc (x - b_dec) + b_enc)),  x_hat = W_dec^T z + b_dec

with W_enc and W_dec both [num_latents, d_in]. BatchTopK trains with the N * k largest
pre-activations of the whole batch instead of k per row, and encodes with a threshold estimated
during training. The parameters are float32 master weights; ``compute_dtype`` (float32 or bfloat16)
is what the kernels see.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from .ops import batch_topk_encode, encode_selected, sparse_decode, sparse_decode_mse, threshold_encode, topk_encode
from .storage import (MANIFEST, CorruptFileError, atomic_write, atomic_write_text, read_checksums, verify_checksums,
                      write_checksums)

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
    arch: str = "topk"  # "topk", or "batchtopk": the N * k largest of the batch (k on average per row)
    max_k: int | None = None  # batchtopk: the most latents a row may keep; default 4 k (at most num_latents)

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
            raise ValueError("max_k applies to arch 'batchtopk' only (a TopK SAE keeps exactly k per row)")
        if self.arch == "batchtopk" and self.max_k is None:
            self.max_k = min(self.num_latents, 4 * self.k)
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


@dataclass
class Loss:
    total: torch.Tensor
    reconstruction: torch.Tensor  # the (tilted) mean of per-row squared errors
    aux: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor  # latents (global numbering)
    touched: TouchedRows | None = None  # with loss(..., touched_rows=True): where the weight gradients are


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

    def loss(self, x: torch.Tensor, *, t: float = 0.0, sample_weights: torch.Tensor | None = None,
             touched_rows: bool = False) -> Loss:
        """Reconstruction loss at the normalised scale (per-row squared error, tilted mean with tilt t)
        plus the AuxK loss for dead latents. x is raw; ``sample_weights`` (from StreamingTERM)
        replaces the tilt when given.

        With ``touched_rows``, the latents are selected without autograd and the loss is computed on
        gathered copies of the rows the batch touched (``Loss.touched``, leaves that require grad): the
        gradients of W_enc, b_enc and W_dec are then [R, ...] for R touched latents instead of [M, ...],
        for :class:`ssae_kernels.optim.SparseAdam`. Same value and gradients as without it."""
        W_enc, b_enc, W_dec, b_dec = self._weights()
        xs = (x * self.input_scale).to(self.compute_dtype)
        dead = self.dead_mask().nonzero().squeeze(1)
        if not touched_rows:
            values, indices, _ = self._select(xs, W_enc, b_enc, b_dec)
            aux_values = aux_indices = None
            if dead.numel():
                aux_values, local = topk_encode(xs, W_enc[dead], b_enc[dead], self._k_aux(dead), b_dec=b_dec)
                aux_indices = dead[local]
            return self._loss(xs, values, indices, aux_values, aux_indices, W_dec, b_dec, t, sample_weights)

        with torch.no_grad():
            _, indices, filled = self._select(xs, W_enc, b_enc, b_dec)
            aux_indices = None
            if dead.numel():
                aux_indices = dead[topk_encode(xs, W_enc[dead], b_enc[dead], self._k_aux(dead), b_dec=b_dec)[1]]
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
        out = self._loss(xs, values, local, aux_values, aux_local, W_dec_r, b_dec, t, sample_weights)
        out.indices, out.touched = indices, touched
        return out

    def _select(self, xs, W_enc, b_enc, b_dec):
        """(values, indices, filled) of the training code: TopK's k per row (filled None: every slot holds one)."""
        values, indices = topk_encode(xs, W_enc, b_enc, self.cfg.k, b_dec=b_dec)
        return values, indices, None

    def _k_aux(self, dead: torch.Tensor) -> int:
        return min(self.cfg.k_aux, dead.numel())

    def _loss(self, xs, values, indices, aux_values, aux_indices, W_dec, b_dec, t, sample_weights) -> Loss:
        """The loss from a code (and AuxK's code of dead latents, or None) decoded with W_dec."""
        if sample_weights is None:
            recon = sparse_decode_mse(values, indices, W_dec, b_dec, xs, t=t)
        else:
            errors = torch.ops.ssae.sparse_decode_sq_error(values, indices, W_dec, b_dec, xs)
            recon = (sample_weights * errors).mean()
        aux = torch.zeros((), device=xs.device)
        if aux_values is not None:
            # AuxK: the dead latents' top-k_aux code (selected by the fused encode on their rows only,
            # never the N x M matrix) fitted to what the live code leaves unexplained
            with torch.no_grad():
                residual = (xs.float() - sparse_decode(values, indices, W_dec, b_dec).float())
            aux_hat = sparse_decode(aux_values, aux_indices, W_dec).float()
            total_variance = ((residual - residual.mean(0)) ** 2).sum().clamp_min(1e-12)
            aux = ((aux_hat - residual) ** 2).sum() / total_variance
        return Loss(recon + self.cfg.aux_coef * aux, recon, aux, values, indices)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def update_firing(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.tokens_since_fired += values.shape[0]
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
    def load(cls, directory: str, device: str | torch.device = "cpu") -> "TopKSAE":
        """Loads our format, checked: the weights against ``checksums.json`` (CorruptFileError; directories
        written before checksums existed have none and load unchecked), ``cfg.json`` (ValueError naming a
        missing, unknown or invalid key) and every tensor's shape against the config (ValueError). The
        class follows cfg.json's ``arch`` (TopKSAE or BatchTopKSAE). SAELens and sparsify directories are
        read by ``ssae_kernels.formats.load_sae``."""
        cfg_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
        raw = read_json_object(cfg_path)
        missing = [key for key in ("d_in", "num_latents", "k") if key not in raw]
        if missing:
            raise ValueError(f"{cfg_path}: missing key {missing[0]!r} (required: d_in, num_latents, k)")
        known = {f.name for f in dataclasses.fields(SAEConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{cfg_path}: unknown keys {unknown} (known: {sorted(known)})")
        for key in ("d_in", "num_latents", "k"):
            if isinstance(raw[key], bool) or not isinstance(raw[key], int):
                raise ValueError(f"{cfg_path}: key {key!r} must be a positive int, got {raw[key]!r}")
        try:
            cfg = SAEConfig(**raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"{weights_path}: missing ({directory} has {CONFIG_FILE} but no weights)")
        verify_weights(directory, WEIGHTS_FILE)
        tensors = read_safetensors(weights_path)
        spec = {"W_enc": ("num_latents", "d_in"), "W_dec": ("num_latents", "d_in"), "b_enc": ("num_latents",),
                "b_dec": ("d_in",), "input_scale": (), "tokens_since_fired": ("num_latents",)}
        if cfg.arch == "batchtopk":
            spec["threshold"] = ()
        check_shapes(weights_path, tensors, spec, {"d_in": cfg.d_in, "num_latents": cfg.num_latents}, cfg_path)
        sae = sae_class(cfg)(cfg)
        sae.load_state_dict(tensors)
        return sae.to(device)


class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): trained on the N * k largest ReLU'd pre-activations of each batch
    (rows share the budget, at most ``max_k`` each; ``batch_topk_encode``), encoded with the batch
    threshold estimated in training: every latent above it, at most ``max_k`` per row
    (``threshold_encode``), so the number of active latents varies by token around k."""

    THRESHOLD_DECAY = 0.9  # the estimate: an exponential moving average of the recent training batches' thresholds

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        # at the normalised scale; NaN until the first training batch
        self.register_buffer("threshold", torch.full((), float("nan")))

    def encode(self, x: torch.Tensor):
        """(values, indices) [N, max_k] of the latents above the threshold (0 in the slots past a row's count)."""
        if not bool(torch.isfinite(self.threshold)):
            raise RuntimeError("this BatchTopK SAE has no threshold yet: it is estimated during training "
                               "(its code keeps the latents above it)")
        W_enc, b_enc, _, b_dec = self._weights()
        values, indices, _ = threshold_encode((x * self.input_scale).to(self.compute_dtype), W_enc, b_enc,
                                              self.threshold.to(self.compute_dtype), self.cfg.max_k, b_dec=b_dec)
        return values, indices

    def _select(self, xs, W_enc, b_enc, b_dec):
        values, indices, counts, threshold = batch_topk_encode(xs, W_enc, b_enc, self.cfg.k, self.cfg.max_k,
                                                               b_dec=b_dec)
        with torch.no_grad():
            if bool(torch.isnan(self.threshold)):
                self.threshold.fill_(float(threshold))
            else:
                self.threshold.mul_(self.THRESHOLD_DECAY).add_((1 - self.THRESHOLD_DECAY) * float(threshold))
        filled = torch.arange(self.cfg.max_k, device=xs.device) < counts.unsqueeze(1)
        return values, indices, filled


# SAEConfig.arch -> the model class
SAE_CLASSES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}
ARCHITECTURES = tuple(SAE_CLASSES)


def sae_class(cfg: SAEConfig) -> type[TopKSAE]:
    """The model class of an SAE config's architecture."""
    return SAE_CLASSES[cfg.arch]


def read_json_object(path: str) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not valid JSON or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def verify_weights(directory: str, name: str) -> bool:
    """``storage.verify_checksums`` of one file (CorruptFileError naming it when it differs); also a
    CorruptFileError, naming the manifest, when ``checksums.json`` itself is unreadable. False without one."""
    try:
        return verify_checksums(directory, [name])
    except CorruptFileError:
        raise
    except (ValueError, AttributeError, TypeError) as e:  # not JSON, or not a JSON object of names
        raise CorruptFileError(f"{os.path.join(directory, MANIFEST)}: unreadable checksum manifest ({e})") from None


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); CorruptFileError naming the file when it cannot be parsed."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError on a truncated file)
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptFileError(f"{path}: not a readable safetensors file ({e})") from None


def check_shapes(weights_path: str, tensors: dict[str, torch.Tensor], spec: dict[str, tuple[str, ...]],
                 dims: dict[str, int], cfg_path: str) -> None:
    """ValueError naming the weights file and the tensor when a tensor is missing, unexpected or not of its
    shape. ``spec`` gives each tensor's shape as config keys, ``dims`` their values read from ``cfg_path``."""
    missing = [name for name in spec if name not in tensors]
    if missing:
        raise ValueError(f"{weights_path}: missing tensor {missing[0]!r} (expected {sorted(spec)})")
    extra = sorted(set(tensors) - set(spec))
    if extra:
        raise ValueError(f"{weights_path}: unexpected tensors {extra} (expected {sorted(spec)})")
    for name, keys in spec.items():
        expected, found = [dims[key] for key in keys], list(tensors[name].shape)
        if found != expected:
            source = ", ".join(f"{key}={dims[key]}" for key in dict.fromkeys(keys)) or "a scalar"
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {found}, expected {expected} "
                             f"({source} in {cfg_path})")


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
