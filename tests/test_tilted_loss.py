import math

import mpmath
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssae_kernels
from ssae_kernels import reference
from assertions import DTYPES, close

BACKENDS = ("cpu",)
ops = torch.ops.ssae
TILTS = (-1e9, -10.0, -1.0, -1e-6, 1e-6, 1.0, 500.0, 1e9)


def exact_tilted(losses, t):
    """High-precision TERM of float losses (the numbers as stored), by mpmath."""
    mpmath.mp.dps = 60
    values = [mpmath.mpf(float(v)) for v in losses]
    if t == 0:
        return float(mpmath.fsum(values) / len(values))
    t = mpmath.mpf(t)
    top = max(t * v for v in values)
    mean = mpmath.fsum(mpmath.exp(t * v - top) for v in values) / len(values)
    return float((top + mpmath.log(mean)) / t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", (0.0,) + TILTS)
def test_float32_accuracy_for_every_tilt(backend, t):
    losses = (torch.rand(3001) * 4 + 0.5).float()
    with ssae_kernels.use_backend(backend):
        value = ssae_kernels.tilted_loss(losses, t)
    assert value.dtype == torch.float32 and math.isfinite(float(value))
    expected = exact_tilted(losses, t)
    assert abs(float(value) - expected) <= 1e-5 * abs(expected), (float(value), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_t_zero_is_exactly_the_mean(backend):
    losses = torch.randn(1000, dtype=torch.float64)
    with ssae_kernels.use_backend(backend):
        assert float(ssae_kernels.tilted_loss(losses, 0.0)) == pytest.approx(float(losses.mean()), rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", TILTS)
def test_single_loss_and_equal_losses(backend, t):
    with ssae_kernels.use_backend(backend):
        assert float(ssae_kernels.tilted_loss(torch.tensor([2.5]), t)) == 2.5
        assert float(ssae_kernels.tilted_loss(torch.full((77,), -1.25), t)) == -1.25


@pytest.mark.parametrize("backend", BACKENDS)
def test_limits_max_and_min(backend):
    losses = torch.rand(500, dtype=torch.float64)
    with ssae_kernels.use_backend(backend):
        assert float(ssae_kernels.tilted_loss(losses, 1e9)) == pytest.approx(float(losses.max()), abs=1e-8)
        assert float(ssae_kernels.tilted_loss(losses, -1e9)) == pytest.approx(float(losses.min()), abs=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_for_huge_losses_and_tilts(backend):
    losses = torch.tensor([1e30, -1e30, 3.0, 1e30], dtype=torch.float64)
    with ssae_kernels.use_backend(backend):
        for t in TILTS:
            value = ssae_kernels.tilted_loss(losses, t)
            grad, = torch.autograd.grad(ssae_kernels.tilted_loss(losses.requires_grad_(), t), losses)
            losses = losses.detach()
            assert math.isfinite(float(value)) and torch.isfinite(grad).all(), t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,t_group", [(0.0, 0.0), (1.0, 0.0), (500.0, 0.0), (-2.0, 3.0), (0.0, -1.0), (1e9, 1e9)])
@pytest.mark.parametrize("grouped", [False, True])
def test_matches_reference_with_gradients(backend, dtype, t, t_group, grouped):
    N, G = 513, 7
    losses = (torch.rand(N, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    groups = torch.randint(0, G, (N,)) if grouped else None
    if not grouped:
        t_group = 0.0
    with ssae_kernels.use_backend(backend):
        value = ssae_kernels.tilted_loss(losses, t, groups=groups, t_group=t_group)
    expected = reference.tilted_loss(losses, t, groups, G if grouped else 1, t_group)
    close(value, expected, dtype=dtype)
    grad, = torch.autograd.grad(value, losses)
    ref_grad, = torch.autograd.grad(expected, losses)
    close(grad, ref_grad, dtype=dtype, scale=1 / N)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_size_one_and_a_single_group(backend):
    losses = torch.rand(40, dtype=torch.float64)
    with ssae_kernels.use_backend(backend):
        # every sample its own group: inner tilt is irrelevant, outer tilt acts on the samples
        per_sample = ssae_kernels.tilted_loss(losses, 123.0, groups=torch.arange(40), t_group=2.0)
        assert float(per_sample) == pytest.approx(float(ssae_kernels.tilted_loss(losses, 2.0)), rel=1e-12)
        # one group: the outer tilt is irrelevant
        single = ssae_kernels.tilted_loss(losses, 2.0, groups=torch.zeros(40, dtype=torch.int64), t_group=-7.0)
        assert float(single) == pytest.approx(float(ssae_kernels.tilted_loss(losses, 2.0)), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_group_ids_drop_out(backend):
    losses = torch.rand(30, dtype=torch.float64)
    groups = torch.randint(0, 3, (30,)) * 2  # ids 0, 2, 4: 1 and 3 empty
    with ssae_kernels.use_backend(backend):
        sparse_ids = ssae_kernels.tilted_loss(losses, 1.5, groups=groups, t_group=0.5)
        dense_ids = ssae_kernels.tilted_loss(losses, 1.5, groups=groups // 2, t_group=0.5)
    assert float(sparse_ids) == pytest.approx(float(dense_ids), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,t_group", [(0.0, 0.0), (1.0, 0.0), (-3.0, 0.0), (2.0, -1.5), (0.0, 4.0)])
def test_gradcheck(backend, t, t_group):
    losses = torch.rand(12, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 1, 1, 2, 0, 0, 2, 1, 3, 3, 0, 1])

    def f(losses):
        with ssae_kernels.use_backend(backend):
            return ssae_kernels.tilted_loss(losses, t, groups=groups, t_group=t_group)

    assert torch.autograd.gradcheck(f, (losses,))


def test_backward_weights_are_the_softmax():
    losses = torch.randn(100, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(ssae_kernels.tilted_loss(losses, 3.0), losses)
    close(grad, torch.softmax(3.0 * losses.detach(), 0))


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


# ---- fused squared-error losses -------------------------------------------------------


def make_decode_inputs(N, d, M, k, dtype, requires_grad=True):
    indices = torch.randint(0, M, (N, k))
    values = torch.rand(N, k, dtype=torch.float64).to(dtype)
    W = (torch.randn(M, d, dtype=torch.float64) / d**0.5).to(dtype)
    b = (torch.randn(d, dtype=torch.float64) * 0.1).to(dtype)
    x = torch.randn(N, d, dtype=torch.float64).to(dtype)
    for t in (values, W, b, x):
        t.requires_grad_(requires_grad)
    return values, indices, W, b, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 1.0, 500.0])
def test_tilted_mse(backend, dtype, t):
    x_hat = torch.randn(37, 29, dtype=torch.float64).to(dtype).requires_grad_()
    x = torch.randn(37, 29, dtype=torch.float64).to(dtype).requires_grad_()
    with ssae_kernels.use_backend(backend):
        value = ssae_kernels.tilted_mse(x_hat, x, t)
    expected = reference.tilted_loss(reference.row_sq_error(x_hat, x), t)
    close(value, expected, dtype=dtype, scale=29)
    grads = torch.autograd.grad(value, (x_hat, x))
    ref = torch.autograd.grad(expected, (x_hat, x))
    for g, r in zip(grads, ref):
        close(g, r, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 500.0, -3.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_decode_mse(backend, dtype, t, with_bias):
    values, indices, W, b, x = make_decode_inputs(41, 23, 90, 6, dtype)
    b = b if with_bias else None
    groups = torch.randint(0, 3, (41,))
    with ssae_kernels.use_backend(backend):
        value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=t, groups=groups, t_group=1.0)
    expected = reference.tilted_loss(reference.sparse_decode_sq_error(values, indices, W, b, x), t, groups, 3, 1.0)
    close(value, expected, dtype=dtype, scale=23)
    inputs = [i for i in (values, W, b, x) if i is not None]
    grads = torch.autograd.grad(value, inputs)
    ref = torch.autograd.grad(expected, inputs)
    for g, r in zip(grads, ref):
        close(g, r, dtype=dtype, scale=2)


def test_sparse_decode_mse_gradcheck():
    values, indices, W, b, x = make_decode_inputs(9, 5, 12, 3, torch.float64)
    f = lambda values, W, b, x: ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (values, W, b, x))


def test_sparse_decode_mse_forward_stores_no_reconstruction():
    values, indices, W, b, x = make_decode_inputs(64, 48, 100, 4, torch.float32, requires_grad=False)
    with torch.profiler.profile(profile_memory=True) as prof:
        ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < 64 * 48 * 4  # nothing of [N, d] size was allocated


# ---- sparse_decode_residual: the backward primitive of sparse_decode_sq_error ------------------


def make_residual_inputs(N, d, M, k, dtype, with_bias=True):
    values, indices, W, b, x = make_decode_inputs(N, d, M, k, dtype, requires_grad=False)
    scale = torch.rand(N, dtype=torch.float64).to(reference.accumulation_dtype(dtype)) * 3 - 1
    return values, indices, W, b if with_bias else None, x, scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 1, 1, 1), (37, 29, 101, 8), (9, 3, 4, 4), (5, 70, 13, 1), (3, 5, 6, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_decode_residual_matches_reference(backend, dtype, N, d, M, k, with_bias):
    args = make_residual_inputs(N, d, M, k, dtype, with_bias)
    with ssae_kernels.use_backend(backend):
        residual, grad_values = ops.sparse_decode_residual(*args)
    ref_residual, ref_grad = reference.sparse_decode_residual(*args)
    assert residual.shape == (N, d) and grad_values.shape == (N, k)
    assert residual.dtype == grad_values.dtype == dtype
    close(residual, ref_residual, scale=k)
    close(grad_values, ref_grad, scale=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_residual_non_contiguous(backend):
    v = torch.rand(13, 12)[:, ::2]
    ix = torch.randint(0, 40, (6, 13)).T
    W = torch.randn(40, 20)[:, 5:15]
    b = torch.randn(20)[::2]
    x = torch.randn(10, 13).T
    scale = torch.tensor([2.0]).expand(13)  # as autograd passes the gradient of a sum
    args = (v, ix, W, b, x, scale)
    assert not any(t.is_contiguous() for t in args)
    with ssae_kernels.use_backend(backend):
        out = ops.sparse_decode_residual(*args)
    for o, r in zip(out, reference.sparse_decode_residual(*args)):
        close(o, r, scale=6)


def _residual_args(**override):
    values, indices, W, b, x, scale = make_residual_inputs(5, 4, 10, 3, torch.float32)
    args = dict(values=values, indices=indices, W_dec=W, b_dec=b, x=x, scale=scale)
    args.update(override)
    return tuple(args.values())


@pytest.mark.parametrize("backend", BACKENDS)
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
    with ssae_kernels.use_backend(backend), pytest.raises(error, match=match):
        ops.sparse_decode_residual(*_residual_args(**override))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_mse_backward_gathers_once(backend):
    values, indices, W, b, x = make_decode_inputs(20, 16, 30, 4, torch.float32)
    with ssae_kernels.use_backend(backend):
        value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
        with _OpLog() as log:
            torch.autograd.grad(value, (values, W, b, x))
    assert "ssae.sparse_decode_residual" in log.names
    assert "ssae.sampled_dot" not in log.names and "ssae.sparse_decode" not in log.names, log.names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needed", [(False, True, False, False), (False, False, True, True), (True, False, False, False)])
def test_sparse_decode_mse_partial_gradients(backend, needed):
    values, indices, W, b, x = make_decode_inputs(15, 11, 20, 5, torch.float32, requires_grad=False)
    inputs = [t.requires_grad_(n) for t, n in zip((values, W, b, x), needed)]
    with ssae_kernels.use_backend(backend):
        value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
    expected = reference.tilted_loss(reference.sparse_decode_sq_error(values, indices, W, b, x), 500.0)
    wanted = [t for t in inputs if t.requires_grad]
    for g, r in zip(torch.autograd.grad(value, wanted), torch.autograd.grad(expected, wanted)):
        close(g, r, scale=2)


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
