"""The encode and decode of a dictionary whose latents are sharded across the ranks of a torch.distributed
group: rank r holds rows [offset_r, offset_r + M_r) of W_enc, b_enc and W_dec (shards may be uneven, some
even empty), and
every rank holds the same inputs x, b_dec.

    values, indices = sharded_topk_encode(x, W_enc_shard, b_enc_shard, k, b_dec=b_dec)   # indices global
    x_hat = sharded_sparse_decode(values, indices, W_dec_shard, b_dec)

Encode: each rank selects its shard's top k with the fused ``topk_encode``, the ranks all-gather those
[N, k] candidates (scores and global indices) and every rank takes the same exact global top k. Decode:
each rank decodes the entries of its own latents and the partial sums are all-reduced. So the results are
the single-process ops' (same indices, values within float tolerance), with O(N * k * R) communicated for
the encode and O(N * d) for the decode, and each rank's memory grows with M / R.

Autograd follows the usual convention of tensor parallelism: the loss is computed identically on every
rank from the (replicated) outputs. Then the gradients of the replicated inputs (x, b_dec, values) come out
complete on every rank (one all-reduce of each in the backward pass) and each rank gets the gradient rows
of its own shard. Every rank must call backward (the all-reduces are collective), with the same inputs
requiring grad. The global ranking uses float32 scores of the candidates (``sampled_dot``): candidates of
different shards whose scores lie within float32 rounding of each other may come out in either order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops import checks, sparse_decode, topk_encode


def control_device(group=None) -> torch.device:
    """Where a group's small control tensors (sizes, flags) live: the CPU for gloo, this rank's GPU otherwise."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def shard_offsets(num_latents: int, group=None) -> tuple[int, int]:
    """(offset, total): where this rank's ``num_latents`` rows start in the global numbering (the shards of
    lower ranks come first) and the global dictionary size. One all-gather of the shard sizes."""
    sizes = _all_gather_ints([num_latents], group)
    rank = dist.get_rank(group)
    return sum(s[0] for s in sizes[:rank]), sum(s[0] for s in sizes)


def sharded_topk_encode(x, W_enc_shard, b_enc_shard, k, *, b_dec=None, group=None):
    """``topk_encode`` of the dictionary whose rows the ranks of ``group`` hold between them.

    Args:
        x [N, d], b_dec [d]: the same on every rank.
        W_enc_shard [M_r, d], b_enc_shard [M_r] (or None): this rank's rows, in rank order.
        k: a Python int, 1 <= k <= M (all ranks' rows).

    Returns:
        (values, indices) [N, k], the same on every rank, indices in the global numbering; equal to
        ``topk_encode`` on the whole dictionary (ties to the lower global index, NaN first).
    """
    checks.tensors(("x", x), ("W_enc_shard", W_enc_shard), ("b_enc_shard", b_enc_shard, None), ("b_dec", b_dec, None))
    checks.integer(k, "k")
    checks.tensor(x, "x", 2, "[N, d]")
    checks.tensor(W_enc_shard, "W_enc_shard", 2, "[M_r, d]")
    shapes = _all_gather_ints([x.shape[0], x.shape[1], W_enc_shard.shape[0], W_enc_shard.shape[1]], group)
    if len({(n, d, dw) for n, d, _, dw in shapes}) != 1 or any(d != dw for _, d, _, dw in shapes) \
            or sum(s[2] for s in shapes) < 1:
        described = ", ".join(f"rank {r}: x {list(s[:2])}, W_enc_shard {list(s[2:])}" for r, s in enumerate(shapes))
        raise ValueError(f"the ranks' shards do not fit together (every rank needs the same x [N, d] and a shard "
                         f"[M_r, d], M_r >= 1 on some rank): {described}")
    rank = dist.get_rank(group)
    offset, M = sum(s[2] for s in shapes[:rank]), sum(s[2] for s in shapes)
    torch._check_value(1 <= k <= M, lambda: f"k must be in [1, M] with M = {M} latents over all ranks, got {k}")
    N, M_r = x.shape[0], W_enc_shard.shape[0]

    # Replicated inputs enter each rank's share of the graph through a copy whose backward sums the ranks'
    # partial gradients.
    x_in, b_dec_in = _copy_to_shards(x, group), None if b_dec is None else _copy_to_shards(b_dec, group)
    k_r = min(k, M_r)
    if k_r:
        local_values, local = topk_encode(x_in, W_enc_shard, b_enc_shard, k_r, b_dec=b_dec_in)
        with torch.no_grad():  # the raw scores rank the candidates (ReLU'd values tie at 0)
            rows = x if b_dec is None else x - b_dec
            scores = torch.ops.ssae.sampled_dot(rows, local, W_enc_shard.detach()).float()
            if b_enc_shard is not None:
                scores += b_enc_shard.detach().float()[local]
    else:  # an empty shard: no candidates, but the inputs stay in its graph so that its backward joins the
        # others' all-reduces (with zero gradients)
        joined = sum(t.narrow(0, 0, 0).sum() for t in (x_in, b_dec_in) if t is not None)
        local_values = torch.zeros(N, 1, dtype=x.dtype, device=x.device) + joined.to(x.dtype)
        scores = local = torch.empty(N, 0, device=x.device)
    # every rank's candidates, padded to k: score -inf and index M (after every real latent)
    cand_scores = torch.full((N, k), float("-inf"), device=x.device)
    cand_indices = torch.full((N, k), M, dtype=torch.int64, device=x.device)
    cand_scores[:, :k_r] = scores
    cand_indices[:, :k_r] = local + offset
    all_scores = _all_gather(cand_scores, group)  # [R, N, k]
    all_indices = _all_gather(cand_indices, group)
    flat_scores = all_scores.permute(1, 0, 2).reshape(N, -1)
    flat_indices = all_indices.permute(1, 0, 2).reshape(N, -1)
    # the global top k: by score descending (NaN first, as torch.sort), ties to the lower global index
    by_index = torch.sort(flat_indices, dim=1, stable=True)
    ranked = torch.sort(flat_scores.gather(1, by_index.indices), dim=1, descending=True, stable=True)
    chosen = by_index.indices.gather(1, ranked.indices[:, :k])  # positions in the flat [R * k] candidates
    indices = flat_indices.gather(1, chosen)

    # values: this rank's chosen entries from its own differentiable code, summed over the ranks
    mine = (chosen >= rank * k) & (chosen < rank * k + k_r)
    slot = torch.where(mine, chosen - rank * k, 0)
    own = local_values.gather(1, slot)
    values = _reduce_from_shards(torch.where(mine, own, torch.zeros((), dtype=own.dtype, device=x.device)), group)
    return values, indices


