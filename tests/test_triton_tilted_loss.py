"""The Triton TERM kernels (tilted_group_stats, row_sq_error, sparse_decode_sq_error and its backward
sparse_decode_residual) against the reference.

CPU tensors run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest), whose
tiles are small (statistics chunks of 64 losses, group tiles of 4, gather tiles of 4
slots x 16 columns): the sizes below cross chunk, block-merge and group-tile boundaries.
"""

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssae_kernels
from assertions import close
from ssae_kernels import reference

triton = pytest.importorskip("triton")
from ssae_kernels.triton import KERNELS  # noqa: E402
from ssae_kernels.triton import tilted_loss as tt  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors run Triton only with TRITON_INTERPRET=1")
ops = torch.ops.ssae
TILTS = (0.0, -1e9, -1.0, 1e-6, 1.0, 500.0, 1e9)
TERM_OPS = ("tilted_group_stats", "row_sq_error", "sparse_decode_sq_error", "sparse_decode_residual")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of the TERM launchers (the backend registry serves KERNELS)."""
    calls = {op: 0 for op in TERM_OPS}
    for op in TERM_OPS:
        def counted(*args, _op=op, _fn=KERNELS[op]):
            calls[_op] += 1
            return _fn(*args)
        monkeypatch.setitem(KERNELS, op, counted)
    return calls


def risk(anchor, log_mean, t):
    return anchor if t == 0 else anchor + log_mean / t


def check_stats(losses, t, groups, num_groups):
    with ssae_kernels.use_backend("triton"):
        anchor, log_mean, count = ops.tilted_group_stats(losses, t, groups, num_groups)
    ref_anchor, ref_log_mean, ref_count = reference.tilted_group_stats(losses, t, groups, num_groups)
    assert anchor.dtype == log_mean.dtype == torch.float64 and count.dtype == torch.int64
    assert torch.equal(count, ref_count)
    assert bool(torch.isfinite(anchor).all() and torch.isfinite(log_mean).all())
    # Both sides work in float64. The reference's anchor is max(t l) / t, which may sit an
    # ulp off the loss itself (the kernel keeps the loss): at |t| = 1e9 that ulp moves
    # log_mean by ~1e-6, so the per-group risk is the quantity compared tightly.
    torch.testing.assert_close(risk(anchor, log_mean, t), risk(ref_anchor, ref_log_mean, t), rtol=1e-12, atol=1e-12)
    if abs(t) <= 500:
        torch.testing.assert_close(anchor, ref_anchor, rtol=1e-15, atol=0.0)
        torch.testing.assert_close(log_mean, ref_log_mean, rtol=1e-10, atol=1e-14)
    empty = count == 0
    assert bool((anchor[empty] == 0).all() and (log_mean[empty] == 0).all())


@pytest.mark.parametrize("t", TILTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("n", (1, 63, 200))
def test_group_stats_without_groups(t, dtype, n):
    losses = (torch.rand(n, dtype=torch.float64) * 4 + 0.5).to(dtype)
    check_stats(losses, t, None, 1)


@pytest.mark.parametrize("t", TILTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_group_stats_with_groups(t, dtype):
    n = 200
    losses = (torch.rand(n, dtype=torch.float64) * 4 + 0.5).to(dtype)
    # ids 1, 4, 8 and 9 unused: empty groups, in the first and in later group tiles of 4
    used = torch.tensor([0, 2, 3, 5, 6, 7])
    groups = used[torch.randint(0, len(used), (n,))]
    groups[7] = 7  # make sure the last used id is present
    check_stats(losses, t, groups, 10)


@pytest.mark.parametrize("t", (-1.0, 1.0, 1e9))
@pytest.mark.parametrize("order", ("ascending", "descending"))
@pytest.mark.parametrize("with_groups", (False, True))
def test_group_stats_anchor_moves(t, order, with_groups):
    # 1100 losses: 9 programs of two chunks each, so the best loss moving later (ascending
    # at t > 0) or staying first (descending) exercises both sides of every merge
    losses = torch.sort(torch.rand(1100, dtype=torch.float64) * 4 + 0.5, descending=order == "descending").values
    groups = torch.randint(0, 6, (1100,)) if with_groups else None
    check_stats(losses.float(), t, groups, 6 if with_groups else 1)


@pytest.mark.parametrize("t", TILTS)
def test_group_stats_small_cases(t):
    # n = 1 with groups, a single group, groups of size one, all-equal losses
    check_stats(torch.tensor([2.5]), t, torch.tensor([2]), 3)
    check_stats(torch.rand(70), t, torch.zeros(70, dtype=torch.int64), 1)
    check_stats(torch.rand(9), t, torch.arange(9), 9)
    equal = torch.full((130,), 1.75)
    check_stats(equal, t, None, 1)
    with ssae_kernels.use_backend("triton"):
        anchor, log_mean, count = ops.tilted_group_stats(equal, t, None, 1)
    assert float(anchor) == 1.75 and float(log_mean) == 0.0 and int(count) == 130


def test_group_stats_large_losses_do_not_overflow():
    # t * loss = 1e12: only differences from the anchor are exponentiated
    losses = torch.rand(150, dtype=torch.float64) * 10 + 1000
    for t in (1e9, -1e9, 500.0):
        check_stats(losses, t, losses.long() % 3, 3)


def test_group_stats_float64_losses_and_bad_groups():
    check_stats(torch.rand(77, dtype=torch.float64), 1.0, None, 1)
    with ssae_kernels.use_backend("triton"):
        with pytest.raises(IndexError, match="groups must lie in"):
            ops.tilted_group_stats(torch.rand(5), 1.0, torch.tensor([0, 1, 5, 0, 1]), 3)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("N,d", [(1, 1), (5, 17), (3, 33), (4, 16)])
def test_row_sq_error(dtype, N, d):
    x_hat, x = torch.randn(N, d).to(dtype), torch.randn(N, d).to(dtype)
    with ssae_kernels.use_backend("triton"):
        out = ops.row_sq_error(x_hat, x)
    assert out.dtype == torch.float32 and out.shape == (N,)
    close(out, reference.row_sq_error(x_hat, x), dtype=torch.float32)  # float32 accumulation on both sides


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("N,k,M,d", [(1, 1, 1, 1), (5, 3, 7, 17), (4, 7, 7, 33), (3, 9, 20, 16)])
@pytest.mark.parametrize("with_b_dec", (True, False))
def test_sparse_decode_sq_error(dtype, N, k, M, d, with_b_dec):
    values = torch.rand(N, k).to(dtype)
    indices = torch.stack([torch.randperm(M)[:k] for _ in range(N)])
    W = (torch.randn(M, d) / d**0.5).to(dtype)
    b = (torch.randn(d) * 0.1).to(dtype) if with_b_dec else None
    x = torch.randn(N, d).to(dtype)
    with ssae_kernels.use_backend("triton"):
        out = ops.sparse_decode_sq_error(values, indices, W, b, x)
    assert out.dtype == torch.float32 and out.shape == (N,)
    close(out, reference.sparse_decode_sq_error(values, indices, W, b, x), dtype=torch.float32,
          scale=float(out.abs().max()))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("N,k,M,d", [(1, 1, 1, 1), (5, 3, 7, 17), (4, 7, 7, 33), (3, 9, 20, 16), (2, 1, 5, 40)])
@pytest.mark.parametrize("with_b_dec", (True, False))
def test_sparse_decode_residual(dtype, N, k, M, d, with_b_dec):
    # d = 33 and 40 span several column blocks (partial dots merged), k = 7 = M and 9 several slot chunks
    values = torch.rand(N, k).to(dtype)
    indices = torch.randint(0, M, (N, k))
    W = (torch.randn(M, d) / d**0.5).to(dtype)
    b = (torch.randn(d) * 0.1).to(dtype) if with_b_dec else None
    x = torch.randn(N, d).to(dtype)
    scale = torch.rand(N) * 4 - 2
    with ssae_kernels.use_backend("triton"):
        residual, grad_values = ops.sparse_decode_residual(values, indices, W, b, x, scale)
    ref_residual, ref_grad = reference.sparse_decode_residual(values, indices, W, b, x, scale)
    assert residual.dtype == grad_values.dtype == dtype
    assert residual.shape == (N, d) and grad_values.shape == (N, k)
    close(residual, ref_residual, scale=k)
    close(grad_values, ref_grad, scale=k)


def test_squared_error_bad_input():
    with ssae_kernels.use_backend("triton"):
        a = torch.randn(3, 4, dtype=torch.float64)
        with pytest.raises(TypeError, match="triton backend supports float32, bfloat16 and float16"):
            ops.row_sq_error(a, a)
        with pytest.raises(TypeError, match="triton backend supports float32, bfloat16 and float16"):
            ops.sparse_decode_sq_error(torch.rand(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.int64),
                                       torch.randn(5, 4, dtype=torch.float64), None, a)
        with pytest.raises(IndexError, match="indices must lie in"):
            ops.sparse_decode_sq_error(torch.rand(3, 2), torch.full((3, 2), 5), torch.randn(5, 4), None,
                                       torch.randn(3, 4))
        with pytest.raises(IndexError, match="indices must lie in"):
            ops.sparse_decode_residual(torch.rand(3, 2), torch.full((3, 2), 5), torch.randn(5, 4), None,
                                       torch.randn(3, 4), torch.ones(3))
        with pytest.raises(TypeError, match="triton backend supports float32, bfloat16 and float16"):
            ops.sparse_decode_residual(torch.rand(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.int64),
                                       torch.randn(5, 4, dtype=torch.float64), None, a,
                                       torch.ones(3, dtype=torch.float64))


# ---- the public ops, forward and backward, through the Triton backend ------------------------


GROUPED = [  # t, groups?, t_group
    (0.0, False, 0.0), (1.0, False, 0.0), (500.0, False, 0.0), (-1.0, False, 0.0), (1e9, False, 0.0),
    (1.0, True, 0.0), (500.0, True, 2.0), (-1.0, True, -1.0), (1e9, True, 1e9),
]


def _group_ids(n):
    return torch.randint(0, 3, (n,)) * 2  # ids 0, 2, 4: 1 and 3 empty


@pytest.mark.parametrize("t,with_groups,t_group", GROUPED)
def test_tilted_loss_forward_backward(triton_calls, t, with_groups, t_group):
    losses = (torch.rand(150, dtype=torch.float64) * 4 + 0.5).float().requires_grad_(True)
    groups = _group_ids(150) if with_groups else None
    G = 5 if with_groups else 1
    with ssae_kernels.use_backend("triton"):
        value = ssae_kernels.tilted_loss(losses, t, groups=groups, t_group=t_group, num_groups=G if with_groups else None)
        (grad,) = torch.autograd.grad(value, losses)
    assert triton_calls["tilted_group_stats"] >= 2  # forward and the backward's recomputation
    ref_losses = losses.detach().double().requires_grad_(True)
    ref = reference.tilted_loss(ref_losses, t, groups, G, t_group)
    (ref_grad,) = torch.autograd.grad(ref, ref_losses)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("t,with_groups,t_group", [(0.0, False, 0.0), (500.0, False, 0.0), (1.0, True, 1e9)])
def test_tilted_mse_forward_backward(triton_calls, t, with_groups, t_group):
    N, d = 19, 21
    x_hat = torch.randn(N, d, requires_grad=True)
    x = torch.randn(N, d, requires_grad=True)
    groups = _group_ids(N) if with_groups else None
    with ssae_kernels.use_backend("triton"):
        value = ssae_kernels.tilted_mse(x_hat, x, t, groups=groups, t_group=t_group)
        grads = torch.autograd.grad(value, (x_hat, x))
    assert triton_calls["row_sq_error"] >= 1
    ref_inputs = [v.detach().double().requires_grad_(True) for v in (x_hat, x)]
    ref = reference.tilted_loss(reference.row_sq_error(*ref_inputs), t, groups,
                                int(groups.max()) + 1 if with_groups else 1, t_group)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=0.0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


@pytest.mark.parametrize("t,with_groups,t_group", [(0.0, False, 0.0), (500.0, False, 0.0), (-1.0, True, 1.0)])
@pytest.mark.parametrize("with_b_dec", (True, False))
def test_sparse_decode_mse_forward_backward(triton_calls, t, with_groups, t_group, with_b_dec):
    N, k, M, d = 13, 3, 11, 18
    values = torch.rand(N, k, requires_grad=True)
    indices = torch.stack([torch.randperm(M)[:k] for _ in range(N)])
    W = (torch.randn(M, d) / d**0.5).requires_grad_(True)
    b = (torch.randn(d) * 0.1).requires_grad_(True) if with_b_dec else None
    x = torch.randn(N, d, requires_grad=True)
    groups = _group_ids(N) if with_groups else None
    inputs = [v for v in (values, W, b, x) if v is not None]
    with ssae_kernels.use_backend("triton"):
        value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=t, groups=groups, t_group=t_group)
        grads = torch.autograd.grad(value, inputs)
    assert triton_calls["sparse_decode_sq_error"] >= 1 and triton_calls["sparse_decode_residual"] >= 1
    ref_inputs = [v.detach().double().requires_grad_(True) for v in inputs]
    rv, rW = ref_inputs[0], ref_inputs[1]
    rb = ref_inputs[2] if with_b_dec else None
    errors = reference.sparse_decode_sq_error(rv, indices, rW, rb, ref_inputs[-1])
    ref = reference.tilted_loss(errors, t, groups, int(groups.max()) + 1 if with_groups else 1, t_group)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=0.0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


class _Allocations(TorchDispatchMode):
    """Records the shape of every new tensor an op returns (factories and results alike)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0].endswith("_"):  # in place (the interpreter's own host copies)
            return out
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.sizes.append((func.__name__, tuple(o.shape)))
        return out


def test_sparse_decode_mse_forward_allocates_no_n_by_d_tensor():
    # the launchers themselves (a dispatch mode does not see inside a custom op's kernel)
    N, k, M, d = 40, 2, 6, 32
    values, indices = torch.rand(N, k), torch.randint(0, M, (N, k))
    W, b, x = torch.randn(M, d), torch.randn(d), torch.randn(N, d)
    with _Allocations() as seen:
        errors = tt.sparse_decode_sq_error(values, indices, W, b, x)
        anchor, log_mean, _ = tt.tilted_group_stats(errors, 500.0, None, 1)
    assert any(shape == (N,) for _, shape in seen.sizes), seen.sizes
    assert all(math.prod(shape) < N * d for _, shape in seen.sizes), seen.sizes
    ref = reference.tilted_loss(reference.sparse_decode_sq_error(values, indices, W, b, x), 500.0)
    torch.testing.assert_close(float(anchor + log_mean / 500.0), float(ref), rtol=1e-6, atol=0.0)
