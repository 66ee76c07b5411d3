"""Adam on selected rows of a parameter, with the steps a row skipped applied first.

``sparse_adam_`` is the kernel behind :class:`ssae_kernels.optim.SparseAdam`: in a TopK
training step only the rows of the latents a batch selected have a gradient, and the
step reads and writes only those rows (plus their moments), once each.

A row that had no gradient for some steps is, under dense Adam, still moved by its
decaying moments on each of them. Those skipped steps are applied when the row is
next touched, from four numbers per row that the optimizer computes (``catchup``):

    p   -= drift * m / (sqrt(v) + eps_skip)     # the skipped steps' total movement
    m   *= decay1 ; v *= decay2                  # beta1^s, beta2^s for s skipped steps

then, when ``grad`` is given, the Adam update of this step (torch.optim.Adam's formula):

    m    = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2
    p   -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

Where m is zero the skipped steps move nothing (a row never touched has m = v = 0).

The moments may be held in bfloat16 beside a float32 parameter (half their memory). They are
computed in float32, the step uses them unrounded, and they are stored with stochastic rounding:
rounded up with probability equal to the value's distance from the bfloat16 below. With
round-to-nearest, v decaying by beta2 = 0.999 would round back to itself every step (a bfloat16
has 8 significant bits); stochastic rounding keeps every moment right in expectation. The random
bits of element (row, column) are a hash of (seed, step, row, column), the same in every backend
(``stochastic_bits``), so a run is reproducible and no generator state is checkpointed.
"""

import math
import os

import torch

from . import checks
from .registry import define

MODULE = __name__.rsplit(".", 1)[-1]
CATCHUP_FIELDS = ("drift", "decay1", "decay2", "eps_skip")
DTYPES = (torch.float32, torch.float64)
MASK32 = 0xFFFFFFFF


def sparse_adam_(param, exp_avg, exp_avg_sq, rows, grad, catchup, *, lr, beta1, beta2, eps, step, seed=0):
    """Adam on ``param[rows]`` in place, after catching each row up on the steps it skipped.

    Args:
        param, exp_avg, exp_avg_sq: [M, d] float32 or float64 (written in place; any strides,
            no overlapping elements). A 1-D parameter is passed as a ``[M, 1]`` view. The moments
            may instead be bfloat16 beside a float32 param (stored with stochastic rounding).
        rows: [R] int64, distinct, in [0, M): the rows to update.
        grad: [R, d] of param's dtype, the gradient of row ``rows[i]`` in ``grad[i]``;
            or None to apply only the catch-up (e.g. before a checkpoint).
        catchup: [R, 4] of param's dtype: per row (drift, decay1, decay2, eps_skip), see the
            module docstring; zeros and ones (0, 1, 1, 1) for a row that skipped nothing.
        lr, beta1, beta2, eps: Adam's hyperparameters for this step.
        step: this update's global step number (>= 1), for the bias corrections.
        seed: picks the stochastic rounding's random bits (with step, row and column); give each
            parameter its own. Unused when the moments have param's dtype.

    Rows not in ``rows`` are not read or written.
    """
    checks.tensors(("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("rows", rows),
                   ("grad", grad, None), ("catchup", catchup))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (param, exp_avg, exp_avg_sq)):
        raise RuntimeError("sparse_adam_ writes param and its moments in place and is not differentiable; "
                           "call it under torch.no_grad()")
    checks.integer(seed, "seed")
    _sparse_adam_(param, exp_avg, exp_avg_sq, rows, grad, catchup, checks.real(lr, "lr"),
                  checks.real(beta1, "beta1"), checks.real(beta2, "beta2"), checks.real(eps, "eps"), step, seed)


def _mix32(x):
    """Wellons' lowbias32 on int64 tensors holding uint32 values (kernels/stochastic_round.h's mix32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def stochastic_bits(seed: int, step: int, rows: torch.Tensor, d: int) -> torch.Tensor:
    """[R, d] int64: the 32 random bits of element (rows[i], column) in the call with (seed, step); the low 16
    round exp_avg, the high 16 exp_avg_sq."""
    key = _mix32(torch.tensor((seed * 0x9E3779B9 + step) & MASK32, dtype=torch.int64, device=rows.device))
    row_key = _mix32(key ^ (rows.to(torch.int64) & MASK32))
    return _mix32(row_key[:, None] ^ torch.arange(d, dtype=torch.int64, device=rows.device))


def round_stochastic_bf16(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounded up when (the 16 bits dropped) + random16 carries; infinities stay and NaN
    stays NaN."""
    u = x.view(torch.int32).to(torch.int64) & MASK32
    special = (u & 0x7F800000) == 0x7F800000
    bits = torch.where(special, u, u + random16) >> 16
    bits = torch.where(x.isnan(), (u >> 16) | 0x40, bits)
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(torch.bfloat16)  # uint16 -> int16 bit pattern


