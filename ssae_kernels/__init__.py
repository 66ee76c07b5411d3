"""ssae-kernels: fused sparse-autoencoder ops for PyTorch.

    values, indices = ssae_kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)
    x_hat = ssae_kernels.sparse_decode(values, indices, W_dec, b_dec)

See ``python -m ssae_kernels.info`` for the backends available here.
"""

from . import reference
from .backends import use_backend
from .ops import (StreamingTERM, batch_topk_encode, jumprelu_encode, sparse_decode, sparse_decode_mse,
                  threshold_encode, tilted_loss, tilted_mse, topk_encode)
from .ops import project_subspace, project_subspace_

__version__ = "0.1.0"
__all__ = ["topk_encode", "threshold_encode", "batch_topk_encode", "jumprelu_encode", "sparse_decode", "tilted_loss",
           "tilted_mse", "sparse_decode_mse", "StreamingTERM",
           "use_backend", "reference", "project_subspace", "project_subspace_"]
