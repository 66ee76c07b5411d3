"""The backward primitives (ssae_kernels/ops/sparse_backward.py: sampled_dot, latent_transpose,
sparse_transpose_matmul, latent_index) on every backend, against their reference definitions.

Sections: the ops on every backend (``backend`` fixture, tests/ops/conftest.py), including
index and data views; latent_index; bad input; then backend-specific tests, marked: the
Triton launchers (interpreter) and GPU-only tests (``test_gpu_*``). Interpreter tiles:
gather tiles of 4 slots x 16 columns, radix blocks of 64 entries.
"""

import pytest
import torch

import ssae_kernels
from assertions import DTYPES, assert_op_matches_reference, assert_transpose_and_matmul_match, close
from conftest import requires_cuda
from ssae_kernels import backends, reference
from ssae_kernels.ops import latent_index

from .conftest import (as_view, bad_index_view, cpu_sized, device_of, index_views, interpreter,
                       require, triton_module, uninterpreted)
from .test_sparse_decode import LAYOUT_ERROR, WEIGHT_VIEWS, weight_view

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ops = torch.ops.ssae


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype)


# ---- sampled_dot --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 1, 1, 1), (7, 16, 30, 4), (6, 17, 5, 5), (3, 33, 100, 9),
                                     cpu_sized(37, 29, 101, 8), cpu_sized(64, 17, 5, 4)])
def test_sampled_dot(backend, dtype, N, d, M, k):
    require(backend, "sampled_dot", dtype=dtype)
    dev = device_of(backend)
    grad, W = randn(N, d, dtype=dtype, device=dev), randn(M, d, dtype=dtype, device=dev)
    indices = torch.randint(0, M, (N, k), device=dev)
    out = ops.sampled_dot(grad, indices, W)
    close(out, reference.sampled_dot(grad, indices, W), scale=d)


@pytest.mark.parametrize("view", ["expanded", "sliced", "stepped", "transposed"])
def test_sampled_dot_index_views(backend, view):
    dev = device_of(backend)
    N, d, M = 5, 6, 16
    indices = index_views(N, M)[view].to(dev)
    grad, W = randn(N, d, device=dev), randn(M, d, device=dev)
    assert torch.equal(ops.sampled_dot(grad, indices, W), ops.sampled_dot(grad, indices.contiguous(), W))


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_sampled_dot_data_views(backend, view):
    # grad in any layout on every backend; W too, except on cuda, which needs unit stride along d
    # (test_sampled_dot_weight_views, test_sampled_dot_transposed_weight).
    dev = device_of(backend)
    N, d, M, k = 7, 6, 12, 3
    grad, W = randn(N, d, device=dev), randn(M, d, device=dev)
    indices = torch.randint(0, M, (N, k), device=dev)
    W_view = weight_view(W, "odd") if backend == "cuda" else as_view(W, view)
    close(ops.sampled_dot(as_view(grad, view), indices, W_view), ops.sampled_dot(grad, indices, W), scale=d)


@pytest.mark.parametrize("kind", WEIGHT_VIEWS)
@pytest.mark.parametrize("d", [5, 16])
def test_sampled_dot_weight_views(backend, kind, d):
    # Row-strided W views and a row-strided grad: read in place on every backend.
    dev = device_of(backend)
    N, M, k = 7, 12, 3
    grad, W = randn(N, d, device=dev), randn(M, d, device=dev)
    indices = torch.randint(0, M, (N, k), device=dev)
    grad_view = weight_view(grad, "narrow")
    close(ops.sampled_dot(grad_view, indices, weight_view(W, kind)), reference.sampled_dot(grad, indices, W), scale=d)


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_sampled_dot_transposed_weight(backend, view):
    # cuda declines a weight without unit stride along d (never copied), naming it; the others read it.
    dev = device_of(backend)
    grad, W = randn(6, 5, device=dev), randn(10, 5, device=dev)
    indices = torch.randint(0, 10, (6, 3), device=dev)
    if backend != "cuda":
        close(ops.sampled_dot(grad, indices, as_view(W, view)), reference.sampled_dot(grad, indices, W), scale=5)
        return
    with pytest.raises((RuntimeError, ValueError), match=LAYOUT_ERROR.format(name="W")):
        ops.sampled_dot(grad, indices, as_view(W, view))


