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
