"""TERM (tilted empirical risk) reductions and the fused squared-error losses built on them.

``tilted_loss(losses, t) = (1/t) log((1/N) sum_i exp(t * losses_i))``: the mean at
t = 0, the max as t -> +inf, the min as t -> -inf; its gradient weights are
``softmax(t * losses)``. A backend supplies one O(N) reduction,
``tilted_group_stats`` (an online log-sum-exp per group in float64, merged
across threads or blocks); everything after it is O(number of groups).
"""

import math

import torch

from . import checks
from .checks import FLOAT_DTYPES, GPU_DTYPES, accumulation_dtype
from .registry import define
from .sparse_backward import latent_index, strided_weight_limits
from .sparse_decode import check as _check_decode

MODULE = __name__.rsplit(".", 1)[-1]


def tilted_loss(losses, t, *, groups=None, t_group=None, num_groups=None):
    """Tilted mean of ``losses``.

    Args:
        losses: [N] per-sample losses (N >= 1), float32/float64/bfloat16/float16.
        t: tilt. 0 gives exactly the mean; large positive t approaches the max
            (t = 1e9 is the max up to log(N)/t), negative t the min.
        groups: optional [N] int64 group ids >= 0 for hierarchical TERM: t tilts
            inside each group, ``t_group`` (default 0: the size-weighted mean)
            across the group risks, each group weighted by its size.
        num_groups: number of group ids (default ``groups.max() + 1``; pass it to
            avoid a device sync or a graph break under torch.compile).

    Returns a scalar of the dtype of losses, computed in float64. Differentiable;
    the backward pass is O(N) (softmax weights), with no N x N or N x groups temporaries.
    """
    checks.tensors(("losses", losses))
    return _tilted_loss(losses, checks.real(t, "t"), groups, *_group_args(groups, t_group, num_groups))


def tilted_mse(x_hat, x, t=0.0, *, groups=None, t_group=None, num_groups=None):
    """``tilted_loss`` of the per-row squared errors ``sum_d (x_hat - x)^2``, in one pass over x_hat and x.

    x_hat and x are [N, d] of one dtype; errors are accumulated in float32 (float64).
    Differentiable in x_hat and x. Returns a float32 (float64) scalar.
    """
    t = checks.real(t, "t")
    checks.tensors(("x_hat", x_hat), ("x", x))
    errors = torch.ops.ssae.row_sq_error.default(x_hat, x)
    return _tilted_loss(errors, t, groups, *_group_args(groups, t_group, num_groups))


def sparse_decode_mse(values, indices, W_dec, b_dec, x, *, t=0.0, groups=None, t_group=None, num_groups=None):
    """``tilted_mse(sparse_decode(values, indices, W_dec, b_dec), x, t)`` without storing x_hat.

    The forward pass decodes each row into a per-thread buffer and keeps only its
    squared error (no [N, d] tensor); the backward pass recomputes the residual.
    Differentiable in values, W_dec, b_dec and x. Returns a float32 (float64) scalar.
    """
    t = checks.real(t, "t")
    checks.tensors(("values", values), ("indices", indices), ("W_dec", W_dec), ("b_dec", b_dec, None), ("x", x))
    errors = torch.ops.ssae.sparse_decode_sq_error.default(values, indices, W_dec, b_dec, x)
    return _tilted_loss(errors, t, groups, *_group_args(groups, t_group, num_groups))


def _group_args(groups, t_group, num_groups):
    t_group = 0.0 if t_group is None else checks.real(t_group, "t_group")
    if num_groups is not None:
        checks.integer(num_groups, "num_groups")
    if groups is None:
        if t_group != 0:
            raise ValueError("t_group needs groups")
        if num_groups not in (None, 1):
            raise ValueError(f"num_groups needs groups (got num_groups={num_groups})")
        return 1, 0.0
    if not isinstance(groups, torch.Tensor) or groups.dtype != torch.int64:
        raise TypeError(f"groups must be an int64 tensor, got {getattr(groups, 'dtype', type(groups).__name__)}")
    if groups.numel() == 0:
        raise ValueError("groups must not be empty")
    if num_groups is None:
        if int(groups.min()) < 0:
            raise ValueError(f"groups must be >= 0, got {int(groups.min())}")
        num_groups = int(groups.max()) + 1
    return num_groups, t_group


