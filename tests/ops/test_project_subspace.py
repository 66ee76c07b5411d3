"""project_subspace / project_subspace_ (ssae_kernels/ops/project_subspace.py) on every backend:
against the reference, views, autograd, opcheck, bad input; then backend-specific tests, marked.

The Triton backend runs in the interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); its tiles are 16 x 16 there, so the shapes below cross every mask, and
``fused_max_r`` moves the two-pass threshold so that the two-pass kernels run on small shapes too.
"""

import pytest
import torch

import ssae_kernels
from conftest import requires_cuda
from ssae_kernels import backends, reference
from ssae_kernels.ops.project_subspace import orthonormality_error

from .conftest import as_view, device_of, interpreter, require, triton_module

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# unit roundoff of the accumulation and of the storage type
ACC_EPS = {torch.float64: 2.0**-53}
STORE_EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def basis(d, r, dtype=torch.float64, device="cpu"):
    return torch.linalg.qr(torch.randn(d, r, dtype=torch.float64)).Q.to(device, dtype)


def assert_matches(out, G, U, complement):
    """|out - exact| within the worst-case rounding of two chained float32 sums (d, then r terms),
    plus the rounding of the result to its dtype (ours and the reference's, which may round the
    other way at a tie of the storage type). A dropped or repeated term fails it."""
    ref = reference.project_subspace(G, U, complement)
    assert out.dtype == G.dtype and out.shape == G.shape
    g, u = G.double(), U.double()
    exact = u @ (u.T @ g)
    magnitude = u.abs() @ (u.abs().T @ g.abs())
    if complement:
        exact, magnitude = g - exact, magnitude + g.abs()
    d, r = U.shape
    tol = (d + r + 2) * ACC_EPS.get(G.dtype, 2.0**-24) * magnitude + STORE_EPS[G.dtype] * exact.abs() + 1e-30
    if G.dtype == torch.float16:
        tol = tol + 2.0**-24  # subnormal spacing
    assert bool(((out.double() - exact).abs() <= tol).all()), f"max error {(out.double() - exact).abs().max():.3g}"
    # and within two storage roundings of the reference itself
    assert bool(((out.double() - ref.double()).abs() <= 2 * tol).all())