def sharded_sparse_decode(values, indices, W_dec_shard, b_dec=None, *, group=None):
    """``sparse_decode`` of a code over the dictionary whose rows the ranks of ``group`` hold between them.

    Args:
        values, indices [N, k]: the same on every rank, indices global (as ``sharded_topk_encode`` returns).
        W_dec_shard [M_r, d]: this rank's rows, in rank order; b_dec [d]: the same on every rank.

    Returns:
        x_hat [N, d], the same on every rank.
    """
    checks.tensors(("values", values), ("indices", indices), ("W_dec_shard", W_dec_shard), ("b_dec", b_dec, None))
    checks.tensor(W_dec_shard, "W_dec_shard", 2, "[M_r, d]")
    offset, M = shard_offsets(W_dec_shard.shape[0], group)
    mine = (indices >= offset) & (indices < offset + W_dec_shard.shape[0])
    values_in = _copy_to_shards(values, group)
    local_values = torch.where(mine, values_in, torch.zeros((), dtype=values.dtype, device=values.device))
    if W_dec_shard.shape[0]:
        partial = sparse_decode(local_values, torch.where(mine, indices - offset, 0), W_dec_shard)
    else:  # an empty shard adds nothing, and joins the backward's all-reduce of the values' gradient
        partial = W_dec_shard.new_zeros(values.shape[0], W_dec_shard.shape[1]) + local_values.narrow(1, 0, 0).sum()
    x_hat = _reduce_from_shards(partial, group)
    return x_hat if b_dec is None else x_hat + b_dec


class _CopyToShards(torch.autograd.Function):
    """Identity forward; the backward sums the ranks' gradients (each holds the part from its own shard)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromShards(torch.autograd.Function):
    """The sum over the ranks forward; the backward passes the (replicated) gradient on unchanged."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _copy_to_shards(t, group):
    return _CopyToShards.apply(t, group)


def _reduce_from_shards(t, group):
    return _ReduceFromShards.apply(t, group)


def all_gather_parts(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (of one shape on all ranks), in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _all_gather(t, group):
    return torch.stack(all_gather_parts(t, group))


def _all_gather_ints(values: list[int], group) -> list[list[int]]:
    mine = torch.tensor(values, dtype=torch.int64, device=control_device(group))
    return [row.tolist() for row in _all_gather(mine, group).cpu()]
