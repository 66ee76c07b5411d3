"""Triton kernels for the ssae ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

``KERNELS`` maps op name -> launcher with the op's schema signature; the
backend registry serves exactly the ops listed here. Kernels and launchers live
in one module per op (topk_encode, sparse_decode, sparse_backward);
``python -m ssae_kernels.triton.aot_report`` compiles them for sm_80 and sm_90.
"""

import triton  # noqa: F401  (ImportError here tells the backend registry Triton is unavailable)

# Aliased imports: the package attributes topk_encode etc. stay the submodules.
from . import project_subspace as _project
from . import sparse_backward as _backward
from . import sparse_decode as _decode
from . import tilted_loss as _tilted
from . import topk_encode as _encode

KERNELS: dict = {
    "topk_encode": _encode.topk_encode,
    "sparse_decode": _decode.sparse_decode,
    "sampled_dot": _backward.sampled_dot,
    "latent_transpose": _backward.latent_transpose,
    "sparse_transpose_matmul": _backward.sparse_transpose_matmul,
    "project_subspace": _project.project_subspace,
    "project_subspace_": _project.project_subspace_,
    "tilted_group_stats": _tilted.tilted_group_stats,
    "row_sq_error": _tilted.row_sq_error,
    "sparse_decode_sq_error": _tilted.sparse_decode_sq_error,
    "sparse_decode_residual": _tilted.sparse_decode_residual,
}
