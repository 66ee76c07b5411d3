"""sparse_decode (ssae_kernels/ops/sparse_decode.py) on every backend, against the reference.

Sections: the op on every backend (``backend`` fixture, tests/ops/conftest.py), including
index and data views; bad input; then GPU-only tests (``test_gpu_*``), the cuda backend's
marked as such. Interpreter gather tiles: 4 slots x 16 columns.
"""

import pytest
import torch

import ssae_kernels
from assertions import DTYPES, assert_op_matches_reference, close
from conftest import requires_cuda
from ssae_kernels import backends, reference

from .conftest import (as_view, bad_index_view, cpu_sized, device_of, index_views, interpreter,
                       require, triton_module, uninterpreted)

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What the cuda backend says of a weight matrix without unit stride along d (it never copies one).
LAYOUT_ERROR = r"{name} must have unit stride in its last dimension on the cuda backend.*got strides.*" \
               r"call \.contiguous\(\) once outside the training loop"


def weight_view(W: torch.Tensor, kind: str) -> torch.Tensor:
    """A view with W's values and unit stride along d, which every backend reads in place (a leaf that
    may require grad): "narrow" (W[:, :d] of a wider matrix: rows 16-byte aligned where d + 8 allows),
    "offset" (W[:, 3:3 + d]: a misaligned base), "rows" (every other row of a taller matrix), "odd"
    (an odd row stride). Memory the view does not show holds NaN."""
    M, d = W.shape
    with torch.no_grad():
        if kind == "rows":
            full = torch.full((2 * M, d), float("nan"), dtype=W.dtype, device=W.device)
            full[::2] = W
            view = full[::2]
        else:
            width, start = {"narrow": (d + 8, 0), "offset": (d + 8, 3), "odd": (d + 1 + (d % 2 == 0), 0)}[kind]
            full = torch.full((M, width), float("nan"), dtype=W.dtype, device=W.device)
            full[:, start:start + d] = W
            view = full[:, start:start + d]
    assert view.stride(-1) == 1 and (M <= 1 or not view.is_contiguous())
    return view.requires_grad_(W.requires_grad)


WEIGHT_VIEWS = ("narrow", "offset", "rows", "odd")


def make_code(N, d, M, k, dtype=torch.float32, requires_grad=False, unique=True, device="cpu", signed=False):
    if unique:
        indices = torch.stack([torch.randperm(M)[:k] for _ in range(N)])
    else:  # repeated latents within a row are allowed: they add up
        indices = torch.randint(0, M, (N, k))
    values = torch.randn(N, k, dtype=torch.float64)
    values = (values if signed else torch.relu(values)).to(dtype)
    W = torch.randn(M, d, dtype=torch.float64).to(dtype)
    b = torch.randn(d, dtype=torch.float64).to(dtype)
    return [t.to(device).requires_grad_(requires_grad and t.is_floating_point()) for t in (values, indices, W, b)]


