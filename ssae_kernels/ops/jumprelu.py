"""JumpReLU (Rajamanoharan et al. 2024) with its learnable thresholds, on the fused ``threshold_encode``:

    f(x)_m = pre_m * H(pre_m - theta_m),   L0(x) = sum_m H(pre_m - theta_m)

H is the step function, whose derivative in theta is zero almost everywhere. The paper trains theta
through straight-through pseudo-derivatives with a rectangle kernel K of bandwidth eps:

    d f_m / d theta_m  := -(theta_m / eps) K((pre_m - theta_m) / eps)
    d L0   / d theta_m := -(1 / eps)       K((pre_m - theta_m) / eps),    K(u) = 1 when |u| < 1/2

Only latents with ``pre > theta - eps/2`` have a nonzero derivative, so one ``threshold_encode`` at
``theta - eps/2`` finds everything the forward pass and both pseudo-derivatives need: O(N * max_k), no
N x M matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import checks
from .threshold_encode import threshold_encode
from .topk_encode import pre_activations


class JumpReLUCode(NamedTuple):
    # [N, max_k]: slots [0, count) hold the kept latents' pre-activations, largest first; then value 0 for the
    # latents within bandwidth / 2 below their thresholds (their index is kept: the threshold's gradient
    # reaches them through it); then value 0 and index 0
    values: torch.Tensor
    indices: torch.Tensor  # [N, max_k] int64
    counts: torch.Tensor  # [N] int64, latents above their threshold before the cap
    l0: torch.Tensor  # [N] float32 (float64 for float64 x), the kept latents per row, differentiable in the threshold


def jumprelu_encode(x, W_enc, b_enc, threshold, max_k, *, bandwidth, b_dec=None) -> JumpReLUCode:
    """The JumpReLU code of x with straight-through gradients for the threshold (see the module docstring).

    Args:
        x, W_enc, b_enc, b_dec: as :func:`threshold_encode`.
        threshold: [M] (or 0-d) float tensor, may require grad; finite.
        max_k: the most latents kept per row; 1 <= max_k <= M. Candidates within ``bandwidth / 2`` below
            the threshold share this cap with the kept latents (they come after them).
        bandwidth: eps of the rectangle kernel, a positive float, in pre-activation units.

    Returns:
        A :class:`JumpReLUCode` ``(values, indices, counts, l0)``. ``values`` are differentiable in x, W_enc,
        b_enc, b_dec (through the kept entries) and the threshold (pseudo-derivative);
        ``l0.sum()`` is the batch's L0 with the threshold's pseudo-derivative. A latent is kept when its
        pre-activation, in x's dtype, exceeds its threshold converted to x's dtype.
    """
    checks.tensors(("x", x), ("W_enc", W_enc), ("b_enc", b_enc, None), ("b_dec", b_dec, None))
    eps = checks.real(bandwidth, "bandwidth")
    if not eps > 0 or eps == float("inf"):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    if not isinstance(threshold, torch.Tensor):
        raise TypeError(f"threshold must be a Tensor (0-d or [M]), got {type(threshold).__name__}")
    theta = threshold.to(x.dtype)
    # every latent the pseudo-derivatives can see: pre > theta - eps/2
    pre, indices, candidates = threshold_encode(x, W_enc, b_enc, theta.detach() - eps / 2, max_k, b_dec=b_dec)
    slots = torch.arange(max_k, device=x.device)
    present = slots < candidates.unsqueeze(1)
    over = (candidates > max_k).nonzero().squeeze(1)
    if over.numel():
        # Candidates past the cap may have pushed out kept latents: those rows take the exact code (they
        # lose the pseudo-derivative of their latents just below the threshold, not the code).
        exact = threshold_encode(x[over], W_enc, b_enc, theta.detach(), max_k, b_dec=b_dec)
        pre, indices = pre.index_put((over,), exact[0]), indices.index_put((over,), exact[1])
        present = present.index_put((over,), slots < exact[2].unsqueeze(1))
    # With per-latent thresholds a candidate below its threshold can outrank a kept latent: kept first.
    kept = present & (pre.detach() > _at(theta.detach(), indices))
    order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)
    pre, indices, present, kept = (t.gather(1, order) for t in (pre, indices, present, kept))
    theta_at = _at(theta, indices)
    values = _JumpReLU.apply(pre, theta_at, present, eps)
    l0 = _Step.apply(pre, theta_at, present, eps).to(checks.accumulation_dtype(x.dtype)).sum(1)
    counts = kept.sum(1)
    if over.numel():
        counts[over] = exact[2]
    return JumpReLUCode(values, torch.where(present, indices, 0), counts, l0)


def _at(theta, indices):
    """theta [M] (or 0-d) at each of indices' latents."""
    return theta.expand(indices.shape) if theta.dim() == 0 else theta[indices]


def _kernel(pre, theta, present, eps):
    """K((pre - theta) / eps) / eps on the present candidates, in float32 (float64 for float64)."""
    dt = checks.accumulation_dtype(pre.dtype)
    inside = present & ((pre.to(dt) - theta.to(dt)).abs() < eps / 2)
    return inside.to(dt) / eps


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, present, eps):
        keep = present & (pre > theta)
        ctx.save_for_backward(pre, theta, present, keep)
        ctx.eps = eps
        return torch.where(keep, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))

    @staticmethod
    def backward(ctx, grad):
        pre, theta, present, keep = ctx.saved_tensors
        grad_pre = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_pre = torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        if ctx.needs_input_grad[1]:
            k = _kernel(pre, theta, present, ctx.eps)
            grad_theta = (-grad.to(k.dtype) * theta.to(k.dtype) * k).to(theta.dtype)
        return grad_pre, grad_theta, None, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, present, eps):
        ctx.save_for_backward(pre, theta, present)
        ctx.eps = eps
        return (present & (pre > theta)).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta, present = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            k = _kernel(pre, theta, present, ctx.eps)
            grad_theta = (-grad.to(k.dtype) * k).to(theta.dtype)
        return None, grad_theta, None, None


def jumprelu_reference(x, W_enc, b_enc, threshold, bandwidth, b_dec=None):
    """(code [N, M], l0 [N]) from the dense pre-activations with the pseudo-derivatives written as
    straight-through terms whose value is 0: the specification ``jumprelu_encode`` is tested against."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    theta = threshold.to(x.dtype).to(pre.dtype).expand(pre.shape[1])
    above = pre > theta
    kernel = ((pre - theta).abs() < bandwidth / 2).to(pre.dtype) / bandwidth
    lift = theta.detach() - theta  # value 0, derivative -1 in theta
    code = torch.where(above, pre, 0) + theta.detach() * kernel * lift
    l0 = above.to(pre.dtype).sum(1) + (kernel * lift).sum(1)
    return code, l0.to(checks.accumulation_dtype(x.dtype))
