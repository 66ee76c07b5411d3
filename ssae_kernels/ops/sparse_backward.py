"""Sparse backward primitives shared by the encoder and decoder backward passes.

A TopK code (values or gradients [N, k] at ``indices`` [N, k]) is a sparse
N x M matrix S. The backward passes need, at O(N * k * d) cost:

- ``sampled_dot(grad, indices, W)``: grad[n] . W[indices[n, j]], the gradient of a code;
- ``sparse_transpose_matmul(weights, rows, offsets, order)``: S^T rows and S's column
  sums, the gradients of a weight matrix and its bias;
- ``latent_transpose(indices, M)``: the transpose of S's sparsity pattern (entries
  counting-sorted by latent) that makes the previous one race-free and deterministic.

``latent_index`` builds that transpose once per ``indices`` tensor, so the
decoder's backward and the encoder's backward of one training step share it.
"""

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import checks
from .checks import FLOAT_DTYPES, GPU_DTYPES, accumulation_dtype
from .registry import define

MODULE = __name__.rsplit(".", 1)[-1]


# ---- weights on the GPU backends -------------------------------------------------------------


def strided_weight_problem(W, name: str, backend: str):
    """Why ``backend`` cannot read the weight matrix ``W`` [M, d] in place, or None.

    The GPU kernels never copy weights: a copy of an [M, d] view costs O(M * d) per call
    (8 GB at M = 2^20, d = 4096 in float16). Triton reads any layout through both strides;
    the cuda kernels read rows through their row stride (``W[:, :d]`` of a wider matrix,
    ``W[::2]``, expanded rows) but need unit stride along d, so a transposed view goes to
    Triton. The cuda bindings raise the same words as ``ValueError`` (csrc/torch/cuda_ops.cu).
    """
    if W.dim() == 2 and W.shape[1] > 1 and W.stride(1) != 1:
        return (f"{name} must have unit stride in its last dimension on the {backend} backend (weights are read "
                f"in place, never copied), got strides {list(W.stride())}; call .contiguous() once outside the "
                f"training loop")
    return None


def strided_weight_limits(position: int, name: str) -> dict:
    """The op-declaration ``limits`` of the GPU backends for the weight argument at ``position``."""
    def limit_for(backend):
        def limit(*args):
            return strided_weight_problem(args[position], name, backend)
        limit.__name__ = f"{backend}_{name}_layout"
        return limit
    return {"cuda": limit_for("cuda")}


# ---- sampled_dot ---------------------------------------------------------------------------


def sampled_dot_reference(grad, indices, W):
    """out[n, j] = grad[n] . W[indices[n, j]]. [N, k]."""
    acc = accumulation_dtype(grad.dtype)
    return torch.einsum("nd,nkd->nk", grad.to(acc), W.to(acc)[indices]).to(grad.dtype)


def _check_sampled_dot(grad, indices, W):
    checks.tensor(grad, "grad", 2, "[N, d]")
    checks.tensor(indices, "indices", 2, "[N, k]")
    checks.tensor(W, "W", 2, "[M, d]")
    checks.floating(grad, "grad")
    checks.like(W, grad, "W", "grad")
    checks.indices(indices, "indices", grad, "grad")
    checks.same_size(indices.shape[0], grad.shape[0], "indices.shape[0] (rows) must equal grad.shape[0]")
    checks.same_size(W.shape[1], grad.shape[1], "W.shape[1] (d) must equal grad.shape[1]")
    checks.index_range(indices, W.shape[0], "indices")


define("sampled_dot", "(Tensor grad, Tensor indices, Tensor W) -> Tensor",
       module=MODULE, check=_check_sampled_dot, reference=sampled_dot_reference,
       fake=lambda grad, indices, W: grad.new_empty(indices.shape),
       dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
       limits=strided_weight_limits(2, "W"))


# ---- latent_transpose ----------------------------------------------------------------------


def latent_transpose_reference(indices, num_latents):
    """(offsets [M + 1], order [N * k]): entries p = n * k + j grouped by latent, ascending within a latent."""
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_latents)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return offsets, torch.argsort(flat, stable=True)