SHAPES = [  # N, d, M, k
    (1, 1, 1, 1),
    uninterpreted(1, 7, 5, 5),  # k = M
    uninterpreted(9, 3, 4, 1),  # k = 1
    (5, 16, 9, 4),  # one interpreter column tile, one slot tile
    (6, 17, 9, 5),  # one past both
    (3, 33, 40, 9),  # several column and slot tiles
    cpu_sized(37, 29, 101, 8),
    cpu_sized(130, 65, 1000, 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(backend, dtype, N, d, M, k, with_bias):
    require(backend, "sparse_decode", dtype=dtype)
    values, indices, W, b = make_code(N, d, M, k, dtype, device=device_of(backend), signed=True)
    b = b if with_bias else None
    out = ssae_kernels.sparse_decode(values, indices, W, b)
    close(out, reference.sparse_decode(values, indices, W, b), scale=k)


def test_repeated_latents_add_up(backend):
    values, indices, W, b = make_code(11, 6, 4, 9, unique=False, device=device_of(backend))
    out = ssae_kernels.sparse_decode(values, indices, W, b)
    dense = torch.zeros(11, 4, device=values.device).scatter_add_(1, indices, values)
    close(out, dense @ W + b, scale=9)


def test_non_contiguous(backend):
    dev = device_of(backend)
    v = torch.randn(13, 12, device=dev)[:, ::2]
    ix = torch.randint(0, 40, (6, 13), device=dev).T
    W2 = torch.randn(40, 20, device=dev)[:, 5:15]
    b2 = torch.randn(20, device=dev)[::2]
    assert not (v.is_contiguous() or ix.is_contiguous() or W2.is_contiguous() or b2.is_contiguous())
    out = ssae_kernels.sparse_decode(v, ix, W2, b2)
    close(out, reference.sparse_decode(v, ix, W2, b2), scale=6)


# ---- views: any strides give the result of the contiguous tensors ---------------------------------


def _decode_with_grads(values, indices, W, b):
    out = ssae_kernels.sparse_decode(values, indices, W, b)
    grad_out = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    return out, torch.autograd.grad(out, (values, W, b), grad_out)


@pytest.mark.parametrize("view", ["expanded", "sliced", "stepped", "transposed"])
def test_index_views_give_the_contiguous_result(backend, view):
    # Out-of-range values hidden behind a sliced or stepped view must not raise: only the entries
    # the view shows are indices.
    dev = device_of(backend)
    N, d, M = 5, 6, 16
    indices = index_views(N, M)[view].to(dev)
    values, _, W, b = make_code(N, d, M, 2, device=dev)
    dense = indices.contiguous()
    assert torch.equal(ssae_kernels.sparse_decode(values, indices, W, b),
                       ssae_kernels.sparse_decode(values, dense, W, b))
    values, W, b = (t.requires_grad_(True) for t in (values, W, b))
    out, grads = _decode_with_grads(values, indices, W, b)
    ref_out, ref_grads = _decode_with_grads(values, dense, W, b)
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_data_views_give_the_contiguous_result(backend, view):
    # values and b_dec in any layout on every backend; W_dec too, except on cuda, which needs unit
    # stride along d (test_weight_views_*, test_transposed_weights_*).
    N, d, M, k = 7, 6, 12, 3
    values, indices, W, b = make_code(N, d, M, k, requires_grad=True, unique=False, device=device_of(backend))
    W_view = weight_view(W, "narrow") if backend == "cuda" else as_view(W, view)
    out, grads = _decode_with_grads(as_view(values, view), indices, W_view, as_view(b, "sliced"))
    ref_out, ref_grads = _decode_with_grads(values, indices, W, b)
    close(out, ref_out, scale=k)
    for g, r, scale in zip(grads, ref_grads, (d, N * k, N)):
        close(g, r, scale=scale)


@pytest.mark.parametrize("kind", WEIGHT_VIEWS)
@pytest.mark.parametrize("d", [5, 16, uninterpreted(37)])
def test_weight_views_are_read_in_place(backend, kind, d):
    # Row-strided W_dec views (wider or taller storage, misaligned bases, odd strides): the result
    # and gradients of the contiguous weights, on every backend, and no copy on the GPU backends.
    N, M, k = 6, 10, 3
    values, indices, W, b = make_code(N, d, M, k, requires_grad=True, unique=False, device=device_of(backend))
    view = weight_view(W, kind)
    out, grads = _decode_with_grads(values, indices, view, b)
    ref_out, ref_grads = _decode_with_grads(values, indices, W, b)
    close(out, ref_out, scale=k)
    for g, r, scale in zip(grads, ref_grads, (d, N * k, N)):
        close(g, r, scale=scale)


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_transposed_weights_read_in_place_or_declined(backend, view):
    # No GPU backend copies a weight matrix (an [M, d] copy per call): triton reads any layout
    # through both strides; cuda declines one without unit stride along d, through the op's
    # declared limits, with the argument named. cpu and reference take any strides.
    values, indices, W, b = make_code(6, 5, 10, 3, device=device_of(backend))
    W_view = as_view(W, view)
    if backend != "cuda":
        close(ssae_kernels.sparse_decode(values, indices, W_view, b), reference.sparse_decode(values, indices, W, b),
              scale=3)
        return
    # Asked for by name: the router (RuntimeError) or the cuda binding itself (ValueError) says why.
    with pytest.raises((RuntimeError, ValueError), match=LAYOUT_ERROR.format(name="W_dec")):
        ssae_kernels.sparse_decode(values, indices, W_view, b)
    reasons = backends.BACKENDS[backend].not_supported_reasons("sparse_decode", values.device, values.dtype,
                                                                (values, indices, W_view, b))
    assert any("W_dec must have unit stride" in r for r in reasons)
    assert not backends.BACKENDS[backend].not_supported_reasons(
        "sparse_decode", values.device, values.dtype, (values, indices, weight_view(W, "rows"), b))


@interpreter
def test_triton_launcher_reads_weight_views():
    # The launcher itself, called directly: a transposed and a misaligned view, read in place.
    values, indices, W, b = make_code(6, 5, 10, 3)
    launcher = triton_module("sparse_decode").sparse_decode
    close(launcher(values, indices, as_view(W, "transposed"), b), reference.sparse_decode(values, indices, W, b),
          scale=3)
    close(launcher(values, indices, weight_view(W, "offset"), b), reference.sparse_decode(values, indices, W, b),
          scale=3)


@pytest.mark.parametrize("bad", [20, 10**11, -1])
def test_visible_out_of_range_index_raises(backend, bad):
    # On CPU tensors every backend checks the entries a view shows (M = 16).
    require(backend, "sparse_decode", device="cpu")
    values, _, W, b = make_code(6, 4, 16, 2)
    with pytest.raises(IndexError, match="indices"):
        ssae_kernels.sparse_decode(values, bad_index_view(6, 16, bad), W, b)


def test_triton_launchers_run_on_their_tensors_device(monkeypatch):
    # Triton launches on the current device: every launcher makes its first tensor's GPU current
    # (torch.cuda.device), and does nothing of the kind for CPU tensors (the interpreter).
    common = triton_module("_common")
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class OnSecondGpu:  # stands for a tensor on cuda:1, without a GPU
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    assert common.guarded(lambda t, x: x)(OnSecondGpu(), 5) == 5
    with common.device_guard(OnSecondGpu()):
        pass
    assert entered == [torch.device("cuda", 1)] * 2
    common.guarded(lambda t: None)(torch.zeros(1))
    with common.device_guard(torch.zeros(1)):
        pass
    assert len(entered) == 2
    launchers = {"sparse_decode": ["sparse_decode"],
                 "sparse_backward": ["sampled_dot", "latent_transpose", "sparse_transpose_matmul"],
                 "tilted_loss": ["tilted_group_stats", "row_sq_error", "sparse_decode_sq_error",
                                 "sparse_decode_residual"],
                 "project_subspace": ["project_subspace", "project_subspace_"],
                 "sparse_adam": ["sparse_adam_"]}
    for module, names in launchers.items():
        for name in names:
            assert getattr(getattr(triton_module(module), name), "__wrapped__", None) is not None, (module, name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_launch_on_another_device(gpu_backend):
    # Tensors on cuda:1 while cuda:0 is current: the launch runs on cuda:1 (device guard).
    values, indices, W, b = make_code(17, 33, 40, 5, device="cuda:1")
    with torch.cuda.device(0):
        out = ssae_kernels.sparse_decode(values, indices, W, b)
    torch.cuda.synchronize(1)
    close(out, reference.sparse_decode(values, indices, W, b), scale=5)


# ---- autograd ------------------------------------------------------------------------------


# In the interpreter: test_training_step_gradients in test_topk_encode.py (the decoder's gradients among them).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,M,k", [uninterpreted(4, 3, 9, 9), cpu_sized(37, 29, 101, 8), cpu_sized(50, 16, 7, 3)])
def test_gradients_match_reference(backend, dtype, N, d, M, k):
    require(backend, "sparse_decode", "sampled_dot", "sparse_transpose_matmul", dtype=dtype)
    values, indices, W, b = make_code(N, d, M, k, dtype, requires_grad=True, unique=False, device=device_of(backend))
    grad_out = torch.randn(N, d, dtype=torch.float64).to(values.device, dtype)
    out = ssae_kernels.sparse_decode(values, indices, W, b)
    grads = torch.autograd.grad(out, (values, W, b), grad_out)
    ref = torch.autograd.grad(reference.sparse_decode(values, indices, W, b), (values, W, b), grad_out)
    for g, r, scale in zip(grads, ref, (d, N * k, N)):
        assert g.dtype == r.dtype
        close(g, r, dtype=dtype, scale=scale)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(backend, with_bias):
    require(backend, "sparse_decode", "sampled_dot", "sparse_transpose_matmul", dtype=torch.float64)
    values, indices, W, b = make_code(7, 5, 11, 3, torch.float64, requires_grad=True, unique=False,
                                      device=device_of(backend))
    inputs = (values, W, b) if with_bias else (values, W)

    def f(values, W, b=None):
        return ssae_kernels.sparse_decode(values, indices, W, b)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    values, indices, W, b = make_code(9, 7, 31, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.ssae.sparse_decode.default, (values, indices, W, b if with_bias else None))


# ---- bad input ------------------------------------------------------------------------------


def _args(**override):
    values, indices, W, b = make_code(5, 4, 10, 3)
    args = dict(values=values, indices=indices, W_dec=W, b_dec=b)
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,match", [
    (dict(values=torch.randn(5)), ValueError, "values must be 2-D"),
    (dict(indices=torch.zeros(5, 2, dtype=torch.int64)), ValueError, "indices must have the shape of values"),
    (dict(indices=torch.zeros(5, 3, dtype=torch.int32)), TypeError, "indices must be int64"),
    (dict(W_dec=torch.randn(10)), ValueError, "W_dec must be 2-D"),
    (dict(W_dec=torch.randn(10, 4, dtype=torch.float16)), TypeError, "W_dec has dtype"),
    (dict(b_dec=torch.randn(5)), ValueError, r"b_dec.shape\[0\]"),
    (dict(values=torch.randn(0, 3), indices=torch.zeros(0, 3, dtype=torch.int64)), ValueError, "at least one row"),
    (dict(indices=torch.full((5, 3), 10)), IndexError, r"indices must lie in \[0, 10\)"),
    (dict(indices=torch.full((5, 3), -1)), IndexError, r"indices must lie in \[0, 10\)"),
])
def test_bad_input(backend, override, error, match):
    require(backend, "sparse_decode", device="cpu")
    with pytest.raises(error, match=match):
        ssae_kernels.sparse_decode(**_args(**override))


def test_float64_is_not_served_by_triton():
    # The triton backend has no float64 kernel: asked for by name, it says so rather than serving the call.
    require("triton", "sparse_decode")
    values, indices, W, b = make_code(5, 4, 10, 3, torch.float64, device=device_of("triton"))
    with ssae_kernels.use_backend("triton"), pytest.raises(Exception, match=r"triton.*does not support float64"):
        ssae_kernels.sparse_decode(values, indices, W, b)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("N,k,d,M", [(1, 1, 1, 1), (17, 5, 33, 40), (300, 32, 768, 24576), (9, 40, 1025, 40),
                                     (5, 300, 7, 1000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_sparse_decode(gpu_backend, dtype, N, k, d, M, with_bias):
    values = torch.randn(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") / d**0.5).to(dtype)
    bias = torch.randn(d, device="cuda").to(dtype) if with_bias else None
    assert_op_matches_reference(gpu_backend, "sparse_decode", values, indices, W, bias, scale=k**0.5)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("d,kind", [(768, "narrow"), (767, "narrow"), (768, "offset"), (768, "rows"), (1023, "odd"),
                                    (4100, "narrow")])
def test_gpu_weight_views(gpu_backend, dtype, d, kind):
    # 16-byte loads where the view's rows are aligned (narrow, rows: a tail when d is odd), one
    # element at a time where not (offset, odd): the same result either way, and no copy of W.
    N, k, M = 64, 32, 4096
    values = torch.randn(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = weight_view((torch.randn(M, d, device="cuda") / d**0.5).to(dtype), kind)
    bias = torch.randn(d, device="cuda").to(dtype)
    assert_op_matches_reference(gpu_backend, "sparse_decode", values, indices, W, bias, scale=k**0.5)


@requires_cuda
def test_gpu_transposed_weight_runs_on_triton(kernel_calls, monkeypatch):
    # Without an override, a transposed W_dec (a tied SAE's W_enc.T) is read in place by triton.
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    values, indices, W, b = make_code(6, 5, 9, 3, device="cuda")
    W_t = as_view(W, "transposed")
    out = ssae_kernels.sparse_decode(values, indices, W_t, b)
    assert kernel_calls.get(("triton", "sparse_decode"), 0) == 1
    close(out, reference.sparse_decode(values, indices, W, b), scale=3)


def test_gpu_index_check_on_request(gpu_backend, monkeypatch):
    # SSAE_CHECK_INDICES=1 makes every GPU backend raise as the CPU backend does (at a sync per call).
    W = torch.randn(10, 8, device="cuda")
    values = torch.randn(2, 2, device="cuda")
    indices = torch.tensor([[0, 1], [2, 10]], device="cuda")
    monkeypatch.setenv("SSAE_CHECK_INDICES", "1")
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\), got 10"):
        ssae_kernels.sparse_decode(values, indices, W)


@requires_cuda
def test_gpu_float64_falls_back_to_reference(kernel_calls, monkeypatch):
    # No GPU backend serves float64: without an override, float64 CUDA tensors go to the reference.
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    values, indices, W, b = make_code(6, 5, 9, 3, torch.float64, device="cuda")
    out = ssae_kernels.sparse_decode(values, indices, W, b)
    assert kernel_calls.get(("reference", "sparse_decode"), 0) == 1
    assert torch.equal(out, reference.sparse_decode(values, indices, W, b))


@requires_cuda
def test_gpu_cuda_out_of_range_indices_never_read_outside():
    # cuda backend only: out-of-range entries read nothing out of bounds; their rows come out NaN.
    require("cuda", "sparse_decode")
    M, d = 10, 8
    W = torch.randn(M, d, device="cuda")
    values = torch.randn(3, 2, device="cuda")
    indices = torch.tensor([[0, 1], [2, M], [-1, 3]], device="cuda")
    with ssae_kernels.use_backend("cuda"):
        out = ssae_kernels.sparse_decode(values, indices, W)
    torch.cuda.synchronize()
    assert not bool(out[0].isnan().any()) and bool(out[1:].isnan().all())