@interpreter
def test_triton_sampled_dot_launcher_reads_a_transposed_weight():
    grad, W = randn(6, 5), randn(10, 5)
    indices = torch.randint(0, 10, (6, 3))
    close(triton_module("sparse_backward").sampled_dot(grad, indices, as_view(W, "transposed")),
          reference.sampled_dot(grad, indices, W), scale=5)


# ---- latent_transpose -----------------------------------------------------------------------


@pytest.mark.parametrize("N,k,M", [
    (1, 1, 1), (16, 4, 7),  # one radix block exactly (64 entries)
    (13, 5, 101), (40, 3, 256), (40, 3, 257),  # one and two radix passes
    (9, 7, 70000),  # three passes
    cpu_sized(37, 8, 101), cpu_sized(50, 3, 2000), cpu_sized(300, 16, 7),
])
def test_latent_transpose(backend, N, k, M):
    indices = torch.randint(0, M, (N, k), device=device_of(backend))
    if M > 1:
        indices[0, 0] = M - 1  # the largest latent, whose digits are all set
    offsets, order = ops.latent_transpose(indices, M)
    ref_offsets, ref_order = reference.latent_transpose(indices, M)
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(order, ref_order)  # stable: ascending entries within a latent
    # and it is what it claims: the entries of latent m are exactly those with index m
    flat = indices.reshape(-1)
    for m in range(min(M, 20)):
        count = int(offsets[m + 1] - offsets[m])
        assert torch.equal(flat[order[offsets[m]:offsets[m + 1]]], torch.full((count,), m, device=flat.device))


def test_latent_transpose_with_duplicates_in_a_row(backend):
    indices = torch.tensor([[3, 3, 0, 3], [0, 0, 2, 3]], device=device_of(backend))
    offsets, order = ops.latent_transpose(indices, 5)
    assert offsets.tolist() == [0, 3, 3, 4, 8, 8]
    assert order.tolist() == [2, 4, 5, 6, 0, 1, 3, 7]


@pytest.mark.parametrize("view", ["expanded", "sliced", "stepped", "transposed"])
def test_latent_transpose_index_views(backend, view):
    # order numbers the entries p = n * k + j of the view's logical layout
    indices = index_views(5, 16)[view].to(device_of(backend))
    offsets, order = ops.latent_transpose(indices, 16)
    ref_offsets, ref_order = ops.latent_transpose(indices.contiguous(), 16)
    assert torch.equal(offsets, ref_offsets) and torch.equal(order, ref_order)


# ---- sparse_transpose_matmul ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 1, 1, 1), (7, 16, 30, 4), (6, 17, 5, 5), (3, 8, 500, 2),
                                     cpu_sized(37, 29, 101, 8), cpu_sized(64, 17, 5, 4)])
def test_sparse_transpose_matmul(backend, dtype, N, d, M, k):
    require(backend, "sparse_transpose_matmul", dtype=dtype)
    dev = device_of(backend)
    weights, rows = randn(N, k, dtype=dtype, device=dev), randn(N, d, dtype=dtype, device=dev)
    indices = torch.randint(0, M, (N, k), device=dev)
    offsets, order = reference.latent_transpose(indices, M)
    out, colsum = ops.sparse_transpose_matmul(weights, rows, offsets, order)
    ref_out, ref_colsum = reference.sparse_transpose_matmul(weights, rows, offsets, order)
    close(out, ref_out, scale=N * k / M + 1)
    close(colsum, ref_colsum, scale=N * k / M + 1)
    # latents that no entry selects get exact zeros
    unused = torch.ones(M, dtype=torch.bool, device=dev)
    unused[indices.reshape(-1)] = False
    assert (out[unused] == 0).all() and (colsum[unused] == 0).all()


@pytest.mark.parametrize("N,d,M,k", [cpu_sized(2000, 33, 50, 16)])
def test_sparse_transpose_matmul_is_deterministic(backend, N, d, M, k):
    # many entries per latent, summed by several threads (Triton: test_triton_pieces_are_deterministic)
    dev = device_of(backend)
    weights, rows = torch.randn(N, k, device=dev), torch.randn(N, d, device=dev)
    offsets, order = reference.latent_transpose(torch.randint(0, M, (N, k), device=dev), M)
    first = ops.sparse_transpose_matmul(weights, rows, offsets, order)
    for _ in range(3):
        again = ops.sparse_transpose_matmul(weights, rows, offsets, order)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("N,d,k", [(300, 9, 2), uninterpreted(600, 40, 3), cpu_sized(2000, 67, 4)])