def _check_latent_transpose(indices, num_latents):
    checks.tensor(indices, "indices", 2, "[N, k]")
    checks.integer(num_latents, "num_latents")
    torch._check_type(indices.dtype == torch.int64, lambda: f"indices must be int64, got {indices.dtype}")
    torch._check_value(num_latents >= 1, lambda: f"num_latents must be >= 1, got {num_latents}")
    checks.index_range(indices, num_latents, "indices")


def _triton_transpose_limit(indices, num_latents):
    if indices.numel() >= 2**31 or num_latents >= 2**31:
        return f"the triton latent_transpose takes fewer than 2^31 entries and latents, got {indices.numel()} and {num_latents}"
    return None


define("latent_transpose", "(Tensor indices, int num_latents) -> (Tensor offsets, Tensor order)",
       module=MODULE, check=_check_latent_transpose, reference=latent_transpose_reference,
       fake=lambda indices, num_latents: (indices.new_empty(num_latents + 1), indices.new_empty(indices.numel())),
       dtypes={"cpu": None, "triton": None, "cuda": None}, limits={"triton": _triton_transpose_limit})


# ---- sparse_transpose_matmul -----------------------------------------------------------------


def sparse_transpose_matmul_reference(weights, rows, offsets, order):
    """(out [M, d], colsum [M]): S^T rows and the column sums of S, S[n, latent] = weights[n, j]."""
    acc = accumulation_dtype(weights.dtype)
    num_latents, k = offsets.numel() - 1, weights.shape[1]
    latent = torch.repeat_interleave(torch.arange(num_latents, device=offsets.device), torch.diff(offsets))
    w = weights.reshape(-1)[order].to(acc)
    out = torch.zeros(num_latents, rows.shape[1], dtype=acc, device=rows.device)
    out.index_add_(0, latent, w[:, None] * rows.to(acc)[order // k])
    colsum = torch.zeros(num_latents, dtype=acc, device=rows.device).index_add_(0, latent, w)
    return out.to(rows.dtype), colsum.to(weights.dtype)


def _check_sparse_transpose_matmul(weights, rows, offsets, order):
    checks.tensor(weights, "weights", 2, "[N, k]")
    checks.tensor(rows, "rows", 2, "[N, d]")
    checks.tensor(offsets, "offsets", 1, "[M + 1]")
    checks.tensor(order, "order", 1, "[N * k]")
    checks.floating(weights, "weights")
    checks.like(rows, weights, "rows", "weights")
    checks.indices(offsets, "offsets", weights, "weights")
    checks.indices(order, "order", weights, "weights")
    checks.same_size(rows.shape[0], weights.shape[0], "rows.shape[0] (N) must equal weights.shape[0]")
    checks.same_size(order.shape[0], weights.shape[0] * weights.shape[1], "order must have N * k elements")
    torch._check_value(offsets.shape[0] >= 2, lambda: f"offsets must have M + 1 >= 2 elements, got {offsets.shape[0]}")
    checks.index_range(order, order.shape[0], "order")


def _fake_sparse_transpose_matmul(weights, rows, offsets, order):
    num_latents = offsets.shape[0] - 1
    return rows.new_empty(num_latents, rows.shape[1]), rows.new_empty(num_latents)


define("sparse_transpose_matmul",
       "(Tensor weights, Tensor rows, Tensor offsets, Tensor order) -> (Tensor out, Tensor colsum)",
       module=MODULE, check=_check_sparse_transpose_matmul, reference=sparse_transpose_matmul_reference,
       fake=_fake_sparse_transpose_matmul,
       dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES})


# ---- the transpose, once per indices tensor -----------------------------------------------------

_transposes = WeakIdKeyDictionary()
_latent_transpose = torch.ops.ssae.latent_transpose.default


def latent_index(indices: torch.Tensor, num_latents: int):
    """(offsets, order) of ``latent_transpose(indices, num_latents)``, computed once per indices tensor."""
    if type(indices) is not torch.Tensor:  # fake/functional tensors while tracing: no caching
        return _latent_transpose(indices, num_latents)
    cached = _transposes.get(indices)
    if cached is not None and cached[0] == (indices._version, num_latents):
        return cached[1]
    result = _latent_transpose(indices, num_latents)
    _transposes[indices] = ((indices._version, num_latents), result)
    return result
