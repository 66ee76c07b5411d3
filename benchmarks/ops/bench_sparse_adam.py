"""ssae_kernels.ops.sparse_adam_ vs the PyTorch formulations of the same update.

The parameter is an SAE weight matrix [M, d]; the rows updated are the distinct latents of N x k
uniform draws (what a TopK batch of the shape touches at most). Each side updates its own copy of the
parameter and both moments, with an empty catch-up (the kernel's work does not depend on its values):

- ``sparse_adam_(param, m, v, rows, grad, catchup)`` vs the gathered formulation
  ``reference.sparse_adam_`` (index, update, index_put: what torch code without the kernel writes);
- the same vs ``torch.optim.Adam(fused=True).step()`` over all M rows with the dense gradient (zeros
  outside ``rows``): what a dense optimizer does with the same gradient.

    python benchmarks/ops/bench_sparse_adam.py [--quick] [--threads 2] [--repeats 5] [--device cpu]
                                               [--out benchmarks/results/ops]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODULE = "sparse_adam"
NOTES = [
    "Shapes: param [M, d] of the SAE shape; rows: the distinct latents of N x k uniform draws. One step each "
    "call (the step number stays 1: every call is a first step on both sides). float32 only: the op "
    "updates float32 (or float64) master weights.",
]
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1)


def build_cases(shape, device, dtype):
    import torch

    from ssae_kernels import reference
    from ssae_kernels.ops import sparse_adam_

    if dtype != torch.float32:
        return []
    M, d, N, k = shape["M"], shape["d"], shape["N"], shape["k"]
    g = torch.Generator().manual_seed(0)
    param = torch.randn(M, d, generator=g).to(device)
    rows = torch.unique(torch.randint(0, M, (N * k,), generator=g)).to(device)
    grad = (torch.randn(rows.numel(), d, generator=g) * 1e-3).to(device)
    catchup = torch.tensor([[0.0, 1.0, 1.0, 1.0]], device=device).expand(rows.numel(), 4).contiguous()
    size = {"M": M, "d": d, "rows": rows.numel()}

    def state():
        return [param.clone(), torch.zeros_like(param), torch.zeros_like(param)]

    def ours():  # a call on its own copy of the state, for each case
        tensors = state()

        def run():
            sparse_adam_(*tensors, rows, grad, catchup, **HYPER)
            return tensors[0]
        return run

    gathered = state()

    def run_gathered():
        reference.sparse_adam_(*gathered, rows, grad, catchup, **HYPER)
        return gathered[0]

    dense = torch.nn.Parameter(param.clone())
    dense.grad = torch.zeros_like(param).index_copy_(0, rows, grad)
    adam = torch.optim.Adam([dense], lr=HYPER["lr"], eps=HYPER["eps"], fused=True)

    def run_dense():
        adam.step()
        adam.state[dense]["step"].fill_(0)  # every call a first step, as ours
        return dense.detach()

    return [
        common.Case("sparse_adam_", "rows of one batch", ours(), run_gathered, "reference.sparse_adam_ (gathered)",
                    shape=size),
        common.Case("sparse_adam_", "vs dense Adam", ours(), run_dense, "torch.optim.Adam(fused=True), all rows",
                    shape=size),
    ]


def main(argv=None):
    return common.main(MODULE, __doc__, build_cases, NOTES, argv)


if __name__ == "__main__":
    main()
