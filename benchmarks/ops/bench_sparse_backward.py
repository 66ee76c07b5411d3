"""The sparse backward primitives torch.ops.ssae.{sampled_dot, latent_transpose, sparse_transpose_matmul}
vs their PyTorch equivalents.

- ``sampled_dot(grad, indices, W)`` (the gradient of a code): ``(grad[:, None, :] * W[indices]).sum(-1)``.
- ``latent_transpose(indices, M)`` (entries grouped by latent): ``bincount`` + ``cumsum`` for the offsets,
  a stable ``argsort`` for the order.
- ``sparse_transpose_matmul(values, rows, offsets, order)`` (the gradient of a weight matrix and its bias):
  ``index_add_`` of the [N * k, d] products ``values[n, j] * rows[n]`` into an [M, d] zero matrix, and of the
  values into an [M] one. Also timed with the ``latent_transpose`` that builds its (offsets, order), which
  the index_add_ baseline does not need.

    python benchmarks/ops/bench_sparse_backward.py [--quick] [--threads 2] [--repeats 5] [--device cpu]
                                                   [--out benchmarks/results/ops]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODULE = "sparse_backward"
NOTES = [
    "The primitives are called through `torch.ops.ssae` (no autograd). Inputs: a random TopK code "
    "(indices distinct within a row), W [M, d], rows and grad [N, d]. `sparse_transpose_matmul` is given "
    "(offsets, order) computed beforehand; the `incl. latent_transpose` case computes them in the call, "
    "as one backward pass does (the encoder's and decoder's backward of one step share them).",
]


def build_cases(shape, device, dtype):
    import torch

    import ssae_kernels  # noqa: F401  (registers the torch.ops.ssae ops)

    t = common.sae_inputs(shape, device, dtype)
    ops = torch.ops.ssae
    indices, values, W, grad, M, d = t["indices"], t["values"], t["W_dec"], t["grad"], shape["M"], shape["d"]
    rows = t["x"]
    flat = indices.reshape(-1)

    def torch_transpose():
        counts = torch.bincount(flat, minlength=M)
        return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]), torch.argsort(flat, stable=True)

    def torch_transpose_matmul():
        out = torch.zeros(M, d, dtype=rows.dtype, device=device)
        out.index_add_(0, flat, (values[:, :, None] * rows[:, None, :]).reshape(-1, d))
        colsum = torch.zeros(M, dtype=values.dtype, device=device).index_add_(0, flat, values.reshape(-1))
        return out, colsum

    try:
        offsets, order = ops.latent_transpose(indices, M)
    except Exception:  # reported by the latent_transpose case; the matmul case runs on torch's transpose
        offsets, order = torch_transpose()

    def ours_with_transpose():
        return ops.sparse_transpose_matmul(values, rows, *ops.latent_transpose(indices, M))

    transpose_matmul = "zeros(M, d).index_add_(0, indices.flatten(), values[..., None] * rows[:, None])"
    return [
        common.Case("sampled_dot", "forward", lambda: ops.sampled_dot(grad, indices, W),
                    lambda: (grad[:, None, :] * W[indices]).sum(-1), "(grad[:, None, :] * W[indices]).sum(-1)"),
        common.Case("latent_transpose", "forward", lambda: ops.latent_transpose(indices, M), torch_transpose,
                    "cumsum(bincount(indices.flatten())), argsort(indices.flatten(), stable=True)"),
        common.Case("sparse_transpose_matmul", "forward",
                    lambda: ops.sparse_transpose_matmul(values, rows, offsets, order),
                    torch_transpose_matmul, transpose_matmul),
        common.Case("sparse_transpose_matmul", "incl. latent_transpose", ours_with_transpose, torch_transpose_matmul,
                    transpose_matmul),
    ]


def main(argv=None):
    return common.main(MODULE, __doc__, build_cases, NOTES, argv)


if __name__ == "__main__":
    main()
