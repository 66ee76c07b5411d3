"""Argument checks shared by the op kernels and their fake (meta) kernels.

They use ``torch._check_*`` so that the same code raises ``ValueError`` /
``TypeError`` eagerly and records symbolic-shape guards under torch.compile.
"""

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tensor(t, name: str, dim: int, shape: str, *, optional: bool = False):
    if t is None and optional:
        return
    torch._check_type(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    torch._check_value(t.dim() == dim, lambda: f"{name} must be {dim}-D {shape}, got shape {tuple(t.shape)}")


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
    """IndexError for entries of a GPU tensor outside [0, bound), when ``SSAE_CHECK_INDICES=1``.

    On CPU tensors every backend checks inside its kernel (no sync to pay). On GPU tensors the
    check costs a reduction and a device-to-host sync per call, so it is opt-in: without it an
    out-of-range entry reads nothing out of bounds, and its outputs are unspecified (NaN on the
    cuda backend, masked on triton). Indices from ``topk_encode`` are always in range.
    """
    if (t.device.type == "cpu" or t.numel() == 0 or os.environ.get("SSAE_CHECK_INDICES") != "1"
            or torch._subclasses.fake_tensor.is_fake(t)):
        return
    bad = (t < 0) | (t >= bound)
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        raise IndexError(f"{name} must lie in [0, {bound}), got {int(t.reshape(-1)[position])} "
                         f"at flat position {position}")


def integer(v, name: str):
    torch._check_type(
        isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool),
        lambda: f"{name} must be an int, got {type(v).__name__}",
    )
