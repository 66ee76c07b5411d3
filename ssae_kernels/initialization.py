"""How an SAE's parameters start: random unit decoder rows, b_dec at the data's geometric median."""

from __future__ import annotations

import torch


def random_unit_rows(num_rows: int, d: int, rows: range, generator: torch.Generator | None) -> torch.Tensor:
    """``rows`` of a [num_rows, d] matrix of random unit rows, drawn in blocks of ``DRAW_ROWS`` (the same rows
    whichever part is kept; memory of one block beyond the part)."""
    kept = []
    for start in range(0, num_rows, DRAW_ROWS):  # every block is drawn: the generator ends in one state
        block = torch.randn(min(DRAW_ROWS, num_rows - start), d, generator=generator)
        if start < rows.stop and rows.start < start + len(block):
            kept.append(block[max(rows.start - start, 0):rows.stop - start])
    W = torch.cat(kept)
    return W / W.norm(dim=1, keepdim=True)


DRAW_ROWS = 1024


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x."""
    point = x.mean(0)
    for _ in range(iters):
        dist = (x - point).norm(dim=1).clamp_min(1e-8)
        new = (x / dist[:, None]).sum(0) / (1 / dist).sum()
        if (new - point).norm() <= tol * point.norm().clamp_min(1e-8):
            return new
        point = new
    return point
