"""ssae_kernels.topk_encode vs the dense PyTorch encode: forward (no grad) and forward + backward.

Baseline: ``torch.topk(F.linear(x - b_dec, W_enc, b_enc), k)`` with ReLU on the values, which stores the
[N, M] pre-activations (and keeps them for the backward pass). Forward + backward: gradients of a
random [N, k] upstream gradient of the values into W_enc, b_enc and b_dec (x needs none, as in
training). The ``b_enc=None`` cases are the bias-free encode as retrieval uses it (no b_dec either).

    python benchmarks/ops/bench_topk_encode.py [--quick] [--threads 2] [--repeats 5] [--device cpu]
                                               [--out benchmarks/results/ops]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODULE = "topk_encode"
NOTES = [
    "Baseline: the dense encode, `torch.topk(F.linear(x - b_dec, W_enc, b_enc), k)` then ReLU on the values "
    "(it stores the [N, M] pre-activations). `forward+backward`: `values.backward(g)` for a random [N, k] g, "
    "gradients into W_enc, b_enc, b_dec (none into x). `max rel diff` compares the values, and the gradients "
    "too where all indices agree; `index_agreement`: the fraction of equal indices (pre-activations closer than "
    "float32 rounding can come out in either order, or either be the k-th). `b_enc=None`: no encoder "
    "or decoder bias, as retrieval calls it.",
    "`forward vs GEMM floor`: our forward encode without biases against one dense GEMM `x @ W_enc.T` of the "
    "same dtype alone (the hardware floor: no top-k); `max rel diff` compares our values with the GEMM's "
    "scores at our indices.",
    "`forward, bf16 screen` (CPU, float32, where the CPU has AVX512_BF16 and the shape screens): our encode "
    "against itself with the bfloat16 screen switched off (`ssae_kernels._C.set_bf16_dot(False)`), i.e. "
    "the float32 encode's own GEMM and selection; the outputs must be identical (max rel diff 0, index "
    "agreement 1). `forward, vdpbf16ps` (CPU, bfloat16, AVX512_BF16): the bfloat16 encode multiplying the "
    "stored values with vdpbf16ps against the same encode converting W_enc tiles to float32 (switched off "
    "the same way).",
]


def compare(ours, base):
    """max rel diff of the values (and of the gradients when every index agrees), and the index agreement.

    Pre-activations closer than rounding can come out in either order (or, at the k-th place, either one
    selected): the values then still agree to rounding, the indices and the gradients they route do not.
    """
    (values, indices, *rest), (base_values, base_indices, *base_rest) = ours, base
    agreement = float((indices == base_indices).double().mean())
    diff = common.max_rel_diff(values, base_values)
    if agreement == 1.0:
        diff = max(diff, common.max_rel_diff(rest, base_rest))
    return diff, {"index_agreement": agreement}


def build_cases(shape, device, dtype):
    import torch
    import torch.nn.functional as F

    import ssae_kernels

    t = common.sae_inputs(shape, device, dtype)
    x, k = t["x"], shape["k"]
    grad_values = torch.randn(shape["N"], k, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def dense(x, W_enc, b_enc, b_dec):
        top = torch.topk(F.linear(x if b_dec is None else x - b_dec, W_enc, b_enc), k)
        return top.values.relu(), top.indices

    def forward(fn, params):
        return common.no_grad_call(fn, x, *params)

    def step(fn, params):
        return common.backward_call(fn, (x, *params), params, grad_values)

    def ours(x, W_enc, b_enc, b_dec):
        return ssae_kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)

    with_bias = (t["W_enc"], t["b_enc"], t["b_dec"])
    bias_free = (t["W_enc"], None, None)
    desc = "topk(F.linear(x - b_dec, W_enc, b_enc), k) + relu"
    desc_free = "topk(F.linear(x, W_enc), k) + relu"
    cases = [
        common.Case(MODULE, "forward", forward(ours, with_bias), forward(dense, with_bias), desc, compare=compare),
        common.Case(MODULE, "forward+backward", step(ours, common.leaves(*with_bias)),
                    step(dense, common.leaves(*with_bias)), desc, compare=compare),
    ]
    def against_floor(ours, floor):
        # our values are the ReLU'd scores the GEMM holds at our indices
        (values, indices), (scores,) = ours, floor
        return common.max_rel_diff(values, scores.gather(1, indices).relu()), {}

    cases.append(common.Case(MODULE, "forward vs GEMM floor", forward(ours, bias_free),
                             forward(lambda x, W, *_: (x @ W.T,), bias_free), "x @ W_enc.T",
                             compare=against_floor))
    screen = _screen_case(shape, device, dtype, forward(ours, with_bias), compare)
    if screen is not None:
        cases.append(screen)
    W_ours, W_dense = common.leaves(t["W_enc"]), common.leaves(t["W_enc"])
    cases += [
        common.Case(MODULE, "forward, b_enc=None", forward(ours, bias_free), forward(dense, bias_free), desc_free,
                    compare=compare),
        common.Case(MODULE, "forward+backward, b_enc=None", step(ours, (*W_ours, None, None)),
                    step(dense, (*W_dense, None, None)), desc_free, compare=compare),
    ]
    return cases


def _screen_case(shape, device, dtype, encode, compare):
    """Our CPU encode with its vdpbf16ps path (float32: the bfloat16 screen; bfloat16: the stored values
    multiplied directly) against the same encode without it (None where there is no such path: another
    device or dtype, a CPU without AVX512_BF16, or a float32 shape the encode does not screen)."""
    import torch

    from ssae_kernels import _C

    if device.type != "cpu" or not _C.build_info().get("cpu_avx512_bf16"):
        return None
    if dtype == torch.bfloat16:
        name, desc = "forward, vdpbf16ps", "ours, bfloat16 converted to float32 tiles (set_bf16_dot(False))"
    elif dtype == torch.float32 and _C.topk_encode_screens_cpu(shape["N"], shape["M"], shape["d"], shape["k"]):
        name, desc = "forward, bf16 screen", "ours, float32 GEMM (set_bf16_dot(False))"
    else:
        return None

    def with_screen(on):
        def call():
            _C.set_bf16_dot(on)
            try:
                return encode()
            finally:
                _C.set_bf16_dot(True)
        return call

    return common.Case(MODULE, name, with_screen(True), with_screen(False), desc, compare=compare)


def main(argv=None):
    return common.main(MODULE, __doc__, build_cases, NOTES, argv)


if __name__ == "__main__":
    main()