def reference_(param, exp_avg, exp_avg_sq, rows, grad, catchup, lr, beta1, beta2, eps, step, seed=0):
    """The formulas of the module docstring, row-gathered in the parameter's dtype."""
    p, m, v = param[rows], exp_avg[rows].to(param.dtype), exp_avg_sq[rows].to(param.dtype)
    drift, decay1, decay2, eps_skip = (catchup[:, i:i + 1] for i in range(4))
    p = p - torch.where(m == 0, 0.0, drift * m / (v.sqrt() + eps_skip))
    if grad is None:
        m, v = decay1 * m, decay2 * v
    else:
        m = beta1 * decay1 * m + (1 - beta1) * grad
        v = beta2 * decay2 * v + (1 - beta2) * grad * grad
        step_size = lr / (1 - beta1**step)
        p = p - step_size * m / (v.sqrt() / math.sqrt(1 - beta2**step) + eps)
    if exp_avg.dtype != param.dtype:
        bits = stochastic_bits(seed, step, rows, param.shape[1])
        m, v = round_stochastic_bf16(m, bits & 0xFFFF), round_stochastic_bf16(v, bits >> 16)
    param[rows], exp_avg[rows], exp_avg_sq[rows] = p, m, v


def check_distinct(rows):
    """ValueError when a row is listed twice (its update would be applied twice, or race). Checked where
    ``checks.index_range`` checks: always on CPU tensors, on GPU tensors when ``SSAE_CHECK_INDICES=1``."""
    if (rows.numel() < 2 or torch._subclasses.fake_tensor.is_fake(rows)
            or (rows.device.type != "cpu" and os.environ.get("SSAE_CHECK_INDICES") != "1")):
        return
    if torch.unique(rows).numel() != rows.numel():
        raise ValueError("rows must be distinct: a row listed twice would be updated twice")


def _check(param, exp_avg, exp_avg_sq, rows, grad, catchup, lr, beta1, beta2, eps, step, seed):
    checks.tensor(param, "param", 2, "[M, d]")
    torch._check_type(param.dtype in DTYPES, lambda: f"param must be float32 or float64, got {param.dtype}")
    for t, name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
        checks.tensor(t, name, 2, "[M, d]")
        checks.same_size(tuple(t.shape), tuple(param.shape), f"{name} must have the shape of param")
    # the moments: param's dtype, or bfloat16 beside a float32 param (both the same, on param's device)
    checks.like(exp_avg_sq, exp_avg, "exp_avg_sq", "exp_avg")
    torch._check_value(exp_avg.device == param.device,
                       lambda: f"exp_avg is on {exp_avg.device} but param is on {param.device}")
    torch._check_type(exp_avg.dtype == param.dtype or (exp_avg.dtype == torch.bfloat16 and param.dtype == torch.float32),
                      lambda: f"exp_avg and exp_avg_sq must have param's dtype (or bfloat16 with a float32 param), "
                              f"got {exp_avg.dtype} with param {param.dtype}")
    checks.tensor(rows, "rows", 1, "[R]")
    checks.indices(rows, "rows", param, "param")
    R, d = rows.shape[0], param.shape[1]
    checks.tensor(grad, "grad", 2, "[R, d]", optional=True)
    if grad is not None:
        checks.like(grad, param, "grad", "param")
        checks.same_size(tuple(grad.shape), (R, d), "grad must be [R, d] (R = rows.shape[0], d = param.shape[1])")
    checks.tensor(catchup, "catchup", 2, "[R, 4]")
    checks.like(catchup, param, "catchup", "param")
    checks.same_size(tuple(catchup.shape), (R, 4), "catchup must be [R, 4] (drift, decay1, decay2, eps_skip)")
    torch._check_value(lr >= 0 and math.isfinite(lr), lambda: f"lr must be finite and >= 0, got {lr}")
    for value, name in ((beta1, "beta1"), (beta2, "beta2")):
        torch._check_value(0 <= value < 1, lambda: f"{name} must be in [0, 1), got {value}")
    torch._check_value(eps >= 0 and math.isfinite(eps), lambda: f"eps must be finite and >= 0, got {eps}")
    checks.integer(step, "step")
    torch._check_value(step >= 1, lambda: f"step must be >= 1, got {step}")
    checks.integer(seed, "seed")
    for t, name in ((param, "param"), (exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
        torch._check_value(torch._debug_has_internal_overlap(t) != 1,
                           lambda: f"{name} has overlapping elements (an expanded view); sparse_adam_ cannot write it")
    checks.index_range(rows, param.shape[0], "rows")
    check_distinct(rows)


define("sparse_adam_",
       "(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor? grad, Tensor catchup, "
       "float lr, float beta1, float beta2, float eps, int step, int seed=0) -> ()",
       module=MODULE, check=_check, fake=lambda *args: None, reference=reference_,
       dtypes={"cpu": DTYPES, "triton": (torch.float32,), "cuda": (torch.float32,)})
_sparse_adam_ = torch.ops.ssae.sparse_adam_.default