def test_hot_latent_chosen_by_every_row(backend, N, d, k):
    # One latent in every row (more entries than one program or block sums, 256): the GPU
    # backends split its segment into pieces and add their partial sums in a fixed order. Close
    # to the reference, bitwise deterministic, and the other latents unaffected.
    dev = device_of(backend)
    M = 7
    indices = torch.randint(1, M, (N, k), device=dev)
    indices[:, k // 2] = 0
    weights, rows = randn(N, k, device=dev), randn(N, d, device=dev)
    rows_view = weight_view(rows, "offset")  # a row-strided, misaligned [N, d] view, read in place
    offsets, order = ops.latent_transpose(indices, M)
    out, colsum = ops.sparse_transpose_matmul(weights, rows_view, offsets, order)
    again = ops.sparse_transpose_matmul(weights, rows_view, offsets, order)
    assert torch.equal(out, again[0]) and torch.equal(colsum, again[1])
    ref_out, ref_colsum = reference.sparse_transpose_matmul(weights, rows, offsets, order)
    scale = float(torch.bincount(indices.reshape(-1), minlength=M).max()) ** 0.5 + 1
    close(out, ref_out, scale=scale)
    close(colsum, ref_colsum, scale=scale)


def test_hot_latent_in_the_decoder_gradient(backend):
    # The same through autograd: sparse_decode's grad W_dec with latent 0 in every row.
    dev = device_of(backend)
    N, d, M, k = 300, 6, 5, 2
    indices = torch.randint(1, M, (N, k), device=dev)
    indices[:, 0] = 0
    values = randn(N, k, device=dev).requires_grad_(True)
    W = randn(M, d, device=dev).requires_grad_(True)
    grad_out = randn(N, d, device=dev)
    grads = torch.autograd.grad(ssae_kernels.sparse_decode(values, indices, W), (values, W), grad_out)
    ref = torch.autograd.grad(reference.sparse_decode(values, indices, W), (values, W), grad_out)
    close(grads[0], ref[0], scale=d)
    close(grads[1], ref[1], scale=N**0.5)


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_sparse_transpose_matmul_data_views(backend, view):
    dev = device_of(backend)
    N, d, M, k = 7, 6, 12, 3
    weights, rows = randn(N, k, device=dev), randn(N, d, device=dev)
    offsets, order = reference.latent_transpose(torch.randint(0, M, (N, k), device=dev), M)
    out = ops.sparse_transpose_matmul(as_view(weights, view), as_view(rows, view), offsets, order)
    ref = ops.sparse_transpose_matmul(weights, rows, offsets, order)
    for o, r in zip(out, ref):
        close(o, r, scale=N * k / M + 1)


# ---- latent_index: one transpose per indices tensor ----------------------------------------------


def test_latent_index_is_built_once_per_indices_tensor():
    indices = torch.randint(0, 40, (10, 4))
    first = latent_index(indices, 40)
    assert latent_index(indices, 40) is first
    assert latent_index(indices, 41) is not first  # another M
    indices.add_(0)  # an in-place write bumps the version: recompute
    assert latent_index(indices, 41) is not first


@pytest.mark.uninterpreted  # the autograd formulas' choice, the same on every backend
def test_one_transpose_per_training_step(backend):
    dev = device_of(backend)
    x = torch.randn(30, 12, device=dev)
    W = torch.randn(64, 12, device=dev, requires_grad=True)
    b = torch.zeros(64, device=dev, requires_grad=True)
    bd = torch.zeros(12, device=dev, requires_grad=True)
    Wd = torch.randn(64, 12, device=dev, requires_grad=True)
    with torch.profiler.profile() as prof:
        values, indices = ssae_kernels.topk_encode(x, W, b, 5, b_dec=bd)
        ((ssae_kernels.sparse_decode(values, indices, Wd, bd) - x) ** 2).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("ssae::latent_transpose") == 1
    assert counts.get("ssae::sparse_transpose_matmul") == 2


@pytest.mark.parametrize("op,args", [
    ("sampled_dot", lambda: (torch.randn(4, 3), torch.randint(0, 5, (4, 2)), torch.randn(5, 3))),
    ("latent_transpose", lambda: (torch.randint(0, 5, (4, 2)), 5)),
    ("sparse_transpose_matmul", lambda: (torch.randn(4, 2), torch.randn(4, 3),
                                         *reference.latent_transpose(torch.randint(0, 5, (4, 2)), 5))),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(ops, op).default, args())


# ---- bad input ------------------------------------------------------------------------------


def test_bad_input(backend):
    require(backend, "sampled_dot", device="cpu")
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
    with pytest.raises(IndexError, match="order must lie in"):
        ops.sparse_transpose_matmul(torch.randn(4, 2), torch.randn(4, 3), torch.tensor([0, 8]), torch.arange(8) + 1)


@pytest.mark.parametrize("op", ["sampled_dot", "latent_transpose"])
@pytest.mark.parametrize("bad", [20, 10**11])
def test_visible_out_of_range_index_raises(backend, op, bad):
    # On CPU tensors every backend checks the entries a view shows (M = 16).
    require(backend, op, device="cpu")
    indices = bad_index_view(6, 16, bad)
    with pytest.raises(IndexError, match="indices"):
        if op == "sampled_dot":
            ops.sampled_dot(torch.randn(6, 4), indices, torch.randn(16, 4))
        else:
            ops.latent_transpose(indices, 16)


@pytest.mark.parametrize("op", ["sampled_dot", "sparse_transpose_matmul"])
def test_float64_is_not_served_by_triton(op):
    # The triton backend has no float64 kernel: asked for by name, it says so rather than serving the call.
    require("triton", op)
    dev = device_of("triton")
    a, b = randn(4, 2, dtype=torch.float64, device=dev), randn(4, 3, dtype=torch.float64, device=dev)
    indices = torch.randint(0, 5, (4, 2), device=dev)
    with ssae_kernels.use_backend("triton"), pytest.raises(Exception, match=r"triton.*does not support float64"):
        if op == "sampled_dot":
            ops.sampled_dot(b, indices, randn(5, 3, dtype=torch.float64, device=dev))
        else:
            ops.sparse_transpose_matmul(a, b, *reference.latent_transpose(indices, 5))


# ---- triton backend only (interpreter) -----------------------------------------------------------


@interpreter
@pytest.mark.parametrize("piece", [4, 7, 256])
def test_triton_pieces_are_deterministic(monkeypatch, piece):
    # hot latents cut into several pieces, whose partial sums a second kernel adds in order
    monkeypatch.setattr(triton_module("sparse_backward"), "PIECE", piece)
    N, d, M, k = 70, 9, 3, 4  # ~93 entries per latent
    weights, rows = torch.randn(N, k), torch.randn(N, d)
    offsets, order = reference.latent_transpose(torch.randint(0, M, (N, k)), M)
    with ssae_kernels.use_backend("triton"):
        first = ops.sparse_transpose_matmul(weights, rows, offsets, order)
        again = ops.sparse_transpose_matmul(weights, rows, offsets, order)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    ref_out, ref_colsum = reference.sparse_transpose_matmul(weights, rows, offsets, order)
    close(first[0], ref_out, scale=N * k / M)
    close(first[1], ref_colsum, scale=N * k / M)


@interpreter
def test_triton_checks_offsets():
    require("triton", "sparse_transpose_matmul", device="cpu")
    with ssae_kernels.use_backend("triton"), pytest.raises(ValueError, match="offsets must run from 0"):
        ops.sparse_transpose_matmul(torch.randn(4, 2), torch.randn(4, 3), torch.tensor([0, 7]), torch.arange(8))


# ---- GPU only ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,k,d,M", [(1, 1, 1, 1), (19, 5, 37, 50), (4096, 32, 192, 24576), (3, 50, 1029, 50),
                                     (1000, 7, 192, 300), (300, 64, 192, 70000)])
