"""The CUDA C++ backend (csrc/kernels/cuda, csrc/torch/cuda_ops.cu) against the reference.

The ``test_gpu_*`` tests need a GPU and ``ssae_kernels._C`` built with
``SSAE_BUILD_CUDA=1``; without them they skip with the reason. Everything about
the CUDA path that can run without a GPU is tested elsewhere: the launch
arithmetic, chunk plans and the block-level selection (emulated on the host) by
ctest (csrc/tests/test_cuda_*.cpp), and the kernels' compilation for sm_80 and
sm_90 with zero register spills by ctest's cuda_ptxas_report. The tests at the
end of this file (the build switch, the backend's reasons) run here.

Shapes: odd N, d, M; k = 1 and k = M; N = 1; encodes that span several row
blocks (2048 rows) and latent chunks (4096 latents at 2048 rows, 2560 with the
bf16/f16 hi + lo split, see launch.h); k beyond the shared-memory sort (2048).
The TERM primitives (tilted_group_stats, row_sq_error, sparse_decode_sq_error)
are compared with the float64 reference at every tilt of issue 5; their slot
plan and merge order are emulated on the host by test_cuda_launch, as is the slot
ownership of sparse_decode_sq_error's backward (sparse_decode_residual).
"""

import os
import subprocess
import sys

import pytest
import torch

import ssae_kernels
from assertions import (assert_gpu_step_matches_reference, assert_op_matches_reference,
                        assert_transpose_and_matmul_match, assert_valid_topk, close, make_encode_inputs,
                        make_step_inputs, step_grads)
from conftest import CUDA
from ssae_kernels import backends, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ops = torch.ops.ssae
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_built():
    ext = backends.BACKENDS["cuda"].extension
    return ext is not None and bool(ext.build_info().get("cuda", False))


requires_cuda_backend = pytest.mark.skipif(
    not CUDA or not _cuda_built(),
    reason="needs a CUDA GPU (none on this machine)" if not CUDA
    else "ssae_kernels._C was built without the CUDA backend (reinstall with SSAE_BUILD_CUDA=1)")


@pytest.fixture(autouse=True)
def _exact_float32_gemm():
    # The encode's float32 GEMM follows torch's TF32 switch; the tests need float32 scores.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def make_inputs(N, d, M, dtype, b_dec=True, requires_grad=False):
    return make_encode_inputs(N, d, M, dtype, b_dec=b_dec, requires_grad=requires_grad, device="cuda")


def assert_valid_cuda_topk(values, indices, x, W, b, k, bd):
    """A correct top-k of the exact pre-activations, up to the CUDA encode's score error.

    Scores come from a float32-accumulated GEMM; for bfloat16/float16 with b_dec,
    x - b_dec enters as hi + lo halves whose rounding adds at most 2^-17 (bf16)
    or 2^-22 (f16) of sum |x_c w| (launch.h / cuda_ops.cu). Keys closer than that
    may come out in either order, nothing else may.
    """
    split_error = {torch.bfloat16: 2.0**-17, torch.float16: 2.0**-22}.get(x.dtype, 0.0) if bd is not None else 0.0
    assert_valid_topk(values, indices, x, W, b, k, bd, score_error=split_error)


ENCODE_SHAPES = [  # N, d, M, k
    (1, 1, 1, 1),
    (1, 64, 128, 1),
    (7, 33, 65, 65),          # k = M
    (257, 129, 1000, 32),
    (33, 64, 300, 300),       # k = M beyond one block of threads
    (2049, 64, 9000, 32),     # two row blocks (the second of one row), three or four latent chunks
    (3, 16, 3000, 2100),      # k > 2048: the final sort runs in global memory
    (64, 768, 24576, 32),     # the reference width and dictionary size
]


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", ENCODE_SHAPES)
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_gpu_topk_encode(dtype, N, d, M, k, with_b_dec):
    x, W, b, bd = make_inputs(N, d, M, dtype, b_dec=with_b_dec)
    with ssae_kernels.use_backend("cuda"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    assert_valid_cuda_topk(values, indices, x, W, b, k, bd)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_topk_encode_exact_ties(dtype):
    # Small integers: every score is exact, so the result must equal the
    # reference bit for bit, ties going to the lower index across chunks.
    N, d, M, k = 2100, 16, 9000, 40
    x = torch.randint(-2, 3, (N, d)).to("cuda", dtype)
    W = torch.randint(-1, 2, (M, d)).to("cuda", dtype)
    b = torch.randint(-1, 2, (M,)).to("cuda", dtype)
    bd = torch.randint(-1, 2, (d,)).to("cuda", dtype)
    for b_dec in (None, bd):
        with ssae_kernels.use_backend("cuda"):
            values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=b_dec)
        ref_values, ref_indices = reference.topk_encode(x, W, b, k, b_dec)
        assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


