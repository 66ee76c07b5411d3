"""Fused threshold encode (JumpReLU, ReLU SAEs): the latents above their thresholds, without the N x M
pre-activation matrix."""

import torch

from . import checks
from .checks import FLOAT_DTYPES, GPU_DTYPES
from .registry import call, define
from .topk_encode import _check as _check_encode
from .topk_encode import _cuda_limit, _int32_latents, encoder_grads, pre_activations


def threshold_encode(x, W_enc, b_enc, threshold, max_k, *, b_dec=None):
    """Every latent whose pre-activation exceeds its threshold, at most ``max_k`` per row, largest first.

    ``pre[n, m] = (x[n] - b_dec) . W_enc[m] + b_enc[m]`` is never stored: as in :func:`topk_encode`, the
    CPU backend scores cache-sized tiles and keeps a running selection per row (extra memory
    O(N * max_k) plus fixed tiles).

    Args:
        x, W_enc, b_enc, b_dec: as :func:`topk_encode`.
        threshold: a [M] tensor (JumpReLU's per-latent thresholds), or one for every latent as a
            Python float or a 0-d tensor (a ReLU SAE uses 0.0); x's dtype and device; finite.
        max_k: the most latents kept per row, a Python int with 1 <= max_k <= M.

    Returns:
        values: [N, max_k], dtype of x: the pre-activations of the kept latents, largest first (not
            shifted by the threshold: JumpReLU keeps the raw pre-activation); slots past a row's
            count hold 0.
        indices: [N, max_k] int64, the kept latents (0 in slots past the count); equal
            pre-activations are ordered by lower index.
        counts: [N] int64, how many latents of each row exceed their threshold, before the cap:
            ``counts > max_k`` shows that a row lost some.

    Differentiable in x, W_enc, b_enc and b_dec through the kept entries, at O(N * max_k * d); not in
    the threshold (pass a tensor that does not require grad).

    Example::

        values, indices, counts = ssae_kernels.threshold_encode(x, sae.W_enc, sae.b_enc, sae.threshold,
                                                                 max_k=256, b_dec=sae.b_dec)
    """
    checks.tensors(("x", x), ("W_enc", W_enc), ("b_enc", b_enc, None), ("b_dec", b_dec, None))
    checks.integer(max_k, "max_k")
    if not isinstance(threshold, torch.Tensor):
        threshold = torch.tensor(checks.real(threshold, "threshold"), dtype=x.dtype, device=x.device)
    if threshold.requires_grad and torch.is_grad_enabled():
        raise ValueError("threshold_encode does not differentiate the threshold: pass threshold.detach(), or "
                         "train it with jumprelu_encode (straight-through pseudo-derivatives)")
    if not bool(torch.isfinite(threshold).all()):
        raise ValueError(f"threshold must be finite, got {int((~torch.isfinite(threshold)).sum())} non-finite "
                         "entries")
    return call("threshold_encode", (x, W_enc, b_enc, threshold, max_k, b_dec),
                differentiable=(x, W_enc, b_enc, b_dec))


def reference(x, W_enc, b_enc, threshold, max_k, b_dec=None):
    """(values, indices, counts) from the dense pre-activations: the specification."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    keep = pre > threshold.to(pre.dtype)  # NaN is never kept
    counts = keep.sum(1)
    masked = torch.where(keep, pre, torch.full((), float("-inf"), dtype=pre.dtype, device=pre.device))
    # A stable descending sort keeps equal pre-activations in index order.
    ranked = torch.sort(masked, dim=1, descending=True, stable=True)
    filled = torch.arange(max_k, device=x.device) < counts.unsqueeze(1)
    values = torch.where(filled, ranked.values[:, :max_k], 0).to(x.dtype)
    indices = torch.where(filled, ranked.indices[:, :max_k], 0)
    return values.contiguous(), indices.contiguous(), counts


def _check(x, W_enc, b_enc, threshold, max_k, b_dec=None):
    checks.integer(max_k, "max_k")
    _check_encode(x, W_enc, b_enc, 1, b_dec)
    M = W_enc.shape[0]
    torch._check_value(1 <= max_k <= M, lambda: f"max_k must be in [1, M] with M = W_enc.shape[0] = {M}, got {max_k}")
    if not isinstance(threshold, torch.Tensor):
        raise TypeError(f"threshold must be a Tensor (0-d or [M]), got {type(threshold).__name__}")
    torch._check_value(threshold.dim() == 0 or tuple(threshold.shape) == (M,),
                       lambda: f"threshold must be a scalar (0-d) or of shape [M] with M = W_enc.shape[0] = {M}, "
                               f"got shape {tuple(threshold.shape)}")
    checks.like(threshold, x, "threshold", "x")


def _fake(x, W_enc, b_enc, threshold, max_k, b_dec=None):
    N = x.shape[0]
    return (x.new_empty(N, max_k), x.new_empty(N, max_k, dtype=torch.int64), x.new_empty(N, dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, threshold, max_k, b_dec = (*inputs, None)[:6]
    values, indices, counts = output
    ctx.save_for_backward(x, W_enc, b_dec, indices, counts)
    ctx.mark_non_differentiable(indices, counts)


def _backward(ctx, grad_values, grad_indices, grad_counts):
    x, W_enc, b_dec, indices, counts = ctx.saved_tensors
    need_x, need_W, need_b_enc, _, _, need_b_dec = (*ctx.needs_input_grad, False)[:6]
    # the kept pre-activations are the values themselves; empty slots pass nothing
    filled = torch.arange(indices.shape[1], device=indices.device) < counts.unsqueeze(1)
    grad_pre = torch.where(filled, grad_values, torch.zeros((), dtype=grad_values.dtype))
    grad_x, grad_W, grad_b_enc, grad_b_dec = encoder_grads(x, W_enc, b_dec, indices, grad_pre,
                                                           need_x, need_W, need_b_enc, need_b_dec)
    grads = (grad_x, grad_W, grad_b_enc, None, None, grad_b_dec)
    return grads[: len(ctx.needs_input_grad)]


OP = define(
    "threshold_encode",
    "(Tensor x, Tensor W_enc, Tensor? b_enc, Tensor threshold, int max_k, Tensor? b_dec=None) "
    "-> (Tensor values, Tensor indices, Tensor counts)",
    module=__name__.rsplit(".", 1)[-1], check=_check, fake=_fake, reference=reference,
    dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
    limits={"cpu": _int32_latents("cpu"), "triton": _int32_latents("triton"), "cuda": _cuda_limit},
    backward=_backward, setup_context=_setup_context,
)
