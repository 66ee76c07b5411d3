"""TERM (ssae_kernels/ops/tilted_loss.py) on every backend: tilted_loss, tilted_mse, sparse_decode_mse,
their primitives tilted_group_stats, row_sq_error, sparse_decode_sq_error and sparse_decode_residual
(the backward of sparse_decode_sq_error), and StreamingTERM.

Sections: the ops on every backend (``backend`` fixture, tests/ops/conftest.py), including
index, group and data views; bad input; StreamingTERM; then backend-specific tests, marked:
the Triton launchers (interpreter) and GPU-only tests (``test_gpu_*``).

Interpreter tiles (ssae_kernels/triton/tilted_loss.py): statistics chunks of 64 losses,
group tiles of 4, gather tiles of 4 slots x 16 columns; the sizes below cross chunk,
block-merge and group-tile boundaries.
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssae_kernels
from assertions import DTYPES, close
from conftest import requires_cuda
from ssae_kernels import backends, reference

from .conftest import (as_view, bad_index_view, cpu_sized, device_of, group_views, index_views,
                       interpreted, interpreter, require, triton_module, uninterpreted)
from .test_sparse_decode import LAYOUT_ERROR, weight_view

ops = torch.ops.ssae
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILTS = (-1e9, -10.0, -1.0, -1e-6, 1e-6, 1.0, 500.0, 1e9)
STATS_TILTS = (0.0, -1e9, -1.0, 1e-6, 1.0, 500.0, 1e9)
TERM_OPS = ("tilted_group_stats", "row_sq_error", "sparse_decode_sq_error", "sparse_decode_residual")
DECODE_MSE_OPS = ("sparse_decode_sq_error", "sparse_decode_residual", "tilted_group_stats", "sparse_transpose_matmul",
                  "latent_transpose")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_exact = {}


def exact_tilted(losses, t):
    """High-precision TERM of float losses (the numbers as stored), by mpmath (cached: every backend
    sees the same losses)."""
    key = (losses.cpu().double().numpy().tobytes(), t)
    if key not in _exact:
        mpmath.mp.dps = 60
        values = [mpmath.mpf(float(v)) for v in losses.cpu()]
        if t == 0:
            _exact[key] = float(mpmath.fsum(values) / len(values))
        else:
            tt = mpmath.mpf(t)
            top = max(tt * v for v in values)
            mean = mpmath.fsum(mpmath.exp(tt * v - top) for v in values) / len(values)
            _exact[key] = float((top + mpmath.log(mean)) / tt)
    return _exact[key]


# ---- tilted_loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, TILTS[0], *map(uninterpreted, TILTS[1:-1]), TILTS[-1]])
@pytest.mark.parametrize("n", [301, cpu_sized(3001)])
def test_float32_accuracy_for_every_tilt(backend, t, n):
    require(backend, "tilted_group_stats")
    losses = (torch.rand(n) * 4 + 0.5).float().to(device_of(backend))
    value = ssae_kernels.tilted_loss(losses, t)
    assert value.dtype == torch.float32 and math.isfinite(float(value))
    expected = exact_tilted(losses, t)
    assert abs(float(value) - expected) <= 1e-5 * abs(expected), (float(value), expected)


def test_t_zero_is_exactly_the_mean(backend):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    losses = torch.randn(1000, dtype=torch.float64, device=device_of(backend))
    assert float(ssae_kernels.tilted_loss(losses, 0.0)) == pytest.approx(float(losses.mean()), rel=1e-15)


@pytest.mark.parametrize("t", [TILTS[0], *map(uninterpreted, TILTS[1:-1]), TILTS[-1]])
def test_single_loss_and_equal_losses(backend, t):
    dev = device_of(backend)
    assert float(ssae_kernels.tilted_loss(torch.tensor([2.5], device=dev), t)) == 2.5
    assert float(ssae_kernels.tilted_loss(torch.full((77,), -1.25, device=dev), t)) == -1.25


def test_limits_max_and_min(backend):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    losses = torch.rand(500, dtype=torch.float64, device=device_of(backend))
    assert float(ssae_kernels.tilted_loss(losses, 1e9)) == pytest.approx(float(losses.max()), abs=1e-8)
    assert float(ssae_kernels.tilted_loss(losses, -1e9)) == pytest.approx(float(losses.min()), abs=1e-8)


@pytest.mark.uninterpreted  # Triton: test_group_stats_large_losses_do_not_overflow
def test_finite_for_huge_losses_and_tilts(backend):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    if backend == "reference":
        # Its anchor is max(t l) / t, an ulp off the loss at |l| = 1e30, |t| = 1e9: t (l - anchor) is then
        # ~1e23 for the anchor's own loss and log_mean underflows to -inf (the kernels keep the loss itself).
        pytest.skip("the reference's anchor max(t l) / t loses the loss itself at |t l| ~ 1e39")
    losses = torch.tensor([1e30, -1e30, 3.0, 1e30], dtype=torch.float64, device=device_of(backend))
    for t in TILTS:
        value = ssae_kernels.tilted_loss(losses, t)
        grad, = torch.autograd.grad(ssae_kernels.tilted_loss(losses.requires_grad_(), t), losses)
        losses = losses.detach()
        assert math.isfinite(float(value)) and torch.isfinite(grad).all(), t


# In the interpreter: bfloat16, grouped, one pair of tilts (test_tilted_loss_forward_backward has float32).
@pytest.mark.parametrize("dtype", [uninterpreted(torch.float32), uninterpreted(torch.float64), torch.bfloat16,
                                   uninterpreted(torch.float16)], ids=str)
@pytest.mark.parametrize("t,t_group", [uninterpreted(0.0, 0.0), uninterpreted(1.0, 0.0), uninterpreted(500.0, 0.0),
                                       (-2.0, 3.0), uninterpreted(0.0, -1.0), uninterpreted(1e9, 1e9)])
@pytest.mark.parametrize("grouped", [uninterpreted(False), True])
def test_matches_reference_with_gradients(backend, dtype, t, t_group, grouped):
    require(backend, "tilted_group_stats", dtype=dtype)
    N, G = (130 if interpreted(backend) else 513), 7
    losses = (torch.rand(N, dtype=torch.float64) * 2).to(device_of(backend), dtype).requires_grad_()
    groups = torch.randint(0, G, (N,), device=losses.device) if grouped else None
    if not grouped:
        t_group = 0.0
    value = ssae_kernels.tilted_loss(losses, t, groups=groups, t_group=t_group)
    expected = reference.tilted_loss(losses, t, groups, G if grouped else 1, t_group)
    close(value, expected, dtype=dtype)
    grad, = torch.autograd.grad(value, losses)
    ref_grad, = torch.autograd.grad(expected, losses)
    close(grad, ref_grad, dtype=dtype, scale=1 / N)


GROUPED = [  # t, groups?, t_group
    (0.0, False, 0.0), (1.0, False, 0.0), (500.0, False, 0.0), (-1.0, False, 0.0), (1e9, False, 0.0),
    (1.0, True, 0.0), (500.0, True, 2.0), (-1.0, True, -1.0), (1e9, True, 1e9),
]


def _group_ids(n, device="cpu"):
    return (torch.randint(0, 3, (n,)) * 2).to(device)  # ids 0, 2, 4: 1 and 3 empty


@pytest.mark.parametrize("t,with_groups,t_group", GROUPED)
def test_tilted_loss_forward_backward(backend, kernel_calls, t, with_groups, t_group):
    # float32 losses against the float64 reference, the backward included; num_groups given
    dev = device_of(backend)
    losses = (torch.rand(150, dtype=torch.float64) * 4 + 0.5).float().to(dev).requires_grad_(True)
    groups = _group_ids(150, dev) if with_groups else None
    G = 5 if with_groups else 1
    value = ssae_kernels.tilted_loss(losses, t, groups=groups, t_group=t_group, num_groups=G if with_groups else None)
    (grad,) = torch.autograd.grad(value, losses)
    if backend in ("triton", "reference"):
        assert kernel_calls.get((backend, "tilted_group_stats"), 0) >= 2  # forward and the backward's recomputation
    ref_losses = losses.detach().double().requires_grad_(True)
    ref = reference.tilted_loss(ref_losses, t, groups, G, t_group)
    (ref_grad,) = torch.autograd.grad(ref, ref_losses)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


def test_groups_of_size_one_and_a_single_group(backend):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    dev = device_of(backend)
    losses = torch.rand(40, dtype=torch.float64, device=dev)
    # every sample its own group: inner tilt is irrelevant, outer tilt acts on the samples
    per_sample = ssae_kernels.tilted_loss(losses, 123.0, groups=torch.arange(40, device=dev), t_group=2.0)
    assert float(per_sample) == pytest.approx(float(ssae_kernels.tilted_loss(losses, 2.0)), rel=1e-12)
    # one group: the outer tilt is irrelevant
    single = ssae_kernels.tilted_loss(losses, 2.0, groups=torch.zeros(40, dtype=torch.int64, device=dev), t_group=-7.0)
    assert float(single) == pytest.approx(float(ssae_kernels.tilted_loss(losses, 2.0)), rel=1e-12)


def test_unused_group_ids_drop_out(backend):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    dev = device_of(backend)
    losses = torch.rand(30, dtype=torch.float64, device=dev)
    groups = _group_ids(30, dev)  # ids 0, 2, 4: 1 and 3 empty
    sparse_ids = ssae_kernels.tilted_loss(losses, 1.5, groups=groups, t_group=0.5)
    dense_ids = ssae_kernels.tilted_loss(losses, 1.5, groups=groups // 2, t_group=0.5)
    assert float(sparse_ids) == pytest.approx(float(dense_ids), rel=1e-12)


@pytest.mark.parametrize("t,t_group", [(0.0, 0.0), (1.0, 0.0), (-3.0, 0.0), (2.0, -1.5), (0.0, 4.0)])
def test_gradcheck(backend, t, t_group):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    if interpreted(backend):
        pytest.skip("gradcheck in float64 runs on the reference and cpu backends (and compiled triton)")
    dev = device_of(backend)
    losses = torch.rand(12, dtype=torch.float64, device=dev, requires_grad=True)
    groups = torch.tensor([0, 1, 1, 2, 0, 0, 2, 1, 3, 3, 0, 1], device=dev)

    def f(losses):
        return ssae_kernels.tilted_loss(losses, t, groups=groups, t_group=t_group)

    assert torch.autograd.gradcheck(f, (losses,))


def test_backward_weights_are_the_softmax(backend):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    losses = torch.randn(100, dtype=torch.float64, device=device_of(backend), requires_grad=True)
    grad, = torch.autograd.grad(ssae_kernels.tilted_loss(losses, 3.0), losses)
    close(grad, torch.softmax(3.0 * losses.detach(), 0))


@pytest.mark.parametrize("view", ["expanded", "sliced", "stepped", "column"])
def test_group_views_give_the_contiguous_result(backend, view):
    # tilted_loss and tilted_mse, forward and backward; out-of-range ids hidden behind the view
    # must not raise: only the entries it shows are group ids.
    dev = device_of(backend)
    N, G = 20, 4
    groups = group_views(N, G)[view].to(dev)
    losses = (torch.rand(N) * 2).to(dev)
    for inputs, fn in (((losses,), lambda g, l: ssae_kernels.tilted_loss(l, 2.0, groups=g, t_group=1.0)),
                       ((torch.randn(N, 6, device=dev), torch.randn(N, 6, device=dev)),
                        lambda g, a, b: ssae_kernels.tilted_mse(a, b, 2.0, groups=g, t_group=1.0, num_groups=G))):
        inputs = [t.requires_grad_(True) for t in inputs]
        value = fn(groups, *inputs)
        ref = fn(groups.contiguous(), *inputs)
        assert torch.equal(value, ref)
        for g, r in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(ref, inputs)):
            assert torch.equal(g, r)


@pytest.mark.parametrize("bad", [5, 10**11])
def test_visible_out_of_range_group_raises(backend, bad):
    # On CPU tensors every backend checks the group ids a view shows (num_groups = 5, given).
    require(backend, "tilted_group_stats", device="cpu")
    full = torch.randint(0, 5, (2 * 12,))
    full[6] = bad
    with pytest.raises(IndexError, match="groups"):
        ssae_kernels.tilted_loss(torch.rand(12), 1.0, groups=full[::2], num_groups=5)
    with pytest.raises(IndexError, match="groups"):
        ssae_kernels.tilted_mse(torch.rand(12, 3), torch.rand(12, 3), 1.0, groups=full[::2], num_groups=5)


def test_losses_view_gives_the_contiguous_result(backend):
    dev = device_of(backend)
    losses = (torch.rand(50) * 2).to(dev).requires_grad_(True)
    groups = _group_ids(50, dev)
    view = as_view(losses, "sliced")
    for g in (None, groups):
        value = ssae_kernels.tilted_loss(view, 3.0, groups=g)
        ref = ssae_kernels.tilted_loss(losses, 3.0, groups=g)
        assert torch.equal(value, ref)
        assert torch.equal(torch.autograd.grad(value, view)[0], torch.autograd.grad(ref, losses)[0])


# ---- tilted_group_stats: the O(N) reduction ----------------------------------------------------


def risk(anchor, log_mean, t):
    return anchor if t == 0 else anchor + log_mean / t


def check_stats(losses, t, groups, num_groups):
    anchor, log_mean, count = ops.tilted_group_stats(losses, t, groups, num_groups)
    ref_anchor, ref_log_mean, ref_count = reference.tilted_group_stats(losses, t, groups, num_groups)
    assert anchor.dtype == log_mean.dtype == torch.float64 and count.dtype == torch.int64
    assert torch.equal(count, ref_count)
    assert bool(torch.isfinite(anchor).all() and torch.isfinite(log_mean).all())
    # Both sides work in float64. The reference's anchor is max(t l) / t, which may sit an
    # ulp off the loss itself (a kernel may keep the loss): at |t| = 1e9 that ulp moves
    # log_mean by ~1e-6, so the per-group risk is the quantity compared tightly.
    torch.testing.assert_close(risk(anchor, log_mean, t), risk(ref_anchor, ref_log_mean, t), rtol=1e-12, atol=1e-12)
    if abs(t) <= 500:
        torch.testing.assert_close(anchor, ref_anchor, rtol=1e-15, atol=0.0)
        torch.testing.assert_close(log_mean, ref_log_mean, rtol=1e-10, atol=1e-14)
    empty = count == 0
    assert bool((anchor[empty] == 0).all() and (log_mean[empty] == 0).all())


@pytest.mark.parametrize("t", STATS_TILTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("n", (1, 63, 200))
def test_group_stats_without_groups(backend, t, dtype, n):
    losses = (torch.rand(n, dtype=torch.float64) * 4 + 0.5).to(device_of(backend), dtype)
    check_stats(losses, t, None, 1)


@pytest.mark.parametrize("t", STATS_TILTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_group_stats_with_groups(backend, t, dtype):
    n = 200
    dev = device_of(backend)
    losses = (torch.rand(n, dtype=torch.float64) * 4 + 0.5).to(dev, dtype)
    # ids 1, 4, 8 and 9 unused: empty groups, in the first and in later group tiles of 4
    used = torch.tensor([0, 2, 3, 5, 6, 7])
    groups = used[torch.randint(0, len(used), (n,))]
    groups[7] = 7  # make sure the last used id is present
    check_stats(losses, t, groups.to(dev), 10)


@pytest.mark.parametrize("t", (-1.0, 1.0, 1e9))
@pytest.mark.parametrize("order", ("ascending", "descending"))
@pytest.mark.parametrize("with_groups", (False, True))
def test_group_stats_anchor_moves(backend, t, order, with_groups):
    # 1100 losses: 9 interpreter programs of two chunks each, so the best loss moving later
    # (ascending at t > 0) or staying first (descending) exercises both sides of every merge
    dev = device_of(backend)
    losses = torch.sort(torch.rand(1100, dtype=torch.float64) * 4 + 0.5, descending=order == "descending").values
    groups = torch.randint(0, 6, (1100,), device=dev) if with_groups else None
    check_stats(losses.float().to(dev), t, groups, 6 if with_groups else 1)


@pytest.mark.parametrize("t", STATS_TILTS)
def test_group_stats_small_cases(backend, t):
    # n = 1 with groups, a single group, groups of size one, all-equal losses
    dev = device_of(backend)
    check_stats(torch.tensor([2.5], device=dev), t, torch.tensor([2], device=dev), 3)
    check_stats(torch.rand(70, device=dev), t, torch.zeros(70, dtype=torch.int64, device=dev), 1)
    check_stats(torch.rand(9, device=dev), t, torch.arange(9, device=dev), 9)
    equal = torch.full((130,), 1.75, device=dev)
    check_stats(equal, t, None, 1)
    anchor, log_mean, count = ops.tilted_group_stats(equal, t, None, 1)
    assert float(anchor) == 1.75 and float(log_mean) == 0.0 and int(count) == 130


def test_group_stats_large_losses_do_not_overflow(backend):
    # t * loss = 1e12: only differences from the anchor are exponentiated
    require(backend, "tilted_group_stats", dtype=torch.float64)
    losses = torch.rand(150, dtype=torch.float64, device=device_of(backend)) * 10 + 1000
    for t in (1e9, -1e9, 500.0):
        check_stats(losses, t, losses.long() % 3, 3)


def test_group_stats_float64_losses_and_bad_groups(backend):
    require(backend, "tilted_group_stats", dtype=torch.float64)
    check_stats(torch.rand(77, dtype=torch.float64, device=device_of(backend)), 1.0, None, 1)
    require(backend, "tilted_group_stats", device="cpu")
    with pytest.raises(IndexError, match="groups must lie in"):
        ops.tilted_group_stats(torch.rand(5), 1.0, torch.tensor([0, 1, 5, 0, 1]), 3)


# ---- tilted_mse and row_sq_error ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d", [(1, 1), (5, 17), (3, 33), (4, 16)])
def test_row_sq_error(backend, dtype, N, d):
    require(backend, "row_sq_error", dtype=dtype)
    dev = device_of(backend)
    x_hat, x = torch.randn(N, d).to(dev, dtype), torch.randn(N, d).to(dev, dtype)
    out = ops.row_sq_error(x_hat, x)
    assert out.dtype == acc_dtype(dtype) and out.shape == (N,)
    close(out, reference.row_sq_error(x_hat, x), dtype=out.dtype)  # accumulation dtype on both sides


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, uninterpreted(1.0), uninterpreted(500.0)])
def test_tilted_mse(backend, dtype, t):
    require(backend, "row_sq_error", "tilted_group_stats", dtype=dtype)
    dev = device_of(backend)
    x_hat = torch.randn(37, 29, dtype=torch.float64).to(dev, dtype).requires_grad_()
    x = torch.randn(37, 29, dtype=torch.float64).to(dev, dtype).requires_grad_()
    value = ssae_kernels.tilted_mse(x_hat, x, t)
    expected = reference.tilted_loss(reference.row_sq_error(x_hat, x), t)
    close(value, expected, dtype=dtype, scale=29)
    grads = torch.autograd.grad(value, (x_hat, x))
    ref = torch.autograd.grad(expected, (x_hat, x))
    for g, r in zip(grads, ref):
        close(g, r, dtype=dtype)


@pytest.mark.parametrize("t,with_groups,t_group", [(0.0, False, 0.0), (500.0, False, 0.0), (1.0, True, 1e9)])
def test_tilted_mse_forward_backward(backend, kernel_calls, t, with_groups, t_group):
    # float32 against the float64 reference, groups included
    dev = device_of(backend)
    N, d = 19, 21
    x_hat = torch.randn(N, d, device=dev, requires_grad=True)
    x = torch.randn(N, d, device=dev, requires_grad=True)
    groups = _group_ids(N, dev) if with_groups else None
    value = ssae_kernels.tilted_mse(x_hat, x, t, groups=groups, t_group=t_group)
    grads = torch.autograd.grad(value, (x_hat, x))
    if backend in ("triton", "reference"):
        assert kernel_calls.get((backend, "row_sq_error"), 0) >= 1
    ref_inputs = [v.detach().double().requires_grad_(True) for v in (x_hat, x)]
    ref = reference.tilted_loss(reference.row_sq_error(*ref_inputs), t, groups,
                                int(groups.max()) + 1 if with_groups else 1, t_group)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=0.0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_tilted_mse_data_views(backend, view):
    dev = device_of(backend)
    x_hat = torch.randn(9, 7, device=dev, requires_grad=True)
    x = torch.randn(9, 7, device=dev, requires_grad=True)
    views = [as_view(x_hat, view), as_view(x, view)]
    value = ssae_kernels.tilted_mse(*views, 2.0)
    ref = ssae_kernels.tilted_mse(x_hat, x, 2.0)
    close(value, ref, scale=7)
    for g, r in zip(torch.autograd.grad(value, views), torch.autograd.grad(ref, (x_hat, x))):
        close(g, r)


# ---- sparse_decode_mse, sparse_decode_sq_error, sparse_decode_residual --------------------------------


def make_decode_inputs(N, d, M, k, dtype, requires_grad=True, device="cpu"):
    indices = torch.randint(0, M, (N, k)).to(device)
    values = torch.rand(N, k, dtype=torch.float64).to(device, dtype)
    W = (torch.randn(M, d, dtype=torch.float64) / d**0.5).to(device, dtype)
    b = (torch.randn(d, dtype=torch.float64) * 0.1).to(device, dtype)
    x = torch.randn(N, d, dtype=torch.float64).to(device, dtype)
    for t in (values, W, b, x):
        t.requires_grad_(requires_grad)
    return values, indices, W, b, x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,M,d", [(1, 1, 1, 1), (5, 3, 7, 17), (4, 7, 7, 33), (3, 9, 20, 16)])
@pytest.mark.parametrize("with_b_dec", (True, False))
def test_sparse_decode_sq_error(backend, dtype, N, k, M, d, with_b_dec):
    require(backend, "sparse_decode_sq_error", dtype=dtype)
    dev = device_of(backend)
    values = torch.rand(N, k).to(dev, dtype)
    indices = torch.stack([torch.randperm(M)[:k] for _ in range(N)]).to(dev)
    W = (torch.randn(M, d) / d**0.5).to(dev, dtype)
    b = (torch.randn(d) * 0.1).to(dev, dtype) if with_b_dec else None
    x = torch.randn(N, d).to(dev, dtype)
    out = ops.sparse_decode_sq_error(values, indices, W, b, x)
    assert out.dtype == acc_dtype(dtype) and out.shape == (N,)
    close(out, reference.sparse_decode_sq_error(values, indices, W, b, x), dtype=out.dtype,
          scale=float(out.abs().max()))


# In the interpreter: float16 (test_sparse_decode_mse_forward_backward has float32).
@pytest.mark.parametrize("dtype", [uninterpreted(torch.float32), torch.float64, uninterpreted(torch.bfloat16),
                                   torch.float16], ids=str)
@pytest.mark.parametrize("t", [0.0, uninterpreted(500.0), uninterpreted(-3.0)])
@pytest.mark.parametrize("with_bias", [True, uninterpreted(False)])
@pytest.mark.parametrize("N,d,M,k", [(13, 18, 11, 3), cpu_sized(41, 23, 90, 6)])
def test_sparse_decode_mse(backend, dtype, t, with_bias, N, d, M, k):
    require(backend, *DECODE_MSE_OPS, dtype=dtype)
    values, indices, W, b, x = make_decode_inputs(N, d, M, k, dtype, device=device_of(backend))
    b = b if with_bias else None
    groups = torch.randint(0, 3, (N,), device=x.device)
    value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=t, groups=groups, t_group=1.0)
    expected = reference.tilted_loss(reference.sparse_decode_sq_error(values, indices, W, b, x), t, groups, 3, 1.0)
    close(value, expected, dtype=dtype, scale=d)
    inputs = [i for i in (values, W, b, x) if i is not None]
    grads = torch.autograd.grad(value, inputs)
    ref = torch.autograd.grad(expected, inputs)
    for g, r in zip(grads, ref):
        close(g, r, dtype=dtype, scale=2)


@pytest.mark.parametrize("t,with_groups,t_group", [(0.0, False, 0.0), (500.0, False, 0.0), (-1.0, True, 1.0)])
@pytest.mark.parametrize("with_b_dec", (True, False))
def test_sparse_decode_mse_forward_backward(backend, kernel_calls, t, with_groups, t_group, with_b_dec):
    # float32 against the float64 reference, groups included
    dev = device_of(backend)
    N, k, M, d = 13, 3, 11, 18
    values = torch.rand(N, k, device=dev, requires_grad=True)
    indices = torch.stack([torch.randperm(M)[:k] for _ in range(N)]).to(dev)
    W = (torch.randn(M, d, device=dev) / d**0.5).requires_grad_(True)
    b = (torch.randn(d, device=dev) * 0.1).requires_grad_(True) if with_b_dec else None
    x = torch.randn(N, d, device=dev, requires_grad=True)
    groups = _group_ids(N, dev) if with_groups else None
    inputs = [v for v in (values, W, b, x) if v is not None]
    value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=t, groups=groups, t_group=t_group)
    grads = torch.autograd.grad(value, inputs)
    if backend in ("triton", "reference"):
        assert kernel_calls.get((backend, "sparse_decode_sq_error"), 0) >= 1
        assert kernel_calls.get((backend, "sparse_decode_residual"), 0) >= 1
    ref_inputs = [v.detach().double().requires_grad_(True) for v in inputs]
    rv, rW = ref_inputs[0], ref_inputs[1]
    rb = ref_inputs[2] if with_b_dec else None
    errors = reference.sparse_decode_sq_error(rv, indices, rW, rb, ref_inputs[-1])
    ref = reference.tilted_loss(errors, t, groups, int(groups.max()) + 1 if with_groups else 1, t_group)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=0.0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


def test_sparse_decode_mse_gradcheck(backend):
    require(backend, *DECODE_MSE_OPS, dtype=torch.float64)
    values, indices, W, b, x = make_decode_inputs(9, 5, 12, 3, torch.float64, device=device_of(backend))
    f = lambda values, W, b, x: ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (values, W, b, x))


def make_residual_inputs(N, d, M, k, dtype, with_bias=True, device="cpu"):
    values, indices, W, b, x = make_decode_inputs(N, d, M, k, dtype, requires_grad=False, device=device)
    scale = (torch.rand(N, dtype=torch.float64) * 3 - 1).to(device, acc_dtype(dtype))
    return values, indices, W, b if with_bias else None, x, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [
    # d = 33 and 40 span several column blocks (partial dots merged), k = 7 = M and 9 several slot chunks
    (1, 1, 1, 1), (5, 17, 7, 3), (4, 33, 7, 7), (3, 16, 20, 9), (2, 40, 5, 1),
    cpu_sized(37, 29, 101, 8), uninterpreted(9, 3, 4, 4), uninterpreted(5, 70, 13, 1), uninterpreted(3, 5, 6, 6),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_decode_residual_matches_reference(backend, dtype, N, d, M, k, with_bias):
    require(backend, "sparse_decode_residual", dtype=dtype)
    args = make_residual_inputs(N, d, M, k, dtype, with_bias, device=device_of(backend))
    residual, grad_values = ops.sparse_decode_residual(*args)
    ref_residual, ref_grad = reference.sparse_decode_residual(*args)
    assert residual.shape == (N, d) and grad_values.shape == (N, k)
    assert residual.dtype == grad_values.dtype == dtype
    close(residual, ref_residual, scale=k)
    close(grad_values, ref_grad, scale=k)


def test_sparse_decode_residual_non_contiguous(backend):
    dev = device_of(backend)
    v = torch.rand(13, 12, device=dev)[:, ::2]
    ix = torch.randint(0, 40, (6, 13), device=dev).T
    W = torch.randn(40, 20, device=dev)[:, 5:15]
    b = torch.randn(20, device=dev)[::2]
    x = torch.randn(10, 13, device=dev).T
    scale = torch.tensor([2.0], device=dev).expand(13)  # as autograd passes the gradient of a sum
    args = (v, ix, W, b, x, scale)
    assert not any(t.is_contiguous() for t in args)
    out = ops.sparse_decode_residual(*args)
    for o, r in zip(out, reference.sparse_decode_residual(*args)):
        close(o, r, scale=6)


@pytest.mark.parametrize("view", ["expanded", "sliced", "stepped", "transposed"])
def test_index_views_give_the_contiguous_result(backend, view):
    # sparse_decode_sq_error and sparse_decode_residual (no autograd) and sparse_decode_mse (forward and
    # backward) give on an index view their results on the contiguous indices (group views: above).
    dev = device_of(backend)
    N, d, M = 5, 6, 16
    indices = index_views(N, M)[view].to(dev)
    dense = indices.contiguous()
    values, _, W, b, x = make_decode_inputs(N, d, M, 2, torch.float32, requires_grad=False, device=dev)
    scale = torch.rand(N, device=dev)
    assert torch.equal(ops.sparse_decode_sq_error(values, indices, W, b, x),
                       ops.sparse_decode_sq_error(values, dense, W, b, x))
    for o, r in zip(ops.sparse_decode_residual(values, indices, W, b, x, scale),
                    ops.sparse_decode_residual(values, dense, W, b, x, scale)):
        assert torch.equal(o, r)
    inputs = [t.requires_grad_(True) for t in (values, W, b, x)]
    value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=2.0)
    ref = ssae_kernels.sparse_decode_mse(values, dense, W, b, x, t=2.0)
    assert torch.equal(value, ref)
    for g, r in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(ref, inputs)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_decode_data_views_give_the_contiguous_result(backend, view):
    dev = device_of(backend)
    N, d, M, k = 7, 6, 12, 3
    values, indices, W, b, x = make_decode_inputs(N, d, M, k, torch.float32, device=dev)
    # W_dec in any layout on cpu, reference and triton; cuda reads it in place and needs unit
    # stride along d (test_decode_weight_layout_on_gpu_backends).
    W_view = weight_view(W, "offset") if backend == "cuda" else as_view(W, view)
    views = [as_view(values, view), W_view, as_view(b, "sliced"), as_view(x, view)]
    value = ssae_kernels.sparse_decode_mse(views[0], indices, *views[1:], t=2.0)
    ref = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=2.0)
    close(value, ref, scale=d)
    for g, r in zip(torch.autograd.grad(value, views), torch.autograd.grad(ref, (values, W, b, x))):
        close(g, r, scale=2)
    scale = as_view(torch.rand(N, device=dev), "sliced")
    plain = [t.detach() for t in (values, W, b, x)]
    close(ops.sparse_decode_sq_error(views[0].detach(), indices, *[v.detach() for v in views[1:]]),
          ops.sparse_decode_sq_error(*plain[:1], indices, *plain[1:]), scale=d)
    for o, r in zip(ops.sparse_decode_residual(views[0].detach(), indices, *[v.detach() for v in views[1:]], scale),
                    ops.sparse_decode_residual(*plain[:1], indices, *plain[1:], scale.contiguous())):
        close(o, r, scale=k)


@pytest.mark.parametrize("op", ["sparse_decode_sq_error", "sparse_decode_residual"])
def test_decode_weight_layout_on_gpu_backends(backend, op):
    # A transposed W_dec: declined by cuda (never copied), named; read in place elsewhere.
    dev = device_of(backend)
    N, d, M, k = 7, 6, 12, 3
    values, indices, W, b, x = make_decode_inputs(N, d, M, k, torch.float32, device=dev)
    args = [values.detach(), indices, as_view(W.detach(), "transposed"), b.detach(), x.detach()]
    if op == "sparse_decode_residual":
        args.append(torch.rand(N, device=dev))
    if backend == "cuda":
        with pytest.raises((RuntimeError, ValueError), match=LAYOUT_ERROR.format(name="W_dec")):
            getattr(ops, op)(*args)
    else:
        plain = [a.contiguous() if a is args[2] else a for a in args]
        for out, ref in zip(*(getattr(ops, op)(*a) if op == "sparse_decode_residual" else (getattr(ops, op)(*a),)
                               for a in (args, plain))):
            close(out, ref, scale=d)


@pytest.mark.parametrize("op", ["sparse_decode_mse", "sparse_decode_sq_error", "sparse_decode_residual"])
@pytest.mark.parametrize("bad", [20, 10**11])
def test_visible_out_of_range_index_raises(backend, op, bad):
    # On CPU tensors every backend checks the entries a view shows (M = 16).
    require(backend, "sparse_decode_sq_error", device="cpu")
    values, _, W, b, x = make_decode_inputs(6, 4, 16, 2, torch.float32, requires_grad=False)
    indices = bad_index_view(6, 16, bad)
    with pytest.raises(IndexError, match="indices"):
        if op == "sparse_decode_mse":
            ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=1.0)
        elif op == "sparse_decode_sq_error":
            ops.sparse_decode_sq_error(values, indices, W, b, x)
        else:
            ops.sparse_decode_residual(values, indices, W, b, x, torch.ones(6))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.uninterpreted  # the autograd formulas' choice, the same on every backend
def test_sparse_decode_mse_backward_gathers_once(backend):
    values, indices, W, b, x = make_decode_inputs(20, 16, 30, 4, torch.float32, device=device_of(backend))
    value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
    with _OpLog() as log:
        torch.autograd.grad(value, (values, W, b, x))
    assert "ssae.sparse_decode_residual" in log.names
    assert "ssae.sampled_dot" not in log.names and "ssae.sparse_decode" not in log.names, log.names


@pytest.mark.uninterpreted  # Triton: test_sparse_decode_mse_forward_backward
@pytest.mark.parametrize("needed", [(False, True, False, False), (False, False, True, True),
                                    (True, False, False, False)])
def test_sparse_decode_mse_partial_gradients(backend, needed):
    values, indices, W, b, x = make_decode_inputs(15, 11, 20, 5, torch.float32, requires_grad=False,
                                                  device=device_of(backend))
    inputs = [t.requires_grad_(n) for t, n in zip((values, W, b, x), needed)]
    value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
    expected = reference.tilted_loss(reference.sparse_decode_sq_error(values, indices, W, b, x), 500.0)
    wanted = [t for t in inputs if t.requires_grad]
    for g, r in zip(torch.autograd.grad(value, wanted), torch.autograd.grad(expected, wanted)):
        close(g, r, scale=2)


def test_cpu_sparse_decode_mse_forward_stores_no_reconstruction():
    # cpu backend: the forward decodes into per-thread buffers (Triton: test_triton_sparse_decode_mse_allocations)
    require("cpu", "sparse_decode_sq_error")
    values, indices, W, b, x = make_decode_inputs(64, 48, 100, 4, torch.float32, requires_grad=False)
    with ssae_kernels.use_backend("cpu"), torch.profiler.profile(profile_memory=True) as prof:
        ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < 64 * 48 * 4  # nothing of [N, d] size was allocated


@pytest.mark.parametrize("op,args", [
    ("sparse_decode_residual", lambda: make_residual_inputs(6, 5, 9, 3, torch.float32)),
    ("sparse_decode_residual", lambda: make_residual_inputs(4, 7, 5, 5, torch.float64, with_bias=False)),
    ("tilted_loss", lambda: (torch.rand(20, requires_grad=True), 2.0, torch.randint(0, 3, (20,)), 3, 1.0)),
    ("tilted_group_stats", lambda: (torch.rand(20), 2.0, None, 1)),
    ("row_sq_error", lambda: (torch.randn(6, 5, requires_grad=True), torch.randn(6, 5))),
    ("sparse_decode_sq_error", lambda: make_decode_inputs(6, 5, 9, 3, torch.float32)[:3]
     + (torch.zeros(5, requires_grad=True), torch.randn(6, 5))),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.ssae, op).default, args())


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,error,match", [
    (lambda: (torch.rand(5, 2), 1.0), ValueError, "losses must be 1-D"),
    (lambda: (torch.rand(0), 1.0), ValueError, "losses must not be empty"),
    (lambda: (torch.arange(5), 1.0), TypeError, "losses must be float32"),
    (lambda: (torch.rand(5), float("inf")), ValueError, "t must be finite"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ssae_kernels.tilted_loss(*args())


def test_bad_groups():
    losses = torch.rand(5)
    with pytest.raises(ValueError, match="groups must be >= 0"):
        ssae_kernels.tilted_loss(losses, 1.0, groups=torch.tensor([0, 1, -1, 0, 0]))
    with pytest.raises(ValueError, match="groups must not be empty"):
        ssae_kernels.tilted_loss(losses, 1.0, groups=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="groups must have one id per loss"):
        ssae_kernels.tilted_loss(losses, 1.0, groups=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="groups must be an int64 tensor"):
        ssae_kernels.tilted_loss(losses, 1.0, groups=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(IndexError, match=r"groups must lie in \[0, 2\)"):
        ssae_kernels.tilted_loss(losses, 1.0, groups=torch.tensor([0, 1, 2, 0, 0]), num_groups=2)
    with pytest.raises(ValueError, match="t_group needs groups"):
        ssae_kernels.tilted_loss(losses, 1.0, t_group=2.0)


def _with_t(name, t):
    """The public TERM function ``name`` with tilt ``t``, on the same inputs at every call."""
    torch.manual_seed(0)
    if name == "tilted_loss":
        return ssae_kernels.tilted_loss(torch.rand(6, dtype=torch.float64), t)
    if name == "tilted_mse":
        return ssae_kernels.tilted_mse(torch.randn(6, 4), torch.randn(6, 4), t)
    values, indices, W, bias, x = make_decode_inputs(6, 4, 9, 2, torch.float32, requires_grad=False)
    return ssae_kernels.sparse_decode_mse(values, indices, W, bias, x, t=t)


@pytest.mark.parametrize("name", ["tilted_loss", "tilted_mse", "sparse_decode_mse"])
@pytest.mark.parametrize("t", ["a", True, False])
def test_t_must_be_a_real_number(name, t):
    with pytest.raises(TypeError, match=r"\bt\b"):
        _with_t(name, t)


@pytest.mark.parametrize("name", ["tilted_loss", "tilted_mse", "sparse_decode_mse"])
@pytest.mark.parametrize("t", [2, 2.0, np.float64(2.0), np.float32(2.0), np.int64(2)], ids=repr)
def test_t_may_be_any_real_number(name, t):
    assert torch.equal(_with_t(name, t), _with_t(name, 2.0))


def _residual_args(**override):
    values, indices, W, b, x, scale = make_residual_inputs(5, 4, 10, 3, torch.float32)
    args = dict(values=values, indices=indices, W_dec=W, b_dec=b, x=x, scale=scale)
    args.update(override)
    return tuple(args.values())


@pytest.mark.parametrize("override,error,match", [
    (dict(scale=torch.rand(5, dtype=torch.float64)), TypeError, "scale must be torch.float32"),
    (dict(scale=torch.rand(4)), ValueError, "scale must have one entry per row"),
    (dict(scale=torch.rand(5, 1)), ValueError, "scale must be 1-D"),
    (dict(x=torch.randn(5, 3)), ValueError, "x must be"),
    (dict(x=torch.randn(5, 4, dtype=torch.float64)), TypeError, "x has dtype"),
    (dict(b_dec=torch.randn(3)), ValueError, r"b_dec.shape\[0\]"),
    (dict(indices=torch.full((5, 3), 10)), IndexError, r"indices must lie in \[0, 10\)"),
])
def test_sparse_decode_residual_bad_input(backend, override, error, match):
    require(backend, "sparse_decode_residual", device="cpu")
    with pytest.raises(error, match=match):
        ops.sparse_decode_residual(*_residual_args(**override))


def test_sparse_decode_sq_error_bad_indices(backend):
    require(backend, "sparse_decode_sq_error", device="cpu")
    with pytest.raises(IndexError, match="indices must lie in"):
        ops.sparse_decode_sq_error(torch.rand(3, 2), torch.full((3, 2), 5), torch.randn(5, 4), None, torch.randn(3, 4))


@pytest.mark.parametrize("op", ["row_sq_error", "sparse_decode_sq_error", "sparse_decode_residual"])
def test_float64_is_not_served_by_triton(op):
    # The triton backend has no float64 kernel for these (tilted_group_stats has one): asked for
    # by name, it says so rather than serving the call.
    require("triton", op)
    dev = device_of("triton")
    a = torch.randn(3, 4, dtype=torch.float64, device=dev)
    decode = (torch.rand(3, 2, dtype=torch.float64, device=dev), torch.zeros(3, 2, dtype=torch.int64, device=dev),
              torch.randn(5, 4, dtype=torch.float64, device=dev), None, a)
    with ssae_kernels.use_backend("triton"), pytest.raises(Exception, match=r"triton.*does not support float64"):
        if op == "row_sq_error":
            ops.row_sq_error(a, a)
        elif op == "sparse_decode_sq_error":
            ops.sparse_decode_sq_error(*decode)
        else:
            ops.sparse_decode_residual(*decode, torch.ones(3, dtype=torch.float64, device=dev))


# ---- streaming TERM --------------------------------------------------------------------


def test_streaming_first_batch_weights_are_the_batch_softmax():
    term = ssae_kernels.StreamingTERM(t=2.0, lam=0.3)
    losses = torch.rand(50, dtype=torch.float64)
    weights = term.weights(losses)
    close(weights, 50 * torch.softmax(2.0 * losses, 0))
    assert term.risk == pytest.approx(float(reference.tilted_loss(losses, 2.0)), rel=1e-12)


def test_streaming_estimate_tracks_the_full_data_risk():
    data = torch.rand(20000, dtype=torch.float64) * 3
    term = ssae_kernels.StreamingTERM(t=1.5, lam=0.05)
    for batch in data.split(100):
        term(batch)
    assert term.risk == pytest.approx(float(reference.tilted_loss(data, 1.5)), rel=0.02)


def test_streaming_state_round_trip_and_t_zero():
    a = ssae_kernels.StreamingTERM(t=4.0, lam=0.2)
    a(torch.rand(10))
    b = ssae_kernels.StreamingTERM(t=1.0)
    b.load_state_dict(a.state_dict())
    batch = torch.rand(10)
    assert torch.equal(a.weights(batch), b.weights(batch)) and a.risk == b.risk
    assert torch.equal(ssae_kernels.StreamingTERM(t=0.0).weights(batch), torch.ones(10))
    with pytest.raises(ValueError, match="lam must be in"):
        ssae_kernels.StreamingTERM(t=1.0, lam=0.0)


# ---- triton backend only (interpreter) ---------------------------------------------------------------


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


@interpreter
def test_triton_sparse_decode_mse_forward_allocates_no_n_by_d_tensor():
    # the launchers themselves (a dispatch mode does not see inside a custom op's kernel)
    tt = triton_module("tilted_loss")
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


# ---- GPU only -------------------------------------------------------------------------------------


def _groups(kind, n):
    if kind == "none":
        return None, 1
    if kind == "one":
        return torch.zeros(n, dtype=torch.int64, device="cuda"), 1
    if kind == "singletons":  # groups of size 1, in shuffled order
        return torch.randperm(n, device="cuda"), n
    # 1000 ids with a skewed distribution: some groups large, many empty
    return (torch.rand(n, device="cuda") ** 3 * 1000).long(), 1000


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 5001, 300001])
@pytest.mark.parametrize("kind", ["none", "one", "singletons", "skewed"])
def test_gpu_cuda_tilted_group_stats(dtype, n, kind):
    # cuda backend only: its anchor is a loss of the group, bit for bit the reference's; every tilt
    require("cuda", "tilted_group_stats", dtype=dtype)
    if kind == "singletons" and n > 5001:
        pytest.skip("covered by the smaller sizes")
    losses = (torch.rand(n, device="cuda", dtype=torch.float64) * 3).to(dtype)
    groups, G = _groups(kind, n)
    for t in (0.0,) + TILTS:
        with ssae_kernels.use_backend("cuda"):
            anchor, log_mean, count = ops.tilted_group_stats(losses, t, groups, G)
        # The kernel reads each loss exactly into float64: the float64 reference is the same math.
        ref_anchor, ref_log_mean, ref_count = reference.tilted_group_stats(losses.double(), t, groups, G)
        assert anchor.dtype == log_mean.dtype == torch.float64 and count.dtype == torch.int64
        assert torch.equal(count, ref_count), t
        if t != 0:
            assert torch.equal(anchor, ref_anchor), t  # a loss of the group, not a computed value
            risk_, ref_risk = anchor + log_mean / t, ref_anchor + ref_log_mean / t
        else:
            risk_, ref_risk = anchor, ref_anchor
        torch.testing.assert_close(risk_, ref_risk, rtol=1e-12, atol=1e-300, msg=lambda m: f"t = {t}: {m}")
        torch.testing.assert_close(log_mean, ref_log_mean, rtol=1e-10, atol=1e-13, msg=lambda m: f"t = {t}: {m}")


@pytest.mark.parametrize("t", (-1e9, 1e-6, 500.0))
def test_gpu_tilted_loss_equal_losses_and_public_op(gpu_backend, t):
    losses = torch.full((4099,), 0.7, device="cuda")
    assert float(ssae_kernels.tilted_loss(losses, t)) == pytest.approx(0.7, rel=1e-7)
    x = torch.rand(4099, device="cuda") * 2
    g = torch.randint(0, 5, (4099,), device="cuda")
    out = ssae_kernels.tilted_loss(x, t, groups=g, t_group=1.0)
    expected = reference.tilted_loss(x.double(), t, g, 5, 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


def test_gpu_group_check_on_request(gpu_backend, monkeypatch):
    # SSAE_CHECK_INDICES=1 makes every GPU backend raise as the CPU backend does (at a sync per call).
    monkeypatch.setenv("SSAE_CHECK_INDICES", "1")
    with pytest.raises(IndexError, match="groups"):
        ssae_kernels.tilted_loss(torch.rand(4, device="cuda"), 1.0,
                                 groups=torch.tensor([0, 1, 2, 3], device="cuda"), num_groups=3)


def _max_rel_error(actual, exact):
    return float(((actual.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max())


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,d", [(1, 1), (9, 33), (300, 768), (5, 5000), (4097, 64)])
def test_gpu_row_sq_error(gpu_backend, dtype, N, d):
    x_hat = torch.randn(N, d, device="cuda").to(dtype)
    x = torch.randn(N, d, device="cuda").to(dtype)
    out = ops.row_sq_error(x_hat, x)
    assert out.dtype == torch.float32 and out.shape == (N,)
    exact = reference.row_sq_error(x_hat.double(), x.double())
    # float32 accumulation: within a few times what PyTorch's own float32 evaluation achieves
    torch_error = _max_rel_error(reference.row_sq_error(x_hat, x), exact)
    assert _max_rel_error(out, exact) <= 4 * torch_error + 1e-6


GPU_DECODE_SHAPES = [(1, 1, 1, 1), (17, 5, 33, 40), (300, 32, 768, 24576), (9, 40, 1025, 40), (5, 300, 7, 1000),
                     (3, 7, 5000, 7)]  # N, k, d, M


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,k,d,M", GPU_DECODE_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_sparse_decode_sq_error(gpu_backend, dtype, N, k, d, M, with_bias):
    values = torch.randn(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).to(dtype)
    bias = torch.randn(d, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(N, d, device="cuda").to(dtype)
    out = ops.sparse_decode_sq_error(values, indices, W, bias, x)
    assert out.dtype == torch.float32 and out.shape == (N,)
    exact = reference.sparse_decode_sq_error(values.double(), indices, W.double(),
                                             None if bias is None else bias.double(), x.double())
    torch_error = _max_rel_error(reference.sparse_decode_sq_error(values, indices, W, bias, x), exact)
    assert _max_rel_error(out, exact) <= 4 * torch_error + 1e-6


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,k,d,M", GPU_DECODE_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_sparse_decode_residual(gpu_backend, dtype, N, k, d, M, with_bias):
    # d = 1025 and 5000 span several column tiles, k = 300 two staging rounds, (9, 40, 1025, 40) has k = M
    values = torch.rand(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).to(dtype)
    bias = (torch.randn(d, device="cuda") * 0.1).to(dtype) if with_bias else None
    x = torch.randn(N, d, device="cuda").to(dtype)
    scale = torch.rand(N, device="cuda") * 4 - 2
    residual, grad_values = ops.sparse_decode_residual(values, indices, W, bias, x, scale)
    assert residual.dtype == grad_values.dtype == dtype
    assert residual.shape == (N, d) and grad_values.shape == (N, k)
    ref_residual, ref_grad = reference.sparse_decode_residual(values, indices, W, bias, x, scale)
    close(residual, ref_residual, scale=k)
    close(grad_values, ref_grad, scale=k)
    # deterministic: the per-tile partial dots are merged in a fixed order
    again = ops.sparse_decode_residual(values, indices, W, bias, x, scale)
    assert torch.equal(again[0], residual) and torch.equal(again[1], grad_values)


def test_gpu_sparse_decode_mse_backward(gpu_backend):
    N, k, d, M = 64, 8, 300, 500
    values = torch.rand(N, k, device="cuda", requires_grad=True)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).requires_grad_(True)
    b = (torch.randn(d, device="cuda") * 0.1).requires_grad_(True)
    x = torch.randn(N, d, device="cuda", requires_grad=True)
    inputs = (values, W, b, x)
    value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
    grads = torch.autograd.grad(value, inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    rv, rW, rb, rx = ref_inputs
    ref = reference.tilted_loss(reference.sparse_decode_sq_error(rv, indices, rW, rb, rx), 500.0)
    for g, r in zip(grads, torch.autograd.grad(ref, ref_inputs)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


@requires_cuda
@pytest.mark.parametrize("op", ["row_sq_error", "sparse_decode_sq_error", "sparse_decode_residual"])
def test_gpu_float64_falls_back_to_reference(kernel_calls, monkeypatch, op):
    # No GPU backend serves these in float64: without an override, float64 CUDA tensors go to the reference.
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    values, indices, W, b, x, scale = make_residual_inputs(6, 5, 9, 3, torch.float64, device="cuda")
    args = {"row_sq_error": (x, x + 1), "sparse_decode_sq_error": (values, indices, W, b, x),
            "sparse_decode_residual": (values, indices, W, b, x, scale)}[op]
    out = getattr(ops, op)(*args)
    assert kernel_calls.get(("reference", op), 0) == 1
    expected = getattr(reference, op)(*args)
    for o, e in zip(*(r if isinstance(r, tuple) else (r,) for r in (out, expected))):
        assert torch.equal(o, e)


# ---- cuda backend only: unchecked ids and indices poison their outputs, and its own argument checks ----


@requires_cuda
def test_gpu_cuda_bad_group_id_gives_nan():
    # Out-of-range ids are not checked on the host (a sync); they poison the result instead.
    require("cuda", "tilted_group_stats")
    losses = torch.rand(100, device="cuda")
    groups = torch.zeros(100, dtype=torch.int64, device="cuda")
    groups[37] = 3
    with ssae_kernels.use_backend("cuda"):
        anchor, log_mean, count = ops.tilted_group_stats(losses, 1.0, groups, 2)
    assert bool(anchor.isnan().all()) and bool(log_mean.isnan().all())
    assert count.tolist() == [99, 0]


@requires_cuda
def test_gpu_cuda_bad_index_gives_nan():
    require("cuda", "sparse_decode_sq_error")
    M, d = 10, 8
    indices = torch.tensor([[0, 1], [2, M], [-1, 3]], device="cuda")
    values, W, x = torch.randn(3, 2, device="cuda"), torch.randn(M, d, device="cuda"), torch.randn(3, d, device="cuda")
    with ssae_kernels.use_backend("cuda"):
        out = ops.sparse_decode_sq_error(values, indices, W, None, x)
        residual, grad_values = ops.sparse_decode_residual(values, indices, W, None, x, torch.ones(3, device="cuda"))
    assert not bool(out[0].isnan()) and bool(out[1:].isnan().all())
    assert not bool(residual[0].isnan().any() or grad_values[0].isnan().any())
    assert bool(residual[1:].isnan().all() and grad_values[1:].isnan().all())


@requires_cuda
def test_gpu_cuda_term_bad_input():
    require("cuda", "tilted_group_stats")
    losses = torch.rand(10, device="cuda")
    i64 = dict(dtype=torch.int64, device="cuda")
    with ssae_kernels.use_backend("cuda"):
        with pytest.raises((TypeError, RuntimeError),
                           match="float64 runs on the reference backend|does not support float64"):
            ops.tilted_group_stats(losses.double(), 1.0, None, 1)
        with pytest.raises(RuntimeError, match="serves cuda tensors"):
            ops.tilted_group_stats(losses.cpu(), 1.0, None, 1)
        with pytest.raises(TypeError, match="groups must be int64"):
            ops.tilted_group_stats(losses, 1.0, torch.zeros(10, dtype=torch.int32, device="cuda"), 1)
        with pytest.raises((ValueError, RuntimeError), match="num_groups must be 1 without groups"):
            ops.tilted_group_stats(losses, 1.0, None, 2)
        with pytest.raises((ValueError, RuntimeError), match="x must have the shape of x_hat"):
            ops.row_sq_error(torch.rand(3, 4, device="cuda"), torch.rand(3, 5, device="cuda"))
        with pytest.raises((ValueError, RuntimeError), match="x must be"):
            ops.sparse_decode_sq_error(torch.rand(3, 2, device="cuda"), torch.zeros(3, 2, **i64),
                                       torch.rand(5, 4, device="cuda"), None, torch.rand(3, 5, device="cuda"))
        with pytest.raises(TypeError, match="scale must be"):
            ops.sparse_decode_residual(torch.rand(3, 2, device="cuda"), torch.zeros(3, 2, **i64),
                                       torch.rand(5, 4, device="cuda"), None, torch.rand(3, 4, device="cuda"),
                                       torch.ones(3, dtype=torch.float64, device="cuda"))
        with pytest.raises((ValueError, RuntimeError), match="scale must"):
            ops.sparse_decode_residual(torch.rand(3, 2, device="cuda"), torch.zeros(3, 2, **i64),
                                       torch.rand(5, 4, device="cuda"), None, torch.rand(3, 4, device="cuda"),
                                       torch.ones(4, device="cuda"))
