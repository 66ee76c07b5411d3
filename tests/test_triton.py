"""The Triton backend against the reference.

On CPU tensors every kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by
conftest). Shapes are small (the interpreter runs each program in Python) and placed
around the interpreter tile sizes so that every mask is exercised: encode tiles
BLOCK_N=16, BLOCK_M=32, BLOCK_K=16; gather tiles 4 slots x 16 columns; radix blocks of 64.

The GPU tests (``test_gpu_*``) run the compiled kernels on CUDA tensors; they need
TRITON_INTERPRET=0, so on a GPU machine ``test_gpu_compiled_mode`` reruns them in a
subprocess without the interpreter.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssae_kernels
from assertions import (GRAD_NAMES, TOLERANCE, assert_gpu_step_matches_reference, assert_op_matches_reference,
                        assert_transpose_and_matmul_match, assert_valid_topk, close, make_encode_inputs,
                        make_step_inputs, step_grads)
from conftest import requires_cuda
from ssae_kernels import reference

triton = pytest.importorskip("triton")
from ssae_kernels.triton import KERNELS  # noqa: E402
from ssae_kernels.triton import sparse_backward as tb  # noqa: E402
from ssae_kernels.triton import topk_encode as te  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU tensors run Triton only with TRITON_INTERPRET=1")
compiled = pytest.mark.skipif(INTERPRETING, reason="compiled-mode test: run with TRITON_INTERPRET=0 "
                                                   "(test_gpu_compiled_mode does so on a GPU machine)")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ops = torch.ops.ssae
SAE_OPS = ("topk_encode", "sparse_decode", "sampled_dot", "latent_transpose", "sparse_transpose_matmul")


def encode(x, W, b, k, bd=None, **overrides):
    """The Triton launcher itself (overrides: config, splits), checked to see CPU tensors."""
    return te.topk_encode(x, W, b, k, bd, **overrides)


# ---- topk_encode forward -----------------------------------------------------------------

EDGE_SHAPES = [  # N, d, M, k around BLOCK_N=16, BLOCK_K=16, BLOCK_M=32
    (1, 1, 1, 1),
    (16, 16, 32, 4),  # every dimension exactly one tile
    (17, 17, 33, 5),  # one past
    (15, 15, 31, 31),  # one short, k = M
    (33, 31, 65, 1),  # k = 1, several row blocks and tiles
    (5, 40, 97, 97),  # k = M across several tiles: KP = 128
    (3, 7, 200, 20),
]


@interpreter
@pytest.mark.parametrize("N,d,M,k", EDGE_SHAPES)
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_encode_matches_reference_float32(N, d, M, k, with_b_dec):
    x, W, b, bd = make_encode_inputs(N, d, M, b_dec=with_b_dec)
    with ssae_kernels.use_backend("triton"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(17, 17, 33, 5), (15, 15, 31, 31), (2, 3, 5, 5)])
def test_encode_dtypes(dtype, N, d, M, k):
    x, W, b, bd = make_encode_inputs(N, d, M, dtype)
    with ssae_kernels.use_backend("triton"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@interpreter
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_encode_latent_splits(splits):
    # 5 tiles of 32 latents; every split count, including splits of unequal length
    x, W, b, bd = make_encode_inputs(20, 9, 150)
    values, indices = encode(x, W, b, 12, bd, splits=splits)
    assert_valid_topk(values, indices, x, W, b, 12, bd)
    assert te.encode_plan(20, 150, 12, x.dtype, x.device, splits=splits).splits == splits


@interpreter
def test_encode_shipped_gpu_config_in_interpreter():
    # The largest shipped tile shape, with shapes one past its edges: 64 rows, 128 latents, 64 columns.
    cfg = te.ENCODE_CONFIGS[(32, 2)]
    x, W, b, bd = make_encode_inputs(65, 65, 257, torch.bfloat16)
    values, indices = encode(x, W, b, 24, bd, config=cfg, splits=2)
    assert_valid_topk(values, indices, x, W, b, 24, bd)


@interpreter
@pytest.mark.parametrize("k", [5, 8, 9, 23])
def test_encode_rounds_when_k_exceeds_max_kp(monkeypatch, k):
    # k > MAX_KP runs the kernels in rounds below the previous round's last key
    monkeypatch.setattr(te, "MAX_KP", 4)
    x, W, b, bd = make_encode_inputs(9, 10, 23 if k == 23 else 50)
    plan = te.encode_plan(9, W.shape[0], k, x.dtype, x.device)
    assert plan.kp == 4 and plan.rounds == -(-k // 4)
    values, indices = encode(x, W, b, k, bd, splits=2)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_encode_exact_ties_go_to_lower_index(dtype, splits):
    # Small integers make every score exact in every dtype, so ties are real ties,
    # also between latents of different splits.
    N, d, M, k = 20, 6, 100, 12
    x = torch.randint(-2, 3, (N, d)).to(dtype)
    W = torch.randint(-1, 2, (M, d)).to(dtype)
    b = torch.randint(-1, 2, (M,)).to(dtype)
    values, indices = encode(x, W, b, k, splits=splits)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)


@interpreter
def test_encode_all_scores_equal_and_negative_zero():
    x = torch.zeros(4, 8)
    W = torch.ones(50, 8)
    b = torch.zeros(50)
    b[::2] = -0.0  # -0.0 ties with +0.0
    values, indices = encode(x, W, b, 10, splits=2)
    assert torch.equal(indices, torch.arange(10).expand(4, 10))
    assert torch.equal(values, torch.zeros(4, 10))


@interpreter
def test_encode_fewer_positive_than_k():
    x, W, b, bd = make_encode_inputs(17, 12, 90)
    b = b - 100.0
    values, indices = encode(x, W, b, 9, bd)
    assert torch.equal(values, torch.zeros_like(values))
    assert_valid_topk(values, indices, x, W, b, 9, bd)


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_encode_non_finite_inputs(bad, with_b_dec):
    x, W, b, bd = make_encode_inputs(20, 10, 64, b_dec=with_b_dec)
    x[3] = bad
    x[7, 2] = bad
    if not with_b_dec:
        # With b_dec, the kernel folds W @ b_dec into the bias (see topk_encode.py), so a
        # non-finite weight gives NaN where the centred reference gives +-inf: only the
        # index range is promised then, which the test below checks too.
        W[5, 1] = bad
    values, indices = encode(x, W, b, 6, bd, splits=2)
    assert int(indices.min()) >= 0 and int(indices.max()) < 64
    assert all(len(set(row.tolist())) == 6 for row in indices)
    ref_values, ref_indices = reference.topk_encode(x, W, b, 6, bd)
    finite_rows = [n for n in range(20) if n not in (3, 7)]
    assert torch.equal(indices[finite_rows], ref_indices[finite_rows])
    torch.testing.assert_close(values[finite_rows], ref_values[finite_rows], equal_nan=True,
                               **TOLERANCE[torch.float32])
    if bad != bad:  # a NaN row: every score NaN, so the lowest indices, as in the reference
        assert torch.equal(indices[3], ref_indices[3]) and torch.isnan(values[3]).all()


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_encode_non_finite_weights_with_b_dec_give_valid_indices():
    x, W, b, bd = make_encode_inputs(20, 10, 64)
    W[5, 1], W[9, 0], bd[2] = float("inf"), float("nan"), float("-inf")
    values, indices = encode(x, W, b, 6, bd, splits=2)
    assert int(indices.min()) >= 0 and int(indices.max()) < 64
    assert all(len(set(row.tolist())) == 6 for row in indices)


@interpreter
def test_encode_nan_ranks_first():
    x = torch.ones(1, 4)
    W = torch.randn(70, 4)
    b = torch.zeros(70)
    b[[4, 17, 66]] = float("nan")
    values, indices = encode(x, W, b, 4, splits=3)
    assert indices[0, :3].tolist() == [4, 17, 66]
    assert torch.isnan(values[0, :3]).all()


@interpreter
def test_encode_non_contiguous_inputs():
    N, d, M, k = 23, 17, 131, 5
    x = torch.randn(d, N).T
    W = torch.randn(M + 3, 2 * d)[3:, ::2]
    b = torch.randn(2 * M)[::2]
    bd = torch.randn(d + 1)[1:]
    with ssae_kernels.use_backend("triton"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


# ---- memory: O(N * splits * k) scratch, never O(N * M) ---------------------------------------


def test_encode_scratch_is_independent_of_M():
    # The GPU plan (132 multiprocessors, as an H100) for growing dictionaries: the candidate
    # buffer stops growing with M once splits reach their cap, and stays far below N x M.
    N, k = 4096, 32
    shapes = {}
    for M in (2**14, 2**18, 2**22, 2**26):
        cfg = te.encode_config(32, torch.bfloat16, torch.device("cuda"))
        plan = te.encode_plan(N, M, k, torch.bfloat16, torch.device("cpu"), config=cfg, multiprocessors=132)
        scratch = plan.scratch_shape[0] * plan.scratch_shape[1] * plan.scratch_shape[2]
        assert plan.scratch_shape[0] == N and plan.kp == 32 and plan.splits <= te.MAX_SPLITS
        assert scratch <= N * te.MAX_SPLITS * plan.kp
        assert scratch * 8 <= N * M * 2 // 16 or M == 2**14  # int64 scratch vs a bf16 N x M matrix
        shapes[M] = plan.scratch_shape
    assert shapes[2**22] == shapes[2**26]
    # few rows: splits grow to fill the GPU, but still capped
    plan = te.encode_plan(8, 2**26, 64, torch.bfloat16, torch.device("cpu"),
                          config=te.encode_config(64, torch.bfloat16, torch.device("cuda")), multiprocessors=132)
    assert plan.splits == te.MAX_SPLITS and plan.scratch_shape == (8, te.MAX_SPLITS, 64)


class _Allocations(TorchDispatchMode):
    """Records the tensors created by factory functions (empty, zeros, full, ...)."""

    FACTORIES = ("empty", "zeros", "full", "ones", "new_empty", "empty_like", "zeros_like", "full_like")

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in self.FACTORIES and isinstance(out, torch.Tensor):
            self.sizes.append((func.__name__, tuple(out.shape), out.numel()))
        return out


@interpreter
def test_encode_allocations_are_small_for_large_M():
    N, d, M, k = 8, 4, 4096, 4
    x, W, b, bd = make_encode_inputs(N, d, M)
    plan = te.encode_plan(N, M, k, x.dtype, x.device)
    with _Allocations() as seen:
        values, indices = encode(x, W, b, k, bd)
    assert_valid_topk(values, indices, x, W, b, k, bd)
    scratch = N * plan.splits * plan.kp
    assert scratch * 16 <= N * M
    allocated = [s for s in seen.sizes if s[2] > 0]
    assert any(shape == plan.scratch_shape for _, shape, _ in allocated), allocated
    # outputs (N x k), candidates (N x splits x KP), the folded bias (M): nothing like N x M
    assert all(n <= max(N * k, scratch, M) for _, _, n in allocated), allocated


# ---- sparse_decode -------------------------------------------------------------------------


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,M,d", [(1, 1, 1, 1), (5, 4, 9, 16), (6, 5, 9, 17), (3, 9, 40, 33)])
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_decode_matches_reference(dtype, N, k, M, d, with_b_dec):
    values = torch.randn(N, k).to(dtype)
    indices = torch.randint(0, M, (N, k))
    W = torch.randn(M, d).to(dtype)
    bd = torch.randn(d).to(dtype) if with_b_dec else None
    assert_op_matches_reference("triton", "sparse_decode", values, indices, W, bd, scale=k)


# ---- backward primitives -------------------------------------------------------------------


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 1, 1, 1), (7, 16, 30, 4), (6, 17, 5, 5), (3, 33, 100, 9)])
def test_sampled_dot(dtype, N, d, M, k):
    grad = torch.randn(N, d).to(dtype)
    W = torch.randn(M, d).to(dtype)
    indices = torch.randint(0, M, (N, k))
    assert_op_matches_reference("triton", "sampled_dot", grad, indices, W, scale=d)


@interpreter
@pytest.mark.parametrize("N,k,M", [
    (1, 1, 1), (16, 4, 7),  # one radix block exactly (64 entries)
    (13, 5, 101), (40, 3, 256), (40, 3, 257),  # one and two radix passes
    (9, 7, 70000),  # three passes
])
def test_latent_transpose(N, k, M):
    indices = torch.randint(0, M, (N, k))
    if M > 1:
        indices[0, 0] = M - 1  # the largest latent, whose digits are all set
    with ssae_kernels.use_backend("triton"):
        offsets, order = ops.latent_transpose(indices, M)
    ref_offsets, ref_order = reference.latent_transpose(indices, M)
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(order, ref_order)  # stable: ascending entries within a latent


@interpreter
def test_latent_transpose_with_duplicates_in_a_row():
    indices = torch.tensor([[3, 3, 0, 3], [0, 0, 2, 3]])
    with ssae_kernels.use_backend("triton"):
        offsets, order = ops.latent_transpose(indices, 5)
    assert offsets.tolist() == [0, 3, 3, 4, 8, 8]
    assert order.tolist() == [2, 4, 5, 6, 0, 1, 3, 7]


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 1, 1, 1), (7, 16, 30, 4), (6, 17, 5, 5), (3, 8, 500, 2)])
def test_sparse_transpose_matmul(dtype, N, d, M, k):
    weights = torch.randn(N, k).to(dtype)
    rows = torch.randn(N, d).to(dtype)
    indices = torch.randint(0, M, (N, k))
    offsets, order = reference.latent_transpose(indices, M)
    with ssae_kernels.use_backend("triton"):
        out, colsum = ops.sparse_transpose_matmul(weights, rows, offsets, order)
    ref_out, ref_colsum = reference.sparse_transpose_matmul(weights, rows, offsets, order)
    close(out, ref_out, scale=N * k / M + 1)
    close(colsum, ref_colsum, scale=N * k / M + 1)
    unused = torch.ones(M, dtype=torch.bool)
    unused[indices.reshape(-1)] = False
    assert (out[unused] == 0).all() and (colsum[unused] == 0).all()


@interpreter
@pytest.mark.parametrize("piece", [4, 7, 256])
def test_sparse_transpose_matmul_pieces_are_deterministic(monkeypatch, piece):
    # hot latents cut into several pieces, whose partial sums a second kernel adds in order
    monkeypatch.setattr(tb, "PIECE", piece)
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


# ---- autograd through the Triton primitives --------------------------------------------------


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of each Triton launcher (the backend registry serves KERNELS)."""
    calls = {op: 0 for op in KERNELS}
    for op, fn in list(KERNELS.items()):
        def counted(*args, _op=op, _fn=fn):
            calls[_op] += 1
            return _fn(*args)
        monkeypatch.setitem(KERNELS, op, counted)
    return calls


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(17, 17, 33, 5), (4, 3, 9, 9), (6, 20, 70, 1)])
def test_training_step_gradients(triton_calls, dtype, N, d, M, k):
    x, W, b, bd, Wd, weights = make_step_inputs(N, d, M, k, dtype)
    grads, indices = step_grads("triton", x, W, b, bd, Wd, k, weights)
    ref_grads, ref_indices = step_grads(None, x, W, b, bd, Wd, k, weights)
    assert torch.equal(indices, ref_indices)  # no near-ties at this seed
    # every primitive ran on the Triton backend (the encoder's and decoder's backward share one transpose)
    assert all(triton_calls[op] >= 1 for op in SAE_OPS), triton_calls
    # The autograd formulas (ops/) centre x in its own dtype before grad W_enc; the reference
    # differentiates through a float32 centring: a few 16-bit ulps of the largest entry apart.
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert g.dtype == r.dtype, name
        close(g, r, dtype=dtype, scale=max(1.0, float(r.abs().max())))
    # The same formulas on the CPU backend: only the summation order differs.
    if not ssae_kernels.backends.BACKENDS["cpu"].not_supported_reasons("topk_encode", x.device):
        cpu_grads, cpu_indices = step_grads("cpu", x, W, b, bd, Wd, k, weights)
        assert torch.equal(indices, cpu_indices)
        for name, g, c in zip(GRAD_NAMES, grads, cpu_grads):
            close(g, c, dtype=dtype)


