"""Fused TopK encode: matmul + top-k without the N x M pre-activation matrix."""

import torch

from . import checks
from .checks import FLOAT_DTYPES, GPU_DTYPES, accumulation_dtype
from .registry import call, define
from .sparse_backward import latent_index


def topk_encode(x, W_enc, b_enc, k, *, b_dec=None):
    """The k largest pre-activations of every row, as a sparse code.

    ``pre[n, m] = (x[n] - b_dec) . W_enc[m] + b_enc[m]`` is never stored: the CPU
    backend computes it in cache-sized tiles and keeps a running top-k per row,
    so extra memory is O(N * k) plus fixed-size tiles.

    Args:
        x: [N, d] inputs (N >= 1); float32, bfloat16, float16 or float64.
        W_enc: [M, d] encoder weights (row m belongs to latent m, as ``nn.Linear``).
        b_enc: [M] encoder bias, or None for none (e.g. nearest-neighbour search).
        k: number of latents kept per row, a Python int with 1 <= k <= M.
        b_dec: optional [d] decoder bias, subtracted from x first.

    All tensors share x's dtype and device and may have any strides; accumulation
    is float32 (float64 for float64).

    Returns:
        values: [N, k], dtype of x: ``ReLU(pre[n, indices[n, j]])``.
        indices: [N, k] int64, the selected latents in descending order of pre;
            equal pre-activations are ordered by lower index (CPU and reference
            backends), and NaN ranks above every number.

    Differentiable in x, W_enc, b_enc and b_dec; the backward pass costs
    O(N * k * d) (gather for x, a per-latent transpose for W_enc and b_enc).

    Example::

        values, indices = ssae_kernels.topk_encode(x, sae.W_enc, sae.b_enc, 32, b_dec=sae.b_dec)
    """
    checks.tensors(("x", x), ("W_enc", W_enc), ("b_enc", b_enc, None), ("b_dec", b_dec, None))
    checks.integer(k, "k")
    return call("topk_encode", (x, W_enc, b_enc, k, b_dec), differentiable=(x, W_enc, b_enc, b_dec))


def pre_activations(x, W_enc, b_enc=None, b_dec=None):
    """pre[n, m] = (x[n] - b_dec) . W_enc[m] + b_enc[m], in the accumulation dtype. [N, M]."""
    acc = accumulation_dtype(x.dtype)
    xc = x.to(acc) if b_dec is None else x.to(acc) - b_dec.to(acc)
    pre = xc @ W_enc.to(acc).T
    return pre if b_enc is None else pre + b_enc.to(acc)


