"""The ``backend`` fixture of the op tests (tests/ops/test_<op module>.py).

A test that takes ``backend`` runs once per backend: "reference" (the pure-PyTorch
specification), "cpu" (C++), "triton" and "cuda". Its body runs inside
``with ssae_kernels.use_backend(backend):`` on tensors of ``device_of(backend)``:

- reference, cpu: CPU tensors;
- triton: CPU tensors in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py),
  CUDA tensors when Triton is compiled on a GPU (TRITON_INTERPRET=0: the driver
  ``test_gpu_triton_compiled_mode`` in test_topk_encode.py reruns the triton tests so);
- cuda: CUDA tensors; skips without a GPU or without the CUDA build.

A backend that cannot serve the test's op (or dtype) skips with the reasons of
``ssae_kernels.backends.availability``: call ``require(backend, op, dtype=...)``.

Shapes: the interpreter runs every Triton program in Python, so the default shapes are
small; ``cpu_sized(...)`` parameters (larger shapes that exercise the kernels' tiling) run on
the compiled kernels only, and ``uninterpreted(...)`` cases skip in the interpreter, whose
run the test's other cases cover. GPU-scale shapes live in the GPU-only ``test_gpu_*`` tests,
which take ``gpu_backend`` (triton and cuda on CUDA tensors). Skips that the parameters alone
decide are made at collection (``pytest_collection_modifyitems``), before any fixture runs.

Triton is imported lazily (``triton_module``), so the files run without it.
"""

import importlib
import os

import pytest
import torch

import ssae_kernels
from conftest import CUDA  # tests/conftest.py, which also sets TRITON_INTERPRET=1 unless it is set
from ssae_kernels import backends

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("reference", "cpu", "triton", "cuda")
GPU_BACKENDS = ("triton", "cuda")
NO_GPU = "needs a CUDA GPU (none on this machine)"

# Triton-specific tests that call the launchers on CPU tensors.
interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU tensors run Triton only with TRITON_INTERPRET=1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_sized: a shape for the compiled kernels only (tests/ops/conftest.py)")
    config.addinivalue_line("markers", "uninterpreted: a case the Triton interpreter skips (tests/ops/conftest.py)")


def device_of(backend: str) -> str:
    """The device of the tensors a backend's tests use."""
    if backend == "cuda" or (backend == "triton" and CUDA and not INTERPRETING):
        return "cuda"
    return "cpu"


def interpreted(backend: str) -> bool:
    return backend == "triton" and INTERPRETING


def require(backend: str, *ops: str, dtype: torch.dtype | None = None, device: str | None = None):
    """Skips unless ``backend`` serves every op in ``ops`` (for ``dtype``) on ``device``
    (default: ``device_of(backend)``), with the reasons the backend registry gives."""
    device = device or device_of(backend)
    for op in ops:
        reasons = backends.availability(device, op, dtype)[backend]
        if reasons:
            what = f"{op} ({str(dtype).removeprefix('torch.')})" if dtype is not None else op
            pytest.skip(f"{backend} cannot serve {what} on {device}: {'; '.join(reasons)}")


def cpu_sized(*values, id=None):
    """A shape for the compiled kernels only (cpu, cuda, compiled Triton), one that exercises their tiling:
    skipped in the Triton interpreter (it runs every program in Python) and on the reference backend
    (the reference is what the kernels are compared with; it has no tiles to cross)."""
    return pytest.param(*values, marks=pytest.mark.cpu_sized, id=id)


def uninterpreted(*values, id=None):
    """A case the Triton interpreter skips to keep its run short: the test's other cases (or the
    Triton test named beside it) cover it there. ``@pytest.mark.uninterpreted`` marks a whole test."""
    return pytest.param(*values, marks=pytest.mark.uninterpreted, id=id)


def triton_module(name: str):
    """ssae_kernels.triton.<name>, for the Triton-specific tests (skips without triton)."""
    pytest.importorskip("triton")
    return importlib.import_module(f"ssae_kernels.triton.{name}")