# ---- bad input -----------------------------------------------------------------------------


@interpreter
def test_bad_input():
    with ssae_kernels.use_backend("triton"):
        x, W, b, bd = make_encode_inputs(5, 4, 10, torch.float64)
        with pytest.raises(TypeError, match="triton backend supports float32, bfloat16 and float16"):
            ssae_kernels.topk_encode(x, W, b, 3, b_dec=bd)
        with pytest.raises(IndexError, match="indices must lie in"):
            ops.sampled_dot(torch.randn(4, 3), torch.full((4, 2), 5), torch.randn(5, 3))
        with pytest.raises(IndexError, match="indices must lie in"):
            ssae_kernels.sparse_decode(torch.randn(4, 2), torch.full((4, 2), -1), torch.randn(5, 3))
        with pytest.raises(IndexError, match="indices must lie in"):
            ops.latent_transpose(torch.full((4, 2), 7), 5)
        with pytest.raises(ValueError, match="offsets must run from 0"):
            ops.sparse_transpose_matmul(torch.randn(4, 2), torch.randn(4, 3), torch.tensor([0, 7]), torch.arange(8))
        with pytest.raises(IndexError, match="order must lie in"):
            ops.sparse_transpose_matmul(torch.randn(4, 2), torch.randn(4, 3), torch.tensor([0, 8]),
                                        torch.arange(8) + 1)


