"""Every schema of the ``ssae`` torch.library namespace, in one place.

Kernels are not registered per dispatch key by the backends themselves: each
op module registers one kernel for CPU and CUDA tensors that checks the
arguments and asks :mod:`ssae_kernels.backends` which backend serves the call
(by device, ``SSAE_BACKEND`` or :func:`ssae_kernels.use_backend`). That keeps
the choice at run time, so the reference and Triton backends can serve CPU
tensors too, and a compiled graph keeps honouring the override.
"""

import torch

LIBRARY = torch.library.Library("ssae", "DEF")

SCHEMAS = {
    # public ops
    "topk_encode": "(Tensor x, Tensor W_enc, Tensor b_enc, int k, Tensor? b_dec=None) -> (Tensor values, Tensor indices)",
    "sparse_decode": "(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec=None) -> Tensor",
    # sparse backward primitives (see ops/sparse_backward.py)
    "sampled_dot": "(Tensor grad, Tensor indices, Tensor W) -> Tensor",
    "latent_transpose": "(Tensor indices, int num_latents) -> (Tensor offsets, Tensor order)",
    "sparse_transpose_matmul": "(Tensor weights, Tensor rows, Tensor offsets, Tensor order) -> (Tensor out, Tensor colsum)",
    # TERM (see ops/tilted_loss.py)
    "tilted_loss": "(Tensor losses, float t, Tensor? groups, int num_groups, float t_group) -> Tensor",
    "tilted_group_stats": "(Tensor losses, float t, Tensor? groups, int num_groups) -> (Tensor anchor, Tensor log_mean, Tensor count)",
    "row_sq_error": "(Tensor x_hat, Tensor x) -> Tensor",
    "sparse_decode_sq_error": "(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec, Tensor x) -> Tensor",
    "sparse_decode_residual": "(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec, Tensor x, Tensor scale) "
                              "-> (Tensor residual, Tensor grad_values)",
    # subspace projection (see ops/project_subspace.py); the second form overwrites G
    "project_subspace": "(Tensor G, Tensor U, bool complement=False) -> Tensor",
    "project_subspace_": "(Tensor(a!) G, Tensor U, bool complement=False) -> ()",
}

for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_name + _schema)


def register_routed_kernel(op: str, check):
    """Registers the CPU/CUDA kernel of ``ssae::<op>``: ``check(*args)``, then the chosen backend."""
    import inspect

    from .. import backends

    signature = inspect.signature(check)

    def kernel(*args, **kwargs):
        # The dispatcher drops trailing arguments equal to their defaults: restore them.
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check(*bound.args)
        return backends.kernel_for(op, bound.args[0].device)(*bound.args)

    kernel.__name__ = f"{op}_kernel"
    torch.library.register_kernel(f"ssae::{op}", ("cpu", "cuda"), kernel, lib=LIBRARY)