def test_gpu_sampled_dot(gpu_backend, dtype, N, k, d, M):
    grad = torch.randn(N, d, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = torch.randn(M, d, device="cuda").to(dtype)
    # the tolerances of the former per-backend tests: sqrt(d) ulps for cuda, d for triton
    assert_op_matches_reference(gpu_backend, "sampled_dot", grad, indices, W,
                                scale=d**0.5 if gpu_backend == "cuda" else d)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,k,M,d,skewed", [
    # skewed latents: some own many entries, many own none
    (1, 1, 1, 67, True), (7, 3, 1, 67, True), (113, 7, 40, 67, True), (4096, 32, 24576, 67, True),
    (300, 64, 70000, 67, True),
    # uniform latents
    (4096, 32, 24576, 192, False), (1000, 7, 300, 192, False), (300, 64, 70000, 192, False),
])
def test_gpu_latent_transpose_and_matmul(gpu_backend, dtype, N, k, M, d, skewed):
    if skewed:
        indices = (torch.rand(N, k, device="cuda") ** 3 * M).long().clamp_(max=M - 1)
        per_latent = float(torch.bincount(indices.reshape(-1), minlength=M).max())  # entries of the busiest latent
        scale = per_latent**0.5 + 1
    else:
        indices = torch.randint(0, M, (N, k), device="cuda")
        scale = N * k / M + 1
    weights = torch.randn(N, k, device="cuda").to(dtype)
    rows = torch.randn(N, d, device="cuda").to(dtype)
    assert_transpose_and_matmul_match(gpu_backend, indices, weights, rows, M, scale=scale)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,k,d,hot", [(70000, 32, 192, 1), (20000, 8, 769, 3), (4096, 64, 4096, 2)])