SHAPES = [  # d, r, n
    (1, 1, 1),
    (16, 16, 16),  # r = d: the identity; one tile exactly
    (17, 5, 33),  # one past the tiles
    (40, 1, 70),  # r = 1
    (130, 33, 9),  # several row steps, r past a register tile
    (64, 20, 300),  # several column blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,r,n", SHAPES)
@pytest.mark.parametrize("complement", [False, True])
def test_matches_reference(backend, dtype, d, r, n, complement):
    require(backend, "project_subspace", "project_subspace_", dtype=dtype)
    dev = device_of(backend)
    U, G = basis(d, r, dtype, dev), torch.randn(d, n, dtype=torch.float64).to(dev, dtype)
    out = ssae_kernels.project_subspace(G, U, complement)
    inplace = G.clone()
    returned = ssae_kernels.project_subspace_(inplace, U, complement)
    assert returned is inplace
    assert_matches(out, G, U, complement)
    assert torch.equal(inplace, out), "the in-place form must give the same result"


def _views(d, n, dtype, device):
    """Non-contiguous [d, n] views: transposed, column slice, padded rows, row step."""
    return {
        "transposed": torch.randn(n, d, dtype=dtype, device=device).T,
        "column slice": torch.randn(d, n + 7, dtype=dtype, device=device)[:, 3:3 + n],
        "every other column": torch.randn(d, 2 * n, dtype=dtype, device=device)[:, ::2],
        "every other row": torch.randn(2 * d, n, dtype=dtype, device=device)[::2],
    }


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("view", ["transposed", "column slice", "every other column", "every other row"])
def test_non_contiguous(backend, dtype, view):
    d, n, r = 21, 19, 6
    dev = device_of(backend)
    G = _views(d, n, dtype, dev)[view]
    U_wide = basis(d, 2 * r, dtype, dev)
    U = U_wide[:, ::2]  # non-contiguous U as well (still orthonormal columns)
    assert not G.is_contiguous() and not U.is_contiguous()
    out = ssae_kernels.project_subspace(G, U, True)
    assert_matches(out, G, U, True)
    # in place through G's own strides, leaving the rest of its storage alone
    base = G._base if G._base is not None else G
    before = base.clone()
    original = G.clone()
    ssae_kernels.project_subspace_(G, U, True)
    assert torch.equal(G, out)
    untouched = torch.ones_like(base, dtype=torch.bool)
    mark = torch.zeros_like(base)
    mark.as_strided(G.shape, G.stride(), G.storage_offset() - base.storage_offset()).fill_(1)
    untouched &= mark == 0
    assert torch.equal(base[untouched], before[untouched])
    assert not torch.equal(G, original)


@pytest.mark.parametrize("view", ["transposed", "sliced"])
@pytest.mark.parametrize("complement", [False, True])
def test_views_give_the_contiguous_result(backend, view, complement):
    # G and U as views (a transpose, or every other column of a wider tensor holding NaN between):
    # the result and both gradients equal those of the contiguous tensors.
    dev = device_of(backend)
    d, r, n = 23, 6, 17
    U = basis(d, r, torch.float32, dev).requires_grad_(True)
    G = torch.randn(d, n, device=dev, requires_grad=True)
    grad_out = torch.randn(d, n, device=dev)
    views = (as_view(G, view), as_view(U, view))
    out = ssae_kernels.project_subspace(*views, complement)
    ref = ssae_kernels.project_subspace(G, U, complement)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, e in zip(torch.autograd.grad(out, views, grad_out), torch.autograd.grad(ref, (G, U), grad_out)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_projection_identities(backend):
    d, r, n = 48, 7, 40
    dev = device_of(backend)
    U, G = basis(d, r, torch.float32, dev), torch.randn(d, n, device=dev)
    P = ssae_kernels.project_subspace(G, U)
    C = ssae_kernels.project_subspace(G, U, complement=True)
    PP = ssae_kernels.project_subspace(P, U)
    CP = ssae_kernels.project_subspace(C, U)
    torch.testing.assert_close(P + C, G, rtol=0, atol=1e-5)  # P + C = G
    torch.testing.assert_close(PP, P, rtol=0, atol=1e-5)  # idempotent
    assert float((U.T @ C).abs().max()) < 1e-5  # complement orthogonal to span(U)
    assert float(CP.abs().max()) < 1e-5
    assert float(P.norm()) > 0.1 * float(G.norm())  # not trivially zero


def test_zero_columns(backend):
    dev = device_of(backend)
    U = basis(6, 2, torch.float32, dev)
    assert ssae_kernels.project_subspace(torch.randn(6, 0, device=dev), U).shape == (6, 0)


# ---- autograd -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("complement", [False, True])
def test_gradients_match_reference(backend, dtype, complement):
    d, r, n = 23, 6, 17
    dev = device_of(backend)
    U = basis(d, r, dtype, dev).requires_grad_(True)
    G = torch.randn(d, n, dtype=torch.float64).to(dev, dtype).requires_grad_(True)
    grad_out = torch.randn(d, n, dtype=torch.float64).to(dev, dtype)
    out = ssae_kernels.project_subspace(G, U, complement)
    grads = torch.autograd.grad(out, (G, U), grad_out)
    ref = torch.autograd.grad(reference.project_subspace(G, U, complement), (G, U), grad_out)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, e in zip(grads, ref):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), **tol)


@pytest.mark.parametrize("complement", [False, True])
def test_gradcheck(backend, complement):
    # Any U (not only orthonormal ones): the op computes U (U^T G) as written.
    require(backend, "project_subspace", dtype=torch.float64)
    dev = device_of(backend)
    U = torch.randn(9, 3, dtype=torch.float64, device=dev, requires_grad=True)
    G = torch.randn(9, 5, dtype=torch.float64, device=dev, requires_grad=True)

    def f(G, U):
        return ssae_kernels.project_subspace(G, U, complement)

    assert torch.autograd.gradcheck(f, (G, U))


