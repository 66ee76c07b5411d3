"""ssae_kernels.project_subspace and project_subspace_ vs the two matmuls of the PyTorch formulation.

G is [d, n] (n = M: the size of an SAE weight matrix of the shape), U is [d, r] with orthonormal columns
(r = k, from a QR of a Gaussian matrix):

- ``project_subspace(G, U)`` vs ``U @ (U.T @ G)``; ``complement=True`` vs ``G - U @ (U.T @ G)``;
- ``project_subspace_(G, U)`` (in place) vs ``G.copy_(U @ (U.T @ G))``; ``complement=True`` vs
  ``G.addmm_(U, U.T @ G, alpha=-1)``. Both sides project their own copy of G again every call (the
  projections are idempotent, so the values stay put).

    python benchmarks/ops/bench_project_subspace.py [--quick] [--threads 2] [--repeats 5] [--device cpu]
                                                    [--out benchmarks/results/ops]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODULE = "project_subspace"
NOTES = [
    "Shapes: G [d, n] with n = M of the SAE shape, U [d, r] with r = k (orthonormal columns). Forward only, "
    "under no_grad. The in-place cases write their own copy of G on both sides.",
]


def build_cases(shape, device, dtype):
    import torch

    import ssae_kernels

    d, n, r = shape["d"], shape["M"], shape["k"]
    g = torch.Generator().manual_seed(0)
    G = torch.randn(d, n, generator=g).to(device=device, dtype=dtype)
    U = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q.to(device=device, dtype=dtype)
    size = {"d": d, "n": n, "r": r}
    G_ours = [G.clone(), G.clone()]
    G_base = [G.clone(), G.clone()]

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    return [
        common.Case("project_subspace", "forward", no_grad(lambda: ssae_kernels.project_subspace(G, U)),
                    no_grad(lambda: U @ (U.T @ G)), "U @ (U.T @ G)", shape=size),
        common.Case("project_subspace", "forward, complement",
                    no_grad(lambda: ssae_kernels.project_subspace(G, U, True)),
                    no_grad(lambda: G - U @ (U.T @ G)), "G - U @ (U.T @ G)", shape=size),
        common.Case("project_subspace_", "in place", no_grad(lambda: ssae_kernels.project_subspace_(G_ours[0], U)),
                    no_grad(lambda: G_base[0].copy_(U @ (U.T @ G_base[0]))), "G.copy_(U @ (U.T @ G))", shape=size),
        common.Case("project_subspace_", "in place, complement",
                    no_grad(lambda: ssae_kernels.project_subspace_(G_ours[1], U, True)),
                    no_grad(lambda: G_base[1].addmm_(U, U.T @ G_base[1], alpha=-1)), "G.addmm_(U, U.T @ G, alpha=-1)",
                    shape=size),
    ]


def main(argv=None):
    return common.main(MODULE, __doc__, build_cases, NOTES, argv)


if __name__ == "__main__":
    main()
