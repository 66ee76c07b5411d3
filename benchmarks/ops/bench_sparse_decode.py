"""ssae_kernels.sparse_decode vs the dense PyTorch decode: forward (no grad) and forward + backward.

Baseline: scatter the TopK code into a dense [N, M] code, then ``z @ W_dec + b_dec``. Forward + backward:
gradients of a random [N, d] upstream gradient into values, W_dec and b_dec.

    python benchmarks/ops/bench_sparse_decode.py [--quick] [--threads 2] [--repeats 5] [--device cpu]
                                                 [--out benchmarks/results/ops]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODULE = "sparse_decode"
NOTES = [
    "Baseline: the dense decode, `z = zeros(N, M).scatter(1, indices, values)` then `z @ W_dec + b_dec` "
    "(it stores the dense [N, M] code). `forward+backward`: `x_hat.backward(g)` for a random [N, d] g, "
    "gradients into values, W_dec and b_dec, compared as `max rel diff`.",
]


def build_cases(shape, device, dtype):
    import torch

    import ssae_kernels

    t = common.sae_inputs(shape, device, dtype)
    indices, M, grad = t["indices"], shape["M"], t["grad"]

    def dense(values, W_dec, b_dec):
        z = torch.zeros(values.shape[0], M, dtype=values.dtype, device=values.device).scatter(1, indices, values)
        return z @ W_dec + b_dec

    def ours(values, W_dec, b_dec):
        return ssae_kernels.sparse_decode(values, indices, W_dec, b_dec)

    def forward(fn, params):
        def call():
            with torch.no_grad():
                return fn(*params)
        return call

    def step(fn, params):
        def call():
            common.clear(params)
            fn(*params).backward(grad)
            return common.grads(params)
        return call

    params = (t["values"], t["W_dec"], t["b_dec"])
    desc = "zeros(N, M).scatter(1, indices, values) @ W_dec + b_dec"
    return [
        common.Case(MODULE, "forward", forward(ours, params), forward(dense, params), desc),
        common.Case(MODULE, "forward+backward", step(ours, common.leaves(*params)),
                    step(dense, common.leaves(*params)), desc),
    ]


def main(argv=None):
    return common.main(MODULE, __doc__, build_cases, NOTES, argv)


if __name__ == "__main__":
    main()
