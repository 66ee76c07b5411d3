import pytest
import torch

import ssae_kernels
from ssae_kernels import reference
from assertions import DTYPES, close

BACKENDS = ("cpu",)


def make_code(N, d, M, k, dtype=torch.float32, requires_grad=False, unique=True):
    if unique:
        indices = torch.stack([torch.randperm(M)[:k] for _ in range(N)])
    else:  # repeated latents within a row are allowed: they add up
        indices = torch.randint(0, M, (N, k))
    values = torch.relu(torch.randn(N, k, dtype=torch.float64)).to(dtype)
    W = torch.randn(M, d, dtype=torch.float64).to(dtype)
    b = torch.randn(d, dtype=torch.float64).to(dtype)
    for t in (values, W, b):
        t.requires_grad_(requires_grad)
    return values, indices, W, b


SHAPES = [(1, 1, 1, 1), (1, 7, 5, 5), (37, 29, 101, 8), (130, 65, 1000, 32), (9, 3, 4, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(backend, dtype, N, d, M, k, with_bias):
    values, indices, W, b = make_code(N, d, M, k, dtype)
    b = b if with_bias else None
    with ssae_kernels.use_backend(backend):
        out = ssae_kernels.sparse_decode(values, indices, W, b)
    close(out, reference.sparse_decode(values, indices, W, b), scale=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_latents_add_up(backend):
    values, indices, W, b = make_code(11, 6, 4, 9, unique=False)
    with ssae_kernels.use_backend(backend):
        out = ssae_kernels.sparse_decode(values, indices, W, b)
    dense = torch.zeros(11, 4).scatter_add_(1, indices, values)
    close(out, dense @ W + b, scale=9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    v = torch.randn(13, 12)[:, ::2]
    ix = torch.randint(0, 40, (6, 13)).T
    W2 = torch.randn(40, 20)[:, 5:15]
    b2 = torch.randn(20)[::2]
    assert not (v.is_contiguous() or ix.is_contiguous() or W2.is_contiguous() or b2.is_contiguous())
    with ssae_kernels.use_backend(backend):
        out = ssae_kernels.sparse_decode(v, ix, W2, b2)
    close(out, reference.sparse_decode(v, ix, W2, b2), scale=6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(37, 29, 101, 8), (4, 3, 9, 9), (50, 16, 7, 3)])
def test_gradients_match_reference(backend, dtype, N, d, M, k):
    values, indices, W, b = make_code(N, d, M, k, dtype, requires_grad=True, unique=False)
    grad_out = torch.randn(N, d, dtype=torch.float64).to(dtype)
    with ssae_kernels.use_backend(backend):
        out = ssae_kernels.sparse_decode(values, indices, W, b)
    grads = torch.autograd.grad(out, (values, W, b), grad_out)
    ref = torch.autograd.grad(reference.sparse_decode(values, indices, W, b), (values, W, b), grad_out)
    for g, r, scale in zip(grads, ref, (d, N * k, N)):
        assert g.dtype == r.dtype
        close(g, r, dtype=dtype, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(backend, with_bias):
    values, indices, W, b = make_code(7, 5, 11, 3, torch.float64, requires_grad=True, unique=False)
    inputs = (values, W, b) if with_bias else (values, W)

    def f(values, W, b=None):
        with ssae_kernels.use_backend(backend):
            return ssae_kernels.sparse_decode(values, indices, W, b)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    values, indices, W, b = make_code(9, 7, 31, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.ssae.sparse_decode.default, (values, indices, W, b if with_bias else None))


def _args(**override):
    values, indices, W, b = make_code(5, 4, 10, 3)
    args = dict(values=values, indices=indices, W_dec=W, b_dec=b)
    args.update(override)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("override,error,match", [
    (dict(values=torch.randn(5)), ValueError, "values must be 2-D"),
    (dict(indices=torch.zeros(5, 2, dtype=torch.int64)), ValueError, "indices must have the shape of values"),
    (dict(indices=torch.zeros(5, 3, dtype=torch.int32)), TypeError, "indices must be int64"),
    (dict(W_dec=torch.randn(10)), ValueError, "W_dec must be 2-D"),
    (dict(W_dec=torch.randn(10, 4, dtype=torch.float16)), TypeError, "W_dec has dtype"),
    (dict(b_dec=torch.randn(5)), ValueError, r"b_dec.shape\[0\]"),
    (dict(values=torch.randn(0, 3), indices=torch.zeros(0, 3, dtype=torch.int64)), ValueError, "at least one row"),
    (dict(indices=torch.full((5, 3), 10)), IndexError, r"indices must lie in \[0, 10\)"),
    (dict(indices=torch.full((5, 3), -1)), IndexError, r"indices must lie in \[0, 10\)"),
])
def test_bad_input(backend, override, error, match):
    args = _args(**override)
    with ssae_kernels.use_backend(backend), pytest.raises(error, match=match):
        ssae_kernels.sparse_decode(**args)
