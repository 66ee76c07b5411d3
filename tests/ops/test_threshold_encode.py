"""ssae_kernels.threshold_encode: every latent above its threshold, at most max_k per row, largest first,
with the true count; against the float64 definition, on every backend that serves it (the reference and
the CPU kernel so far), every dtype, odd shapes, ties, non-finite values, views, and in autograd."""

import pytest
import torch

import ssae_kernels
from assertions import DTYPES, close, make_encode_inputs
from ssae_kernels import reference

from .conftest import as_view, cpu_sized, device_of, require

OP = "threshold_encode"


def assert_valid_threshold_code(values, indices, counts, x, W_enc, b_enc, threshold, max_k, b_dec=None):
    """The code keeps the latents above threshold of the exact (float64) pre-activations, the largest
    max_k of them in descending order, with their count; scores within float32 rounding of the
    threshold or of each other may come out either way, and the check allows exactly that slack."""
    N, M = x.shape[0], W_enc.shape[0]
    assert values.shape == (N, max_k) and indices.shape == (N, max_k) and counts.shape == (N,)
    assert values.dtype == x.dtype and indices.dtype == torch.int64 and counts.dtype == torch.int64

    def f64(t):
        return None if t is None else t.double().cpu()

    x64, W64 = f64(x), f64(W_enc)
    pre = reference.pre_activations(x64, W64, f64(b_enc), f64(b_dec))
    xc = x64 if b_dec is None else x64 - f64(b_dec)
    magnitude = (xc.abs() @ W64.abs().T).max(dim=1, keepdim=True).values
    if b_enc is not None:
        magnitude = magnitude + f64(b_enc).abs().max()
    eps = 1e-13 if x.dtype == torch.float64 else 2e-7
    slack = (x.shape[1] + 1) * eps * magnitude + 1e-30
    thr = f64(threshold).expand(M)
    values, indices, counts = values.cpu(), indices.cpu(), counts.cpu()
    surely, maybe = (pre > thr + slack).sum(1), (pre > thr - slack).sum(1)
    assert bool(((surely <= counts) & (counts <= maybe)).all()), "counts off by more than rounding"
    for n in range(N):
        filled = int(min(counts[n], max_k))
        kept, rest = indices[n, :filled], indices[n, filled:]
        assert len(set(kept.tolist())) == filled, f"row {n}: a latent kept twice"
        assert bool((rest == 0).all()) and bool((values[n, filled:] == 0).all()), f"row {n}: empty slots not 0"
        selected = pre[n, kept]
        assert bool((selected > thr[kept] - slack[n]).all()), f"row {n}: a kept latent is below its threshold"
        assert bool((selected[:-1] >= selected[1:] - slack[n]).all()), f"row {n}: not in descending order"
        if filled:
            left_out = pre[n].clone()
            left_out[kept] = float("-inf")
            above = left_out[left_out > thr + slack[n]]
            if above.numel():
                assert float(above.max()) <= float(selected[-1] + slack[n]), f"row {n}: a better latent left out"
        close(values[n, :filled], selected.to(x.dtype), dtype=x.dtype,
              scale=float(magnitude.max()) if x.dtype in (torch.float32, torch.float64) else 1.0)


def encode(x, W, b, threshold, max_k, bd=None):
    return ssae_kernels.threshold_encode(x, W, b, threshold, max_k, b_dec=bd)


def per_latent_thresholds(M, dtype, device, low=-0.5, high=1.5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(M, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,max_k", [(1, 1, 1, 1), (5, 7, 40, 3), (17, 17, 33, 33), (9, 30, 64, 64),
                                         cpu_sized(300, 64, 5000, 40), cpu_sized(7, 301, 20000, 50)])
@pytest.mark.parametrize("kind", ["per_latent", "scalar", "zero_dim", "negative"])
def test_matches_the_definition(backend, dtype, N, d, M, max_k, kind):
    require(backend, OP, dtype=dtype)
    device = device_of(backend)
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, device=device)
    threshold = {"per_latent": per_latent_thresholds(M, dtype, device), "scalar": 0.0,
                 "zero_dim": torch.tensor(0.3, dtype=dtype, device=device),
                 "negative": torch.tensor(-0.2, dtype=dtype, device=device)}[kind]
    values, indices, counts = encode(x, W, b, threshold, max_k, bd)
    thr = threshold if isinstance(threshold, torch.Tensor) else torch.tensor(threshold, dtype=dtype)
    assert_valid_threshold_code(values, indices, counts, x, W, b, thr, max_k, bd)