def test_gpu_hot_latents(gpu_backend, dtype, N, k, d, hot):
    # `hot` latents chosen by every row (N entries each, hundreds of pieces) among uniform ones:
    # split across blocks and added in a fixed order, so the result is close to the reference and
    # bitwise the same on a second call (assert_transpose_and_matmul_match checks both).
    M = 24576
    indices = torch.randint(hot, M, (N, k), device="cuda")
    indices[:, :hot] = torch.arange(hot, device="cuda")
    weights = torch.randn(N, k, device="cuda").to(dtype)
    rows = torch.randn(N, d, device="cuda").to(dtype)
    assert_transpose_and_matmul_match(gpu_backend, indices, weights, rows, M, scale=N**0.5 + 1)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("d,kind", [(768, "narrow"), (767, "narrow"), (768, "offset"), (768, "rows"), (1023, "odd")])
def test_gpu_weight_views(gpu_backend, dtype, d, kind):
    # sampled_dot over W views (16-byte loads where the rows are aligned, else one element at a time)
    # and sparse_transpose_matmul over a rows view: the results of the contiguous tensors.
    N, k, M = 512, 32, 4096
    grad = torch.randn(N, d, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = weight_view(torch.randn(M, d, device="cuda").to(dtype), kind)
    assert_op_matches_reference(gpu_backend, "sampled_dot", weight_view(grad, kind), indices, W,
                                scale=d**0.5 if gpu_backend == "cuda" else d)
    weights = torch.randn(N, k, device="cuda").to(dtype)
    assert_transpose_and_matmul_match(gpu_backend, indices, weights, weight_view(grad, kind), M,
                                      scale=N * k / M + 1)


@requires_cuda
@pytest.mark.parametrize("op", ["sampled_dot", "sparse_transpose_matmul"])
def test_gpu_float64_falls_back_to_reference(kernel_calls, monkeypatch, op):
    # No GPU backend serves float64: without an override, float64 CUDA tensors go to the reference.
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    a, b = randn(4, 2, dtype=torch.float64, device="cuda"), randn(4, 3, dtype=torch.float64, device="cuda")
    indices = torch.randint(0, 5, (4, 2), device="cuda")
    if op == "sampled_dot":
        args = (b, indices, randn(5, 3, dtype=torch.float64, device="cuda"))
    else:
        args = (a, b, *reference.latent_transpose(indices, 5))
    out = getattr(ops, op)(*args)
    assert kernel_calls.get(("reference", op), 0) == 1
    expected = getattr(reference, op)(*args)
    for o, e in zip(*(r if isinstance(r, tuple) else (r,) for r in (out, expected))):
        assert torch.equal(o, e)


@requires_cuda
def test_gpu_cuda_out_of_range_indices_never_read_outside():
    # cuda backend only: out-of-range entries read nothing out of bounds; their dots come out NaN,
    # and the transpose leaves them out.
    require("cuda", "sampled_dot")
    M, d = 10, 8
    W = torch.randn(M, d, device="cuda")
    indices = torch.tensor([[0, 1], [2, M], [-1, 3]], device="cuda")
    with ssae_kernels.use_backend("cuda"):
        dots = ops.sampled_dot(torch.randn(3, d, device="cuda"), indices, W)
        offsets, order = ops.latent_transpose(indices, M)
    torch.cuda.synchronize()
    assert bool(dots[1, 1].isnan()) and bool(dots[2, 0].isnan()) and not bool(dots[0].isnan().any())
    assert int(offsets[-1]) == 4  # the two invalid entries are left out of the transpose
    assert sorted(order[:4].tolist()) == [0, 1, 2, 5]
