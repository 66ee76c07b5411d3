"""What each latent of an SAE responds to, from one streaming pass over a text with the fused encode: firing
frequency, activation statistics and histogram, top-activating contexts, contexts drawn from the lower half
of its activations, the output tokens its decoder direction promotes and suppresses, and its nearest latents
by decoder cosine.

The pass keeps only the sparse codes ([N, k] values and indices, never an N x M matrix); everything per
latent comes from their transpose (the codes sorted by latent), so memory grows with N * k.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .activations import iter_activations, token_chunks


@dataclass
class Codes:
    """The codes of a text's tokens in reading order: ``values``, ``indices`` [N, width] (value 0: no latent),
    the token ids [N], and where each token sits: ``sequences`` [N] into ``chunks``, ``positions`` [N]."""

    values: torch.Tensor
    indices: torch.Tensor
    tokens: torch.Tensor
    sequences: torch.Tensor
    positions: torch.Tensor
    chunks: list[list[int]]


@torch.no_grad()
def encode_text(model, tokenizer, sae, texts: list[str], layer: int, *, context: int = 256,
                max_tokens: int | None = None, batch_size: int = 16, progress: bool = True) -> Codes:
    """The SAE's codes of every token of ``texts`` (as ``activations.harvest`` takes them) up to ``max_tokens``,
    encoded batch by batch as the model produces them."""
    chunks = token_chunks(tokenizer, texts, context)
    total = sum(len(c) - 1 for c in chunks)
    total = total if max_tokens is None else min(total, max_tokens)
    device = sae.W_enc.device
    parts, taken = [], 0
    with tqdm(total=total, unit="tok", desc="encoding", disable=not progress) as bar, \
            contextlib.closing(iter_activations(model, tokenizer, chunks, [layer], batch_size=batch_size)) as batches:
        for batch in batches:
            n = min(len(batch.tokens), total - taken)
            values, indices = sae.encode(batch.acts[layer][:n].to(device))
            parts.append((values.float().cpu(), indices.to(torch.int32).cpu(), batch.tokens[:n],
                          batch.sequences[:n].to(torch.int32), batch.positions[:n].to(torch.int32)))
            taken += n
            bar.update(n)
            if taken >= total:
                break
    if not parts:
        raise ValueError("the text holds no tokens to encode")
    return Codes(*(torch.cat(column) for column in zip(*parts)), chunks)


@torch.no_grad()
def codes_of_activations(sae, acts: torch.Tensor, tokens: torch.Tensor, chunks: list[list[int]],
                         batch_size: int = 4096) -> Codes:
    """``Codes`` of activations harvested from ``chunks`` (``activations.harvest``: every token but each
    sequence's first, in reading order, possibly cut short by max_tokens)."""
    lengths = torch.tensor([len(c) - 1 for c in chunks])
    sequences = torch.repeat_interleave(torch.arange(len(chunks)), lengths)[:len(tokens)]
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(len(tokens)) - starts[sequences] + 1
    parts = [sae.encode(acts[i:i + batch_size].to(sae.W_enc.device)) for i in range(0, len(tokens), batch_size)]
    return Codes(torch.cat([v for v, _ in parts]).float().cpu(), torch.cat([i for _, i in parts]).to(torch.int32).cpu(),
                 tokens, sequences.to(torch.int32), positions.to(torch.int32), chunks)


def max_cosine(W_a: torch.Tensor, W_b: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """[M_a]: each row of W_a's largest cosine with any row of W_b (decoder directions of two SAEs)."""
    A = W_a.float() / W_a.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    B = W_b.float() / W_b.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([(A[i:i + block] @ B.T).max(dim=1).values for i in range(0, A.shape[0], block)]).cpu()


@dataclass
class LatentStatistics:
    """Per latent m (first dimension M): ``count`` of tokens it fired on, ``frequency`` (count / N), ``max`` and
    ``mean`` activation where it fired, ``histogram`` [M, bins] of those activations over (0, max],
    ``top`` [M, K] the tokens of its K largest activations (descending; -1 past its count) with
    ``top_values``, ``samples`` [M, S] tokens drawn at random from the lower half of its activations, and
    ``activation`` its activations' sum over all N tokens / N."""

    count: torch.Tensor
    frequency: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    histogram: torch.Tensor
    top: torch.Tensor
    top_values: torch.Tensor
    samples: torch.Tensor
    activation: torch.Tensor


def latent_statistics(codes: Codes, num_latents: int, *, contexts: int = 10, bins: int = 20, samples: int = 4,
                      seed: int = 0) -> LatentStatistics:
    """``LatentStatistics`` of the codes, from their per-latent transpose."""
    N, M = codes.values.shape[0], num_latents
    fired = codes.values > 0
    latent = codes.indices[fired].long()
    value = codes.values[fired]
    token = fired.nonzero()[:, 0]
    # the transpose: grouped by latent, each group by value descending (ties: reading order)
    by_value = torch.sort(value, descending=True, stable=True).indices
    by_latent = torch.sort(latent[by_value], stable=True).indices
    order = by_value[by_latent]
    latent, value, token = latent[order], value[order], token[order]
    count = torch.bincount(latent, minlength=M)
    start = torch.cumsum(count, 0) - count
    rank = torch.arange(latent.numel()) - start[latent]  # 0 for a latent's largest activation

    top = torch.full((M, contexts), -1, dtype=torch.int64)
    top_values = torch.zeros(M, contexts)
    first = rank < contexts
    top[latent[first], rank[first]] = token[first]
    top_values[latent[first], rank[first]] = value[first]
    peak = torch.zeros(M)
    peak[latent[rank == 0]] = value[rank == 0]  # each group's first
    total = torch.zeros(M, dtype=torch.float64).index_add_(0, latent, value.double())
    mean = (total / count.clamp_min(1)).float()
    bin_of = (value / peak[latent] * bins).long().clamp(0, bins - 1)
    histogram = torch.bincount(latent * bins + bin_of, minlength=M * bins).view(M, bins)

    # from each latent's lower half (rank >= count / 2): the entries with the smallest random keys
    lower = rank >= (count[latent] + 1) // 2
    keys = torch.rand(int(lower.sum()), generator=torch.Generator().manual_seed(seed))
    low_latent, low_token = latent[lower], token[lower]
    by_key = torch.sort(keys).indices
    regrouped = by_key[torch.sort(low_latent[by_key], stable=True).indices]
    low_latent, low_token = low_latent[regrouped], low_token[regrouped]
    low_count = torch.bincount(low_latent, minlength=M)
    low_rank = torch.arange(low_latent.numel()) - (torch.cumsum(low_count, 0) - low_count)[low_latent]
    drawn = torch.full((M, samples), -1, dtype=torch.int64)
    keep = low_rank < samples
    drawn[low_latent[keep], low_rank[keep]] = low_token[keep]
    return LatentStatistics(count, count.double() / N, peak, mean, histogram, top, top_values, drawn, total / N)


def activation_window(codes: Codes, token: int, latent: int, radius: int) -> tuple[list[int], list[float], int]:
    """(token ids, the latent's activation on each, the index of ``token`` among them) of the tokens within
    ``radius`` of ``token`` in its sequence (the sequence's first token, never encoded, left out)."""
    sequence, position = int(codes.sequences[token]), int(codes.positions[token])
    first = max(1, position - radius)
    last = min(len(codes.chunks[sequence]) - 1, position + radius)
    # a sequence's tokens are consecutive in the codes (cut only where max_tokens ended the pass)
    lo, hi = token - (position - first), min(token + (last - position), codes.values.shape[0] - 1)
    rows = slice(lo, hi + 1)
    acts = (codes.values[rows] * (codes.indices[rows] == latent)).sum(1)
    return codes.tokens[rows].tolist(), acts.tolist(), token - lo


@torch.no_grad()
def logit_effects(model, W_dec: torch.Tensor, latents: torch.Tensor, top: int = 10, block: int = 512):
    """(boosted, suppressed) [len(latents), top] token ids: the largest and smallest logits of each latent's
    decoder direction through the final norm's scale and the unembedding (the direct path, without the
    normalisation's dependence on the rest of the residual stream)."""
    unembed = model.get_output_embeddings().weight.detach().float()
    norm = getattr(getattr(model, "model", None), "norm", None)
    scale = norm.weight.detach().float() if norm is not None and getattr(norm, "weight", None) is not None else 1.0
    boosted, suppressed = [torch.empty(0, top, dtype=torch.int64)], [torch.empty(0, top, dtype=torch.int64)]
    for start in range(0, latents.numel(), block):
        directions = W_dec[latents[start:start + block]].float().to(unembed.device) * scale
        logits = directions @ unembed.T
        boosted.append(logits.topk(top, dim=1).indices.cpu())
        suppressed.append((-logits).topk(top, dim=1).indices.cpu())
    return torch.cat(boosted), torch.cat(suppressed)


@torch.no_grad()
def nearest_latents(W_dec: torch.Tensor, latents: torch.Tensor, top: int = 5, block: int = 1024):
    """(indices, cosines) [len(latents), top]: the other latents whose decoder rows are closest in cosine."""
    W = W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    top = min(top, W.shape[0] - 1)
    found, cosines = [torch.empty(0, top, dtype=torch.int64)], [torch.empty(0, top)]
    for start in range(0, latents.numel(), block):
        rows = latents[start:start + block]
        sims = W[rows] @ W.T
        sims[torch.arange(rows.numel()), rows] = float("-inf")  # not itself
        best = sims.topk(top, dim=1)
        found.append(best.indices.cpu())
        cosines.append(best.values.cpu())
    return torch.cat(found), torch.cat(cosines)
