"""Which backend serves an op call.

Each backend declares the devices it serves and, through
``not_supported_reasons``, says with values why it cannot serve a call. The
choice is made per call, at run time:

1. ``with ssae_kernels.use_backend(name):`` if active, else
2. the ``SSAE_BACKEND`` environment variable (``cpu``, ``triton``, ``cuda``, ``reference``), else
3. the first backend of the device's default order that supports the call.

An explicit choice that cannot serve the call raises with its reasons; when
nothing fits, the error lists every backend's reasons. The override is a
process-wide setting, not thread-local, because autograd may run backward
passes on its own threads.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import reference

ENV_VAR = "SSAE_BACKEND"
DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


# The ops a backend supplies kernels for (composite ops such as tilted_loss are built on these).
OPS = ("topk_encode", "sparse_decode", "sampled_dot", "latent_transpose", "sparse_transpose_matmul",
       "tilted_group_stats", "row_sq_error", "sparse_decode_sq_error", "project_subspace", "project_subspace_",
       "sparse_decode_residual")


class Backend:
    name: str = ""
    devices: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()

    def not_supported_reasons(self, op: str, device: torch.device) -> list[str]:
        reasons = []
        if device.type not in self.devices:
            reasons.append(f"serves {', '.join(self.devices)} tensors, not {device.type}")
        if op not in self.ops:
            reasons.append(f"has no kernel for {op}")
        return reasons

    def kernel(self, op: str):
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The pure-PyTorch specification (dense N x M memory): for tests and as a last resort."""

    name = "reference"
    devices = ("cpu", "cuda")
    ops = OPS

    def kernel(self, op):
        return getattr(reference, op)


def _load_extension():
    try:
        from . import _C
    except ImportError as error:  # not built, or built against another torch
        return None, f"{type(error).__name__}: {error}"
    return _C, None


class CpuBackend(Backend):
    """C++ kernels with OpenMP (csrc/kernels/cpu)."""

    name = "cpu"
    devices = ("cpu",)
    ops = OPS

    def __init__(self):
        self.extension, self.load_error = _load_extension()

    def not_supported_reasons(self, op, device):
        reasons = super().not_supported_reasons(op, device)
        if self.extension is None:
            reasons.append(f"ssae_kernels._C is not available ({self.load_error}); reinstall with "
                           "`pip install -e . --no-build-isolation`")
        return reasons

    def kernel(self, op):
        return getattr(self.extension, f"{op}_cpu")


class TritonBackend(Backend):
    """Triton kernels (ssae_kernels/triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    devices = ("cuda", "cpu")

    def __init__(self):
        self._kernels = None
        self.load_error = None

    @property
    def kernels(self) -> dict:
        if self._kernels is None:  # imported on first use: importing triton takes a second
            try:
                from .triton import KERNELS
            except ImportError as error:  # triton missing or too old
                self._kernels, self.load_error = {}, f"{type(error).__name__}: {error}"
            else:
                self._kernels = KERNELS
        return self._kernels

    @property
    def ops(self):
        return tuple(self.kernels)

    def not_supported_reasons(self, op, device):
        if not self.kernels and self.load_error:
            return [f"cannot import triton kernels ({self.load_error})"]
        reasons = super().not_supported_reasons(op, device)
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("runs CPU tensors only in the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
        return reasons

    def kernel(self, op):
        return self.kernels[op]


class CudaBackend(Backend):
    """CUDA C++ kernels (csrc/kernels/cuda), built into ssae_kernels._C when asked for at install time."""

    name = "cuda"
    devices = ("cuda",)

    def __init__(self):
        self.extension, self.load_error = _load_extension()
        built = self.extension is not None and self.extension.build_info().get("cuda", False)
        self.ops = tuple(op for op in OPS if built and hasattr(self.extension, f"{op}_cuda"))

    def not_supported_reasons(self, op, device):
        reasons = super().not_supported_reasons(op, device)
        if self.extension is None:
            reasons.append(f"ssae_kernels._C is not available ({self.load_error})")
        elif not self.extension.build_info().get("cuda", False):
            reasons.append("ssae_kernels._C was built without CUDA (set SSAE_BUILD_CUDA=1 and reinstall)")
        return reasons

    def kernel(self, op):
        return getattr(self.extension, f"{op}_cuda")


BACKENDS: dict[str, Backend] = {b.name: b for b in (CpuBackend(), TritonBackend(), CudaBackend(), ReferenceBackend())}

_override: list[str] = []
_warned_fallback: set[tuple[str, str]] = set()


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, every op call is served by backend ``name`` (or raises why it cannot)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def requested_backend() -> str | None:
    """The backend asked for by use_backend() or SSAE_BACKEND, if any."""
    if _override:
        return _override[-1]
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if name and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a known backend; known: {', '.join(BACKENDS)}")
    return name or None


def select(op: str, device: torch.device) -> Backend:
    """The backend that serves ``op`` on ``device`` now."""
    requested = requested_backend()
    if requested is not None:
        backend = BACKENDS[requested]
        reasons = backend.not_supported_reasons(op, device)
        if reasons:
            raise RuntimeError(f"backend {requested!r} cannot run {op} on {device}: " + "; ".join(reasons))
        return backend
    order = DEFAULT_ORDER.get(device.type, ("reference",))
    report = {}
    for name in order:
        reasons = BACKENDS[name].not_supported_reasons(op, device)
        if not reasons:
            if name == "reference" and (op, device.type) not in _warned_fallback:
                _warned_fallback.add((op, device.type))
                skipped = "; ".join(f"{n}: {', '.join(r)}" for n, r in report.items())
                warnings.warn(f"ssae_kernels: {op} on {device.type} falls back to the dense reference "
                              f"backend (O(N*M) memory). {skipped}", stacklevel=3)
            return BACKENDS[name]
        report[name] = reasons
    raise RuntimeError(f"no backend can run {op} on {device}: "
                       + "; ".join(f"{n}: {', '.join(r)}" for n, r in report.items()))


def kernel_for(op: str, device: torch.device):
    return select(op, device).kernel(op)


def availability(device: str = "cpu", op: str = "topk_encode") -> dict[str, list[str]]:
    """Backend name -> reasons it cannot serve ``op`` on ``device`` (empty if it can)."""
    dev = torch.device(device)
    return {name: b.not_supported_reasons(op, dev) for name, b in BACKENDS.items()}
