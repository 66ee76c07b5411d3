"""The backward primitives against their reference definitions."""

import pytest
import torch

import ssae_kernels
from ssae_kernels import reference
from ssae_kernels.ops import latent_index
from assertions import DTYPES, close

BACKENDS = ("cpu",)
ops = torch.ops.ssae


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 1, 1, 1), (37, 29, 101, 8), (64, 17, 5, 4)])
def test_sampled_dot(backend, dtype, N, d, M, k):
    grad = torch.randn(N, d).to(dtype)
    W = torch.randn(M, d).to(dtype)
    indices = torch.randint(0, M, (N, k))
    with ssae_kernels.use_backend(backend):
        out = ops.sampled_dot(grad, indices, W)
    close(out, reference.sampled_dot(grad, indices, W), scale=d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,k,M", [(1, 1, 1), (37, 8, 101), (50, 3, 2000), (300, 16, 7)])
def test_latent_transpose(backend, N, k, M):
    indices = torch.randint(0, M, (N, k))
    with ssae_kernels.use_backend(backend):
        offsets, order = ops.latent_transpose(indices, M)
    ref_offsets, ref_order = reference.latent_transpose(indices, M)
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(order, ref_order)  # stable: ascending entries within a latent
    # and it is what it claims: the entries of latent m are exactly those with index m
    flat = indices.reshape(-1)
    for m in range(min(M, 20)):
        assert torch.equal(flat[order[offsets[m]:offsets[m + 1]]], torch.full((int(offsets[m + 1] - offsets[m]),), m))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 1, 1, 1), (37, 29, 101, 8), (64, 17, 5, 4), (3, 8, 500, 2)])
def test_sparse_transpose_matmul(backend, dtype, N, d, M, k):
    weights = torch.randn(N, k).to(dtype)
    rows = torch.randn(N, d).to(dtype)
    indices = torch.randint(0, M, (N, k))
    offsets, order = reference.latent_transpose(indices, M)
    with ssae_kernels.use_backend(backend):
        out, colsum = ops.sparse_transpose_matmul(weights, rows, offsets, order)
    ref_out, ref_colsum = reference.sparse_transpose_matmul(weights, rows, offsets, order)
    close(out, ref_out, scale=N * k / M + 1)
    close(colsum, ref_colsum, scale=N * k / M + 1)
    # latents that no entry selects get exact zeros
    unused = torch.ones(M, dtype=torch.bool)
    unused[indices.reshape(-1)] = False
    assert (out[unused] == 0).all() and (colsum[unused] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_transpose_matmul_is_deterministic(backend):
    N, d, M, k = 2000, 33, 50, 16  # many entries per latent, summed by several threads
    weights, rows = torch.randn(N, k), torch.randn(N, d)
    offsets, order = reference.latent_transpose(torch.randint(0, M, (N, k)), M)
    with ssae_kernels.use_backend(backend):
        first = ops.sparse_transpose_matmul(weights, rows, offsets, order)
        for _ in range(3):
            again = ops.sparse_transpose_matmul(weights, rows, offsets, order)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_latent_index_is_built_once_per_indices_tensor():
    indices = torch.randint(0, 40, (10, 4))
    first = latent_index(indices, 40)
    assert latent_index(indices, 40) is first
    assert latent_index(indices, 41) is not first  # another M
    indices.add_(0)  # an in-place write bumps the version: recompute
    assert latent_index(indices, 41) is not first


def test_one_transpose_per_training_step():
    x = torch.randn(30, 12)
    W = torch.randn(64, 12, requires_grad=True)
    b = torch.zeros(64, requires_grad=True)
    bd = torch.zeros(12, requires_grad=True)
    Wd = torch.randn(64, 12, requires_grad=True)
    with torch.profiler.profile() as prof:
        values, indices = ssae_kernels.topk_encode(x, W, b, 5, b_dec=bd)
        ((ssae_kernels.sparse_decode(values, indices, Wd, bd) - x) ** 2).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("ssae::latent_transpose") == 1
    assert counts.get("ssae::sparse_transpose_matmul") == 2


@pytest.mark.parametrize("op,args", [
    ("sampled_dot", lambda: (torch.randn(4, 3), torch.randint(0, 5, (4, 2)), torch.randn(5, 3))),
    ("latent_transpose", lambda: (torch.randint(0, 5, (4, 2)), 5)),
    ("sparse_transpose_matmul", lambda: (torch.randn(4, 2), torch.randn(4, 3), *reference.latent_transpose(torch.randint(0, 5, (4, 2)), 5))),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(ops, op).default, args())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    with ssae_kernels.use_backend(backend):
        with pytest.raises(IndexError, match="indices must lie in"):
            ops.sampled_dot(torch.randn(4, 3), torch.full((4, 2), 5), torch.randn(5, 3))
        with pytest.raises(ValueError, match=r"W.shape\[1\]"):
            ops.sampled_dot(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), torch.randn(5, 4))
        with pytest.raises(ValueError, match="num_latents must be >= 1"):
            ops.latent_transpose(torch.zeros(4, 2, dtype=torch.int64), 0)
        with pytest.raises(IndexError, match="indices must lie in"):
            ops.latent_transpose(torch.full((4, 2), 7), 5)
        with pytest.raises(ValueError, match="order must have N \\* k elements"):
            ops.sparse_transpose_matmul(torch.randn(4, 2), torch.randn(4, 3), torch.tensor([0, 8]), torch.arange(7))
