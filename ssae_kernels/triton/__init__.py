"""Triton kernels for the ssae ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

``KERNELS`` maps op name -> launcher with the op's schema signature; the
backend registry serves exactly the ops listed here.
"""

import triton  # noqa: F401  (ImportError here tells the backend registry Triton is unavailable)

KERNELS: dict = {}
