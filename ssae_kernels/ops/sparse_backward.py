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
from .library import register_routed_kernel


def _check_sampled_dot(grad, indices, W):
    checks.tensor(grad, "grad", 2, "[N, d]")
    checks.tensor(indices, "indices", 2, "[N, k]")
    checks.tensor(W, "W", 2, "[M, d]")
    checks.floating(grad, "grad")
    checks.like(W, grad, "W", "grad")
    checks.indices(indices, "indices", grad, "grad")
    checks.same_size(indices.shape[0], grad.shape[0], "indices.shape[0] (rows) must equal grad.shape[0]")
    checks.same_size(W.shape[1], grad.shape[1], "W.shape[1] (d) must equal grad.shape[1]")


def _check_latent_transpose(indices, num_latents):
    checks.tensor(indices, "indices", 2, "[N, k]")
    checks.integer(num_latents, "num_latents")
    torch._check_type(indices.dtype == torch.int64, lambda: f"indices must be int64, got {indices.dtype}")
    torch._check_value(num_latents >= 1, lambda: f"num_latents must be >= 1, got {num_latents}")


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


register_routed_kernel("sampled_dot", _check_sampled_dot)
register_routed_kernel("latent_transpose", _check_latent_transpose)
register_routed_kernel("sparse_transpose_matmul", _check_sparse_transpose_matmul)


@torch.library.register_fake("ssae::sampled_dot")
def _(grad, indices, W):
    _check_sampled_dot(grad, indices, W)
    return grad.new_empty(indices.shape)


@torch.library.register_fake("ssae::latent_transpose")
def _(indices, num_latents):
    _check_latent_transpose(indices, num_latents)
    return indices.new_empty(num_latents + 1), indices.new_empty(indices.numel())


@torch.library.register_fake("ssae::sparse_transpose_matmul")
def _(weights, rows, offsets, order):
    _check_sparse_transpose_matmul(weights, rows, offsets, order)
    num_latents = offsets.shape[0] - 1
    return rows.new_empty(num_latents, rows.shape[1]), rows.new_empty(num_latents)


_transposes = WeakIdKeyDictionary()


def latent_index(indices: torch.Tensor, num_latents: int):
    """(offsets, order) of ``latent_transpose(indices, num_latents)``, computed once per indices tensor."""
    if type(indices) is not torch.Tensor:  # fake/functional tensors while tracing: no caching
        return torch.ops.ssae.latent_transpose(indices, num_latents)
    cached = _transposes.get(indices)
    if cached is not None and cached[0] == (indices._version, num_latents):
        return cached[1]
    result = torch.ops.ssae.latent_transpose(indices, num_latents)
    _transposes[indices] = ((indices._version, num_latents), result)
    return result