def test_gradient_of_G_is_projected(backend):
    # The gradient a loss sends to G through the projection lies in span(U) itself.
    dev = device_of(backend)
    U, G = basis(30, 4, torch.float32, dev), torch.randn(30, 8, device=dev, requires_grad=True)
    loss = (ssae_kernels.project_subspace(G, U) * torch.randn(30, 8, device=dev)).sum()
    (grad,) = torch.autograd.grad(loss, G)
    assert float((grad - U @ (U.T @ grad)).abs().max()) < 1e-5
    assert float(grad.abs().max()) > 1e-3


@pytest.mark.parametrize("complement", [False, True])
def test_opcheck(complement):
    U, G = basis(13, 4, torch.float32), torch.randn(13, 11)
    torch.library.opcheck(torch.ops.ssae.project_subspace.default, (G.requires_grad_(True), U, complement))
    torch.library.opcheck(torch.ops.ssae.project_subspace_.default, (torch.randn(13, 11), U, complement))


def test_compiled_optimizer_hook_matches_eager():
    # The in-place form inside a compiled function (as in an optimizer step).
    torch._dynamo.reset()
    U, G = basis(24, 5, torch.float32), torch.randn(24, 10)

    def step(grad, U):
        ssae_kernels.project_subspace_(grad, U)
        return grad * 2

    eager = step(G.clone(), U)
    compiled = torch.compile(step, fullgraph=True)(G.clone(), U)
    torch.testing.assert_close(compiled, eager)


def test_orthonormality_check():
    U = basis(20, 5, torch.float32)
    G = torch.randn(20, 3)
    torch.testing.assert_close(ssae_kernels.project_subspace(G, U, check=True),
                               ssae_kernels.project_subspace(G, U))
    assert orthonormality_error(U) < 1e-5
    with pytest.raises(ValueError, match=r"U must have orthonormal columns: max \|U\^T U - I\| = 3 exceeds"):
        ssae_kernels.project_subspace(G, 2 * U, check=True)
    skewed = U.clone()
    skewed[:, 1] = (U[:, 0] + U[:, 1]) / 2**0.5  # unit norm, not orthogonal
    with pytest.raises(ValueError, match="orthonormal columns"):
        ssae_kernels.project_subspace_(G.clone(), skewed, check=True)
    # an explicit tolerance: a 1e-3 perturbation passes 1e-2 and fails 1e-5
    noisy = U + 1e-3 * torch.randn_like(U)
    ssae_kernels.project_subspace(G, noisy, check=1e-2)
    with pytest.raises(ValueError, match="exceeds 1e-05"):
        ssae_kernels.project_subspace(G, noisy, check=1e-5)
    # bfloat16 rounding of an orthonormal basis passes its dtype's default
    ssae_kernels.project_subspace(G.bfloat16(), basis(20, 5, torch.bfloat16), check=True)


# ---- bad input ------------------------------------------------------------------------------


def _args(**override):
    args = dict(G=torch.randn(10, 4), U=basis(10, 3, torch.float32))
    args.update(override)
    return args


BAD = [
    (dict(G=torch.randn(10)), ValueError, "G must be 2-D"),
    (dict(U=torch.randn(10)), ValueError, "U must be 2-D"),
    (dict(U=torch.randn(9, 3)), ValueError, r"G.shape\[0\] must equal U.shape\[0\] \(d\)"),
    (dict(U=torch.randn(10, 3, dtype=torch.float64)), TypeError, "U has dtype"),
    (dict(G=torch.randn(10, 4).to(torch.int32), U=torch.randn(10, 3).to(torch.int32)), TypeError,
     "G must be float32, float64, bfloat16 or float16"),
    (dict(U=torch.randn(10, 0)), ValueError, "U must have at least one column"),
    (dict(U=torch.randn(3, 5), G=torch.randn(3, 4)), ValueError, r"r <= d"),
    (dict(G="not a tensor"), TypeError, "G must be a torch.Tensor"),
]


