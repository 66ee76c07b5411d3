"""Subspace projection: U (U^T G), or its complement G - U (U^T G), for U with orthonormal columns.

The op behind SAE-feature subspace finetuning (SAILS): a weight update whose output
side must stay inside span(U) is projected with it, from a gradient hook or right
after an optimizer step. The CPU kernel and Triton's fused kernel (r <= 128) compute
U^T G one block of columns at a time and write that block's result before moving on,
so G is read from memory once and temporaries are per block; the CUDA kernels and
Triton's path for larger r keep U^T G in a float32 [r, n] scratch buffer instead.
"""

import torch

from . import checks
from .checks import FLOAT_DTYPES, GPU_DTYPES, accumulation_dtype
from .registry import define

MODULE = __name__.rsplit(".", 1)[-1]


def project_subspace(G, U, complement=False, *, check=False):
    """The projection of the columns of G onto span(U), or onto its orthogonal complement.

    Args:
        G: [d, n] matrix, e.g. the gradient of an ``nn.Linear`` weight [out_features,
            in_features] whose output side is projected (d = out_features); float32,
            bfloat16, float16 or float64; any strides.
        U: [d, r] with orthonormal columns (1 <= r <= d); dtype and device of G.
        complement: False: ``U (U^T G)``; True: ``G - U (U^T G)``.
        check: verify that U has orthonormal columns first (costs O(d r^2) and a sync):
            True for the tolerance of U's dtype (:func:`default_orthonormality_tolerance`),
            or a float tolerance; raises ``ValueError`` with the measured max |U^T U - I|.

    Returns:
        [d, n] contiguous, dtype of G, accumulated in float32 (float64 for float64).
        Without the check, any U is accepted and the formula is applied as written.

    Differentiable in G (the same projection of the incoming gradient: P is symmetric)
    and in U. Projection and complement sum to G, the projection is idempotent, and
    the complement is orthogonal to span(U), up to rounding.
    """
    checks.tensors(("G", G), ("U", U))
    if check is not False:
        check_orthonormal(U, None if check is True else float(check))
    return _project(G, U, bool(complement))


def project_subspace_(G, U, complement=False, *, check=False):
    """:func:`project_subspace` written into G (which is returned), without another [d, n] buffer.

    For gradients and updates, e.g. ``project_subspace_(p.grad, U)`` before an optimizer
    step, or on ``delta = p - p0`` after one (then ``p.copy_(p0 + delta)``, as
    :class:`ssae_kernels.recipes.subspace.ProjectedGradient` does). Not differentiable: G must
    not require grad while autograd records (call it under ``torch.no_grad()``).
    G must not have overlapping elements (an ``expand``-ed view).
    """
    checks.tensors(("G", G), ("U", U))
    if G.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("project_subspace_ overwrites G and is not differentiable: G requires grad here; "
                           "use project_subspace (out of place) or call it under torch.no_grad()")
    if check is not False:
        check_orthonormal(U, None if check is True else float(check))
    _project_(G, U, bool(complement))
    return G


def default_orthonormality_tolerance(dtype: torch.dtype) -> float:
    # Rounding an exact orthonormal basis to the dtype leaves max |U^T U - I| up to 3e-3
    # (bfloat16) and 4e-4 (float16) (measured, d = 20 ... 4096); a float32 QR gives < 1e-6.
    # The check exists to catch bases that are not orthonormal at all (errors of 0.1-1).
    return {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-4)


def orthonormality_error(U) -> float:
    """max |U^T U - I|, computed in float64."""
    u = U.detach().double()
    gram = u.T @ u
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)).abs().max())


def check_orthonormal(U, atol=None):
    """Raises ValueError unless max |U^T U - I| <= atol (default: by dtype, see above)."""
    checks.tensor(U, "U", 2, "[d, r]")
    checks.floating(U, "U")
    if U.shape[1] > U.shape[0]:
        raise ValueError(f"U [d, r] has r = {U.shape[1]} > d = {U.shape[0]} columns: they cannot be orthonormal")
    tol = default_orthonormality_tolerance(U.dtype) if atol is None else atol
    error = orthonormality_error(U)
    if not error <= tol:  # also catches NaN
        raise ValueError(f"U must have orthonormal columns: max |U^T U - I| = {error:.3g} exceeds {tol:.3g} "
                         "(orthonormalise it first, e.g. torch.linalg.qr(U).Q)")


def reference(G, U, complement=False):
    """U (U^T G), or G - U (U^T G) with complement, in the accumulation dtype. [d, n].

    The projection onto span(U) when U [d, r] has orthonormal columns; the formula is
    evaluated as written for any U.
    """
    acc = accumulation_dtype(G.dtype)
    g, u = G.to(acc), U.to(acc)
    p = u @ (u.T @ g)
    return (g - p if complement else p).to(G.dtype)


def reference_(G, U, complement=False):
    """project_subspace written into G."""
    G.copy_(reference(G, U, complement))


def _check(G, U, complement=False):
    checks.tensor(G, "G", 2, "[d, n]")
    checks.tensor(U, "U", 2, "[d, r]")
    checks.floating(G, "G")
    checks.like(U, G, "U", "G")
    torch._check_type(isinstance(complement, bool),
                      lambda: f"complement must be a bool, got {type(complement).__name__}")
    d, r = U.shape
    checks.same_size(G.shape[0], d, "G.shape[0] must equal U.shape[0] (d)")
    torch._check_value(r >= 1, lambda: f"U must have at least one column, got shape {tuple(U.shape)}")
    torch._check_value(r <= d, lambda: f"U [d, r] must have r <= d (orthonormal columns), got shape {tuple(U.shape)}")


def _check_inplace(G, U, complement=False):
    _check(G, U, complement)
    # Writing an expanded view would race: several elements share one memory location.
    torch._check_value(torch._debug_has_internal_overlap(G) != 1,
                       lambda: "G has overlapping elements (an expanded view); project_subspace_ cannot write it")


def _setup_context(ctx, inputs, output):
    G, U, complement = (*inputs, False)[:3]  # complement may be omitted (a trailing default)
    ctx.complement = complement
    ctx.save_for_backward(G if ctx.needs_input_grad[1] else None, U)


def _backward(ctx, grad):
    G, U = ctx.saved_tensors
    need_G, need_U = ctx.needs_input_grad[:2]
    # P = U U^T is symmetric, so the gradient in G is the same projection of grad.
    grad_G = _project(grad, U, ctx.complement) if need_G else None
    grad_U = None
    if need_U:
        # d <grad, U U^T G> / dU = grad (G^T U) + G (grad^T U); the complement negates it.
        acc = accumulation_dtype(G.dtype)
        g, u, x = grad.to(acc), U.to(acc), G.to(acc)
        grad_U = g @ (x.T @ u) + x @ (g.T @ u)
        grad_U = (-grad_U if ctx.complement else grad_U).to(U.dtype)
    return grad_G, grad_U, None


define("project_subspace", "(Tensor G, Tensor U, bool complement=False) -> Tensor",
       module=MODULE, check=_check, fake=lambda G, U, complement=False: G.new_empty(G.shape), reference=reference,
       dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
       backward=_backward, setup_context=_setup_context)
# The in-place form overwrites G (not differentiable).
define("project_subspace_", "(Tensor(a!) G, Tensor U, bool complement=False) -> ()",
       module=MODULE, check=_check_inplace, fake=lambda G, U, complement=False: None, reference=reference_,
       dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES})
_project = torch.ops.ssae.project_subspace.default
_project_ = torch.ops.ssae.project_subspace_.default