# ---- the reduction op --------------------------------------------------------------


def _segment_sum(values, groups, num_groups):
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)


def tilted_group_stats_reference(losses, t, groups, num_groups):
    """(anchor, log_mean, count) per group, float64: R_g = anchor + log_mean / t (anchor = mean if t == 0).

    anchor is the group's loss maximising t * loss and
    log_mean = log1p(mean(expm1(t * (loss - anchor)))), exact for tiny and huge |t| alike;
    empty groups get zeros. Differentiable in losses (through log_mean, or the mean at t == 0).
    """
    l = losses.double()
    g = torch.zeros_like(l, dtype=torch.int64) if groups is None else groups
    count = torch.bincount(g, minlength=num_groups)
    n = count.clamp_min(1)
    if t == 0:
        return _segment_sum(l, g, num_groups) / n, torch.zeros(num_groups, dtype=torch.float64, device=l.device), count
    top = torch.full((num_groups,), float("-inf"), dtype=torch.float64, device=l.device)
    top = top.scatter_reduce(0, g, (t * l).detach(), reduce="amax")
    anchor = torch.where(count > 0, top / t, 0.0)
    log_mean = torch.log1p(_segment_sum(torch.expm1(t * (l - anchor[g])), g, num_groups) / n)
    return anchor, torch.where(count > 0, log_mean, 0.0), count


def tilted_loss_reference(losses, t, groups=None, num_groups=1, t_group=0.0):
    """TERM: (1/t) log mean exp(t * losses); the mean at t == 0.

    With groups (int64 ids in [0, num_groups)), t tilts inside each group and
    t_group across the group risks, weighted by group size (empty groups drop
    out). Computed in float64, returned in the dtype of losses.
    """
    anchor, log_mean, count = tilted_group_stats_reference(losses, t, groups, num_groups)
    risk = anchor if t == 0 else anchor + log_mean / t
    present = count > 0
    risk, weight = risk[present], count[present].double() / count.sum()
    if t_group == 0:
        total = (weight * risk).sum()
    else:
        top = risk[torch.argmax(t_group * risk.detach())].detach()
        total = top + torch.log1p((weight * torch.expm1(t_group * (risk - top))).sum()) / t_group
    return total.to(losses.dtype)


def _check_losses(losses, t, groups, num_groups):
    checks.tensor(losses, "losses", 1, "[N]")
    checks.floating(losses, "losses")
    torch._check_value(losses.shape[0] >= 1, lambda: "losses must not be empty")
    torch._check_type(isinstance(t, float), lambda: f"t must be a float, got {type(t).__name__}")
    torch._check_value(math.isfinite(t), lambda: f"t must be finite, got {t}")
    checks.integer(num_groups, "num_groups")
    torch._check_value(num_groups >= 1, lambda: f"num_groups must be >= 1, got {num_groups}")
    if groups is None:
        torch._check_value(num_groups == 1, lambda: f"num_groups must be 1 without groups, got {num_groups}")
    else:
        checks.tensor(groups, "groups", 1, "[N]")
        checks.indices(groups, "groups", losses, "losses")
        checks.same_size(groups.shape[0], losses.shape[0], "groups must have one id per loss")
        checks.index_range(groups, num_groups, "groups")


def _check_tilted_loss(losses, t, groups, num_groups, t_group):
    _check_losses(losses, t, groups, num_groups)
    torch._check_value(math.isfinite(t_group), lambda: f"t_group must be finite, got {t_group}")


def _fake_group_stats(losses, t, groups, num_groups):
    stat = losses.new_empty(num_groups, dtype=torch.float64)
    return stat, stat.new_empty(num_groups), stat.new_empty(num_groups, dtype=torch.int64)