@requires_cuda_backend
def test_gpu_topk_encode_non_finite():
    N, d, M, k = 50, 32, 700, 9
    x, W, b, _ = make_inputs(N, d, M, torch.float32, b_dec=False)
    x[3] = float("nan")  # a whole row of NaN scores: the first k latents, NaN values
    x[4, 0] = float("inf")  # a row of +-inf scores
    b[5] = float("nan")  # latent 5 is NaN in every row: it ranks first in the others
    with ssae_kernels.use_backend("cuda"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k)
    assert int(indices.min()) >= 0 and int(indices.max()) < M
    assert all(len(set(row.tolist())) == k for row in indices.cpu())
    assert torch.equal(indices[3], torch.arange(k, device="cuda")) and bool(values[3].isnan().all())
    others = [n for n in range(N) if n != 3]
    assert bool((indices[others, 0] == 5).all()) and bool(values[others, 0].isnan().all())
    assert not bool(values[others, 1:].isnan().any())


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,d,M", [(1, 1, 1, 1), (17, 5, 33, 40), (300, 32, 768, 24576), (9, 40, 1025, 40),
                                     (5, 300, 7, 1000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_sparse_decode(dtype, N, k, d, M, with_bias):
    values = torch.randn(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).to(dtype)
    bias = torch.randn(d, device="cuda").to(dtype) if with_bias else None
    assert_op_matches_reference("cuda", "sparse_decode", values, indices, W, bias, scale=k**0.5)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,d,M", [(1, 1, 1, 1), (19, 5, 37, 50), (4096, 32, 192, 24576), (3, 50, 1029, 50)])
def test_gpu_sampled_dot(dtype, N, k, d, M):
    grad = torch.randn(N, d, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = torch.randn(M, d, device="cuda").to(dtype)
    assert_op_matches_reference("cuda", "sampled_dot", grad, indices, W, scale=d**0.5)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,M", [(1, 1, 1), (7, 3, 1), (113, 7, 40), (4096, 32, 24576), (300, 64, 70000)])
def test_gpu_latent_transpose_and_matmul(dtype, N, k, M):
    d = 67
    # Skewed latents: some own many entries, many own none.
    indices = (torch.rand(N, k, device="cuda") ** 3 * M).long().clamp_(max=M - 1)
    weights = torch.randn(N, k, device="cuda").to(dtype)
    rows = torch.randn(N, d, device="cuda").to(dtype)
    per_latent = float(torch.bincount(indices.reshape(-1), minlength=M).max())  # entries of the busiest latent
    assert_transpose_and_matmul_match("cuda", indices, weights, rows, M, scale=per_latent**0.5 + 1)


@requires_cuda_backend
def test_gpu_out_of_range_indices_never_read_outside():
    M, d = 10, 8
    W = torch.randn(M, d, device="cuda")
    values = torch.randn(3, 2, device="cuda")
    indices = torch.tensor([[0, 1], [2, M], [-1, 3]], device="cuda")
    with ssae_kernels.use_backend("cuda"):
        out = ssae_kernels.sparse_decode(values, indices, W)
        dots = ops.sampled_dot(torch.randn(3, d, device="cuda"), indices, W)
        offsets, order = ops.latent_transpose(indices, M)
    torch.cuda.synchronize()
    assert not bool(out[0].isnan().any()) and bool(out[1:].isnan().all())
    assert bool(dots[1, 1].isnan()) and bool(dots[2, 0].isnan()) and not bool(dots[0].isnan().any())
    assert int(offsets[-1]) == 4  # the two invalid entries are left out of the transpose
    assert sorted(order[:4].tolist()) == [0, 1, 2, 5]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_index_check_on_request(backend, monkeypatch):
    # SSAE_CHECK_INDICES=1 makes every GPU backend raise as the CPU backend does (at a sync per call).
    reasons = backends.availability("cuda", "sparse_decode")[backend]
    if reasons:
        pytest.skip(f"{backend} backend unavailable: {'; '.join(reasons)}")
    W = torch.randn(10, 8, device="cuda")
    values = torch.randn(2, 2, device="cuda")
    indices = torch.tensor([[0, 1], [2, 10]], device="cuda")
    monkeypatch.setenv("SSAE_CHECK_INDICES", "1")
    with ssae_kernels.use_backend(backend), pytest.raises(IndexError, match=r"indices must lie in \[0, 10\), got 10"):
        ssae_kernels.sparse_decode(values, indices, W)
    with ssae_kernels.use_backend(backend), pytest.raises(IndexError, match="groups"):
        ssae_kernels.tilted_loss(torch.rand(4, device="cuda"), 1.0,
                                 groups=torch.tensor([0, 1, 2, 3], device="cuda"), num_groups=3)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_training_step(dtype):
    # Forward and backward of encode -> decode through autograd, cuda vs reference.
    N, d, M, k = 512, 256, 8192, 32
    x, W, b, bd, Wd, weights = make_step_inputs(N, d, M, k, dtype, device="cuda")
    grads, indices = step_grads("cuda", x, W, b, bd, Wd, k, weights)
    ref_grads, ref_indices = step_grads(None, x, W, b, bd, Wd, k, weights)
    assert_gpu_step_matches_reference(grads, indices, ref_grads, ref_indices, x, weights, dtype)


@requires_cuda_backend
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compares with compiled Triton: run with TRITON_INTERPRET=0 "
                           "(test_gpu_cuda_vs_triton_compiled does so on a GPU machine)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_cuda_vs_triton(dtype):
    # Exact scores (small integers): both GPU backends must give the reference's answer.
    pytest.importorskip("triton")
    N, d, M, k = 1000, 16, 5000, 32
    x = torch.randint(-2, 3, (N, d)).to("cuda", dtype)
    W = torch.randint(-1, 2, (M, d)).to("cuda", dtype)
    b = torch.randint(-1, 2, (M,)).to("cuda", dtype)
    results = {}
    for name in ("cuda", "triton"):
        with ssae_kernels.use_backend(name):
            values, indices = ssae_kernels.topk_encode(x, W, b, k)
            x_hat = ssae_kernels.sparse_decode(values, indices, W)
        results[name] = (values, indices, x_hat)
    assert torch.equal(results["cuda"][1], results["triton"][1])
    assert torch.equal(results["cuda"][0], results["triton"][0])
    close(results["cuda"][2], results["triton"][2], scale=k**0.5)


@pytest.mark.skipif(not CUDA or not _cuda_built(), reason="needs a CUDA GPU and the CUDA backend built")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="this is the driver; runs directly otherwise")
def test_gpu_cuda_vs_triton_compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "test_gpu_cuda_vs_triton and not compiled",
                             "-p", "no:cacheprovider"], env=env, cwd=os.path.dirname(__file__),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@requires_cuda_backend
