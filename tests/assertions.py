"""Comparisons against ssae_kernels.reference shared by the op tests."""

import torch

import ssae_kernels
from ssae_kernels import reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Output tolerances per dtype, a few ulps of the storage type: both sides
# accumulate in float32 (float64), so the storage rounding dominates.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def close(actual, expected, dtype=None, scale=1.0):
    tol = TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               check_dtype=True)


def assert_valid_topk(values, indices, x, W_enc, b_enc, k, b_dec=None, score_error=0.0):
    """The code is a correct top-k of the exact (float64) pre-activations.

    Summation order may differ between backends, so scores within a float32
    rounding error of each other may legitimately come out in either order; the
    check allows exactly that slack and nothing more. ``score_error``: a backend's
    documented extra score error, relative to max_m sum |x_c w_m| of the row
    (e.g. the CUDA encode's hi + lo split of 16-bit x - b_dec, see tests/ops/test_topk_encode.py).
    ``b_enc`` and ``b_dec`` may be None.
    """
    N, M = x.shape[0], W_enc.shape[0]
    assert values.shape == (N, k) and indices.shape == (N, k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.is_contiguous() and indices.is_contiguous()
    assert int(indices.min()) >= 0 and int(indices.max()) < M
    assert all(len(set(row.tolist())) == k for row in indices.cpu()), "a latent selected twice in one row"

    def f64(t):
        return None if t is None else t.double()

    pre = reference.pre_activations(x.double(), W_enc.double(), f64(b_enc), f64(b_dec))
    # float32 scores of a length-d dot product: error <~ d * eps * sum |x_i w_i|
    xc = x.double() if b_dec is None else x.double() - b_dec.double()
    magnitude = xc.abs() @ W_enc.double().abs().T
    if b_enc is not None:
        magnitude = magnitude + b_enc.double().abs()
    eps = 1e-13 if x.dtype == torch.float64 else 2e-7
    slack = ((x.shape[1] + 1) * eps + score_error) * magnitude.max(dim=1, keepdim=True).values + 1e-30
    selected = pre.gather(1, indices)
    # descending (within slack)
    assert bool((selected[:, :-1] >= selected[:, 1:] - slack).all()), "indices not in descending order"
    # nothing left out beats the k-th selected
    rest = pre.scatter(1, indices, float("-inf"))
    assert bool((selected[:, -1:] >= rest.max(dim=1, keepdim=True).values - slack).all()), "a better latent was left out"
    close(values, torch.relu(selected).to(x.dtype), dtype=x.dtype,
          scale=float(magnitude.max()) if x.dtype in (torch.float32, torch.float64) else 1.0)


# ---- backend-vs-reference scaffolding shared by the op tests (tests/ops) ----

GRAD_NAMES = ("x", "W_enc", "b_enc", "b_dec", "W_dec")


def make_encode_inputs(N, d, M, dtype=torch.float32, b_dec=True, requires_grad=False, device="cpu"):
    """x [N, d], W_enc [M, d] (entries ~ 1/sqrt(d)), b_enc [M], b_dec [d] or None; drawn in float64 on
    the CPU and then cast and moved, so every dtype and device sees the same numbers."""
    x = torch.randn(N, d, dtype=torch.float64)
    W = torch.randn(M, d, dtype=torch.float64) / d**0.5
    b = torch.randn(M, dtype=torch.float64) * 0.1
    bd = torch.randn(d, dtype=torch.float64) * 0.1 if b_dec else None
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) if t is not None else None
            for t in (x, W, b, bd)]


def make_step_inputs(N, d, M, k, dtype, device="cpu"):
    """make_encode_inputs (with grad) plus W_dec [M, d] and per-code loss weights [N, k] (float32)."""
    x, W, b, bd = make_encode_inputs(N, d, M, dtype, requires_grad=True, device=device)
    Wd = (torch.randn(M, d, device=device) / d**0.5).to(dtype).requires_grad_(True)
    weights = torch.randn(N, k, device=device)
    return x, W, b, bd, Wd, weights


def step_grads(backend, x, W, b, bd, Wd, k, weights):
    """(grads, indices) of encode -> decode -> loss, through the public ops on ``backend`` (the
    backward too), or through ssae_kernels.reference when ``backend`` is None. The loss adds a
    weighted sum of the codes, so grad values does not come through the decode alone."""
    def run(encode, decode):
        values, indices = encode(x, W, b, k, bd)
        x_hat = decode(values, indices, Wd, bd)
        loss = ((x_hat.float() - x.detach().float()) ** 2).sum() + (values.float() * weights).sum()
        return torch.autograd.grad(loss, [t for t in (x, W, b, bd, Wd) if t is not None]), indices

    if backend is None:
        return run(reference.topk_encode, reference.sparse_decode)
    with ssae_kernels.use_backend(backend):
        return run(lambda x, W, b, k, bd: ssae_kernels.topk_encode(x, W, b, k, b_dec=bd), ssae_kernels.sparse_decode)


def assert_gpu_step_matches_reference(grads, indices, ref_grads, ref_indices, x, weights, dtype):
    """A large step on a GPU backend against the reference. Rows with a near-tie may select other
    latents (at most 5%); grad x is compared on the other rows, the gradients that mix all rows
    only when no row differs; atol scaled by the largest gradient magnitude the loss can give."""
    same = (indices == ref_indices).all(dim=1)
    assert same.float().mean() > 0.95
    N = x.shape[0]
    scale = max(1.0, float(weights.abs().sum(0).max()), float(x.detach().float().abs().max()) * N)
    tol = TOLERANCE[dtype]
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        if name == "x":
            g, r = g[same], r[same]
        if bool(same.all()) or name == "x":
            torch.testing.assert_close(g, r, rtol=tol["rtol"], atol=tol["atol"] * scale)


def assert_op_matches_reference(backend, op, *args, scale=1.0):
    """``op`` (the public function if there is one, else torch.ops.ssae.<op>) on ``backend`` is close
    to reference.<op>; returns its output."""
    fn = getattr(ssae_kernels, op, None) or getattr(torch.ops.ssae, op)
    with ssae_kernels.use_backend(backend):
        out = fn(*args)
    close(out, getattr(reference, op)(*args), scale=scale)
    return out


def assert_transpose_and_matmul_match(backend, indices, weights, rows, M, scale):
    """latent_transpose on ``backend`` equals the reference (stable order within a latent);
    sparse_transpose_matmul on its output is deterministic (a second call is bitwise equal) and
    close to the reference with atol scaled by ``scale``."""
    ops = torch.ops.ssae
    with ssae_kernels.use_backend(backend):
        offsets, order = ops.latent_transpose(indices, M)
        out, colsum = ops.sparse_transpose_matmul(weights, rows, offsets, order)
        again = ops.sparse_transpose_matmul(weights, rows, offsets, order)
    ref_offsets, ref_order = reference.latent_transpose(indices, M)
    assert torch.equal(offsets, ref_offsets) and torch.equal(order, ref_order)
    assert torch.equal(out, again[0]) and torch.equal(colsum, again[1])
    ref_out, ref_colsum = reference.sparse_transpose_matmul(weights, rows, offsets, order)
    close(out, ref_out, scale=scale)
    close(colsum, ref_colsum, scale=scale)
