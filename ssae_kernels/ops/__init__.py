"""The public ops, one module each, declared in the ``ssae`` torch.library (see ``registry``)."""

from .batch_topk import batch_topk_encode
from .jumprelu import JumpReLUCode, jumprelu_encode
from .project_subspace import project_subspace, project_subspace_
from .sparse_adam import sparse_adam_
from .sparse_backward import latent_index
from .sparse_decode import sparse_decode
from .threshold_encode import threshold_encode
from .tilted_loss import StreamingTERM, sparse_decode_mse, tilted_loss, tilted_mse
from .topk_encode import encode_selected, topk_encode

from .. import backends as _backends  # noqa: E402  (loads ssae_kernels._C, whose kernels register themselves)
from .registry import install as _install  # noqa: E402

_install(_backends.BACKENDS["cpu"].extension)

__all__ = ["topk_encode", "sparse_decode", "tilted_loss", "tilted_mse", "sparse_decode_mse", "StreamingTERM",
           "latent_index", "project_subspace", "project_subspace_",
           "sparse_adam_", "encode_selected", "threshold_encode",
           "batch_topk_encode", "jumprelu_encode", "JumpReLUCode"]