define("tilted_group_stats",
       "(Tensor losses, float t, Tensor? groups, int num_groups) -> (Tensor anchor, Tensor log_mean, Tensor count)",
       module=MODULE, check=_check_losses, fake=_fake_group_stats, reference=tilted_group_stats_reference,
       dtypes={"cpu": FLOAT_DTYPES, "triton": FLOAT_DTYPES, "cuda": GPU_DTYPES},  # triton's kernel works in float64
       limits={"cuda": lambda losses, t, groups, num_groups:
               f"num_groups must be < 2^31 on the cuda backend, got {num_groups}" if num_groups >= 2**31 else None})


def _risks(losses, t, groups, num_groups, t_group):
    """Per-group stats, the total risk, and each group's log gradient weight t_group (R_g - R), float64."""
    anchor, log_mean, count = torch.ops.ssae.tilted_group_stats.default(losses, t, groups, num_groups)
    risk = anchor if t == 0 else anchor + log_mean / t
    weight = count.double() / losses.shape[0]  # empty groups weigh 0
    if t_group == 0:
        return anchor, log_mean, (weight * risk).sum(), torch.zeros_like(risk)
    best = torch.argmax(torch.where(count > 0, t_group * risk, float("-inf")))
    top = risk.gather(0, best.reshape(1)).squeeze(0)  # (tensor indexing would sync under tracing)
    log_total = torch.log1p((weight * torch.expm1(t_group * (risk - top))).sum())
    # t_group (R_g - R) written without subtracting the nearly equal R_g and R
    # (at t_group = 1e9 that difference would lose 7 digits)
    return anchor, log_mean, top + log_total / t_group, t_group * (risk - top) - log_total


def _tilted_loss_kernel(losses, t, groups=None, num_groups=1, t_group=0.0):
    _check_tilted_loss(losses, t, groups, num_groups, t_group)
    return _risks(losses, t, groups, num_groups, t_group)[2].to(losses.dtype)


def _setup_tilted(ctx, inputs, output):
    losses, t, groups, num_groups, t_group = inputs
    ctx.save_for_backward(losses, groups)
    ctx.args = (t, num_groups, t_group)


def _backward_tilted(ctx, grad):
    losses, groups = ctx.saved_tensors
    t, num_groups, t_group = ctx.args
    # The O(N) statistics are recomputed rather than saved: one more pass over N floats.
    anchor, log_mean, _, group_log_weight = _risks(losses, t, groups, num_groups, t_group)
    g = torch.zeros_like(losses, dtype=torch.int64) if groups is None else groups
    # d R / d loss_i = exp(t_group (R_g - R)) / N * exp(t (loss_i - anchor_g) - log_mean_g)
    inner = t * (losses.double() - anchor[g]) - log_mean[g] if t != 0 else 0.0
    weights = torch.exp(group_log_weight[g] + inner) / losses.shape[0]
    return (grad.double() * weights).to(losses.dtype), None, None, None, None


# A composite: the backend-specific work is the tilted_group_stats it calls.
define("tilted_loss", "(Tensor losses, float t, Tensor? groups, int num_groups, float t_group) -> Tensor",
       module=MODULE, check=_check_tilted_loss, fake=lambda losses, *rest: losses.new_empty(()),
       reference=tilted_loss_reference, dtypes={}, composite=_tilted_loss_kernel,
       backward=_backward_tilted, setup_context=_setup_tilted)
_tilted_loss = torch.ops.ssae.tilted_loss.default


# ---- per-row squared errors ----------------------------------------------------------


def row_sq_error_reference(x_hat, x):
    """sum_d (x_hat - x)^2 per row, in the accumulation dtype. [N]."""
    acc = accumulation_dtype(x_hat.dtype)
    return ((x_hat.to(acc) - x.to(acc)) ** 2).sum(1)


