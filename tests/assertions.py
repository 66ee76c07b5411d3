"""Comparisons against ssae_kernels.reference shared by the op tests."""

import torch

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


def assert_valid_topk(values, indices, x, W_enc, b_enc, k, b_dec=None):
    """The code is a correct top-k of the exact (float64) pre-activations.

    Summation order may differ between backends, so scores within a float32
    rounding error of each other may legitimately come out in either order; the
    check allows exactly that slack and nothing more.
    """
    N, M = x.shape[0], W_enc.shape[0]
    assert values.shape == (N, k) and indices.shape == (N, k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.is_contiguous() and indices.is_contiguous()
    assert int(indices.min()) >= 0 and int(indices.max()) < M
    assert all(len(set(row.tolist())) == k for row in indices), "a latent selected twice in one row"

    pre = reference.pre_activations(x.double(), W_enc.double(), b_enc.double(),
                                    None if b_dec is None else b_dec.double())
    # float32 scores of a length-d dot product: error <~ d * eps * sum |x_i w_i|
    xc = x.double() if b_dec is None else x.double() - b_dec.double()
    magnitude = xc.abs() @ W_enc.double().abs().T + b_enc.double().abs()
    eps = 1e-13 if x.dtype == torch.float64 else 2e-7
    slack = (x.shape[1] + 1) * eps * magnitude.max(dim=1, keepdim=True).values + 1e-30
    selected = pre.gather(1, indices)
    # descending (within slack)
    assert bool((selected[:, :-1] >= selected[:, 1:] - slack).all()), "indices not in descending order"
    # nothing left out beats the k-th selected
    rest = pre.scatter(1, indices, float("-inf"))
    assert bool((selected[:, -1:] >= rest.max(dim=1, keepdim=True).values - slack).all()), "a better latent was left out"
    close(values, torch.relu(selected).to(x.dtype), dtype=x.dtype,
          scale=float(magnitude.max()) if x.dtype in (torch.float32, torch.float64) else 1.0)