# ---- GPU, compiled mode ----------------------------------------------------------------------


@requires_cuda
@pytest.mark.skipif(not INTERPRETING, reason="this is the driver; the GPU tests run directly in this process")
def test_gpu_compiled_mode():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-p", "no:cacheprovider",
                             "-k", "test_gpu_ and not compiled_mode"], env=env, cwd=os.path.dirname(__file__),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@requires_cuda
@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(1, 64, 128, 1), (257, 129, 1000, 32), (64, 768, 24576, 32),
                                     (33, 64, 300, 300), (100, 96, 5000, 200)])
def test_gpu_encode(dtype, N, d, M, k):
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, device="cuda")
    with ssae_kernels.use_backend("triton"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        pytest.skip("tf32 inputs: scores are not float32-accurate")
    assert_valid_topk(values.cpu(), indices.cpu(), x.cpu(), W.cpu(), b.cpu(), k, bd.cpu())


@requires_cuda
@compiled
def test_gpu_encode_exact_ties():
    N, d, M, k = 300, 16, 5000, 40
    x = torch.randint(-2, 3, (N, d)).to("cuda", torch.bfloat16)
    W = torch.randint(-1, 2, (M, d)).to("cuda", torch.bfloat16)
    b = torch.randint(-1, 2, (M,)).to("cuda", torch.bfloat16)
    with ssae_kernels.use_backend("triton"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k)
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


@requires_cuda
@compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_training_step(dtype):
    N, d, M, k = 512, 256, 8192, 32
    x, W, b, bd, Wd, weights = make_step_inputs(N, d, M, k, dtype, device="cuda")
    grads, indices = step_grads("triton", x, W, b, bd, Wd, k, weights)
    ref_grads, ref_indices = step_grads(None, x, W, b, bd, Wd, k, weights)
    assert_gpu_step_matches_reference(grads, indices, ref_grads, ref_indices, x, weights, dtype)


@requires_cuda
@compiled
@pytest.mark.parametrize("N,k,M", [(4096, 32, 24576), (1000, 7, 300), (300, 64, 70000)])
def test_gpu_backward_primitives(N, k, M):
    d = 192
    indices = torch.randint(0, M, (N, k), device="cuda")
    weights, rows = torch.randn(N, k, device="cuda"), torch.randn(N, d, device="cuda")
    W = torch.randn(M, d, device="cuda")
    assert_transpose_and_matmul_match("triton", indices, weights, rows, M, scale=N * k / M + 1)
    assert_op_matches_reference("triton", "sampled_dot", rows, indices, W, scale=d)