@pytest.mark.parametrize("override,error,match", BAD)
def test_bad_input(backend, override, error, match):
    require(backend, "project_subspace", device="cpu")
    args = _args(**override)
    with pytest.raises(error, match=match):
        ssae_kernels.project_subspace(**args)
    with pytest.raises(error, match=match):
        ssae_kernels.project_subspace_(**args)


def test_inplace_rejects_expanded_views(backend):
    dev = device_of(backend)
    G = torch.randn(10, 1, device=dev).expand(10, 4)
    with pytest.raises(ValueError, match="overlapping elements"):
        ssae_kernels.project_subspace_(G, basis(10, 3, torch.float32, dev))


def test_inplace_rejects_tensors_recording_grad():
    G = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ssae_kernels.project_subspace_(G, basis(10, 3, torch.float32))
    with torch.no_grad():  # fine on a leaf's data under no_grad (an optimizer step)
        ssae_kernels.project_subspace_(G, basis(10, 3, torch.float32))


@pytest.mark.parametrize("op", ["project_subspace", "project_subspace_"])
def test_float64_is_not_served_by_triton(op):
    # The triton backend has no float64 kernel: asked for by name, it says so rather than serving the call.
    require("triton", op)
    dev = device_of("triton")
    G, U = torch.randn(10, 4, dtype=torch.float64, device=dev), basis(10, 3, torch.float64, dev)
    with ssae_kernels.use_backend("triton"), pytest.raises(Exception, match=r"triton.*does not support float64"):
        getattr(ssae_kernels, op)(G, U)


# ---- cpu backend only: the C++ kernel checks its arguments itself -------------------------------------


def test_cpu_kernel_checks_its_arguments():
    # torch.ops on CPU tensors reaches the cpu backend's C++ kernel without the Python checks.
    require("cpu", "project_subspace")
    with ssae_kernels.use_backend("cpu"):
        with pytest.raises(ValueError, match=r"G.shape\[0\] must equal U.shape\[0\] \(d\): expected 9, got 10"):
            torch.ops.ssae.project_subspace.default(torch.randn(10, 4), torch.randn(9, 3), False)
        with pytest.raises(TypeError, match="U has dtype"):
            torch.ops.ssae.project_subspace_.default(torch.randn(10, 4), torch.randn(10, 3, dtype=torch.float64), False)


# ---- triton backend only (interpreter) ---------------------------------------------------------------


@interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("complement", [False, True])
def test_triton_two_pass_path(dtype, complement):
    # r above the fused threshold: scratch U^T G, then the apply kernel (also in place).
    triton_project = triton_module("project_subspace")
    U, G = basis(37, 21, dtype), torch.randn(37, 45, dtype=torch.float64).to(dtype)
    out = triton_project.project_subspace(G, U, complement, fused_max_r=8)
    assert_matches(out, G, U, complement)
    inplace = G.clone()
    triton_project.project_subspace_(inplace, U, complement, fused_max_r=8)
    assert torch.equal(inplace, out)


# ---- GPU only ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("d,r,n", [(17, 5, 33), (576, 22, 1536), (300, 200, 70)])
@pytest.mark.parametrize("complement", [False, True])
def test_gpu_project_subspace(gpu_backend, dtype, d, r, n, complement):
    U, G = basis(d, r, dtype, "cuda"), torch.randn(d, n, dtype=torch.float64).to("cuda", dtype)
    out = ssae_kernels.project_subspace(G, U, complement)
    inplace = G.clone()
    ssae_kernels.project_subspace_(inplace, U, complement)
    assert_matches(out.cpu(), G.cpu(), U.cpu(), complement)
    assert torch.equal(inplace, out)


@requires_cuda
def test_gpu_float64_falls_back_to_reference(kernel_calls, monkeypatch):
    # No GPU backend serves float64: without an override, float64 CUDA tensors go to the reference.
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    U, G = basis(12, 3, torch.float64, "cuda"), torch.randn(12, 7, dtype=torch.float64, device="cuda")
    out = ssae_kernels.project_subspace(G, U)
    assert kernel_calls.get(("reference", "project_subspace"), 0) == 1
    assert torch.equal(out, reference.project_subspace(G, U))