def _known_skip(item):
    """Why the item's backend cannot run it here, decided from its parameters alone (or None)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = params.get("backend") or params.get("gpu_backend")
    if name is None:
        return None
    if not CUDA and ("gpu_backend" in params or device_of(name) == "cuda"):
        return NO_GPU
    if interpreted(name) and "gpu_backend" in params:
        return "compiled-mode test: test_gpu_triton_compiled_mode reruns it with TRITON_INTERPRET=0"
    marked = item.get_closest_marker
    if interpreted(name) and "backend" in params and (marked("cpu_sized") or marked("uninterpreted")):
        return "too slow for the Triton interpreter, or covered there by the test's other cases"
    if name == "reference" and marked("cpu_sized"):
        return "a shape for the kernels' tiling; the reference is what they are compared with"
    return None


def pytest_collection_modifyitems(config, items):
    # Skips decided at collection skip before any fixture is set up (a few ms less per item, and
    # there are a thousand of them without a GPU); the fixtures below decide the rest.
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here):
            reason = _known_skip(item)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def _skip_unless_present(name: str, device: str):
    if device == "cuda" and not CUDA:
        pytest.skip(NO_GPU)
    # sparse_decode: an op every backend has a kernel for, so these are the backend's own reasons
    reasons = backends.availability(device, "sparse_decode")[name]
    if reasons:
        pytest.skip(f"{name} backend unavailable on {device}: {'; '.join(reasons)}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend name; the test body runs under ``use_backend(name)`` (see the module docstring)."""
    name = request.param
    _skip_unless_present(name, device_of(name))
    with ssae_kernels.use_backend(name):
        yield name


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    """triton or cuda on CUDA tensors at GPU scale (test_gpu_*); triton only compiled
    (TRITON_INTERPRET=0, which ``test_gpu_triton_compiled_mode`` sets in a subprocess)."""
    name = request.param
    _skip_unless_present(name, "cuda")
    if interpreted(name):
        pytest.skip("compiled-mode test: test_gpu_triton_compiled_mode reruns it with TRITON_INTERPRET=0")
    with ssae_kernels.use_backend(name):
        yield name


@pytest.fixture(autouse=True)
def _exact_float32_gemm():
    # The GPU encodes' float32 GEMMs follow torch's TF32 switch; the tests need float32 scores.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls the router hands to the triton and reference backends: (backend, op) -> calls.

    (The cpu and cuda backends' C++ kernels are called by the dispatcher itself.)
    """
    calls = {}
    for name in ("triton", "reference"):
        b = backends.BACKENDS[name]

        def kernel(op, _real=b.kernel, _name=name):
            fn = _real(op)
            key = (_name, getattr(op, "name", op))

            def counted(*args, **kwargs):
                calls[key] = calls.get(key, 0) + 1
                return fn(*args, **kwargs)
            return counted

        monkeypatch.setattr(b, "kernel", kernel)
    return calls


# ---- non-contiguous inputs -------------------------------------------------------------------

HIDDEN = 10**11  # out of range of any index or group id: stored where a view does not look


def index_views(N: int, M: int) -> dict:
    """Non-contiguous [N, 2] int64 views with entries in [0, M) (M >= 2): expanded (stride 0), a
    column slice and a stepped slice whose hidden columns hold an out-of-range value (a backend
    that read the storage would raise or read out of bounds), and a transposed [2, N] tensor."""
    sliced = torch.randint(0, M, (N, 3))
    sliced[:, 2] = HIDDEN
    stepped = torch.randint(0, M, (N, 3))
    stepped[:, 1] = HIDDEN
    return {
        "expanded": torch.tensor([[0, 1]]).expand(N, 2),
        "sliced": sliced[:, :2],
        "stepped": stepped[:, ::2],
        "transposed": torch.randint(0, M, (2, N)).T,
    }


def bad_index_view(N: int, M: int, bad: int):
    """A stepped [N, 2] view of indices in [0, M) but for one visible entry ``bad``."""
    full = torch.randint(0, M, (N, 3))
    full[N // 2, 2] = bad
    return full[:, ::2]


def group_views(N: int, G: int) -> dict:
    """Non-contiguous [N] int64 views of group ids in [0, G) (G >= 2), hidden entries out of range:
    expanded (stride 0), a slice at an offset, a stepped slice, a column of an [N, 2] tensor."""
    sliced = torch.randint(0, G, (N + 1,))
    sliced[0] = HIDDEN
    stepped = torch.randint(0, G, (2 * N,))
    stepped[1::2] = HIDDEN
    column = torch.randint(0, G, (N, 2))
    column[:, 0] = HIDDEN
    return {
        "expanded": torch.tensor([G - 1]).expand(N),
        "sliced": sliced[1:],
        "stepped": stepped[::2],
        "column": column[:, 1],
    }


def as_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous view with the values of ``t`` (same device and dtype), a leaf that may require
    grad: "transposed" (2-D: the transpose of a contiguous copy of t.T) or "sliced" (every other
    column of a wider tensor that holds NaN between)."""
    with torch.no_grad():
        if kind == "transposed":
            view = t.detach().T.contiguous().T
        else:
            wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
            wide[..., ::2] = t
            view = wide[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view.requires_grad_(t.requires_grad)
