"""Triton kernels for the ssae ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

``KERNELS`` maps op name -> launcher with the op's schema signature; the
backend registry serves exactly the ops listed here. Kernels and launchers live
in one module per op (topk_encode, sparse_decode, sparse_backward);
``python -m ssae_kernels.triton.aot_report`` compiles them for sm_80 and sm_90.
"""

import triton  # noqa: F401  (ImportError here tells the backend registry Triton is unavailable)

from .sparse_backward import latent_transpose, sampled_dot, sparse_transpose_matmul
from .sparse_decode import sparse_decode
from .topk_encode import topk_encode

KERNELS: dict = {
    "topk_encode": topk_encode,
    "sparse_decode": sparse_decode,
    "sampled_dot": sampled_dot,
    "latent_transpose": latent_transpose,
    "sparse_transpose_matmul": sparse_transpose_matmul,
}
