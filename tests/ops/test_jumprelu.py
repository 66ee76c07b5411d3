"""ssae_kernels.jumprelu_encode: the JumpReLU code, its L0 and the threshold's straight-through
pseudo-derivatives, against the dense float64 definition (ssae_kernels.reference.jumprelu_encode)."""

import pytest
import torch

import ssae_kernels
from assertions import make_encode_inputs
from ssae_kernels import reference


def _dense(code, M):
    """[N, M] from a sparse (values, indices) code."""
    out = code.values.new_zeros(code.values.shape[0], M)
    return out.scatter_add(1, code.indices, code.values)


def _inputs(N, d, M, dtype=torch.float64, scalar=False, seed=0):
    torch.manual_seed(seed)
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, requires_grad=True)
    theta = (torch.full((), 0.3) if scalar else 0.3 + 0.4 * torch.rand(M)).to(dtype).requires_grad_(True)
    return x, W, b, bd, theta


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("scalar", [False, True], ids=["per-latent", "scalar"])
@pytest.mark.parametrize("N,d,M,bandwidth", [(1, 3, 5, 2.0), (9, 13, 40, 0.2), (64, 32, 700, 0.05),
                                             (17, 8, 300, 1.0)])
def test_code_l0_and_pseudo_derivatives_match_the_definition(N, d, M, bandwidth, scalar):
    x, W, b, bd, theta = _inputs(N, d, M, scalar=scalar)
    code = ssae_kernels.jumprelu_encode(x, W, b, theta, M, bandwidth=bandwidth, b_dec=bd)
    want_code, want_l0 = reference.jumprelu_encode(x, W, b, theta, bandwidth, bd)
    torch.testing.assert_close(_dense(code, M), want_code.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(code.l0, want_l0.detach())
    assert torch.equal(code.counts, (want_code.detach() != 0).sum(1))
    # the kept latents first, largest first; value 0 past the count
    filled = torch.arange(M) < code.counts.unsqueeze(1)
    kept = torch.where(filled, code.values.detach(), float("-inf"))
    assert bool((kept[:, :-1] >= kept[:, 1:]).all()) and bool((code.values.detach()[~filled] == 0).all())

    # a loss on the code and on L0 with weights of both signs: every gradient, the threshold's included
    g = torch.randn(N, M, dtype=torch.float64)
    inputs = (x, W, b, bd, theta)
    got = _grads((_dense(code, M) * g).sum() + 0.7 * code.l0.sum(), inputs)
    want = _grads((want_code * g).sum() + 0.7 * want_l0.double().sum(), inputs)
    for name, a, e in zip(("x", "W_enc", "b_enc", "b_dec", "threshold"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    assert bool(want[-1].abs().sum() > 0), "no pre-activation fell within the bandwidth: the test checks nothing"


def test_the_cap_keeps_the_largest_and_counts_stay_exact():
    N, d, M, max_k = 12, 16, 200, 4
    x, W, b, bd, theta = _inputs(N, d, M)
    theta = (theta.detach() * 0 - 1.0).requires_grad_(True)  # nearly half the latents above it
    code = ssae_kernels.jumprelu_encode(x, W, b, theta, max_k, bandwidth=0.1, b_dec=bd)
    pre = reference.pre_activations(x, W, b, bd).detach()
    assert torch.equal(code.counts, (pre > -1.0).sum(1)) and bool((code.counts > max_k).all())
    want_values, want_indices = pre.topk(max_k)
    assert torch.equal(code.indices, want_indices)
    torch.testing.assert_close(code.values.detach(), want_values)


def test_candidates_past_the_cap_never_push_out_kept_latents():
    # A wide band and per-latent thresholds: candidates just below a high threshold outrank kept latents
    # above a low one, and the candidates overflow max_k; the code stays threshold_encode's exact one.
    N, d, M, max_k = 20, 16, 300, 6
    x, W, b, bd, _ = _inputs(N, d, M)
    theta = (torch.rand(M, dtype=torch.float64) * 2 - 0.5).requires_grad_(True)
    code = ssae_kernels.jumprelu_encode(x, W, b, theta, max_k, bandwidth=3.0, b_dec=bd)
    with torch.no_grad():
        values, indices, counts = ssae_kernels.threshold_encode(x, W, b, theta, max_k, b_dec=bd)
    filled = torch.arange(max_k) < counts.unsqueeze(1)
    assert torch.equal(code.counts, counts) and torch.equal(code.values.detach(), values)
    assert torch.equal(torch.where(filled, code.indices, 0), indices)
    code.values.sum().backward()  # the kept latents within the band still reach the threshold
    assert bool(theta.grad.abs().sum() > 0)


def test_no_grad_code_equals_threshold_encode():
    x, W, b, bd, theta = _inputs(40, 24, 500, torch.float32)
    with torch.no_grad():
        code = ssae_kernels.jumprelu_encode(x, W, b, theta, 60, bandwidth=0.05, b_dec=bd)
        values, indices, counts = ssae_kernels.threshold_encode(x, W, b, theta, 60, b_dec=bd)
    filled = torch.arange(60) < counts.unsqueeze(1)
    assert torch.equal(code.counts, counts) and torch.equal(code.values, values)
    assert torch.equal(torch.where(filled, code.indices, 0), indices)


def test_gradcheck_in_the_inputs_float64():
    # Away from the jumps the code is smooth in x and the weights: finite differences agree.
    x, W, b, bd, theta = _inputs(5, 6, 30)
    theta = theta.detach()

    def f(x, W, b, bd):
        code = ssae_kernels.jumprelu_encode(x, W, b, theta, 30, bandwidth=0.1, b_dec=bd)
        return _dense(code, 30)

    assert torch.autograd.gradcheck(f, (x, W, b, bd))


@pytest.mark.parametrize("bandwidth,error", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                             (float("nan"), ValueError), ("0.1", TypeError)])
def test_bad_bandwidth_is_named(bandwidth, error):
    x, W, b, bd, theta = _inputs(3, 4, 10)
    with pytest.raises(error, match="bandwidth"):
        ssae_kernels.jumprelu_encode(x, W, b, theta, 5, bandwidth=bandwidth, b_dec=bd)


def test_bad_threshold_is_named():
    x, W, b, bd, _ = _inputs(3, 4, 10)
    with pytest.raises(TypeError, match="threshold"):
        ssae_kernels.jumprelu_encode(x, W, b, 0.5, 5, bandwidth=0.1)
    with pytest.raises(ValueError, match="threshold"):
        ssae_kernels.jumprelu_encode(x, W, b, torch.zeros(7, dtype=x.dtype), 5, bandwidth=0.1)
    with pytest.raises(ValueError, match="threshold"):
        ssae_kernels.jumprelu_encode(x, W, b, torch.full((10,), float("nan"), dtype=x.dtype), 5, bandwidth=0.1)
    with pytest.raises(ValueError, match="max_k"):
        ssae_kernels.jumprelu_encode(x, W, b, torch.zeros(10, dtype=x.dtype), 11, bandwidth=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_follows_the_float64_definition(dtype):
    x, W, b, bd, theta = _inputs(32, 48, 300, dtype)
    code = ssae_kernels.jumprelu_encode(x, W, b, theta, 300, bandwidth=0.1, b_dec=bd)
    assert code.values.dtype == dtype and code.l0.dtype == torch.float32
    want_code, want_l0 = reference.jumprelu_encode(*(t.detach().double() for t in (x, W, b)), theta.detach().double(),
                                                   0.1, bd.detach().double())
    # pre-activations within rounding of a threshold may land either side
    assert float((code.l0.detach() - want_l0).abs().max()) <= 2
    pre = reference.pre_activations(*(t.detach().double() for t in (x, W, b, bd)))
    clear = (pre - theta.detach().double()).abs() > 0.02 * pre.abs()
    torch.testing.assert_close(_dense(code, 300).detach().double()[clear], want_code[clear], rtol=0.02, atol=0.05)
    code.values.float().sum().backward()
    assert theta.grad is not None and theta.grad.dtype == dtype and W.grad.dtype == dtype


def test_pseudo_derivatives_match_saelens():
    # SAELens's JumpReLU and Step autograd functions (DeepMind's estimator: no straight-through term to the
    # pre-activations) on the dense pre-activations: the same code, L0 and gradients as ours.
    jumprelu_sae = pytest.importorskip("sae_lens.saes.jumprelu_sae")
    N, d, M, eps = 40, 24, 300, 0.2
    x, W, b, bd, theta = _inputs(N, d, M)
    g = torch.randn(N, M, dtype=torch.float64)
    inputs = (x, W, b, bd, theta)

    code = ssae_kernels.jumprelu_encode(x, W, b, theta, M, bandwidth=eps, b_dec=bd)
    ours = _grads((_dense(code, M) * g).sum() + 0.7 * code.l0.sum(), inputs)

    pre = reference.pre_activations(x, W, b, bd)
    feature = jumprelu_sae.JumpReLU.apply(pre, theta, eps, False)
    l0 = jumprelu_sae.Step.apply(pre, theta, eps, False).sum(1)
    torch.testing.assert_close(_dense(code, M).detach(), feature.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(code.l0, l0.detach())
    theirs = _grads((feature * g).sum() + 0.7 * l0.sum(), inputs)
    for name, a, e in zip(("x", "W_enc", "b_enc", "b_dec", "threshold"), ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