def test_gpu_bad_input():
    x, W, b, bd = make_inputs(5, 4, 10, torch.float32)
    with ssae_kernels.use_backend("cuda"):
        with pytest.raises(TypeError, match="float64 runs on the reference backend"):
            ssae_kernels.topk_encode(x.double(), W.double(), b.double(), 3)
        with pytest.raises(ValueError, match="k must be"):
            ssae_kernels.topk_encode(x, W, b, 11)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        backends.BACKENDS["cuda"].extension.topk_encode_cuda(x.cpu(), W.cpu(), b.cpu(), 3, None)


# ---- TERM primitives (csrc/kernels/cuda/tilted_loss.cu) ------------------------------------------

TILTS = (-1e9, -10.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 500.0, 1e9)


def _groups(kind, n):
    if kind == "none":
        return None, 1
    if kind == "one":
        return torch.zeros(n, dtype=torch.int64, device="cuda"), 1
    if kind == "singletons":  # groups of size 1, in shuffled order
        return torch.randperm(n, device="cuda"), n
    # 1000 ids with a skewed distribution: some groups large, many empty
    return (torch.rand(n, device="cuda") ** 3 * 1000).long(), 1000


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", TILTS)
@pytest.mark.parametrize("n", [1, 7, 5001, 300001])
@pytest.mark.parametrize("kind", ["none", "one", "singletons", "skewed"])
def test_gpu_tilted_group_stats(dtype, t, n, kind):
    if kind == "singletons" and n > 5001:
        pytest.skip("covered by the smaller sizes")
    losses = (torch.rand(n, device="cuda", dtype=torch.float64) * 3).to(dtype)
    groups, G = _groups(kind, n)
    with ssae_kernels.use_backend("cuda"):
        anchor, log_mean, count = ops.tilted_group_stats(losses, t, groups, G)
    # The kernel reads each loss exactly into float64: the float64 reference is the same math.
    ref_anchor, ref_log_mean, ref_count = reference.tilted_group_stats(losses.double(), t, groups, G)
    assert anchor.dtype == log_mean.dtype == torch.float64 and count.dtype == torch.int64
    assert torch.equal(count, ref_count)
    if t != 0:
        assert torch.equal(anchor, ref_anchor)  # a loss of the group, not a computed value
        risk, ref_risk = anchor + log_mean / t, ref_anchor + ref_log_mean / t
    else:
        risk, ref_risk = anchor, ref_anchor
    torch.testing.assert_close(risk, ref_risk, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(log_mean, ref_log_mean, rtol=1e-10, atol=1e-13)


@requires_cuda_backend
@pytest.mark.parametrize("t", (-1e9, 1e-6, 500.0))
def test_gpu_tilted_loss_equal_losses_and_public_op(t):
    losses = torch.full((4099,), 0.7, device="cuda")
    with ssae_kernels.use_backend("cuda"):
        assert float(ssae_kernels.tilted_loss(losses, t)) == pytest.approx(0.7, rel=1e-7)
        x = torch.rand(4099, device="cuda") * 2
        g = torch.randint(0, 5, (4099,), device="cuda")
        out = ssae_kernels.tilted_loss(x, t, groups=g, t_group=1.0)
    expected = reference.tilted_loss(x.double(), t, g, 5, 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


@requires_cuda_backend
def test_gpu_tilted_group_stats_bad_group_id_gives_nan():
    # Out-of-range ids are not checked on the host (a sync); they poison the result instead.
    losses = torch.rand(100, device="cuda")
    groups = torch.zeros(100, dtype=torch.int64, device="cuda")
    groups[37] = 3
    with ssae_kernels.use_backend("cuda"):
        anchor, log_mean, count = ops.tilted_group_stats(losses, 1.0, groups, 2)
    assert bool(anchor.isnan().all()) and bool(log_mean.isnan().all())
    assert count.tolist() == [99, 0]


def _max_rel_error(actual, exact):
    return float(((actual.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max())


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d", [(1, 1), (9, 33), (300, 768), (5, 5000), (4097, 64)])
def test_gpu_row_sq_error(dtype, N, d):
    x_hat = torch.randn(N, d, device="cuda").to(dtype)
    x = torch.randn(N, d, device="cuda").to(dtype)
    with ssae_kernels.use_backend("cuda"):
        out = ops.row_sq_error(x_hat, x)
    assert out.dtype == torch.float32 and out.shape == (N,)
    exact = reference.row_sq_error(x_hat.double(), x.double())
    # float32 accumulation: within a few times what PyTorch's own float32 evaluation achieves
    torch_error = _max_rel_error(reference.row_sq_error(x_hat, x), exact)
    assert _max_rel_error(out, exact) <= 4 * torch_error + 1e-6


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,d,M", [(1, 1, 1, 1), (17, 5, 33, 40), (300, 32, 768, 24576), (9, 40, 1025, 40),
                                     (5, 300, 7, 1000), (3, 7, 5000, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_sparse_decode_sq_error(dtype, N, k, d, M, with_bias):
    values = torch.randn(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).to(dtype)
    bias = torch.randn(d, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(N, d, device="cuda").to(dtype)
    with ssae_kernels.use_backend("cuda"):
        out = ops.sparse_decode_sq_error(values, indices, W, bias, x)
    assert out.dtype == torch.float32 and out.shape == (N,)
    exact = reference.sparse_decode_sq_error(values.double(), indices, W.double(),
                                             None if bias is None else bias.double(), x.double())
    torch_error = _max_rel_error(reference.sparse_decode_sq_error(values, indices, W, bias, x), exact)
    assert _max_rel_error(out, exact) <= 4 * torch_error + 1e-6


@requires_cuda_backend
def test_gpu_sparse_decode_sq_error_bad_index_gives_nan():
    M, d = 10, 8
    W = torch.randn(M, d, device="cuda")
    values = torch.randn(3, 2, device="cuda")
    indices = torch.tensor([[0, 1], [2, M], [-1, 3]], device="cuda")
    x = torch.randn(3, d, device="cuda")
    ext = backends.BACKENDS["cuda"].extension
    out = ext.sparse_decode_sq_error_cuda(values, indices, W, None, x)
    assert not bool(out[0].isnan()) and bool(out[1:].isnan().all())


@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,d,M", [(1, 1, 1, 1), (17, 5, 33, 40), (300, 32, 768, 24576), (9, 40, 1025, 40),
                                     (5, 300, 7, 1000), (3, 7, 5000, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_sparse_decode_residual(dtype, N, k, d, M, with_bias):
    # d = 1025 and 5000 span several column tiles, k = 300 two staging rounds, (9, 40, 1025, 40) has k = M
    values = torch.rand(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).to(dtype)
    bias = (torch.randn(d, device="cuda") * 0.1).to(dtype) if with_bias else None
    x = torch.randn(N, d, device="cuda").to(dtype)
    scale = torch.rand(N, device="cuda") * 4 - 2
    with ssae_kernels.use_backend("cuda"):
        residual, grad_values = ops.sparse_decode_residual(values, indices, W, bias, x, scale)
    assert residual.dtype == grad_values.dtype == dtype
    assert residual.shape == (N, d) and grad_values.shape == (N, k)
    ref_residual, ref_grad = reference.sparse_decode_residual(values, indices, W, bias, x, scale)
    close(residual, ref_residual, scale=k)
    close(grad_values, ref_grad, scale=k)
    # deterministic: the per-tile partial dots are merged in a fixed order
    with ssae_kernels.use_backend("cuda"):
        again = ops.sparse_decode_residual(values, indices, W, bias, x, scale)
    assert torch.equal(again[0], residual) and torch.equal(again[1], grad_values)


@requires_cuda_backend
def test_gpu_sparse_decode_mse_backward():
    N, k, d, M = 64, 8, 300, 500
    values = torch.rand(N, k, device="cuda", requires_grad=True)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).requires_grad_(True)
    b = (torch.randn(d, device="cuda") * 0.1).requires_grad_(True)
    x = torch.randn(N, d, device="cuda", requires_grad=True)
    inputs = (values, W, b, x)
    with ssae_kernels.use_backend("cuda"):
        value = ssae_kernels.sparse_decode_mse(values, indices, W, b, x, t=500.0)
        grads = torch.autograd.grad(value, inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    rv, rW, rb, rx = ref_inputs
    ref = reference.tilted_loss(reference.sparse_decode_sq_error(rv, indices, rW, rb, rx), 500.0)
    for g, r in zip(grads, torch.autograd.grad(ref, ref_inputs)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


@requires_cuda_backend
def test_gpu_sparse_decode_residual_bad_index_gives_nan():
    M, d = 10, 8
    ext = backends.BACKENDS["cuda"].extension
    indices = torch.tensor([[0, 1], [2, M], [-1, 3]], device="cuda")
    residual, grad_values = ext.sparse_decode_residual_cuda(torch.randn(3, 2, device="cuda"), indices,
                                                            torch.randn(M, d, device="cuda"), None,
                                                            torch.randn(3, d, device="cuda"), torch.ones(3, device="cuda"))
    assert not bool(residual[0].isnan().any() or grad_values[0].isnan().any())
    assert bool(residual[1:].isnan().all() and grad_values[1:].isnan().all())


@requires_cuda_backend
def test_gpu_term_bad_input():
    ext = backends.BACKENDS["cuda"].extension
    losses = torch.rand(10, device="cuda")
    with pytest.raises(TypeError, match="float64 runs on the reference backend"):
        ext.tilted_group_stats_cuda(losses.double(), 1.0, None, 1)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ext.tilted_group_stats_cuda(losses.cpu(), 1.0, None, 1)
    with pytest.raises(TypeError, match="groups must be int64"):
        ext.tilted_group_stats_cuda(losses, 1.0, torch.zeros(10, dtype=torch.int32, device="cuda"), 1)
    with pytest.raises(RuntimeError, match="num_groups must be 1 without groups"):
        ext.tilted_group_stats_cuda(losses, 1.0, None, 2)
    with pytest.raises(RuntimeError, match="x must have the shape of x_hat"):
        ext.row_sq_error_cuda(torch.rand(3, 4, device="cuda"), torch.rand(3, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="x must be"):
        ext.sparse_decode_sq_error_cuda(torch.rand(3, 2, device="cuda"), torch.zeros(3, 2, dtype=torch.int64,
                                        device="cuda"), torch.rand(5, 4, device="cuda"), None,
                                        torch.rand(3, 5, device="cuda"))
    with pytest.raises(TypeError, match="scale must be float32"):
        ext.sparse_decode_residual_cuda(torch.rand(3, 2, device="cuda"), torch.zeros(3, 2, dtype=torch.int64,
                                        device="cuda"), torch.rand(5, 4, device="cuda"), None,
                                        torch.rand(3, 4, device="cuda"), torch.ones(3, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match="scale must be"):
        ext.sparse_decode_residual_cuda(torch.rand(3, 2, device="cuda"), torch.zeros(3, 2, dtype=torch.int64,
                                        device="cuda"), torch.rand(5, 4, device="cuda"), None,
                                        torch.rand(3, 4, device="cuda"), torch.ones(4, device="cuda"))


# ---- without a GPU ---------------------------------------------------------------------------


def test_cuda_backend_says_why_it_is_unavailable():
    reasons = backends.BACKENDS["cuda"].not_supported_reasons("topk_encode", torch.device("cuda"))
    if _cuda_built():
        assert reasons == []
    else:
        assert any("built without CUDA" in r or "not available" in r for r in reasons), reasons
    # It never serves CPU tensors, whatever was built.
    assert any("serves cuda tensors" in r for r in backends.BACKENDS["cuda"].not_supported_reasons(
        "topk_encode", torch.device("cpu")))


def _setup_py(env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("SSAE_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch answers of setup.py")
def test_setup_builds_cuda_only_when_asked():
    # Asked explicitly with a CPU torch: a clear failure, not a silent CPU-only build.
    asked = _setup_py({"SSAE_BUILD_CUDA": "1"})
    assert asked.returncode != 0 and "torch" in asked.stderr and "CPU build" in asked.stderr, asked.stderr
    # Asked through the arch list: skipped, and said so.
    arch = _setup_py({"TORCH_CUDA_ARCH_LIST": "8.0"})
    assert arch.returncode == 0 and "CUDA backend is skipped" in arch.stderr, arch.stderr
    # Not asked: nothing said about CUDA at all.
    quiet = _setup_py({})
    assert quiet.returncode == 0 and "CUDA" not in quiet.stderr, quiet.stderr