def test_rows_with_none_kept_and_rows_over_the_cap(backend):
    require(backend, OP)
    x, W, b, _ = make_encode_inputs(6, 8, 50, device=device_of(backend))
    threshold = torch.full((50,), 0.2, device=x.device)
    x[0] = 0  # pre = b_enc: set every bias below the threshold for this row
    b = torch.full_like(b, -1.0)
    values, indices, counts = encode(x, W, b, threshold, 4)
    assert int(counts[0]) == 0 and bool((values[0] == 0).all()) and bool((indices[0] == 0).all())
    assert_valid_threshold_code(values, indices, counts, x, W, b, threshold, 4)
    values, indices, counts = encode(x, W, torch.zeros_like(b), -10.0, 4)  # every latent passes
    assert bool((counts == 50).all())
    assert_valid_threshold_code(values, indices, counts, x, W, torch.zeros_like(b), torch.tensor(-10.0), 4)


def test_exact_ties_go_to_lower_index(backend):
    # Small integers: every score exact in float32, so the order is fully determined.
    require(backend, OP)
    g = torch.Generator().manual_seed(0)
    N, d, M, max_k = 20, 6, 100, 12
    x = torch.randint(-2, 3, (N, d), generator=g).float().to(device_of(backend))
    W = torch.randint(-1, 2, (M, d), generator=g).float().to(x.device)
    b = torch.randint(-1, 2, (M,), generator=g).float().to(x.device)
    threshold = torch.randint(-1, 2, (M,), generator=g).float().to(x.device)
    got = encode(x, W, b, threshold, max_k)
    want = reference.threshold_encode(x, W, b, threshold, max_k)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)


