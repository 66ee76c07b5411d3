"""Builds ssae_kernels._C from csrc/.

The CPU backend (C++ with OpenMP) is always built. Build against the torch you
run with and without build isolation (an isolated build would fetch another,
possibly CUDA, torch into its build environment):

    pip install -e . --no-build-isolation
"""

import glob
import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "ssae-kernels builds against the installed torch: install torch first, then\n"
        "    pip install -e . --no-build-isolation"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]

ext_modules = [
    CppExtension(
        name="ssae_kernels._C",
        sources=sources("csrc/torch/*.cpp") + sources("csrc/kernels/cpu/*.cpp"),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
