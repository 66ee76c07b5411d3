"""Triton kernels for the ssae ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

One module per op module of ``ssae_kernels.ops``, holding the kernels and, for
each op, a launcher of the op's name with the op's schema signature: the backend
registry finds ``triton.<module>.<op>`` from the op's declaration.
``python -m ssae_kernels.triton.aot_report`` compiles the kernels for sm_80 and sm_90.
"""

import triton  # noqa: F401  (ImportError here tells the backend registry Triton is unavailable)
