"""The public ops (one module each) and the ``ssae`` torch.library they are registered in."""

from . import library  # noqa: F401  (defines the schemas first)
from .project_subspace import project_subspace, project_subspace_
from .sparse_backward import latent_index
from .sparse_decode import sparse_decode
from .tilted_loss import StreamingTERM, sparse_decode_mse, tilted_loss, tilted_mse
from .topk_encode import topk_encode

__all__ = ["topk_encode", "sparse_decode", "tilted_loss", "tilted_mse", "sparse_decode_mse", "StreamingTERM",
           "latent_index", "project_subspace", "project_subspace_"]
