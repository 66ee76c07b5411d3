"""Helpers shared by the Triton launchers: argument checks, launch settings, bf16 rounding."""

from __future__ import annotations

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
