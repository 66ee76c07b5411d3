"""Builds ssae_kernels._C from csrc/.

The CPU backend (C++ with OpenMP) is always built. Build against the torch you
run with and without build isolation (an isolated build would fetch another,
possibly CUDA, torch into its build environment):

    pip install -e . --no-build-isolation

The CUDA backend (csrc/kernels/cuda, csrc/torch/cuda_ops.cu) is built only when
asked for, never because a GPU happens to be present: set SSAE_BUILD_CUDA=1
(fails if it cannot be built) or TORCH_CUDA_ARCH_LIST (skipped with a message
if torch is a CPU build or nvcc is missing); SSAE_BUILD_CUDA=0 turns it off.
The default architectures are 8.0;9.0+PTX (A100, H100, and PTX for newer GPUs).
"""

import glob
import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "ssae-kernels builds against the installed torch: install torch first, then\n"
        "    pip install -e . --no-build-isolation"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# No -std=: torch's cpp_extension adds the standard its headers need (C++17 up
# to torch 2.13, C++20 from 2.14, whose headers refuse to build as C++17).
# -fno-math-errno: sqrt need not set errno, so loops that take square roots vectorise (nothing reads errno).
cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]


def cuda_blockers():
    """Why the CUDA backend cannot be built here (empty if it can)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None:
        reasons.append("nvcc not found (put it on PATH or set CUDA_HOME)")
    elif not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        reasons.append(f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit root)")
    return reasons


def build_cuda():
    flag = os.environ.get("SSAE_BUILD_CUDA", "").strip()
    if flag == "0":
        return False
    if flag != "1" and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return False
    reasons = cuda_blockers()
    if reasons:
        if flag == "1":
            sys.exit("SSAE_BUILD_CUDA=1 but the CUDA backend cannot be built: " + "; ".join(reasons))
        print("ssae-kernels: TORCH_CUDA_ARCH_LIST is set but the CUDA backend is skipped: " + "; ".join(reasons),
              file=sys.stderr)
        return False
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return True


cpp_sources = sources("csrc/torch/*.cpp") + sources("csrc/kernels/cpu/*.cpp")
if build_cuda():
    extension = CUDAExtension(
        name="ssae_kernels._C",
        sources=cpp_sources + sources("csrc/torch/*.cu") + sources("csrc/kernels/cuda/*.cu"),
        extra_compile_args={
            "cxx": cxx_flags + ["-DSSAE_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-DSSAE_WITH_CUDA"],
        },
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        name="ssae_kernels._C",
        sources=cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
ext_modules = [extension]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
