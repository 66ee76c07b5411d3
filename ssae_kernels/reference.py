"""The pure-PyTorch definition of every op: the specification the kernels are tested against.

Each op's definition lives in its op module, beside its schema and autograd;
this module gathers them by op name (``reference.topk_encode``, ``reference.sparse_decode``,
``reference.tilted_group_stats``, ...). Written for clarity, not speed: they
materialise the dense N x M pre-activations and the N x k x d gathered rows.
Accumulation is float32 for float32/bfloat16/float16 inputs and float64 for
float64, as in every backend. Gradients come from PyTorch autograd through these formulas.
"""

from .ops.batch_topk import batch_topk_reference as batch_topk_encode  # noqa: F401  (a composite, not a registered op)
from .ops.jumprelu import jumprelu_reference as jumprelu_encode  # noqa: F401  (a composite)
from .ops.checks import accumulation_dtype  # noqa: F401
from .ops.registry import OPS
from .ops.topk_encode import pre_activations  # noqa: F401


def __getattr__(name: str):
    if name in OPS:
        return OPS[name].reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *OPS])
