import pytest
import torch

import ssae_kernels
from ssae_kernels import reference
from assertions import DTYPES, TOLERANCE, assert_valid_topk, close

BACKENDS = ("cpu",)


def make_inputs(N, d, M, dtype=torch.float32, b_dec=True, requires_grad=False, scale=1.0):
    x = torch.randn(N, d, dtype=torch.float64) * scale
    W = torch.randn(M, d, dtype=torch.float64) / d**0.5
    b = torch.randn(M, dtype=torch.float64) * 0.1
    bd = torch.randn(d, dtype=torch.float64) * 0.1 if b_dec else None
    out = [t.to(dtype).requires_grad_(requires_grad) if t is not None else None for t in (x, W, b, bd)]
    return out


SHAPES = [  # N, d, M, k
    (1, 1, 1, 1),
    (1, 5, 7, 7),  # k = M
    (3, 29, 101, 1),  # k = 1
    (37, 29, 101, 8),
    (130, 65, 1000, 32),
    (5, 16, 3000, 100),
    (1030, 8, 4500, 16),  # several row blocks and latent tiles on the CPU path (test_work_split_is_exercised)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,d,M,k", SHAPES)
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_matches_reference_float32(backend, N, d, M, k, with_b_dec):
    x, W, b, bd = make_inputs(N, d, M, b_dec=with_b_dec)
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,d,M,k,splits", [
    (1030, 8, 4500, 16, False),  # SHAPES' last entry: several row blocks and latent tiles
    (3, 8, 1000, 40, True),      # fewer row blocks than work items: latent ranges selected apart, then merged
])
def test_work_split_is_exercised(threads, N, d, M, k, splits):
    # The CPU encode works in row blocks x latent tiles, and splits the latents into ranges with
    # selectors of their own when there are too few rows; both paths must agree with the reference.
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
        x, W, b, bd = make_inputs(N, d, M)
        with ssae_kernels.use_backend("cpu"):
            values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    finally:
        torch.set_num_threads(old)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_rows_in_large_row_blocks(threads, dtype):
    # Blocks of more than 64 rows wider than 2560 are scored by BLAS tiles, the rest by dot_tile
    # (csrc/torch/cpu_ops.cpp, score_tile); this shape takes the BLAS tiles.
    from ssae_kernels import _C

    N, d, M, k = 300, 2600, 150, 5
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        rows, _, _ = _C.topk_encode_plan_cpu(N, M, d, dtype == torch.float32)
        assert rows > 64
        x, W, b, bd = make_inputs(N, d, M, dtype)
        with ssae_kernels.use_backend("cpu"):
            values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    finally:
        torch.set_num_threads(old)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(37, 29, 101, 8), (1030, 8, 1100, 16), (2, 3, 5, 5)])
