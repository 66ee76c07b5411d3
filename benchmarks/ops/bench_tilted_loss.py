"""The TERM ops: ssae_kernels.tilted_loss, tilted_mse and sparse_decode_mse vs their PyTorch formulations,
forward (no grad) and forward + backward.

- ``tilted_loss(losses, t)`` on [N] losses: t = 0 vs ``losses.mean()``; t = 1 vs
  ``(logsumexp(t * losses) - log N) / t``; t = 1 with groups (hierarchical TERM, t_group = 0: the
  size-weighted mean of the per-group tilted risks) vs a per-group log-sum-exp from ``scatter_reduce``
  (amax) and ``index_add``.
- ``tilted_mse(x_hat, x, t=1)`` vs the same log-sum-exp over ``((x_hat - x) ** 2).sum(1)``.
- ``sparse_decode_mse(values, indices, W_dec, b_dec, x, t)`` (t = 0 and 1) vs the unfused composition:
  ``sparse_decode`` (ours) -> squared error summed over d -> mean (t = 0) or log-sum-exp (t = 1).

    python benchmarks/ops/bench_tilted_loss.py [--quick] [--threads 2] [--repeats 5] [--device cpu]
                                               [--out benchmarks/results/ops]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODULE = "tilted_loss"
GROUPS = 8
NOTES = [
    "Inputs: `losses` [N] uniform in [0, 2); x_hat, x [N, d] Gaussian; a random TopK code for "
    f"`sparse_decode_mse`. Groups: n % G for G = min({GROUPS}, N) groups, with `num_groups` passed (no sync). "
    "`forward+backward`: backward of the scalar into losses / x_hat / (values, W_dec, b_dec). Ours accumulates "
    "the reduction in float64, the baselines in the input dtype.",
]


def torch_tilted(losses, t):
    if t == 0:
        return losses.mean()
    import torch

    return (torch.logsumexp(t * losses, 0) - math.log(losses.shape[0])) / t


def torch_grouped(losses, t, groups, num_groups):
    """Size-weighted mean over groups of (1/t) log mean_{i in g} exp(t losses_i) (t != 0, groups non-empty)."""
    import torch

    scaled = t * losses
    top = torch.full((num_groups,), -math.inf, dtype=losses.dtype, device=losses.device)
    top = top.scatter_reduce(0, groups, scaled.detach(), "amax").detach()
    sums = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, groups, torch.exp(scaled - top[groups]))
    counts = torch.bincount(groups, minlength=num_groups).to(losses.dtype)
    risks = (top + torch.log(sums / counts)) / t
    return (counts / losses.shape[0] * risks).sum()


def build_cases(shape, device, dtype):
    import torch

    import ssae_kernels

    t = common.sae_inputs(shape, device, dtype)
    N = shape["N"]
    g = torch.Generator().manual_seed(2)
    losses = (2 * torch.rand(N, generator=g)).to(device=device, dtype=dtype)
    x_hat = t["x"] + torch.randn(N, shape["d"], generator=g).to(device=device, dtype=dtype)
    x = t["x"]
    G = min(GROUPS, N)
    groups = torch.arange(N, device=device) % G

    def forward(fn, *params):
        def call():
            with torch.no_grad():
                return fn(*params)
        return call

    def step(fn, *params):
        def call():
            common.clear(params)
            fn(*params).backward()
            return common.grads(params)
        return call

    def both(name, ours, base, desc, *params):
        """The forward case and the forward+backward case of one op (each with its own leaves)."""
        return [common.Case(name, "forward", forward(ours, *params), forward(base, *params), desc),
                common.Case(name, "forward+backward", step(ours, *common.leaves(*params)),
                            step(base, *common.leaves(*params)), desc)]

    cases = []
    for tilt in (0.0, 1.0):
        desc = "losses.mean()" if tilt == 0 else "(logsumexp(t * losses) - log(N)) / t"
        for c in both("tilted_loss", lambda l, tilt=tilt: ssae_kernels.tilted_loss(l, tilt),
                      lambda l, tilt=tilt: torch_tilted(l, tilt), desc, losses):
            c.case += f", t={tilt:g}"
            c.extra["t"] = tilt
            cases.append(c)
    for c in both("tilted_loss", lambda l: ssae_kernels.tilted_loss(l, 1.0, groups=groups, num_groups=G),
                  lambda l: torch_grouped(l, 1.0, groups, G),
                  "scatter_reduce(amax) + index_add(exp) per group, weighted mean", losses):
        c.case += f", t=1, {G} groups"
        c.extra.update(t=1.0, groups=G)
        cases.append(c)
    for c in both("tilted_mse", lambda a, b: ssae_kernels.tilted_mse(a, b, 1.0),
                  lambda a, b: torch_tilted(((a - b) ** 2).sum(1), 1.0),
                  "(logsumexp(t * ((x_hat - x) ** 2).sum(1)) - log(N)) / t", x_hat, x):
        c.case += ", t=1"
        c.extra["t"] = 1.0
        cases.append(c)
    indices = t["indices"]
    for tilt in (0.0, 1.0):
        reduce = "mean()" if tilt == 0 else "logsumexp"
        for c in both("sparse_decode_mse",
                      lambda v, W, b, tilt=tilt: ssae_kernels.sparse_decode_mse(v, indices, W, b, x, t=tilt),
                      lambda v, W, b, tilt=tilt: torch_tilted(
                          ((ssae_kernels.sparse_decode(v, indices, W, b) - x) ** 2).sum(1), tilt),
                      f"((sparse_decode(values, indices, W_dec, b_dec) - x) ** 2).sum(1) -> {reduce}",
                      t["values"], t["W_dec"], t["b_dec"]):
            c.case += f", t={tilt:g}"
            c.extra["t"] = tilt
            cases.append(c)
    return cases


def main(argv=None):
    return common.main(MODULE, __doc__, build_cases, NOTES, argv)


if __name__ == "__main__":
    main()