def test_non_finite_pre_activations(backend):
    # NaN never exceeds a threshold; +inf always does; -inf never.
    require(backend, OP)
    x, W, b, _ = make_encode_inputs(4, 5, 30, device=device_of(backend))
    b[3], b[4], b[5] = float("nan"), float("inf"), float("-inf")
    values, indices, counts = encode(x, W, b, 0.0, 30)
    want = reference.threshold_encode(x, W, b, torch.tensor(0.0), 30)
    assert torch.equal(counts, want[2])
    assert bool((indices[:, 0] == 4).all()) and bool(torch.isinf(values[:, 0]).all())
    assert not bool((indices[:, : int(counts.min())] == 3).any()) and not bool((indices == 5).any())


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded_threshold"])
def test_views_give_the_contiguous_result(backend, view):
    require(backend, OP)
    if backend == "reference":
        pytest.skip("the reference is a dense matmul, whose rounding depends on the layout")
    device = device_of(backend)
    x, W, b, bd = make_encode_inputs(9, 12, 70, device=device)
    threshold = per_latent_thresholds(70, torch.float32, device)
    if view == "expanded_threshold":
        want = encode(x, W, b, torch.full((70,), 0.25, device=device), 10, bd)
        got = encode(x, W, b, torch.tensor(0.25, device=device).expand(70), 10, bd)
    else:
        want = encode(x, W, b, threshold, 10, bd)
        got = encode(as_view(x, view), as_view(W, view), as_view(b, "sliced"), as_view(threshold, "sliced"), 10,
                     as_view(bd, "sliced"))
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_the_reference(backend, dtype):
    # Through the kept entries only: empty slots pass no gradient (to latent 0 or anywhere).
    require(backend, OP, dtype=dtype)
    device = device_of(backend)
    x, W, b, bd = make_encode_inputs(13, 9, 40, dtype, requires_grad=True, device=device)
    threshold = per_latent_thresholds(40, dtype, device, low=0.2, high=0.8)
    weights = torch.randn(13, 6, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def grads(fn):
        for t in (x, W, b, bd):
            t.grad = None
        values, indices, counts = fn(x, W, b, threshold, 6, bd)
        (values.float() * weights.float()).sum().backward()
        return [t.grad.clone() for t in (x, W, b, bd)], indices

    got, got_indices = grads(encode)
    with ssae_kernels.use_backend("reference"):
        want, want_indices = grads(encode)
    assert torch.equal(got_indices, want_indices)
    for g_, w_ in zip(got, want):
        close(g_, w_, dtype=dtype)


def test_gradcheck():
    x, W, b, bd = make_encode_inputs(5, 4, 12, torch.float64, requires_grad=True)
    threshold = per_latent_thresholds(12, torch.float64, "cpu", low=-0.3, high=0.3)

    def values(x, W, b, bd):
        with ssae_kernels.use_backend("cpu"):
            return ssae_kernels.threshold_encode(x, W, b, threshold, 5, b_dec=bd)[0]

    assert torch.autograd.gradcheck(values, (x, W, b, bd))


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_opcheck(with_b_dec):
    x, W, b, bd = make_encode_inputs(6, 5, 20, requires_grad=True, b_dec=with_b_dec)
    threshold = per_latent_thresholds(20, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.ssae.threshold_encode.default, (x, W, b, threshold, 7, bd))
    torch.library.opcheck(torch.ops.ssae.threshold_encode.default, (x, W, None, torch.tensor(0.0), 3, bd))


def _args(**override):
    x, W, b, bd = make_encode_inputs(4, 3, 10)
    args = dict(x=x, W_enc=W, b_enc=b, threshold=torch.zeros(10), max_k=3, b_dec=bd)
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,match", [
    (dict(threshold=torch.zeros(9)), ValueError, r"threshold must be a scalar \(0-d\) or of shape \[M\]"),
    (dict(threshold=torch.zeros(10, 1)), ValueError, "threshold must be a scalar"),
    (dict(threshold=torch.tensor([float("nan")] + [0.0] * 9)), ValueError, "threshold must be finite"),
    (dict(threshold=float("inf")), ValueError, "threshold must be finite"),
    (dict(threshold=True), TypeError, "threshold must be a real number"),
    (dict(threshold=torch.zeros(10, dtype=torch.float64)), (TypeError, ValueError), "threshold"),
    (dict(threshold=torch.zeros(10, requires_grad=True)), ValueError, "does not differentiate the threshold"),
    (dict(max_k=0), ValueError, r"max_k must be in \[1, M\]"),
    (dict(max_k=11), ValueError, r"max_k must be in \[1, M\]"),
    (dict(max_k=2.0), TypeError, "max_k"),
    (dict(W_enc=torch.zeros(10, 4)), ValueError, "W_enc.shape"),
])
def test_bad_input(backend, override, error, match):
    require(backend, OP)
    args = _args(**override)
    with pytest.raises(error, match=match):
        ssae_kernels.threshold_encode(args["x"], args["W_enc"], args["b_enc"], args["threshold"], args["max_k"],
                                      b_dec=args["b_dec"])


def test_kernel_checks_the_threshold_itself():
    # Called through torch.ops (past the Python wrapper), the CPU kernel still refuses a non-finite one.
    x, W, b, _ = make_encode_inputs(4, 3, 10)
    with ssae_kernels.use_backend("cpu"), pytest.raises(ValueError, match="threshold must be finite"):
        torch.ops.ssae.threshold_encode(x, W, b, torch.tensor(float("nan")), 3)


def test_matches_topk_encode_when_every_latent_passes():
    # With a threshold below every pre-activation and max_k = k, the code is topk_encode's (whose
    # values are ReLU'd: compare where positive).
    x, W, b, bd = make_encode_inputs(40, 16, 500)
    values, indices, counts = ssae_kernels.threshold_encode(x, W, b, -1e30, 8, b_dec=bd)
    top_values, top_indices = ssae_kernels.topk_encode(x, W, b, 8, b_dec=bd)
    assert bool((counts == 500).all())
    assert torch.equal(indices, top_indices)
    assert torch.equal(values.relu(), top_values)