def test_dtypes(backend, dtype, N, d, M, k):
    x, W, b, bd = make_inputs(N, d, M, dtype)
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    assert_valid_topk(values, indices, x, W, b, k, bd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_ties_go_to_lower_index(backend, dtype):
    # Small integers make every score exact, so ties are real ties.
    N, d, M, k = 40, 6, 300, 12
    x = torch.randint(-2, 3, (N, d)).to(dtype)
    W = torch.randint(-1, 2, (M, d)).to(dtype)
    b = torch.randint(-1, 2, (M,)).to(dtype)
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, k)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_scores_equal(backend):
    x = torch.zeros(4, 8)
    W = torch.ones(50, 8)
    b = torch.zeros(50)
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, 10)
    assert torch.equal(indices, torch.arange(10).expand(4, 10))
    assert torch.equal(values, torch.zeros(4, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_positive_than_k(backend):
    x, W, b, bd = make_inputs(17, 12, 90)
    b = b - 100.0  # every pre-activation negative
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, 9, b_dec=bd)
    assert torch.equal(values, torch.zeros_like(values))
    assert_valid_topk(values, indices, x, W, b, 9, bd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    N, d, M, k = 23, 17, 131, 5
    x_t = torch.randn(d, N)  # x as a transposed view
    W_big = torch.randn(M + 3, 2 * d)
    W = W_big[3:, ::2]  # offset and strided
    b = torch.randn(2 * M)[::2]
    bd = torch.randn(d + 1)[1:]
    x = x_t.T
    assert not x.is_contiguous() and not W.is_contiguous() and not b.is_contiguous()
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, k, b_dec=bd)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k, bd)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_give_valid_indices(backend, bad):
    x, W, b, bd = make_inputs(20, 10, 64)
    x[3] = bad  # a whole row
    x[7, 2] = bad  # one element
    W[5, 1] = bad
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, 6, b_dec=bd)
    assert int(indices.min()) >= 0 and int(indices.max()) < 64
    assert all(len(set(row.tolist())) == 6 for row in indices)
    finite_rows = [n for n in range(20) if n not in (3, 7)]
    ref_values, ref_indices = reference.topk_encode(x, W, b, 6, bd)
    assert torch.equal(indices[finite_rows], ref_indices[finite_rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_ranks_first_like_torch_topk(backend):
    x = torch.ones(1, 4)
    W = torch.randn(30, 4)
    b = torch.zeros(30)
    b[[4, 17]] = float("nan")
    with ssae_kernels.use_backend(backend):
        values, indices = ssae_kernels.topk_encode(x, W, b, 3)
    assert indices[0, :2].tolist() == [4, 17]
    assert torch.isnan(values[0, :2]).all()


# ---- autograd -------------------------------------------------------------------------


def _loss_grads(encode, x, W, b, bd, k, weights):
    values, indices = encode(x, W, b, k, bd)
    loss = (values.float() * weights).sum()
    inputs = [t for t in (x, W, b, bd) if t is not None]
    return torch.autograd.grad(loss, inputs), values.detach(), indices


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [(37, 29, 101, 8), (4, 3, 9, 9), (1030, 8, 1100, 16)])
def test_gradients_match_reference(backend, dtype, N, d, M, k):
    x, W, b, bd = make_inputs(N, d, M, dtype, requires_grad=True)
    weights = torch.randn(N, k)

    def ours(*args):
        with ssae_kernels.use_backend(backend):
            return ssae_kernels.topk_encode(*args[:4], b_dec=args[4])

    grads, values, indices = _loss_grads(ours, x, W, b, bd, k, weights)
    assert_valid_topk(values, indices, x.detach(), W.detach(), b.detach(), k, bd.detach())

    def reference_at_our_selection(x, W, b, k, bd):
        # Near-ties may come out in either order (e.g. bfloat16, d = 8: two scores 3e-8 apart),
        # so the reference gradient is taken at the selection made, which is checked above.
        return torch.relu(reference.pre_activations(x, W, b, bd).gather(1, indices)).to(x.dtype), indices

    ref_grads, _, _ = _loss_grads(reference_at_our_selection, x, W, b, bd, k, weights)
    scale = max(1.0, float(weights.abs().sum(0).max()))
    for name, g, r in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        close(g, r, dtype=dtype, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["x", "W_enc", "b_enc", "b_dec", "W_enc,b_dec"])
def test_partial_requires_grad(backend, needs):
    x, W, b, bd = make_inputs(21, 11, 70, torch.float64)
    named = dict(x=x, W_enc=W, b_enc=b, b_dec=bd)
    for name in needs.split(","):
        named[name].requires_grad_(True)
    wanted = [named[name] for name in needs.split(",")]
    with ssae_kernels.use_backend(backend):
        v, _ = ssae_kernels.topk_encode(x, W, b, 5, b_dec=bd)
    grads = torch.autograd.grad((v * v).sum(), wanted)
    rv, _ = reference.topk_encode(x, W, b, 5, bd)
    ref = torch.autograd.grad((rv * rv).sum(), wanted)
    for g, r in zip(grads, ref):
        close(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_gradcheck(backend, with_b_dec):
    x, W, b, bd = make_inputs(6, 5, 13, torch.float64, b_dec=with_b_dec, requires_grad=True)
    inputs = tuple(t for t in (x, W, b, bd) if t is not None)

    def f(x, W, b, bd=None):
        with ssae_kernels.use_backend(backend):
            return ssae_kernels.topk_encode(x, W, b, 4, b_dec=bd)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_opcheck(with_b_dec):
    x, W, b, bd = make_inputs(9, 7, 31, torch.float32, b_dec=with_b_dec, requires_grad=True)
    torch.library.opcheck(torch.ops.ssae.topk_encode.default, (x, W, b, 4, bd))


# ---- bad input ----------------------------------------------------------------------


def _args(**override):
    x, W, b, bd = make_inputs(5, 4, 10)
    args = dict(x=x, W_enc=W, b_enc=b, k=3, b_dec=bd)
    args.update(override)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
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
    args = _args(**override)
    with ssae_kernels.use_backend(backend), pytest.raises(error, match=match):
        ssae_kernels.topk_encode(args["x"], args["W_enc"], args["b_enc"], args["k"], b_dec=args["b_dec"])


def test_k_must_be_int():
    args = _args()
    with pytest.raises((TypeError, RuntimeError)):
        ssae_kernels.topk_encode(args["x"], args["W_enc"], args["b_enc"], 2.5)
