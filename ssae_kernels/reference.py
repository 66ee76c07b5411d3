"""Pure-PyTorch definitions of every op: the specification the kernels are tested against.

Written for clarity, not speed: they materialise the dense N x M
pre-activations and the N x k x d gathered rows. Accumulation is float32 for
float32/bfloat16/float16 inputs and float64 for float64, as in every backend.
Gradients come from PyTorch autograd through these formulas.
"""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pre_activations(x, W_enc, b_enc, b_dec=None):
    """pre[n, m] = (x[n] - b_dec) . W_enc[m] + b_enc[m], in the accumulation dtype. [N, M]."""
    acc = accumulation_dtype(x.dtype)
    xc = x.to(acc) if b_dec is None else x.to(acc) - b_dec.to(acc)
    return xc @ W_enc.to(acc).T + b_enc.to(acc)


def topk_encode(x, W_enc, b_enc, k, b_dec=None):
    """(values, indices): the k largest pre-activations of each row, descending, ties to the lower index."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    # A stable descending sort keeps equal scores in index order; NaN sorts first.
    ranked = torch.sort(pre, dim=1, descending=True, stable=True)
    return torch.relu(ranked.values[:, :k]).to(x.dtype).contiguous(), ranked.indices[:, :k].contiguous()


def sparse_decode(values, indices, W_dec, b_dec=None):
    """x_hat[n] = b_dec + sum_j values[n, j] * W_dec[indices[n, j]]. [N, d]."""
    acc = accumulation_dtype(values.dtype)
    out = torch.einsum("nk,nkd->nd", values.to(acc), W_dec.to(acc)[indices])
    if b_dec is not None:
        out = out + b_dec.to(acc)
    return out.to(values.dtype)


def sampled_dot(grad, indices, W):
    """out[n, j] = grad[n] . W[indices[n, j]]. [N, k]."""
    acc = accumulation_dtype(grad.dtype)
    return torch.einsum("nd,nkd->nk", grad.to(acc), W.to(acc)[indices]).to(grad.dtype)


def latent_transpose(indices, num_latents):
    """(offsets [M + 1], order [N * k]): entries p = n * k + j grouped by latent, ascending within a latent."""
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_latents)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return offsets, torch.argsort(flat, stable=True)


def sparse_transpose_matmul(weights, rows, offsets, order):
    """(out [M, d], colsum [M]): S^T rows and the column sums of S, S[n, latent] = weights[n, j]."""
    acc = accumulation_dtype(weights.dtype)
    num_latents, k = offsets.numel() - 1, weights.shape[1]
    latent = torch.repeat_interleave(torch.arange(num_latents, device=offsets.device), torch.diff(offsets))
    w = weights.reshape(-1)[order].to(acc)
    out = torch.zeros(num_latents, rows.shape[1], dtype=acc, device=rows.device)
    out.index_add_(0, latent, w[:, None] * rows.to(acc)[order // k])
    colsum = torch.zeros(num_latents, dtype=acc, device=rows.device).index_add_(0, latent, w)
    return out.to(rows.dtype), colsum.to(weights.dtype)


def _segment_sum(values, groups, num_groups):
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)


def tilted_group_stats(losses, t, groups, num_groups):
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


def tilted_loss(losses, t, groups=None, num_groups=1, t_group=0.0):
    """TERM: (1/t) log mean exp(t * losses); the mean at t == 0.

    With groups (int64 ids in [0, num_groups)), t tilts inside each group and
    t_group across the group risks, weighted by group size (empty groups drop
    out). Computed in float64, returned in the dtype of losses.
    """
    anchor, log_mean, count = tilted_group_stats(losses, t, groups, num_groups)
    risk = anchor if t == 0 else anchor + log_mean / t
    present = count > 0
    risk, weight = risk[present], count[present].double() / count.sum()
    if t_group == 0:
        total = (weight * risk).sum()
    else:
        top = risk[torch.argmax(t_group * risk.detach())].detach()
        total = top + torch.log1p((weight * torch.expm1(t_group * (risk - top))).sum()) / t_group
    return total.to(losses.dtype)


def row_sq_error(x_hat, x):
    """sum_d (x_hat - x)^2 per row, in the accumulation dtype. [N]."""
    acc = accumulation_dtype(x_hat.dtype)
    return ((x_hat.to(acc) - x.to(acc)) ** 2).sum(1)


def sparse_decode_sq_error(values, indices, W_dec, b_dec, x):
    """Per-row squared error of the decode (not rounded to the storage dtype first). [N]."""
    acc = accumulation_dtype(values.dtype)
    x_hat = torch.einsum("nk,nkd->nd", values.to(acc), W_dec.to(acc)[indices])
    if b_dec is not None:
        x_hat = x_hat + b_dec.to(acc)
    return ((x_hat - x.to(acc)) ** 2).sum(1)


def sparse_decode_residual(values, indices, W_dec, b_dec, x, scale):
    """(residual [N, d], grad_values [N, k]), both of the dtype of values.

    residual[n] = scale[n] * (x_hat[n] - x[n]) with x_hat the decode; grad_values[n, j] =
    residual[n] . W_dec[indices[n, j]], dotted with the residual before it is rounded.
    """
    acc = accumulation_dtype(values.dtype)
    rows = W_dec.to(acc)[indices]
    x_hat = torch.einsum("nk,nkd->nd", values.to(acc), rows)
    if b_dec is not None:
        x_hat = x_hat + b_dec.to(acc)
    residual = scale.to(acc)[:, None] * (x_hat - x.to(acc))
    grad_values = torch.einsum("nd,nkd->nk", residual, rows)
    return residual.to(values.dtype), grad_values.to(values.dtype)


def project_subspace(G, U, complement=False):
    """U (U^T G), or G - U (U^T G) with complement, in the accumulation dtype. [d, n].

    The projection onto span(U) when U [d, r] has orthonormal columns; the formula is
    evaluated as written for any U.
    """
    acc = accumulation_dtype(G.dtype)
    g, u = G.to(acc), U.to(acc)
    p = u @ (u.T @ g)
    return (g - p if complement else p).to(G.dtype)


def project_subspace_(G, U, complement=False):
    """project_subspace written into G."""
    G.copy_(project_subspace(G, U, complement))
