"""topk_encode (ssae_kernels/ops/topk_encode.py) on every backend, against the reference.

Sections: the op on every backend (``backend`` fixture, tests/ops/conftest.py); the
encode -> decode training step; bad input; then backend-specific tests, each section
marked: the cpu backend's work split, the Triton encode's plans, splits and configs
(interpreter), GPU-scale tests (``test_gpu_*``, triton and cuda on CUDA tensors), the
cuda backend's build switch, and the driver that reruns the triton tests compiled.

Interpreter tile sizes (ssae_kernels/triton/topk_encode.py): BLOCK_N=16, BLOCK_M=32,
BLOCK_K=16; the small shapes sit around them so that every mask is exercised.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssae_kernels
from assertions import (DTYPES, GRAD_NAMES, TOLERANCE, assert_gpu_step_matches_reference, assert_valid_topk, close,
                        make_encode_inputs, make_step_inputs, step_grads)
from conftest import requires_cuda
from ssae_kernels import backends, reference

from .conftest import (CUDA, INTERPRETING, as_view, cpu_sized, device_of, interpreter, require, triton_module,
                       uninterpreted)

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SAE_OPS = ("topk_encode", "sparse_decode", "sampled_dot", "latent_transpose", "sparse_transpose_matmul")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def score_error(backend, dtype, b_dec):
    """A backend's extra score error beyond float32 summation (assert_valid_topk's score_error):
    none any more. The cuda encode used to split 16-bit x - b_dec into hi + lo halves (error
    ~2^-17); it now folds W @ b_dec into a float32 bias like the Triton encode (docs/cuda.md)."""
    return 0.0


def encode(x, W, b, k, bd=None):
    """The public op (a test body that takes ``backend`` runs under use_backend(backend))."""
    return ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)


# ---- forward, every backend -------------------------------------------------------------------

SHAPES = [  # N, d, M, k
    (1, 1, 1, 1),
    (16, 16, 32, 4),  # every dimension exactly one interpreter tile
    (17, 17, 33, 5),  # one past
    (15, 15, 31, 31),  # one short, k = M
    (33, 31, 65, 1),  # k = 1, several row blocks and tiles
    (5, 40, 97, 97),  # k = M across several tiles: KP = 128
    (3, 7, 200, 20),
    uninterpreted(1, 5, 7, 7),  # k = M
    uninterpreted(3, 29, 101, 1),  # k = 1
    cpu_sized(37, 29, 101, 8),
    cpu_sized(130, 65, 1000, 32),
    cpu_sized(5, 16, 3000, 100),
    cpu_sized(1030, 8, 4500, 16),  # several row blocks and latent tiles on the CPU path (test_cpu_work_split)
]


@pytest.mark.parametrize("N,d,M,k", SHAPES)
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_matches_reference_float32(backend, N, d, M, k, with_b_dec):
    x, W, b, bd = make_encode_inputs(N, d, M, b_dec=with_b_dec, device=device_of(backend))
    values, indices = encode(x, W, b, k, bd)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(17, 17, 33, 5), (15, 15, 31, 31), (2, 3, 5, 5),
                                     cpu_sized(37, 29, 101, 8), cpu_sized(1030, 8, 1100, 16)])
def test_dtypes(backend, dtype, N, d, M, k):
    require(backend, "topk_encode", dtype=dtype)
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, device=device_of(backend))
    values, indices = encode(x, W, b, k, bd)
    assert_valid_topk(values, indices, x, W, b, k, bd, score_error=score_error(backend, dtype, bd))


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(20, 6, 100, 12), cpu_sized(40, 6, 300, 12)])
def test_exact_ties_go_to_lower_index(backend, dtype, N, d, M, k):
    # Small integers make every score exact in every dtype, so ties are real ties.
    dev = device_of(backend)
    x = torch.randint(-2, 3, (N, d)).to(dev, dtype)
    W = torch.randint(-1, 2, (M, d)).to(dev, dtype)
    b = torch.randint(-1, 2, (M,)).to(dev, dtype)
    values, indices = encode(x, W, b, k)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)


def test_all_scores_equal_and_negative_zero(backend):
    dev = device_of(backend)
    x = torch.zeros(4, 8, device=dev)
    W = torch.ones(50, 8, device=dev)
    b = torch.zeros(50, device=dev)
    b[::2] = -0.0  # -0.0 ties with +0.0
    values, indices = encode(x, W, b, 10)
    assert torch.equal(indices, torch.arange(10, device=dev).expand(4, 10))
    assert torch.equal(values, torch.zeros(4, 10, device=dev))


def test_fewer_positive_than_k(backend):
    x, W, b, bd = make_encode_inputs(17, 12, 90, device=device_of(backend))
    b = b - 100.0  # every pre-activation negative
    values, indices = encode(x, W, b, 9, bd)
    assert torch.equal(values, torch.zeros_like(values))
    assert_valid_topk(values, indices, x, W, b, 9, bd)


def test_non_contiguous_inputs(backend):
    N, d, M, k = 23, 17, 131, 5
    dev = device_of(backend)
    x = torch.randn(d, N, device=dev).T  # x as a transposed view
    W = torch.randn(M + 3, 2 * d, device=dev)[3:, ::2]  # offset and strided
    b = torch.randn(2 * M, device=dev)[::2]
    bd = torch.randn(d + 1, device=dev)[1:]
    assert not x.is_contiguous() and not W.is_contiguous() and not b.is_contiguous()
    values, indices = encode(x, W, b, k, bd)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


@pytest.mark.parametrize("view,with_b_dec", [("transposed", True), ("sliced", False)])
def test_views_give_the_contiguous_result(backend, view, with_b_dec):
    # Every tensor argument as a view (x, W_enc transposed or every other column of a wider
    # tensor holding NaN between; the biases always sliced): values, indices and every
    # gradient equal those of the contiguous tensors.
    N, d, M, k = 9, 7, 40, 5
    x, W, b, bd = make_encode_inputs(N, d, M, b_dec=with_b_dec, requires_grad=True, device=device_of(backend))
    weights = torch.randn(N, k, device=x.device)
    views = [as_view(x, view), as_view(W, view), as_view(b, "sliced"), None if bd is None else as_view(bd, "sliced")]

    def run(x, W, b, bd):
        values, indices = encode(x, W, b, k, bd)
        inputs = [t for t in (x, W, b, bd) if t is not None]
        return values, indices, torch.autograd.grad((values * weights).sum(), inputs)

    values, indices, grads = run(*views)
    ref_values, ref_indices, ref_grads = run(x, W, b, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)
    for g, r in zip(grads, ref_grads):
        close(g, r)


# In the interpreter: test_triton_non_finite_inputs_across_splits (the same, with the latents in 2 splits).
@pytest.mark.uninterpreted
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_non_finite_inputs(backend, bad, with_b_dec):
    x, W, b, bd = make_encode_inputs(20, 10, 64, b_dec=with_b_dec, device=device_of(backend))
    x[3] = bad  # a whole row
    x[7, 2] = bad  # one element
    if not (backend == "triton" and with_b_dec):
        # With b_dec, the Triton kernel folds W @ b_dec into the bias (triton/topk_encode.py), so a
        # non-finite weight gives NaN where the centred reference gives +-inf: only the index range
        # is promised then (test_triton_non_finite_weights_with_b_dec).
        W[5, 1] = bad
    values, indices = encode(x, W, b, 6, bd)
    assert int(indices.min()) >= 0 and int(indices.max()) < 64
    assert all(len(set(row.tolist())) == 6 for row in indices.cpu())
    ref_values, ref_indices = reference.topk_encode(x, W, b, 6, bd)
    finite_rows = [n for n in range(20) if n not in (3, 7)]
    assert torch.equal(indices[finite_rows], ref_indices[finite_rows])
    torch.testing.assert_close(values[finite_rows], ref_values[finite_rows], equal_nan=True,
                               **TOLERANCE[torch.float32])
    if bad != bad:  # a NaN row: every score NaN, so the lowest indices, as in the reference
        assert torch.equal(indices[3], ref_indices[3]) and torch.isnan(values[3]).all()


def test_nan_ranks_first_like_torch_topk(backend):
    dev = device_of(backend)
    x = torch.ones(1, 4, device=dev)
    W = torch.randn(70, 4, device=dev)
    b = torch.zeros(70, device=dev)
    b[[4, 17, 66]] = float("nan")
    values, indices = encode(x, W, b, 4)
    assert indices[0, :3].tolist() == [4, 17, 66]
    assert torch.isnan(values[0, :3]).all()


# ---- b_enc=None: no encoder bias ------------------------------------------------------------------


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_no_b_enc_is_a_zero_bias(backend, with_b_dec):
    N, d, M, k = 9, 7, 40, 5
    x, W, _, bd = make_encode_inputs(N, d, M, b_dec=with_b_dec, requires_grad=True, device=device_of(backend))
    zeros = torch.zeros(M, device=x.device)
    weights = torch.randn(N, k, device=x.device)
    inputs = [t for t in (x, W, bd) if t is not None]

    def run(b_enc):
        values, indices = encode(x, W, b_enc, k, bd)
        return values, indices, torch.autograd.grad((values * weights).sum(), inputs)

    values, indices, grads = run(None)
    ref_values, ref_indices, ref_grads = run(zeros)
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)
    for g, r in zip(grads, ref_grads):
        close(g, r)
    assert_valid_topk(values, indices, x.detach(), W.detach(), None, k, None if bd is None else bd.detach())


def test_no_b_enc_gradcheck(backend):
    require(backend, "topk_encode", dtype=torch.float64)
    x, W, _, bd = make_encode_inputs(6, 5, 13, torch.float64, requires_grad=True, device=device_of(backend))
    inputs = (x, W, bd)

    def f(x, W, bd):
        return ssae_kernels.topk_encode(x, W, None, 4, b_dec=bd)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_no_b_enc_opcheck(with_b_dec):
    x, W, _, bd = make_encode_inputs(9, 7, 31, torch.float32, b_dec=with_b_dec, requires_grad=True)
    torch.library.opcheck(torch.ops.ssae.topk_encode.default, (x, W, None, 4, bd))


# ---- autograd -------------------------------------------------------------------------------


def _loss_grads(encode_fn, x, W, b, bd, k, weights):
    values, indices = encode_fn(x, W, b, k, bd)
    loss = (values.float() * weights).sum()
    inputs = [t for t in (x, W, b, bd) if t is not None]
    return torch.autograd.grad(loss, inputs), values.detach(), indices


# In the interpreter: test_training_step_gradients (the encoder's gradients among them).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [uninterpreted(4, 3, 9, 9), cpu_sized(37, 29, 101, 8),
                                     cpu_sized(1030, 8, 1100, 16)])
def test_gradients_match_reference(backend, dtype, N, d, M, k):
    require(backend, "topk_encode", dtype=dtype)
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, requires_grad=True, device=device_of(backend))
    weights = torch.randn(N, k, device=x.device)

    def ours(x, W, b, k, bd):
        return ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)

    grads, values, indices = _loss_grads(ours, x, W, b, bd, k, weights)
    assert_valid_topk(values, indices, x.detach(), W.detach(), b.detach(), k, bd.detach(),
                      score_error=score_error(backend, dtype, bd))

    def reference_at_our_selection(x, W, b, k, bd):
        # Near-ties may come out in either order (e.g. bfloat16, d = 8: two scores 3e-8 apart),
        # so the reference gradient is taken at the selection made, which is checked above.
        return torch.relu(reference.pre_activations(x, W, b, bd).gather(1, indices)).to(x.dtype), indices

    ref_grads, _, _ = _loss_grads(reference_at_our_selection, x, W, b, bd, k, weights)
    scale = max(1.0, float(weights.abs().sum(0).max()))
    for name, g, r in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        close(g, r, dtype=dtype, scale=scale)


@pytest.mark.parametrize("needs", ["x", "W_enc", "b_enc", "b_dec", "W_enc,b_dec"])
def test_partial_requires_grad(backend, needs):
    require(backend, "topk_encode", dtype=torch.float64)
    x, W, b, bd = make_encode_inputs(21, 11, 70, torch.float64, device=device_of(backend))
    named = dict(x=x, W_enc=W, b_enc=b, b_dec=bd)
    for name in needs.split(","):
        named[name].requires_grad_(True)
    wanted = [named[name] for name in needs.split(",")]
    v, _ = ssae_kernels.topk_encode(x, W, b, 5, b_dec=bd)
    grads = torch.autograd.grad((v * v).sum(), wanted)
    rv, _ = reference.topk_encode(x, W, b, 5, bd)
    ref = torch.autograd.grad((rv * rv).sum(), wanted)
    for g, r in zip(grads, ref):
        close(g, r)


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_gradcheck(backend, with_b_dec):
    require(backend, "topk_encode", dtype=torch.float64)
    x, W, b, bd = make_encode_inputs(6, 5, 13, torch.float64, b_dec=with_b_dec, requires_grad=True,
                                     device=device_of(backend))
    inputs = tuple(t for t in (x, W, b, bd) if t is not None)

    def f(x, W, b, bd=None):
        return ssae_kernels.topk_encode(x, W, b, 4, b_dec=bd)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_opcheck(with_b_dec):
    x, W, b, bd = make_encode_inputs(9, 7, 31, torch.float32, b_dec=with_b_dec, requires_grad=True)
    torch.library.opcheck(torch.ops.ssae.topk_encode.default, (x, W, b, 4, bd))


# ---- encode_selected: the values and gradients of a code chosen beforehand --------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_encode_selected_has_topk_encodes_values_and_gradients(backend, dtype, with_b_dec):
    require(backend, "topk_encode", "sampled_dot", "sparse_transpose_matmul", dtype=dtype)
    dev = device_of(backend)
    x, W, b, bd = make_encode_inputs(11, 9, 37, dtype, b_dec=with_b_dec, requires_grad=True, device=dev)
    values, indices = ssae_kernels.topk_encode(x, W, b, 5, b_dec=bd)
    again = ssae_kernels.ops.encode_selected(x, W, b, indices, b_dec=bd)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(again, values, **tol)
    grad = torch.randn_like(values)
    inputs = [t for t in (x, W, b, bd) if t is not None]
    expected = torch.autograd.grad((values * grad).sum(), inputs)
    for got, want in zip(torch.autograd.grad((again * grad).sum(), inputs), expected):
        torch.testing.assert_close(got, want, **tol)


def test_encode_selected_gradcheck_and_opcheck():
    x, W, b, bd = make_encode_inputs(6, 5, 13, torch.float64, b_dec=True, requires_grad=True)
    indices = torch.randint(0, 13, (6, 3))  # any latents, repeats and all: the formula does not care
    assert torch.autograd.gradcheck(lambda *a: ssae_kernels.ops.encode_selected(*a[:3], indices, b_dec=a[3]),
                                    (x, W, b, bd))
    torch.library.opcheck(torch.ops.ssae.encode_selected.default,
                          (x.detach().float().requires_grad_(), W.detach().float(), b.detach().float(), indices,
                           bd.detach().float()))


def test_encode_selected_bad_input():
    x, W, b, _ = make_encode_inputs(4, 3, 10, torch.float32)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\)"):
        ssae_kernels.ops.encode_selected(x, W, b, torch.tensor([[0], [1], [10], [2]]))
    with pytest.raises(ValueError, match=r"indices.shape\[0\] \(rows\) must equal x.shape\[0\]"):
        ssae_kernels.ops.encode_selected(x, W, b, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="indices must be int64"):
        ssae_kernels.ops.encode_selected(x, W, b, torch.zeros(4, 2, dtype=torch.int32))


# ---- the training step: encode -> decode -> loss, forward and backward ----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(17, 17, 33, 5), (4, 3, 9, 9), (6, 20, 70, 1)])
def test_training_step_gradients(backend, kernel_calls, dtype, N, d, M, k):
    require(backend, *SAE_OPS, dtype=dtype)
    x, W, b, bd, Wd, weights = make_step_inputs(N, d, M, k, dtype, device=device_of(backend))
    grads, indices = step_grads(backend, x, W, b, bd, Wd, k, weights)
    ref_grads, ref_indices = step_grads(None, x, W, b, bd, Wd, k, weights)
    assert torch.equal(indices, ref_indices)  # no near-ties at this seed
    if backend in ("triton", "reference"):
        # every primitive ran on this backend (the encoder's and decoder's backward share one transpose)
        assert all(kernel_calls.get((backend, op), 0) >= 1 for op in SAE_OPS), kernel_calls
    # The autograd formulas (ops/) centre x in its own dtype before grad W_enc; the reference
    # differentiates through a float32 centring: a few 16-bit ulps of the largest entry apart.
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert g.dtype == r.dtype, name
        close(g, r, dtype=dtype, scale=max(1.0, float(r.abs().max())))
    # The same formulas on the CPU backend: only the summation order differs.
    if backend != "cpu" and not backends.availability(str(x.device), "topk_encode", dtype)["cpu"]:
        cpu_grads, cpu_indices = step_grads("cpu", x, W, b, bd, Wd, k, weights)
        assert torch.equal(indices, cpu_indices)
        for name, g, c in zip(GRAD_NAMES, grads, cpu_grads):
            close(g, c, dtype=dtype)


# ---- bad input ------------------------------------------------------------------------------


def _args(**override):
    x, W, b, bd = make_encode_inputs(5, 4, 10)
    args = dict(x=x, W_enc=W, b_enc=b, k=3, b_dec=bd)
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,match", [
    (dict(x=torch.randn(5)), ValueError, "x must be 2-D"),
    (dict(W_enc=torch.randn(10, 4, 1)), ValueError, "W_enc must be 2-D"),
    (dict(b_enc=torch.randn(10, 1)), ValueError, "b_enc must be 1-D"),
    (dict(W_enc=torch.randn(10, 5)), ValueError, r"W_enc.shape\[1\]"),
    (dict(b_enc=torch.randn(11)), ValueError, r"b_enc.shape\[0\]"),
    (dict(b_dec=torch.randn(5)), ValueError, r"b_dec.shape\[0\]"),
    (dict(k=0), ValueError, "k must be in"),
    (dict(k=11), ValueError, "k must be in"),
    (dict(x=torch.randn(0, 4)), ValueError, "x must have at least one row"),
    (dict(W_enc=torch.randn(10, 4, dtype=torch.float64)), TypeError, "W_enc has dtype"),
    (dict(x=torch.randint(0, 3, (5, 4))), TypeError, "x must be float32"),
    (dict(W_enc=torch.randn(10, 4, device="meta")), (ValueError, RuntimeError), "W_enc is on meta"),
])
def test_bad_input(backend, override, error, match):
    require(backend, "topk_encode", device="cpu")
    args = _args(**override)
    with pytest.raises(error, match=match):
        ssae_kernels.topk_encode(args["x"], args["W_enc"], args["b_enc"], args["k"], b_dec=args["b_dec"])


@pytest.mark.parametrize("k", [True, 2.0, 2.5])
def test_k_must_be_an_int(k):
    args = _args()
    with pytest.raises(TypeError, match=r"\bk\b"):
        ssae_kernels.topk_encode(args["x"], args["W_enc"], args["b_enc"], k)


def test_float64_is_not_served_by_triton():
    # The triton backend has no float64 kernel: asked for by name, it says so rather than serving the call.
    require("triton", "topk_encode")
    x, W, b, bd = make_encode_inputs(5, 4, 10, torch.float64, device=device_of("triton"))
    with ssae_kernels.use_backend("triton"), pytest.raises(Exception, match=r"triton.*does not support float64"):
        ssae_kernels.topk_encode(x, W, b, 3, b_dec=bd)


# ---- cpu backend only: the work split of the fused encode (csrc/torch/cpu_ops.cpp) ------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_small_encode_is_one_work_item(threads):
    # Below 2^20 dense multiply-adds the encode runs on the calling thread as one item (no
    # latent ranges to merge); just above, it splits again.
    require("cpu", "topk_encode")
    from ssae_kernels import _C

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert _C.topk_encode_plan_cpu(4, 256, 64, True)[2] == 1
        assert _C.topk_encode_plan_cpu(3, 6000, 64, True)[2] == 2 * threads
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,d,M,k,splits", [
    (1030, 8, 4500, 16, False),  # SHAPES' last entry: several row blocks and latent tiles
    (3, 64, 6000, 40, True),     # fewer row blocks than work items: latent ranges selected apart, then merged
])
def test_cpu_work_split_is_exercised(threads, N, d, M, k, splits):
    # The CPU encode works in row blocks x latent tiles, and splits the latents into ranges with
    # selectors of their own when there are too few rows; both paths must agree with the reference.
    require("cpu", "topk_encode")
    from ssae_kernels import _C

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        rows, cols, ranges = _C.topk_encode_plan_cpu(N, M, d, True)
        assert M > cols and M % cols != 0
        if splits:
            assert ranges > 1 and M > (ranges - 1) * cols
        else:
            assert N > rows and ranges == 1
        x, W, b, bd = make_encode_inputs(N, d, M)
        with ssae_kernels.use_backend("cpu"):
            values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    finally:
        torch.set_num_threads(old)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_wide_rows_in_large_row_blocks(threads, dtype):
    # Blocks of more than 64 rows wider than 2560 are scored by BLAS tiles, the rest by dot_tile
    # (csrc/torch/cpu_ops.cpp, score_tile); this shape takes the BLAS tiles.
    require("cpu", "topk_encode")
    from ssae_kernels import _C

    N, d, M, k = 300, 2600, 150, 5
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        rows, _, _ = _C.topk_encode_plan_cpu(N, M, d, dtype == torch.float32)
        assert rows > 64
        x, W, b, bd = make_encode_inputs(N, d, M, dtype)
        with ssae_kernels.use_backend("cpu"):
            values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    finally:
        torch.set_num_threads(old)
    assert_valid_topk(values, indices, x, W, b, k, bd)


def _avx512_bf16_or_skip():
    from ssae_kernels import _C

    if not _C.build_info().get("cpu_avx512_bf16"):
        pytest.skip("this CPU has no AVX512_BF16: the encode has no vdpbf16ps paths here")
    return _C


def _encode_without_and_with_bf16_dot(_C, x, W, b, k, bd):
    out = {}
    try:
        for screened in (False, True):
            _C.set_bf16_dot(screened)
            with ssae_kernels.use_backend("cpu"):
                out[screened] = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    finally:
        _C.set_bf16_dot(True)
    return out[False], out[True]


def _assert_bitwise_equal(screened, plain):
    assert torch.equal(screened[1], plain[1])
    # bit patterns, so that NaN == NaN and -0 != +0
    assert torch.equal(screened[0].view(torch.int32), plain[0].view(torch.int32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["normal", "ties", "non_finite", "views", "latent_ranges"])
def test_cpu_bf16_screen_is_exact(threads, case):
    # float32 encodes on a CPU with AVX512_BF16 screen the pre-activations in bfloat16 and
    # rescore exactly the latents within a proven bound of each row's k-th best
    # (csrc/kernels/cpu/topk_encode.cpp): the result must be the float32 encode's, bit for bit.
    require("cpu", "topk_encode")
    _C = _avx512_bf16_or_skip()
    # Several latent tiles per range (each range's first tile is scored exactly, the rest screened).
    N, d, M, k = (7, 301, 20000, 20) if case == "latent_ranges" else (150, 601, 4100, 9)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert _C.topk_encode_screens_cpu(N, M, d, k)
        if case == "latent_ranges":
            assert _C.topk_encode_plan_cpu(N, M, d, False)[2] > 1
        x, W, b, bd = make_encode_inputs(N, d, M)
        if case == "ties":  # duplicated latents and rows, biases on a coarse grid
            W[1::3] = W[0:-1:3][: W[1::3].shape[0]]
            x[1::2] = x[0:-1:2][: x[1::2].shape[0]]
            b = (b * 4).round() / 4
        if case == "non_finite":
            W[5, 3], W[700, 0], W[1200, 9] = float("nan"), float("inf"), 1e30
            b[17], b[18], b[19] = float("-inf"), float("inf"), float("nan")
            x[3, 2] = float("-inf")
        if case == "views":
            W = torch.cat([W, W], dim=1)[:, ::2]  # strided rows, other values in between
            x = x.t().contiguous().t()
        plain, screened = _encode_without_and_with_bf16_dot(_C, x, W, b, k, bd)
    finally:
        torch.set_num_threads(old)
    _assert_bitwise_equal(screened, plain)
    if case != "non_finite":
        assert_valid_topk(plain[0], plain[1], x, W, b, k, bd)


@pytest.mark.parametrize("N,d,M,k", [(5, 7, 40, 3), (33, 64, 300, 8), (70, 97, 1000, 16), (300, 128, 5000, 32)])
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_cpu_bfloat16_inputs_by_vdpbf16ps(N, d, M, k, with_b_dec):
    # bfloat16 encodes on a CPU with AVX512_BF16 multiply the stored values with vdpbf16ps (float32
    # sums, rows zero-padded to 32) and fold b_dec into the bias: the reference's top k, up to
    # float32 rounding, and the float32-GEMM path's result up to ties that rounding can flip.
    require("cpu", "topk_encode")
    _C = _avx512_bf16_or_skip()
    x, W, b, bd = make_encode_inputs(N, d, M, torch.bfloat16)
    bd = bd if with_b_dec else None
    converted, native = _encode_without_and_with_bf16_dot(_C, x, W, b, k, bd)
    assert_valid_topk(native[0], native[1], x, W, b, k, bd)
    assert (native[1] == converted[1]).double().mean() > 0.99
    torch.testing.assert_close(native[0].float(), converted[0].float(), rtol=2 ** -7, atol=1e-5)


def test_cpu_bf16_screen_only_where_it_pays():
    # Not for serial (small) calls, nor for k above 1/64 of the latents, nor for other dtypes.
    require("cpu", "topk_encode")
    _C = _avx512_bf16_or_skip()
    assert _C.topk_encode_screens_cpu(2048, 24576, 768, 32)
    assert not _C.topk_encode_screens_cpu(4, 256, 64, 2)
    assert not _C.topk_encode_screens_cpu(2048, 24576, 768, 24576 // 64 + 1)
    assert not _C.topk_encode_screens_cpu(150, 4100, 67, 9)  # one latent tile: scored exactly
    try:
        _C.set_bf16_dot(False)
        assert not _C.topk_encode_screens_cpu(2048, 24576, 768, 32)
    finally:
        _C.set_bf16_dot(True)


# ---- triton backend only: plans, latent splits, configs, rounds (the launcher, in the interpreter) ------


@pytest.fixture
def te():
    return triton_module("topk_encode")


@interpreter
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_triton_latent_splits(te, splits):
    # 5 tiles of 32 latents; every split count, including splits of unequal length
    x, W, b, bd = make_encode_inputs(20, 9, 150)
    values, indices = te.topk_encode(x, W, b, 12, bd, splits=splits)
    assert_valid_topk(values, indices, x, W, b, 12, bd)
    assert te.encode_plan(20, 150, 12, x.dtype, x.device, splits=splits).splits == splits


@interpreter
def test_triton_shipped_gpu_config_in_interpreter(te):
    # The shipped bfloat16 tile shape, with shapes one past its edges: 64 rows, 128 latents, 64 columns.
    cfg = te.ENCODE_CONFIGS[(90, 2)]
    x, W, b, bd = make_encode_inputs(65, 65, 257, torch.bfloat16)
    values, indices = te.topk_encode(x, W, b, 24, bd, config=cfg, splits=2)
    assert_valid_topk(values, indices, x, W, b, 24, bd)


@interpreter
@pytest.mark.parametrize("k", [5, 8, 9, 23])
def test_triton_rounds_when_k_exceeds_max_k_per_round(te, monkeypatch, k):
    # k > MAX_K_PER_ROUND runs the kernels in rounds below the previous round's last key
    monkeypatch.setattr(te, "MAX_K_PER_ROUND", 4)
    x, W, b, bd = make_encode_inputs(9, 10, 23 if k == 23 else 50)
    plan = te.encode_plan(9, W.shape[0], k, x.dtype, x.device)
    assert plan.k_round == 4 and plan.kp == 4 and plan.rounds == -(-k // 4)
    values, indices = te.topk_encode(x, W, b, k, bd, splits=2)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


@interpreter
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_triton_exact_ties_across_splits(te, dtype):
    # test_exact_ties_go_to_lower_index with the latents in 3 splits (the public op takes 1 here):
    # ties between latents of different splits go to the lower index too.
    N, d, M, k = 20, 6, 100, 12
    x = torch.randint(-2, 3, (N, d)).to(dtype)
    W = torch.randint(-1, 2, (M, d)).to(dtype)
    b = torch.randint(-1, 2, (M,)).to(dtype)
    values, indices = te.topk_encode(x, W, b, k, splits=3)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)


@interpreter
def test_triton_all_scores_equal_across_splits(te):
    x = torch.zeros(4, 8)
    W = torch.ones(50, 8)
    b = torch.zeros(50)
    b[::2] = -0.0  # -0.0 ties with +0.0
    values, indices = te.topk_encode(x, W, b, 10, splits=2)
    assert torch.equal(indices, torch.arange(10).expand(4, 10))
    assert torch.equal(values, torch.zeros(4, 10))


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_triton_non_finite_inputs_across_splits(te, bad, with_b_dec):
    # test_non_finite_inputs with the latents in 2 splits
    x, W, b, bd = make_encode_inputs(20, 10, 64, b_dec=with_b_dec)
    x[3] = bad
    x[7, 2] = bad
    if not with_b_dec:  # see test_non_finite_inputs
        W[5, 1] = bad
    values, indices = te.topk_encode(x, W, b, 6, bd, splits=2)
    assert int(indices.min()) >= 0 and int(indices.max()) < 64
    assert all(len(set(row.tolist())) == 6 for row in indices)
    ref_values, ref_indices = reference.topk_encode(x, W, b, 6, bd)
    finite_rows = [n for n in range(20) if n not in (3, 7)]
    assert torch.equal(indices[finite_rows], ref_indices[finite_rows])
    torch.testing.assert_close(values[finite_rows], ref_values[finite_rows], equal_nan=True,
                               **TOLERANCE[torch.float32])
    if bad != bad:
        assert torch.equal(indices[3], ref_indices[3]) and torch.isnan(values[3]).all()


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_triton_non_finite_weights_with_b_dec(te):
    x, W, b, bd = make_encode_inputs(20, 10, 64)
    W[5, 1], W[9, 0], bd[2] = float("inf"), float("nan"), float("-inf")
    values, indices = te.topk_encode(x, W, b, 6, bd, splits=2)
    assert int(indices.min()) >= 0 and int(indices.max()) < 64
    assert all(len(set(row.tolist())) == 6 for row in indices)


@interpreter
def test_triton_nan_ranks_first_across_splits(te):
    x = torch.ones(1, 4)
    W = torch.randn(70, 4)
    b = torch.zeros(70)
    b[[4, 17, 66]] = float("nan")
    values, indices = te.topk_encode(x, W, b, 4, splits=3)
    assert indices[0, :3].tolist() == [4, 17, 66]
    assert torch.isnan(values[0, :3]).all()


@interpreter
@pytest.mark.parametrize("order", ["increasing", "decreasing", "constant_rows"])
@pytest.mark.parametrize("k,splits", [(1, 1), (7, 2), (40, 3)])
def test_triton_selection_worst_orders(te, order, k, splits):
    # Scores rising with the latent index make every key beat its row's threshold, so buffers fill
    # and compact on every tile; falling scores make nearly every later key fail. Rows of equal
    # scores test the threshold's tie-break (lower latent wins) across compactions and splits.
    N, M = 19, 400
    x = torch.ones(N, 1)
    if order == "constant_rows":
        W = torch.zeros(M, 1)
        b = torch.zeros(M)
    else:
        ramp = torch.linspace(-1, 1, M)
        W = (ramp if order == "increasing" else -ramp)[:, None].clone()
        b = torch.zeros(M)
    x = x * torch.arange(1, N + 1, dtype=torch.float32)[:, None]
    values, indices = te.topk_encode(x, W, b, k, splits=splits)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


@interpreter
@pytest.mark.parametrize("scores", ["random", "equal"])
def test_triton_compaction_of_buffers_of_1024_keys(te, scores):
    # k = 700 makes 1024-key buffers (compacted 4 rows at a time under the interpreter config);
    # equal scores make every compaction rank the tied keys by latent.
    N, M, k = 5, 2500, 700
    if scores == "equal":
        x, W, b = torch.ones(N, 3), torch.zeros(M, 3), torch.zeros(M)
        bd = None
    else:
        x, W, b, bd = make_encode_inputs(N, 3, M, b_dec=True)
    plan = te.encode_plan(N, M, k, x.dtype, x.device, splits=1)
    assert plan.capacity == 1024 and plan.latents_per_split > plan.capacity
    values, indices = te.topk_encode(x, W, b, k, bd, splits=1)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


@interpreter
def test_triton_compaction_and_shared_threshold_paths(te):
    # Many tiles per split with small buffers: rows compact several times, and with 4 splits the
    # shared threshold published by one split prunes the others. Exact against the reference.
    x, W, b, bd = make_encode_inputs(37, 11, 2000, b_dec=True)
    plan = te.encode_plan(37, 2000, 9, x.dtype, x.device, splits=4)
    assert plan.latents_per_split // plan.config.block_m > plan.capacity // plan.config.block_m
    values, indices = te.topk_encode(x, W, b, 9, bd, splits=4)
    ref_values, ref_indices = reference.topk_encode(x, W, b, 9, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


@interpreter
@pytest.mark.parametrize("layout", ["transposed", "row_strided", "column_strided"])
def test_triton_weight_views_are_read_in_place(te, layout):
    # W_enc views (W_dec.T of a tied SAE, every other row, every other column) are read through
    # their strides: the launcher allocates nothing of W_enc's size.
    N, d, M, k = 9, 12, 300, 5
    x, _, b, bd = make_encode_inputs(N, d, M)
    if layout == "transposed":
        W = torch.randn(d, M).T
    elif layout == "row_strided":
        W = torch.randn(2 * M, d)[::2]
    else:
        W = torch.randn(M, 2 * d)[:, ::2]
    with _Allocations() as seen:
        values, indices = te.topk_encode(x, W, b, k, bd, splits=2)
    assert all(n < M * d for _, _, n in seen.sizes), seen.sizes
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


def test_triton_scratch_is_independent_of_M(te):
    # The GPU plan (132 multiprocessors, as an H100) for growing dictionaries: the candidate
    # buffer stops growing with M once splits reach their cap, and stays far below N x M.
    N, k = 4096, 32
    shapes = {}
    for M in (2**14, 2**18, 2**22, 2**26):
        cfg = te.encode_config(torch.bfloat16, torch.device("cuda"), arch=90)
        plan = te.encode_plan(N, M, k, torch.bfloat16, torch.device("cpu"), config=cfg, multiprocessors=132)
        scratch = plan.scratch_shape[0] * plan.scratch_shape[1] * plan.scratch_shape[2]
        assert plan.scratch_shape[0] == N and plan.kp == 32 and plan.splits <= te.MAX_SPLITS
        assert plan.capacity == te.buffer_capacity(k, cfg.block_m) and plan.capacity < 8 * cfg.block_m
        assert scratch <= N * te.MAX_SPLITS * plan.capacity
        assert scratch * 8 <= N * M * 2 // 16 or M == 2**14  # int64 scratch vs a bf16 N x M matrix
        shapes[M] = plan.scratch_shape
    assert shapes[2**22] == shapes[2**26]
    # few rows: splits grow to fill the GPU, but still capped
    plan = te.encode_plan(8, 2**26, 64, torch.bfloat16, torch.device("cpu"),
                          config=te.encode_config(torch.bfloat16, torch.device("cuda"), arch=90), multiprocessors=132)
    assert plan.splits == te.MAX_SPLITS and plan.scratch_shape == (8, te.MAX_SPLITS, plan.capacity)


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
def test_triton_allocations_are_small_for_large_M(te):
    # O(N * splits * k) scratch, never O(N * M)
    N, d, M, k = 8, 4, 4096, 4
    x, W, b, bd = make_encode_inputs(N, d, M)
    plan = te.encode_plan(N, M, k, x.dtype, x.device)
    with _Allocations() as seen:
        values, indices = te.topk_encode(x, W, b, k, bd)
    assert_valid_topk(values, indices, x, W, b, k, bd)
    scratch = N * plan.splits * plan.capacity
    assert scratch * 16 <= N * M
    allocated = [s for s in seen.sizes if s[2] > 0]
    assert any(shape == plan.scratch_shape for _, shape, _ in allocated), allocated
    # outputs (N x k), candidates (N x splits x CAPACITY), the folded bias (M): nothing like N x M
    assert all(n <= max(N * k, scratch, M) for _, _, n in allocated), allocated


# ---- GPU only: GPU-scale shapes on triton (compiled) and cuda -------------------------------------

GPU_ENCODE_SHAPES = [  # N, d, M, k
    (1, 1, 1, 1),
    (1, 64, 128, 1),
    (7, 33, 65, 65),          # k = M
    (257, 129, 1000, 32),
    (33, 64, 300, 300),       # k = M beyond one block of threads
    (100, 96, 5000, 200),
    (2049, 64, 9000, 32),     # cuda: two row blocks (the second of one row), three or four latent chunks
    (3, 16, 3000, 2100),      # cuda: k > 2048, the final sort runs in global memory; triton: rounds
    (64, 768, 24576, 32),     # the reference width and dictionary size
]


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,d,M,k", GPU_ENCODE_SHAPES)
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_gpu_topk_encode(gpu_backend, dtype, N, d, M, k, with_b_dec):
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, b_dec=with_b_dec, device="cuda")
    values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    assert_valid_topk(values, indices, x, W, b, k, bd, score_error=score_error(gpu_backend, dtype, bd))


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(300, 16, 5000, 40), (2100, 16, 9000, 40)])
def test_gpu_topk_encode_exact_ties(gpu_backend, dtype, N, d, M, k):
    # Small integers: every score is exact, so the result must equal the
    # reference bit for bit, ties going to the lower index across chunks and splits.
    x = torch.randint(-2, 3, (N, d)).to("cuda", dtype)
    W = torch.randint(-1, 2, (M, d)).to("cuda", dtype)
    b = torch.randint(-1, 2, (M,)).to("cuda", dtype)
    bd = torch.randint(-1, 2, (d,)).to("cuda", dtype)
    for b_dec in (None, bd):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=b_dec)
        ref_values, ref_indices = reference.topk_encode(x, W, b, k, b_dec)
        assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_training_step(gpu_backend, dtype):
    # Forward and backward of encode -> decode through autograd, against the reference.
    N, d, M, k = 512, 256, 8192, 32
    x, W, b, bd, Wd, weights = make_step_inputs(N, d, M, k, dtype, device="cuda")
    grads, indices = step_grads(gpu_backend, x, W, b, bd, Wd, k, weights)
    ref_grads, ref_indices = step_grads(None, x, W, b, bd, Wd, k, weights)
    assert_gpu_step_matches_reference(grads, indices, ref_grads, ref_indices, x, weights, dtype)


@requires_cuda
def test_gpu_float64_falls_back_to_reference(kernel_calls, monkeypatch):
    # No GPU backend serves float64: without an override, float64 CUDA tensors go to the reference.
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x, W, b, bd = make_encode_inputs(7, 5, 30, torch.float64, device="cuda")
    values, indices = ssae_kernels.topk_encode(x, W, b, 4, b_dec=bd)
    assert kernel_calls.get(("reference", "topk_encode"), 0) == 1
    ref_values, ref_indices = reference.topk_encode(x, W, b, 4, bd)
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


# ---- cuda backend only -------------------------------------------------------------------------


def _cuda_built():
    ext = backends.BACKENDS["cuda"].extension
    return ext is not None and bool(ext.build_info().get("cuda", False))


requires_cuda_backend = pytest.mark.skipif(
    not CUDA or not _cuda_built(),
    reason="needs a CUDA GPU (none on this machine)" if not CUDA
    else "ssae_kernels._C was built without the CUDA backend (reinstall with SSAE_BUILD_CUDA=1)")


@requires_cuda_backend
def test_gpu_cuda_encode_non_finite():
    N, d, M, k = 50, 32, 700, 9
    x, W, b, _ = make_encode_inputs(N, d, M, torch.float32, b_dec=False, device="cuda")
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


# The cuda encode's plans (csrc/kernels/cuda/launch.h, docs/cuda.md): few rows split each
# row's latents over several selection blocks ("splits"), merged at the end; more than one
# GEMM chunk double-buffers the scores, the GEMMs on a second stream. Plans on a 132-SM GPU
# (H100/H200) in the comments.
CUDA_SMALL_N_SHAPES = [  # N, d, M, k
    (1, 64, 100_000, 32),     # 79 splits, one chunk
    (3, 32, 200_000, 40),     # 157 splits, one chunk
    (4, 8, 3_000_000, 32),    # 256 splits x 3 chunks: splits and the overlap
    (2, 16, 200_000, 2100),   # 24 splits of >= 8192 latents; k > 2048: the merge sorts in global memory
    (100, 64, 300_000, 64),   # 21 splits x 6 chunks
]


@requires_cuda_backend
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,d,M,k", CUDA_SMALL_N_SHAPES)
def test_gpu_cuda_encode_small_n_splits(dtype, N, d, M, k):
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, device="cuda")
    with ssae_kernels.use_backend("cuda"):
        for b_dec in (None, bd):
            values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=b_dec)
            assert_valid_topk(values, indices, x, W, b, k, b_dec)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,M", [(3, 200_000), (5, 3_000_000), (2100, 9000)])
def test_gpu_cuda_encode_exact_ties_across_splits(dtype, N, M):
    # Small integers: every score is exact (the folded bias of 16-bit inputs too), so the
    # result must equal the reference bit for bit, ties to the lower index across splits,
    # chunks and row blocks.
    d, k = 16, 40
    x = torch.randint(-2, 3, (N, d)).to("cuda", dtype)
    W = torch.randint(-1, 2, (M, d)).to("cuda", dtype)
    b = torch.randint(-1, 2, (M,)).to("cuda", dtype)
    bd = torch.randint(-1, 2, (d,)).to("cuda", dtype)
    with ssae_kernels.use_backend("cuda"):
        for b_dec in (None, bd):
            values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=b_dec)
            ref_values, ref_indices = reference.topk_encode(x, W, b, k, b_dec)
            assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_encode_folds_b_dec_without_copying_W(dtype):
    # 16-bit x with b_dec: one GEMM on x as it is, with b_dec as an extra GEMM row whose output
    # W @ b_dec is folded into the bias. W_enc as a transposed view is read where it lies: the
    # call allocates far less than W. Small integers: every score is exact, so the result is the
    # reference's bit for bit whatever order cuBLAS sums in for either layout.
    N, d, M, k = 64, 512, 1 << 20, 32
    x = torch.randint(-1, 2, (N, d), device="cuda").to(dtype)
    W = torch.randint(-1, 2, (d, M), device="cuda").to(dtype).t()  # [M, d], strides (1, M)
    b = torch.randint(-3, 4, (M,), device="cuda").to(dtype)
    bd = torch.randint(-1, 2, (d,), device="cuda").to(dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with ssae_kernels.use_backend("cuda"):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < W.numel() * W.element_size() // 4, extra
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


@requires_cuda_backend
def test_gpu_cuda_bad_input():
    x, W, b, bd = make_encode_inputs(5, 4, 10, torch.float32, device="cuda")
    with ssae_kernels.use_backend("cuda"):
        with pytest.raises((TypeError, RuntimeError),
                           match="float64 runs on the reference backend|does not support float64"):
            ssae_kernels.topk_encode(x.double(), W.double(), b.double(), 3)
        with pytest.raises(ValueError, match="k must be"):
            ssae_kernels.topk_encode(x, W, b, 11)
        # it never serves CPU tensors
        with pytest.raises(RuntimeError, match="serves cuda tensors"):
            ssae_kernels.topk_encode(x.cpu(), W.cpu(), b.cpu(), 3)


@requires_cuda_backend
@pytest.mark.skipif(INTERPRETING, reason="compares with compiled Triton: test_gpu_triton_compiled_mode reruns it "
                                         "with TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
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


def test_cuda_backend_says_why_it_is_unavailable():
    reasons = backends.availability("cuda", "topk_encode")["cuda"]
    if _cuda_built():
        assert reasons == []
    else:
        assert any("built without CUDA" in r or "not available" in r for r in reasons), reasons
    # It never serves CPU tensors, whatever was built.
    assert any("serves cuda tensors" in r for r in backends.availability("cpu", "topk_encode")["cuda"])


def _setup_py(env_overrides):
    """Starts ``setup.py --name`` with the CUDA switches of ``env_overrides`` (and no others)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSAE_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env.update(env_overrides)
    return subprocess.Popen([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch answers of setup.py")
def test_setup_builds_cuda_only_when_asked():
    started = [_setup_py({"SSAE_BUILD_CUDA": "1"}), _setup_py({"TORCH_CUDA_ARCH_LIST": "8.0"}), _setup_py({})]
    (_, asked_err), (_, arch_err), (_, quiet_err) = (p.communicate() for p in started)
    asked, arch, quiet = (p.returncode for p in started)
    # Asked explicitly with a CPU torch: a clear failure, not a silent CPU-only build.
    assert asked != 0 and "torch" in asked_err and "CPU build" in asked_err, asked_err
    # Asked through the arch list: skipped, and said so.
    assert arch == 0 and "CUDA backend is skipped" in arch_err, arch_err
    # Not asked: nothing said about CUDA at all.
    assert quiet == 0 and "CUDA" not in quiet_err, quiet_err


# ---- GPU, compiled Triton: the driver ----------------------------------------------------------------


@requires_cuda
@pytest.mark.skipif(not INTERPRETING, reason="this is the driver; without the interpreter the tests run directly")
def test_gpu_triton_compiled_mode():
    # Under TRITON_INTERPRET=1 (tests/conftest.py) Triton runs CPU tensors in the interpreter; this
    # reruns every triton test of tests/ops compiled, on CUDA tensors (see conftest.device_of).
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", os.path.dirname(__file__),
                             "-p", "no:cacheprovider", "-k", "triton and not compiled_mode"],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