def _check_row_sq_error(x_hat, x):
    checks.tensor(x_hat, "x_hat", 2, "[N, d]")
    checks.tensor(x, "x", 2, "[N, d]")
    checks.floating(x_hat, "x_hat")
    checks.like(x, x_hat, "x", "x_hat")
    checks.same_size(tuple(x.shape), tuple(x_hat.shape), "x must have the shape of x_hat")


def _setup_row_sq_error(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_row_sq_error(ctx, grad):
    x_hat, x = ctx.saved_tensors
    g = (2 * grad[:, None] * (x_hat.to(grad.dtype) - x.to(grad.dtype))).to(x_hat.dtype)
    need_x_hat, need_x = ctx.needs_input_grad
    return g if need_x_hat else None, -g if need_x else None


define("row_sq_error", "(Tensor x_hat, Tensor x) -> Tensor",
       module=MODULE, check=_check_row_sq_error, reference=row_sq_error_reference,
       fake=lambda x_hat, x: x_hat.new_empty(x_hat.shape[0], dtype=accumulation_dtype(x_hat.dtype)),
       dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
       backward=_backward_row_sq_error, setup_context=_setup_row_sq_error)


def _decode_rows(values, indices, W_dec, b_dec):
    """(x_hat, gathered W_dec rows) in the accumulation dtype."""
    acc = accumulation_dtype(values.dtype)
    rows = W_dec.to(acc)[indices]
    x_hat = torch.einsum("nk,nkd->nd", values.to(acc), rows)
    return (x_hat if b_dec is None else x_hat + b_dec.to(acc)), rows


def sparse_decode_sq_error_reference(values, indices, W_dec, b_dec, x):
    """Per-row squared error of the decode (not rounded to the storage dtype first). [N]."""
    x_hat, _ = _decode_rows(values, indices, W_dec, b_dec)
    return ((x_hat - x.to(x_hat.dtype)) ** 2).sum(1)


def _check_sparse_decode_sq_error(values, indices, W_dec, b_dec, x):
    _check_decode(values, indices, W_dec, b_dec)
    checks.tensor(x, "x", 2, "[N, d]")
    checks.like(x, values, "x", "values")
    checks.same_size(tuple(x.shape), (values.shape[0], W_dec.shape[1]), "x must be [N, d]")


def _setup_decode_sq_error(ctx, inputs, output):
    values, indices, W_dec, b_dec, x = inputs
    ctx.save_for_backward(values, indices, W_dec, b_dec, x)


def _backward_decode_sq_error(ctx, grad):
    values, indices, W_dec, b_dec, x = ctx.saved_tensors
    need_values, _, need_W, need_b, need_x = ctx.needs_input_grad
    # d error_n / d x_hat_n = 2 (x_hat_n - x_n): one pass over each row's W_dec rows
    # re-decodes it and dots the scaled residual with the same (cached) rows.
    residual, grad_values = torch.ops.ssae.sparse_decode_residual.default(values, indices, W_dec, b_dec, x, 2 * grad)
    grad_W = None
    if need_W:
        offsets, order = latent_index(indices, W_dec.shape[0])
        grad_W = torch.ops.ssae.sparse_transpose_matmul.default(values, residual, offsets, order)[0]
    grad_b = residual.sum(0) if need_b else None
    return grad_values if need_values else None, None, grad_W, grad_b, -residual if need_x else None


define("sparse_decode_sq_error", "(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec, Tensor x) -> Tensor",
       module=MODULE, check=_check_sparse_decode_sq_error, reference=sparse_decode_sq_error_reference,
       fake=lambda values, *rest: values.new_empty(values.shape[0], dtype=accumulation_dtype(values.dtype)),
       dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
       limits=strided_weight_limits(2, "W_dec"),  # the GPU backends read W_dec in place (sparse_decode)
       backward=_backward_decode_sq_error, setup_context=_setup_decode_sq_error)


def sparse_decode_residual_reference(values, indices, W_dec, b_dec, x, scale):
    """(residual [N, d], grad_values [N, k]), both of the dtype of values.

    residual[n] = scale[n] * (x_hat[n] - x[n]) with x_hat the decode; grad_values[n, j] =
    residual[n] . W_dec[indices[n, j]], dotted with the residual before it is rounded.
    """
    x_hat, rows = _decode_rows(values, indices, W_dec, b_dec)
    residual = scale.to(x_hat.dtype)[:, None] * (x_hat - x.to(x_hat.dtype))
    grad_values = torch.einsum("nd,nkd->nk", residual, rows)
    return residual.to(values.dtype), grad_values.to(values.dtype)


def _check_sparse_decode_residual(values, indices, W_dec, b_dec, x, scale):
    _check_sparse_decode_sq_error(values, indices, W_dec, b_dec, x)
    checks.tensor(scale, "scale", 1, "[N]")
    acc = accumulation_dtype(values.dtype)
    torch._check_type(scale.dtype == acc,
                      lambda: f"scale must be {acc} (the accumulation dtype of values {values.dtype}), got {scale.dtype}")
    torch._check_value(scale.device == values.device,
                       lambda: f"scale is on {scale.device} but values is on {values.device}")
    checks.same_size(scale.shape[0], values.shape[0], "scale must have one entry per row of values")


# The backward primitive of sparse_decode_sq_error: (residual, grad_values) with
# residual[n] = scale[n] (x_hat[n] - x[n]) and grad_values[n, j] = residual[n] . W_dec[indices[n, j]],
# both from one gather of each row's k W_dec rows (the unrounded residual is dotted).
define("sparse_decode_residual",
       "(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec, Tensor x, Tensor scale) "
       "-> (Tensor residual, Tensor grad_values)",
       module=MODULE, check=_check_sparse_decode_residual, reference=sparse_decode_residual_reference,
       fake=lambda values, indices, W_dec, *rest: (values.new_empty(values.shape[0], W_dec.shape[1]),
                                                   values.new_empty(values.shape)),
       dtypes={"cpu": FLOAT_DTYPES, "triton": GPU_DTYPES, "cuda": GPU_DTYPES},
       limits=strided_weight_limits(2, "W_dec"))


# ---- streaming TERM -------------------------------------------------------------------


class StreamingTERM:
    """TERM for minibatch training: a running estimate of the tilted normalizer.

    TERM's stochastic form keeps ``log_norm ~ log E[exp(t * loss)]`` as an
    exponential moving average (decay ``lam``) over minibatches, and weights
    each sample by ``exp(t * loss_i - log_norm)``. Calling the object on a
    batch of per-sample losses updates the estimate and returns the weighted
    mean loss to backpropagate; ``risk`` is the current estimate of the tilted
    risk, ``log_norm / t``. Checkpoint it with ``state_dict()``.
    """

    def __init__(self, t: float, lam: float = 0.1):
        if not 0 < lam <= 1:
            raise ValueError(f"lam must be in (0, 1], got {lam}")
        self.t, self.lam = float(t), float(lam)
        self.log_norm = None  # float, set by the first batch

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """Updates the normalizer with this batch and returns its per-sample weights (no grad)."""
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"losses must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
        scaled = self.t * losses.detach().double()
        if self.t == 0:
            return torch.ones_like(losses)
        batch = float(torch.logsumexp(scaled, 0)) - math.log(losses.numel())
        if self.log_norm is None:
            self.log_norm = batch
        else:  # log((1 - lam) exp(log_norm) + lam exp(batch))
            self.log_norm = float(torch.logaddexp(torch.tensor(math.log1p(-self.lam) + self.log_norm if self.lam < 1 else float("-inf")),
                                                  torch.tensor(math.log(self.lam) + batch)))
        return torch.exp(scaled - self.log_norm).to(losses.dtype)

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.weights(losses) * losses).mean()

    @property
    def risk(self):
        return None if self.log_norm is None or self.t == 0 else self.log_norm / self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "lam": self.lam, "log_norm": self.log_norm}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.lam, self.log_norm = float(state["t"]), float(state["lam"]), state["log_norm"]
