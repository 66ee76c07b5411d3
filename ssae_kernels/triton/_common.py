"""Helpers shared by the Triton launchers: argument checks, device guards, strides, launch
settings, bf16 rounding."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_dtype(t: torch.Tensor, name: str):
    if t.dtype not in DTYPES:
        raise TypeError(f"the triton backend supports float32, bfloat16 and float16; {name} has dtype {t.dtype} "
                        "(float64 runs on the cpu and reference backends)")


def check_device(t: torch.Tensor, name: str):
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{name} is a CPU tensor: the triton backend runs CPU tensors only under TRITON_INTERPRET=1")


def device_guard(t: torch.Tensor):
    """A context in which ``t``'s GPU is the current device, for a launch on ``t``.

    Triton launches on the current device (its stream, its compiled binary), so a launch
    on tensors of another GPU than the current one would run on the wrong device without
    it. A no-op for CPU tensors (the interpreter); ``torch.cuda.device`` swaps the device
    index and back, about a microsecond.
    """
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def guarded(launcher):
    """Decorator: runs a launcher under ``device_guard`` of its first (tensor) argument."""

    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        if first.device.type != "cuda":
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(first, *args, **kwargs)

    return run


def weight_strides(t: torch.Tensor) -> tuple[int, int]:
    """(row stride, column stride) through which a kernel reads the weight matrix ``t`` [M, d] in place.

    Weights are never copied: a ``.contiguous()`` copy of a view costs O(M * d) per call
    (8 GB at M = 2^20, d = 4096 in float16). Every layout works: ``W[:, :d]`` of a wider
    matrix, ``W[::2]``, a transposed view (``W_dec.T`` of a tied SAE). A column stride of 1
    (the usual case) is specialised by Triton's JIT into contiguous, vectorised loads.
    """
    return t.stride(0), t.stride(1)


def rows_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, row stride) for an activation or gradient [N, d] read through its row stride.

    Only a layout without unit stride along d is copied (O(N * d), the size of the
    call's own inputs and outputs; never a weight matrix).
    """
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def round_bf16_in_kernel(dtype: torch.dtype) -> bool:
    """The interpreter truncates float32 -> bfloat16; kernels round explicitly there."""
    return interpreting() and dtype == torch.bfloat16


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot is wrong on bfloat16 (it multiplies the raw bits): use float32 there.

    Exact: products of bfloat16 numbers are exact in float32, so only the summation
    order can differ from a bfloat16 tensor-core dot with float32 accumulation.
    """
    return interpreting() and dtype == torch.bfloat16


def fp32_dot_precision() -> str:
    """tl.dot input precision for float32 inputs, following PyTorch's own matmul setting.

    tf32 (10-bit mantissa inputs) when torch.backends.cuda.matmul.allow_tf32 is set,
    else tf32x3 (three tf32 products, about float32 accuracy, still on tensor cores).
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs per row block still exercise the split path


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@triton.jit
def rne_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even), still as float32.

    Used only under the interpreter, whose float32 -> bfloat16 cast truncates; the
    GPU cast rounds to nearest even itself, so the result is the same.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


def rows_strided(t: torch.Tensor) -> bool:
    """Unit column stride and rows apart: the kernels read and write t through its row stride."""
    d, n = t.shape
    return (n <= 1 or t.stride(1) == 1) and (d <= 1 or t.stride(0) >= max(n, 1))


def row_stride(t: torch.Tensor) -> int:
    """The row stride of a rows_strided t (any value where there is one row)."""
    return max(t.shape[1], 1) if t.shape[0] <= 1 else t.stride(0)
