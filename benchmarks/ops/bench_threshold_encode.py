"""ssae_kernels.threshold_encode vs the dense PyTorch threshold encode: time and peak memory, forward (no grad)
and forward + backward.

Baseline: ``pre = F.linear(x - b_dec, W_enc, b_enc)``, the mask ``pre > threshold``, its count per row and
``topk(where(mask, pre, -inf), max_k)`` (it stores the [N, M] pre-activations). The per-latent thresholds
are drawn around the value that leaves about k latents per row active (L0 ~ k), and max_k = 2k.

    python benchmarks/ops/bench_threshold_encode.py [--quick] [--threads 2] [--repeats 5] [--device cpu]
                                                    [--out benchmarks/results/ops]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_topk_encode  # noqa: E402
import common  # noqa: E402

MODULE = "threshold_encode"
NOTES = [
    "Baseline: the dense threshold encode, `pre = F.linear(x - b_dec, W_enc, b_enc)`, `counts = (pre > "
    "threshold).sum(1)` and `topk(where(pre > threshold, pre, -inf), max_k)` with empty slots zeroed (it "
    "stores the [N, M] pre-activations). Thresholds per latent, around the level that leaves about k "
    "latents per row active (L0 ~ k); max_k = 2k. `forward+backward`: `values.backward(g)` for a random "
    "[N, max_k] g, gradients into W_enc, b_enc and b_dec (none into x). `max rel diff` compares the values "
    "(and the gradients where all indices agree); `index_agreement`: the fraction of equal indices. "
    "`peak_MB_ours`, `peak_MB_baseline`: memory one call takes at its peak above what was in use before it "
    "(resident bytes on the CPU, with glibc returning freed buffers of 64 KiB and more; allocated bytes on a "
    "GPU), inputs and weights excluded.",
]


def compare(ours, base):
    """bench_topk_encode's comparison of the values and indices (and gradients), plus the mean count."""
    (values, indices, counts, *rest), (base_values, base_indices, _, *base_rest) = ours, base
    diff, facts = bench_topk_encode.compare((values, indices, *rest), (base_values, base_indices, *base_rest))
    return diff, {**facts, "mean_count": float(counts.double().mean())}


def build_cases(shape, device, dtype):
    import torch
    import torch.nn.functional as F

    import ssae_kernels

    t = common.sae_inputs(shape, device, dtype)
    x, k = t["x"], shape["k"]
    max_k = min(2 * k, shape["M"])
    with torch.no_grad():  # the level that leaves ~k of M latents active, from the first rows
        sample = F.linear(x[:64] - t["b_dec"], t["W_enc"], t["b_enc"]).float()
        level = torch.quantile(sample.flatten()[:2**24], 1 - k / shape["M"])
    g = torch.Generator().manual_seed(2)
    threshold = (level * (0.9 + 0.2 * torch.rand(shape["M"], generator=g))).to(device=device, dtype=dtype)
    grad_values = torch.randn(shape["N"], max_k, generator=g).to(device=device, dtype=dtype)

    def dense(x, W_enc, b_enc, b_dec):
        pre = F.linear(x - b_dec, W_enc, b_enc)
        keep = pre > threshold
        counts = keep.sum(1)
        top = torch.topk(torch.where(keep, pre, float("-inf")), max_k)
        filled = torch.arange(max_k, device=x.device) < counts.unsqueeze(1)
        return torch.where(filled, top.values, 0), torch.where(filled, top.indices, 0), counts

    def ours(x, W_enc, b_enc, b_dec):
        return ssae_kernels.threshold_encode(x, W_enc, b_enc, threshold, max_k, b_dec=b_dec)

    def forward(fn, params):
        return common.no_grad_call(fn, x, *params)

    def step(fn, params):
        return common.backward_call(fn, (x, *params), params, grad_values)

    params = (t["W_enc"], t["b_enc"], t["b_dec"])
    desc = "topk(where(F.linear(x - b_dec, W_enc, b_enc) > threshold, pre, -inf), max_k)"
    return [
        common.Case(MODULE, "forward", forward(ours, params), forward(dense, params), desc, compare=compare,
                    memory=True),
        common.Case(MODULE, "forward+backward", step(ours, common.leaves(*params)),
                    step(dense, common.leaves(*params)), desc, compare=compare, memory=True),
    ]


def main(argv=None):
    return common.main(MODULE, __doc__, build_cases, NOTES, argv, memory=True)


if __name__ == "__main__":
    main()
