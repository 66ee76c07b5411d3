"""Argument checks shared by the op modules and their fake (meta) kernels, and the dtype facts they use.

They use ``torch._check_*`` so that the same code raises ``ValueError`` /
``TypeError`` eagerly and records symbolic-shape guards under torch.compile.
"""

import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# What the GPU kernels serve (float64 goes to the reference backend there).
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(t, name: str, dim: int, shape: str, *, optional: bool = False):
    if t is None and optional:
        return
    torch._check_type(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    torch._check_value(t.dim() == dim, lambda: f"{name} must be {dim}-D {shape}, got shape {tuple(t.shape)}")


def tensors(*named):
    """TypeError unless each (name, value) is a tensor, or each (name, value, None) a tensor or None.

    Run by the public functions before the dispatcher, whose own message for a
    non-tensor is a RuntimeError.
    """
    for entry in named:
        value = entry[1]
        if not isinstance(value, torch.Tensor) and not (len(entry) == 3 and value is None):
            optional = " or None" if len(entry) == 3 else ""
            raise TypeError(f"{entry[0]} must be a torch.Tensor{optional}, got {type(value).__name__}")


def floating(t, name: str):
    torch._check_type(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}",
    )


def like(t, ref, name: str, ref_name: str):
    """t has ref's dtype and device."""
    if t is None:
        return
    torch._check_type(t.dtype == ref.dtype, lambda: f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    torch._check_value(
        t.device == ref.device, lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}"
    )


def same_size(actual, expected, what: str):
    torch._check_value(actual == expected, lambda: f"{what}: expected {expected}, got {actual}")


def indices(t, name: str, ref, ref_name: str):
    torch._check_type(t.dtype == torch.int64, lambda: f"{name} must be int64, got {t.dtype}")
    torch._check_value(t.device == ref.device, lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def index_range(t, bound: int, name: str):
    """IndexError for entries of ``t`` outside [0, bound): always on CPU tensors, on GPU tensors
    when ``SSAE_CHECK_INDICES=1``.

    The entries checked are those the view shows, in its logical order. On GPU tensors the
    check costs a reduction and a device-to-host sync per call, so it is opt-in: without it an
    out-of-range entry reads nothing out of bounds, and its outputs are unspecified (NaN on the
    cuda backend, masked on triton). Indices from ``topk_encode`` are always in range. (The cpu
    backend's C++ kernels check their own indices.)
    """
    if (t.numel() == 0 or torch._subclasses.fake_tensor.is_fake(t)
            or (t.device.type != "cpu" and os.environ.get("SSAE_CHECK_INDICES") != "1")):
        return
    bad = (t < 0) | (t >= bound)
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        raise IndexError(f"{name} must lie in [0, {bound}), got {int(t.reshape(-1)[position])} "
                         f"at flat position {position}")


def integer(v, name: str):
    """A Python int (or a symbolic one while tracing); bool is not a count."""
    if not isinstance(v, (int, torch.SymInt)) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")


def real(v, name: str) -> float:
    """A real number (int, float, numpy float, ...; not bool) as a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    return float(v)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
