"""Sparse decode: x_hat = b_dec + sum_j values[:, j] * W_dec[indices[:, j]]."""

import torch

from . import checks
from .checks import FLOAT_DTYPES, GPU_DTYPES, accumulation_dtype
from .registry import call, define
from .sparse_backward import latent_index, strided_weight_limits


def sparse_decode(values, indices, W_dec, b_dec=None):
    """Decodes a TopK code without forming the dense N x M code.

    Args:
        values: [N, k] activations; float32, bfloat16, float16 or float64.
        indices: [N, k] int64 latents, each in [0, M).
        W_dec: [M, d] decoder weights (row m is latent m's direction); dtype of values.
        b_dec: optional [d] decoder bias.

    Every tensor may have any strides (an expanded or sliced ``indices`` view reads
    exactly the entries it shows). The GPU backends read ``W_dec`` in place and never copy
    it: triton in any layout, cuda with unit stride along d (it declines a transposed view,
    which then runs on triton; asked for by name, it raises).

    Returns:
        x_hat: [N, d], dtype of values, ``b_dec + sum_j values[n, j] * W_dec[indices[n, j]]``
        accumulated in float32 (float64 for float64).

    Differentiable in values (gather-dot), W_dec (a per-latent transpose touching only
    the selected rows) and b_dec; O(N * k * d) forward and backward. Out-of-range
    indices raise ``IndexError`` on CPU tensors; on GPU tensors only with
    ``SSAE_CHECK_INDICES=1`` (a device sync per call; see ``ops.checks.index_range``).
    """
    checks.tensors(("values", values), ("indices", indices), ("W_dec", W_dec), ("b_dec", b_dec, None))
    return call("sparse_decode", (values, indices, W_dec, b_dec), differentiable=(values, W_dec, b_dec))


def reference(values, indices, W_dec, b_dec=None):
    """x_hat[n] = b_dec + sum_j values[n, j] * W_dec[indices[n, j]]. [N, d]."""
    acc = accumulation_dtype(values.dtype)
    out = torch.einsum("nk,nkd->nd", values.to(acc), W_dec.to(acc)[indices])
    if b_dec is not None:
        out = out + b_dec.to(acc)
    return out.to(values.dtype)


def check(values, indices, W_dec, b_dec=None):
    checks.tensor(values, "values", 2, "[N, k]")
    checks.tensor(indices, "indices", 2, "[N, k]")
    checks.tensor(W_dec, "W_dec", 2, "[M, d]")
    checks.tensor(b_dec, "b_dec", 1, "[d]", optional=True)
    checks.floating(values, "values")
    checks.indices(indices, "indices", values, "values")
    checks.like(W_dec, values, "W_dec", "values")
    checks.like(b_dec, values, "b_dec", "values")
    checks.same_size(tuple(indices.shape), tuple(values.shape), "indices must have the shape of values")
    torch._check_value(values.shape[0] >= 1, lambda: f"values must have at least one row, got shape {tuple(values.shape)}")
    if b_dec is not None:
        checks.same_size(b_dec.shape[0], W_dec.shape[1], "b_dec.shape[0] must equal W_dec.shape[1] (d)")
    checks.index_range(indices, W_dec.shape[0], "indices")


def _fake(values, indices, W_dec, b_dec=None):
    return values.new_empty(values.shape[0], W_dec.shape[1])


def _setup_context(ctx, inputs, output):
    values, indices, W_dec = inputs[:3]
    ctx.save_for_backward(values, indices, W_dec)


def _backward(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    need_values, _, need_W, need_b = (*ctx.needs_input_grad, False)[:4]  # b_dec may be omitted
    grad_values = grad_W = grad_b = None
    if need_values:
        grad_values = torch.ops.ssae.sampled_dot.default(grad_out, indices, W_dec)
    if need_W:
        offsets, order = latent_index(indices, W_dec.shape[0])
        grad_W, _ = torch.ops.ssae.sparse_transpose_matmul.default(values, grad_out, offsets, order)
    if need_b:
        grad_b = grad_out.sum(0)
    return (grad_values, None, grad_W, grad_b)[: len(ctx.needs_input_grad)]


OP = define(
    "sparse_decode",
    "(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec=None) -> Tensor",
    module=__name__.rsplit(".", 1)[-1], check=check, fake=_fake, reference=reference,
    dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
    limits=strided_weight_limits(2, "W_dec"),
    backward=_backward, setup_context=_setup_context,
)
