"""Which backend serves an op call.

Each backend says, with values, why it cannot serve a call (``not_supported_reasons``):
the device, whether it is built or importable here, and the op's own declaration
(:mod:`ssae_kernels.ops.registry`): whether the backend has a kernel for the op, for
the call's dtype, at the call's size. The choice is made per call:

1. ``with ssae_kernels.use_backend(name):`` if active, else
2. the ``SSAE_BACKEND`` environment variable (``cpu``, ``triton``, ``cuda``, ``reference``), else
3. the first backend of the device's default order that can serve the call.

An explicit choice that cannot serve the call raises with its reasons; when
nothing fits, the error lists every backend's reasons. The override is a
process-wide setting, not thread-local, because autograd may run backward
passes on its own threads.

On the default path of CPU tensors the choice costs nothing: the cpu backend's
C++ kernels sit under the CPU dispatch key and serve the call unless a backend
is asked for by name (csrc/torch/route.h).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

from .ops.registry import OPS

ENV_VAR = "SSAE_BACKEND"
DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Backend:
    name: str = ""
    devices: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        """Why the backend cannot run anything here (not built, not importable), or None."""
        return None

    def not_supported_reasons(self, op, device: torch.device, dtype: torch.dtype | None = None,
                              args: tuple | None = None) -> list[str]:
        """Why this backend cannot serve ``op`` (a registry.Op or its name) on device/dtype; empty if it can."""
        op = _op(op)
        reasons = []
        if device.type not in self.devices:
            reasons.append(f"serves {', '.join(self.devices)} tensors, not {device.type}")
        why = self.unavailable()
        if why:
            reasons.append(why)
        if not op.served_by(self.name):
            reasons.append(f"has no kernel for {op.name}")
            return reasons
        served = op.dtypes.get(self.name)
        if dtype is not None and served is not None and dtype not in served:
            reasons.append(f"does not support {_dtype_name(dtype)} for {op.name} "
                           f"(serves {', '.join(map(_dtype_name, served))})")
        limit = op.limits.get(self.name)
        if args is not None and limit is not None and not reasons:
            too_large = limit(*args)
            if too_large:
                reasons.append(too_large)
        return reasons

    def kernel(self, op):
        raise NotImplementedError


def _op(op):
    if isinstance(op, str):
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
        return OPS[op]
    return op


class ReferenceBackend(Backend):
    """The pure-PyTorch specification (dense N x M memory): for tests and as a last resort."""

    name = "reference"
    devices = ("cpu", "cuda")

    def kernel(self, op):
        return _op(op).reference


def _load_extension():
    try:
        from . import _C
    except ImportError as error:  # not built, or built against another torch
        return None, f"{type(error).__name__}: {error}"
    return _C, None


class CompiledBackend(Backend):
    """A backend compiled into ssae_kernels._C: its kernels sit under the dispatch key of its device,
    and the router hands calls back to them rather than calling them itself."""

    def __init__(self, extension, load_error):
        self.extension, self.load_error = extension, load_error

    def kernel(self, op):
        raise RuntimeError(f"the {self.name} backend's kernels are called by the dispatcher, not by the router")


class CpuBackend(CompiledBackend):
    """C++ kernels with OpenMP (csrc/kernels/cpu)."""

    name = "cpu"
    devices = ("cpu",)

    def unavailable(self):
        if self.extension is None:
            return (f"ssae_kernels._C is not available ({self.load_error}); reinstall with "
                    "`pip install -e . --no-build-isolation`")
        return None


class CudaBackend(CompiledBackend):
    """CUDA C++ kernels (csrc/kernels/cuda), built into ssae_kernels._C when asked for at install time."""

    name = "cuda"
    devices = ("cuda",)

    def unavailable(self):
        if self.extension is None:
            return f"ssae_kernels._C is not available ({self.load_error})"
        if not self.extension.build_info().get("cuda", False):
            return "ssae_kernels._C was built without CUDA (set SSAE_BUILD_CUDA=1 and reinstall)"
        return None


class TritonBackend(Backend):
    """Triton kernels (ssae_kernels/triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    devices = ("cuda", "cpu")

    def __init__(self):
        self._import_error: str | None = None
        self._checked = False

    def _importable(self) -> str | None:
        if not self._checked:  # imported on first use: importing triton takes a second
            try:
                importlib.import_module(f"{__package__}.triton")
            except ImportError as error:  # triton missing or too old
                self._import_error = f"cannot import triton kernels ({type(error).__name__}: {error})"
            self._checked = True
        return self._import_error

    def not_supported_reasons(self, op, device, dtype=None, args=None):
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            # Said without importing triton: a CPU-only process never needs it.
            reasons = super().not_supported_reasons(op, device, dtype, args)
            return reasons + ["runs CPU tensors only in the Triton interpreter "
                              "(set TRITON_INTERPRET=1 before importing triton)"]
        return super().not_supported_reasons(op, device, dtype, args)

    def unavailable(self):
        return self._importable()

    def kernel(self, op):
        op = _op(op)
        return getattr(importlib.import_module(f"{__package__}.triton.{op.module}"), op.name)


_extension, _load_error = _load_extension()
BACKENDS: dict[str, Backend] = {b.name: b for b in (CpuBackend(_extension, _load_error), TritonBackend(),
                                                     CudaBackend(_extension, _load_error), ReferenceBackend())}

# The request codes of csrc/torch/route.h.
_REQUEST_CODES = {"cpu": 1, "cuda": 2}
_override: list[str] = []
_warned_fallback: set[tuple[str, str]] = set()


def _tell_extension() -> None:
    if _extension is not None:
        _extension.set_override(_REQUEST_CODES.get(_override[-1], 3) if _override else -1)


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, every op call is served by backend ``name`` (or raises why it cannot)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    _override.append(name)
    _tell_extension()
    try:
        yield
    finally:
        _override.pop()
        _tell_extension()


def requested_backend() -> str | None:
    """The backend asked for by use_backend() or SSAE_BACKEND, if any."""
    if _override:
        return _override[-1]
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if name and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a known backend; known: {', '.join(BACKENDS)}")
    return name or None


def select(op, args: tuple) -> Backend:
    """The backend that serves ``op`` called with ``args`` now (device and dtype of the leading tensor)."""
    op = _op(op)
    lead = args[0]
    device, dtype = lead.device, lead.dtype
    requested = requested_backend()
    if requested is not None:
        backend = BACKENDS[requested]
        reasons = backend.not_supported_reasons(op, device, dtype, args)
        if reasons:
            raise RuntimeError(f"backend {requested!r} cannot run {op.name} on {device} ({_dtype_name(dtype)}): "
                               + "; ".join(reasons))
        return backend
    report = {}
    for name in DEFAULT_ORDER.get(device.type, ("reference",)):
        reasons = BACKENDS[name].not_supported_reasons(op, device, dtype, args)
        if not reasons:
            if name == "reference" and (op.name, device.type) not in _warned_fallback:
                _warned_fallback.add((op.name, device.type))
                skipped = "; ".join(f"{n}: {', '.join(r)}" for n, r in report.items())
                warnings.warn(f"ssae_kernels: {op.name} on {device.type} falls back to the dense reference "
                              f"backend (O(N*M) memory). {skipped}", stacklevel=3)
            return BACKENDS[name]
        report[name] = reasons
    raise RuntimeError(f"no backend can run {op.name} on {device} ({_dtype_name(dtype)}): "
                       + "; ".join(f"{n}: {', '.join(r)}" for n, r in report.items()))


def availability(device: str = "cpu", op: str = "topk_encode", dtype: torch.dtype | None = None) -> dict[str, list[str]]:
    """Backend name -> reasons it cannot serve ``op`` on ``device`` (for ``dtype``, if given); empty if it can."""
    dev = torch.device(device)
    return {name: b.not_supported_reasons(op, dev, dtype) for name, b in BACKENDS.items()}
