"""``python -m ssae_kernels.info``: what was built, which backends can serve calls here (and why not),
and the op x backend x dtype table of the op declarations."""

import platform

import torch

from . import __version__, backends
from .ops.registry import OPS

_SHORT = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def op_table() -> list[str]:
    """One line per op: for each backend with a kernel, the dtypes it serves ("any": not dtype-bound)."""
    lines = ["op x backend x dtype (what each backend serves; reference: every op and dtype):"]
    width = max(map(len, OPS))
    for name, op in OPS.items():
        if op.composite:
            cells = ["built from the ops above, on whichever backend serves them"]
        else:
            cells = [f"{backend}: " + ("any" if dtypes is None else " ".join(_SHORT[d] for d in dtypes))
                     for backend, dtypes in op.dtypes.items()]
        lines.append(f"{name:<{width}}  " + " | ".join(cells))
    return lines


def report() -> str:
    lines = [f"ssae_kernels {__version__}  torch {torch.__version__}  python {platform.python_version()}"]
    cpu = backends.BACKENDS["cpu"]
    if cpu.extension is None:
        lines.append(f"compiled extension: not available ({cpu.load_error})")
    else:
        info = cpu.extension.build_info()
        lines.append("compiled extension: ssae_kernels._C")
        lines.append(f"  compiler {info['compiler']}, OpenMP {'on' if info['openmp'] else 'off'} "
                     f"({info['omp_max_threads']} threads), CUDA kernels {'built' if info['cuda'] else 'not built'}")
        if "cpu_avx512f" in info:
            isa = "AVX-512" if info["cpu_avx512f"] else "AVX2" if info["cpu_avx2"] else "baseline x86-64"
            lines.append(f"  this CPU runs the {isa} kernels")
            gemm = ("dot_tile (AVX-512) up to width 2560 or 64-row blocks, else BLAS" if info["cpu_avx512f"]
                    else "BLAS (torch.mm)")
            lines.append(f"  topk_encode score tiles with float32 accumulation: {gemm}; calls too small "
                         "for threads: dot_tile; float64: BLAS")
            if info.get("cpu_avx512_bf16"):
                lines.append("  AVX512_BF16: float32 encodes screened in bfloat16 (exact results, docs/cpu.md), "
                             "bfloat16 encodes by vdpbf16ps")
            else:
                lines.append("  no AVX512_BF16: no bfloat16 screen, bfloat16 encodes through float32 tiles")
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError as error:
        lines.append(f"triton: not installed ({error})")
    lines.append(f"torch.cuda.is_available(): {torch.cuda.is_available()}")
    for device in ("cpu", "cuda"):
        lines.append(f"backends for {device} tensors (default order: {', '.join(backends.DEFAULT_ORDER[device])}):")
        for name, reasons in backends.availability(device).items():
            lines.append(f"  {name:<10} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    requested = backends.requested_backend()
    if requested:
        lines.append(f"{backends.ENV_VAR}={requested} overrides the default order")
    lines += op_table()
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
