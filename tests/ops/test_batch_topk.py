"""ssae_kernels.batch_topk_encode: the N * k largest ReLU'd pre-activations of the batch (BatchTopK), exact,
against the dense definition (ssae_kernels.reference.batch_topk_encode)."""

import pytest
import torch

import ssae_kernels
from assertions import close, make_encode_inputs
from ssae_kernels import reference


def _encode(x, W, b, k, max_k, bd=None, backend="cpu"):
    with ssae_kernels.use_backend(backend):
        return ssae_kernels.batch_topk_encode(x, W, b, k, max_k, b_dec=bd)


def _assert_same(got, want):
    values, indices, counts, threshold = got
    assert torch.equal(indices, want[1]) and torch.equal(counts, want[2])
    close(values, want[0], dtype=values.dtype)
    assert float(threshold) == pytest.approx(float(want[3]), rel=1e-12)


@pytest.mark.parametrize("N,d,M,k,max_k", [(1, 3, 5, 1, 1), (7, 13, 50, 3, 10), (64, 32, 2000, 8, 64),
                                           (5, 4, 20, 20, 20), (30, 16, 300, 2, 300), (200, 24, 3000, 16, 40)])
def test_matches_the_definition_float64(N, d, M, k, max_k):
    x, W, b, bd = make_encode_inputs(N, d, M, torch.float64)
    got = _encode(x, W, b, k, max_k, bd)
    _assert_same(got, reference.batch_topk_encode(x, W, b, k, max_k, bd))
    positive = int((reference.pre_activations(x, W, b, bd) > 0).sum())
    assert int(got[2].sum()) == min(N * k, positive)  # the whole budget, unless fewer entries are positive


def test_rows_share_the_budget_and_wide_rows_are_widened():
    # One row with a large norm takes far more than its 2k candidates; the others fewer than k.
    N, d, M, k, max_k = 16, 8, 400, 4, 8  # first candidates: max(max_k, 2k) = 8 per row
    x, W, b, bd = make_encode_inputs(N, d, M, torch.float64)
    x[3] *= 50
    got = _encode(x, W, b, k, max_k, bd)
    _assert_same(got, reference.batch_topk_encode(x, W, b, k, max_k, bd))
    assert int(got[2][3]) > 8 and int(got[2].sum()) == N * k


def test_counts_past_the_cap_show_the_overflow():
    x, W, b, bd = make_encode_inputs(8, 8, 300, torch.float64)
    x[0] *= 40
    values, indices, counts, _ = _encode(x, W, b, 6, 5, bd)
    want = reference.batch_topk_encode(x, W, b, 6, 5, bd)
    assert int(counts[0]) > 5 and torch.equal(counts, want[2]) and torch.equal(indices, want[1])


def test_few_positive_pre_activations():
    # Fewer positive entries than N * k: the threshold is 0 and every positive entry is kept, no zero.
    x, W, b, bd = make_encode_inputs(10, 6, 80, torch.float64)
    b = b - 3.0
    got = _encode(x, W, b, 8, 80, bd)
    want = reference.batch_topk_encode(x, W, b, 8, 80, bd)
    _assert_same(got, want)
    assert float(got[3]) == 0.0 and int(got[2].sum()) < 80
    filled = torch.arange(80) < got[2].unsqueeze(1)
    assert bool((got[0][filled] > 0).all())


def test_ties_in_row_major_order():
    # Small integers: exact scores, many ties at the threshold; they go to lower rows, then lower latents.
    g = torch.Generator().manual_seed(0)
    N, d, M = 12, 5, 60
    x = torch.randint(-2, 3, (N, d), generator=g).float()
    W = torch.randint(-1, 2, (M, d), generator=g).float()
    b = torch.randint(-1, 2, (M,), generator=g).float()
    for k in (1, 3, 7):
        _assert_same(_encode(x, W, b, k, M), reference.batch_topk_encode(x, W, b, k, M))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_matches_up_to_rounding(dtype):
    x, W, b, bd = make_encode_inputs(50, 32, 1000, dtype)
    values, indices, counts, threshold = _encode(x, W, b, 8, 64, bd)
    want = reference.batch_topk_encode(x, W, b, 8, 64, bd)
    assert int(counts.sum()) == 50 * 8
    agree = (indices == want[1]).double().mean()
    assert agree > 0.99  # entries within rounding of the threshold may swap
    pre = reference.pre_activations(x.double(), W.double(), b.double(), bd.double())
    filled = torch.arange(64) < counts.unsqueeze(1)
    close(values[filled], pre.gather(1, indices)[filled].relu().to(dtype), dtype=dtype, scale=10.0)


def test_gradients_match_the_reference():
    x, W, b, bd = make_encode_inputs(20, 6, 90, torch.float64, requires_grad=True)
    weights = torch.randn(20, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        for t in (x, W, b, bd):
            t.grad = None
        values = fn()[0]
        (values * weights).sum().backward()
        return [t.grad.clone() for t in (x, W, b, bd)]

    got = grads(lambda: _encode(x, W, b, 5, 12, bd))
    want = grads(lambda: reference.batch_topk_encode(x, W, b, 5, 12, bd))
    for g_, w_ in zip(got, want):
        close(g_, w_, dtype=torch.float64)


def test_gradcheck():
    x, W, b, bd = make_encode_inputs(4, 3, 15, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _encode(*t[:3], 3, 8, t[3])[0], (x, W, b, bd))


@pytest.mark.parametrize("override,error,match", [
    (dict(k=0), ValueError, r"k must be in \[1, M\]"),
    (dict(k=11), ValueError, r"k must be in \[1, M\]"),
    (dict(max_k=0), ValueError, r"max_k must be in \[1, M\]"),
    (dict(k=2.0), TypeError, "k"),
    (dict(max_k=True), TypeError, "max_k"),
])
def test_bad_input(override, error, match):
    x, W, b, bd = make_encode_inputs(4, 3, 10)
    args = dict(k=2, max_k=4)
    args.update(override)
    with pytest.raises(error, match=match):
        ssae_kernels.batch_topk_encode(x, W, b, args["k"], args["max_k"], b_dec=bd)


def test_matches_saelens_batchtopk():
    # SAELens's BatchTopK activation (its training forward) on the dense pre-activations: the same code.
    batchtopk = pytest.importorskip("sae_lens.saes.batchtopk_sae")
    N, d, M, k = 64, 32, 500, 6
    x, W, b, bd = make_encode_inputs(N, d, M, torch.float64)
    values, indices, counts, _ = ssae_kernels.batch_topk_encode(x, W, b, k, M, b_dec=bd)
    theirs = batchtopk.BatchTopK(k)(reference.pre_activations(x, W, b, bd))
    ours = torch.zeros(N, M, dtype=torch.float64).scatter_add(1, indices, values)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(counts, (theirs > 0).sum(1))