def reference(x, W_enc, b_enc, k, b_dec=None):
    """(values, indices): the k largest pre-activations of each row, descending, ties to the lower index."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    # A stable descending sort keeps equal scores in index order; NaN sorts first.
    ranked = torch.sort(pre, dim=1, descending=True, stable=True)
    return torch.relu(ranked.values[:, :k]).to(x.dtype).contiguous(), ranked.indices[:, :k].contiguous()


def _check(x, W_enc, b_enc, k, b_dec=None):
    checks.tensor(x, "x", 2, "[N, d]")
    checks.tensor(W_enc, "W_enc", 2, "[M, d]")
    checks.tensor(b_enc, "b_enc", 1, "[M]", optional=True)
    checks.tensor(b_dec, "b_dec", 1, "[d]", optional=True)
    checks.integer(k, "k")
    checks.floating(x, "x")
    for t, name in ((W_enc, "W_enc"), (b_enc, "b_enc"), (b_dec, "b_dec")):
        checks.like(t, x, name, "x")
    N, d = x.shape
    M = W_enc.shape[0]
    torch._check_value(N >= 1, lambda: f"x must have at least one row, got shape {tuple(x.shape)}")
    checks.same_size(W_enc.shape[1], d, "W_enc.shape[1] must equal x.shape[1] (d)")
    if b_enc is not None:
        checks.same_size(b_enc.shape[0], M, "b_enc.shape[0] must equal W_enc.shape[0] (M)")
    if b_dec is not None:
        checks.same_size(b_dec.shape[0], d, "b_dec.shape[0] must equal x.shape[1] (d)")
    torch._check_value(1 <= k <= M, lambda: f"k must be in [1, M] with M = W_enc.shape[0] = {M}, got {k}")


def _fake(x, W_enc, b_enc, k, b_dec=None):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, k, b_dec = (*inputs, None)[:5]  # b_dec may be omitted (a trailing default)
    values, indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices)
    ctx.mark_non_differentiable(indices)


def _backward(ctx, grad_values, grad_indices):
    x, W_enc, b_dec, values, indices = ctx.saved_tensors
    need_x, need_W, need_b_enc, _, need_b_dec = (*ctx.needs_input_grad, False)[:5]
    # d ReLU: only selected latents with a positive pre-activation pass gradient
    grad_pre = torch.where(values > 0, grad_values, torch.zeros((), dtype=grad_values.dtype))
    grad_x, grad_W, grad_b_enc, grad_b_dec = encoder_grads(x, W_enc, b_dec, indices, grad_pre,
                                                           need_x, need_W, need_b_enc, need_b_dec)
    grads = (grad_x, grad_W, grad_b_enc, None, grad_b_dec)
    return grads[: len(ctx.needs_input_grad)]


def encoder_grads(x, W_enc, b_dec, indices, grad_pre, need_x, need_W, need_b_enc, need_b_dec):
    """(grad_x, grad_W_enc, grad_b_enc, grad_b_dec) of a sparse code's pre-activations
    ``pre[n, indices[n, j]]`` given their gradient ``grad_pre`` [N, k] (zero where a slot passes
    none), at O(N * k * d); None where not needed. Shared by the encode ops."""
    grad_x = grad_W = grad_b_enc = grad_b_dec = None
    if need_x:
        grad_x = torch.ops.ssae.sparse_decode.default(grad_pre, indices, W_enc, None)
    if need_W or need_b_enc or (need_b_dec and not need_x):
        offsets, order = latent_index(indices, W_enc.shape[0])
        rows = x if b_dec is None else x - b_dec
        grad_W, grad_b_enc = torch.ops.ssae.sparse_transpose_matmul.default(grad_pre, rows, offsets, order)
    if need_b_dec:
        # -sum_n grad_x[n]; without grad_x, the same sum grouped by latent is
        # grad_b_enc @ W_enc: one [M] x [M, d] product instead of an N x k gather.
        grad_b_dec = -grad_x.sum(0) if need_x else -(grad_b_enc.to(W_enc.dtype) @ W_enc)
    return grad_x, grad_W if need_W else None, grad_b_enc if need_b_enc else None, grad_b_dec


def _int32_latents(backend):
    def limit(x, W_enc, *args):  # the selection state holds latents as int32
        if W_enc.shape[0] >= 2**31 - 1:
            return f"W_enc has {W_enc.shape[0]} latents; the {backend} backend takes at most 2^31 - 2"
        return None
    return limit


def _cuda_limit(x, W_enc, *args):
    # Latents are packed into 32 bits of the selection keys.
    if W_enc.shape[0] >= 2**32:
        return f"W_enc has {W_enc.shape[0]} latents; the cuda backend takes at most 2^32 - 1"
    return None


OP = define(
    "topk_encode",
    "(Tensor x, Tensor W_enc, Tensor? b_enc, int k, Tensor? b_dec=None) -> (Tensor values, Tensor indices)",
    module=__name__.rsplit(".", 1)[-1], check=_check, fake=_fake, reference=reference,
    dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
    limits={"cpu": _int32_latents("cpu"), "triton": _int32_latents("triton"), "cuda": _cuda_limit},
    backward=_backward, setup_context=_setup_context,
)


# ---- encode_selected: the same code for latents chosen beforehand ------------------------------------


def encode_selected(x, W_enc, b_enc, indices, *, b_dec=None):
    """``ReLU(pre[n, indices[n, j]])``: the values of a code whose latents are already chosen.

    With the indices of :func:`topk_encode` this gives its values and the same gradients, at
    O(N * k * d): the encode of a training step can select under ``torch.no_grad()`` and take
    the values' gradient from here, e.g. on a gathered copy of just the rows the batch touched
    (``SAE.loss(..., touched_rows=True)``), so that the weight gradients are [R, d] and not [M, d].

    Args: as :func:`topk_encode`, with ``indices`` [N, k] int64 in [0, M) instead of k.
    Returns: [N, k], dtype of x. Differentiable in x, W_enc, b_enc and b_dec.
    """
    checks.tensors(("x", x), ("W_enc", W_enc), ("b_enc", b_enc, None), ("indices", indices), ("b_dec", b_dec, None))
    return call("encode_selected", (x, W_enc, b_enc, indices, b_dec), differentiable=(x, W_enc, b_enc, b_dec))


def encode_selected_reference(x, W_enc, b_enc, indices, b_dec=None):
    return torch.relu(pre_activations(x, W_enc, b_enc, b_dec).gather(1, indices)).to(x.dtype)


def _check_selected(x, W_enc, b_enc, indices, b_dec=None):
    checks.tensor(indices, "indices", 2, "[N, k]")
    checks.indices(indices, "indices", x, "x")
    _check(x, W_enc, b_enc, 1, b_dec)
    checks.same_size(indices.shape[0], x.shape[0], "indices.shape[0] (rows) must equal x.shape[0]")
    checks.index_range(indices, W_enc.shape[0], "indices")


def _encode_selected_kernel(x, W_enc, b_enc, indices, b_dec=None):
    _check_selected(x, W_enc, b_enc, indices, b_dec)
    rows = x if b_dec is None else x - b_dec
    pre = torch.ops.ssae.sampled_dot.default(rows, indices, W_enc)
    return torch.relu(pre if b_enc is None else pre + b_enc[indices])


def _setup_selected(ctx, inputs, output):
    x, W_enc, b_enc, indices, b_dec = (*inputs, None)[:5]
    ctx.save_for_backward(x, W_enc, b_dec, output, indices)


def _backward_selected(ctx, grad_values):
    return _backward(ctx, grad_values, None)  # topk_encode's formulas: they depend only on the selection


# A composite: the backend-specific work is the sampled_dot it calls (and, backward, topk_encode's ops).
define("encode_selected", "(Tensor x, Tensor W_enc, Tensor? b_enc, Tensor indices, Tensor? b_dec=None) -> Tensor",
       module=__name__.rsplit(".", 1)[-1], check=_check_selected, fake=lambda x, W_enc, b_enc, indices, b_dec=None: x.new_empty(indices.shape),
       reference=encode_selected_reference, dtypes={}, composite=_encode_selected_kernel,
       backward=_backward_selected, setup_context=_setup_selected)
