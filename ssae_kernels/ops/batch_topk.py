"""BatchTopK (Bussmann et al. 2024): the N * k largest ReLU'd pre-activations of a whole batch, without the
N x M pre-activation matrix, built on the fused per-row ``topk_encode``."""

import torch

from . import checks
from .topk_encode import pre_activations, topk_encode


def batch_topk_encode(x, W_enc, b_enc, k, max_k, *, b_dec=None):
    """The ``N * k`` largest of ``ReLU(pre)`` over the whole batch, as a per-row sparse code.

    Rows share the budget: one row may keep many latents and another none. The selection is exact.
    Each row's candidates are its largest pre-activations from :func:`topk_encode` (``max(max_k, 2k)``
    of them); the batch threshold is the ``N * k``-th largest candidate, and a row whose last
    candidate still reaches it is encoded again with twice as many, until none does. So the extra
    memory is O(N * width) for the widest candidate list needed, never N x M unless a row must keep
    nearly every latent.

    Args:
        x, W_enc, b_enc, b_dec: as :func:`topk_encode`.
        k: the average number of latents per row, a Python int with 1 <= k <= M.
        max_k: the most latents returned per row, a Python int with 1 <= max_k <= M.

    Returns:
        values: [N, max_k], dtype of x: the selected ``ReLU(pre)``, largest first; 0 past a row's count.
        indices: [N, max_k] int64 (0 past a row's count).
        counts: [N] int64, how many latents of each row the batch selection took, before the cap
            (``counts > max_k``: the row lost some); entries equal to 0 are never counted.
        threshold: 0-d float tensor, the ``N * k``-th largest ``ReLU(pre)`` of the batch.

    Equal values are taken in row-major order (lower row, then lower latent) and NaN ranks above every
    number, as in :func:`topk_encode`. Differentiable in x, W_enc, b_enc and b_dec (through the
    kept entries, as ``topk_encode``).
    """
    checks.tensors(("x", x), ("W_enc", W_enc), ("b_enc", b_enc, None), ("b_dec", b_dec, None))
    checks.integer(k, "k")
    checks.integer(max_k, "max_k")
    checks.tensor(x, "x", 2, "[N, d]")
    checks.tensor(W_enc, "W_enc", 2, "[M, d]")
    N, M = x.shape[0], W_enc.shape[0]
    torch._check_value(1 <= k <= M, lambda: f"k must be in [1, M] with M = W_enc.shape[0] = {M}, got {k}")
    torch._check_value(1 <= max_k <= M, lambda: f"max_k must be in [1, M] with M = W_enc.shape[0] = {M}, got {max_k}")
    budget = N * k

    width = min(M, max(max_k, 2 * k))
    values, indices = topk_encode(x, W_enc, b_enc, width, b_dec=b_dec)
    key = _key(values)
    while True:
        threshold = key.flatten().topk(budget).values[-1]
        last = key[:, -1]
        # A row may hold more entries that reach the threshold (or, with a threshold of 0, more positive ones).
        short = (last >= threshold) & (last > 0) if width < M else torch.zeros_like(last, dtype=torch.bool)
        if not bool(short.any()):
            break
        rows = short.nonzero().squeeze(1)
        wider = min(M, 2 * width)
        more_values, more_indices = topk_encode(x[rows], W_enc, b_enc, wider, b_dec=b_dec)
        pad = wider - width
        values = torch.nn.functional.pad(values, (0, pad)).index_put((rows,), more_values)
        indices = torch.nn.functional.pad(indices, (0, pad)).index_put((rows,), more_indices)
        key = torch.nn.functional.pad(key, (0, pad), value=float("-inf")).index_put((rows,), _key(more_values))
        width = wider

    # Everything above the threshold, then ties at it in row-major order up to the budget; never zeros.
    greater = key > threshold
    ties = key == threshold
    tie_rank = ties.flatten().cumsum(0).view_as(ties)
    take = (greater | (ties & (tie_rank <= budget - greater.sum()))) & (key > 0)
    counts = take.sum(1)
    # Within a row the taken entries are a prefix of its descending candidates.
    filled = torch.arange(max_k, device=x.device) < counts.unsqueeze(1)
    out_values = torch.where(filled, values[:, :max_k], torch.zeros((), dtype=values.dtype, device=x.device))
    out_indices = torch.where(filled, indices[:, :max_k], 0)
    return out_values, out_indices, counts, threshold


def _key(values):
    """The selection key of ReLU'd values: NaN (ranked first by topk_encode) as +inf."""
    return torch.nan_to_num(values.detach().float(), nan=float("inf"), posinf=float("inf"))


def batch_topk_reference(x, W_enc, b_enc, k, max_k, b_dec=None):
    """batch_topk_encode from the dense pre-activations: the specification."""
    N, M = x.shape[0], W_enc.shape[0]
    relu = torch.relu(pre_activations(x, W_enc, b_enc, b_dec))
    key = torch.nan_to_num(relu.detach().float(), nan=float("inf"), posinf=float("inf"))
    flat = torch.sort(key.flatten(), descending=True, stable=True)  # ties in row-major order
    take = torch.zeros(N * M, dtype=torch.bool, device=x.device)
    take[flat.indices[: N * k]] = True
    take = take.view(N, M) & (key > 0)
    counts = take.sum(1)
    ranked = torch.sort(torch.where(take, key, float("-inf")), dim=1, descending=True, stable=True)
    filled = torch.arange(max_k, device=x.device) < counts.unsqueeze(1)
    idx = ranked.indices[:, :max_k]
    values = torch.where(filled, relu.gather(1, idx), 0).to(x.dtype)
    return values, torch.where(filled, idx, 0), counts, flat.values[N * k - 1]
