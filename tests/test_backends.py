"""Which backend serves a call: the default path, overrides, per-call support, and the op registry."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import ssae_kernels
from ssae_kernels import backends
from ssae_kernels.ops.registry import OPS


def small_args():
    return torch.randn(6, 5), torch.randn(20, 5), torch.randn(20), 3


@pytest.fixture
def reference_calls(monkeypatch):
    """The names of the ops the reference backend serves while the test runs."""
    calls = []
    real = backends.ReferenceBackend.kernel

    def spy(self, op):
        kernel = real(self, op)

        def counted(*args):
            calls.append(backends._op(op).name)
            return kernel(*args)

        return counted

    monkeypatch.setattr(backends.ReferenceBackend, "kernel", spy)
    return calls


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def run_python(code: str, **env) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          check=True).stdout


def test_cpu_tensors_default_to_the_cpu_backend(reference_calls):
    args = small_args()
    assert backends.select("topk_encode", (args[0], *args[1:])).name == "cpu"
    ssae_kernels.topk_encode(*args)
    assert reference_calls == []


def test_context_manager_selects_a_backend(reference_calls):
    with ssae_kernels.use_backend("reference"):
        ssae_kernels.topk_encode(*small_args())
    assert reference_calls == ["topk_encode"]
    ssae_kernels.topk_encode(*small_args())  # restored afterwards
    assert reference_calls == ["topk_encode"]


def test_nested_context_managers_restore_the_outer_choice(reference_calls):
    with ssae_kernels.use_backend("reference"):
        with ssae_kernels.use_backend("cpu"):
            ssae_kernels.topk_encode(*small_args())
        assert reference_calls == []
        ssae_kernels.topk_encode(*small_args())
    assert reference_calls == ["topk_encode"]


def test_env_var_selects_a_backend(monkeypatch, reference_calls):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    ssae_kernels.topk_encode(*small_args())
    assert reference_calls == ["topk_encode"]


def test_env_var_spelled_loosely_still_reaches_the_cpu_kernels(monkeypatch, reference_calls):
    # The C++ kernels hand " CPU" to the router, which reads it as cpu and hands the call back.
    monkeypatch.setenv(backends.ENV_VAR, " CPU")
    values, indices = ssae_kernels.topk_encode(*small_args())
    assert reference_calls == [] and indices.shape == (6, 3)


def test_context_manager_wins_over_env_var(monkeypatch, reference_calls):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    with ssae_kernels.use_backend("cpu"):
        ssae_kernels.topk_encode(*small_args())
    assert reference_calls == []


def test_override_applies_to_backward_too(reference_calls):
    x, W, b, k = small_args()
    W.requires_grad_(True)
    with ssae_kernels.use_backend("reference"):
        values, _ = ssae_kernels.topk_encode(x, W, b, k)
        values.sum().backward()
    assert reference_calls[0] == "topk_encode"
    assert "sparse_transpose_matmul" in reference_calls and "latent_transpose" in reference_calls


def test_override_holds_inside_a_compiled_graph(reference_calls):
    torch._dynamo.reset()
    x, W, b, k = small_args()
    compiled = torch.compile(lambda x, W, b: ssae_kernels.topk_encode(x, W, b, k), fullgraph=True)
    expected = ssae_kernels.topk_encode(x, W, b, k)
    assert reference_calls == []
    with ssae_kernels.use_backend("reference"):
        values, indices = compiled(x, W, b)
    assert reference_calls == ["topk_encode"]
    torch.testing.assert_close(values, expected[0])
    assert torch.equal(indices, expected[1])


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with ssae_kernels.use_backend("fast"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SSAE_BACKEND='fast' is not a known backend"):
        ssae_kernels.topk_encode(*small_args())


def test_requested_backend_that_cannot_serve_says_why():
    with ssae_kernels.use_backend("cuda"), pytest.raises(
            RuntimeError, match=r"backend 'cuda' cannot run topk_encode on cpu \(float32\): serves cuda tensors"):
        ssae_kernels.topk_encode(*small_args())


def test_support_is_decided_by_dtype():
    triton = backends.BACKENDS["triton"]
    cuda = torch.device("cuda")
    assert any("does not support float64 for sparse_decode" in r
               for r in triton.not_supported_reasons("sparse_decode", cuda, torch.float64))
    assert not any("does not support" in r for r in triton.not_supported_reasons("sparse_decode", cuda, torch.bfloat16))
    # triton's TERM statistics work in float64 themselves
    assert not any("does not support" in r
                   for r in triton.not_supported_reasons("tilted_group_stats", cuda, torch.float64))


def test_float64_cuda_calls_fall_to_the_reference_backend():
    class CudaFloat64:  # select reads only the leading tensor's device and dtype
        device, dtype = torch.device("cuda"), torch.float64

    with pytest.warns(UserWarning, match="falls back to the dense reference backend"):
        assert backends.select("sparse_decode", (CudaFloat64(),)).name == "reference"


def test_support_is_decided_by_size():
    class Big:  # W_enc with more latents than the cpu kernel's int32 selection state holds
        shape = (2**31, 4)

    reasons = backends.BACKENDS["cpu"].not_supported_reasons("topk_encode", torch.device("cpu"), torch.float32,
                                                             (torch.zeros(2, 4), Big(), None, 1, None))
    assert reasons == [f"W_enc has {2**31} latents; the cpu backend takes at most 2^31 - 2"]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = backends.BACKENDS["triton"].not_supported_reasons("topk_encode", torch.device("cpu"))
    assert any("TRITON_INTERPRET=1" in r for r in reasons)


def test_no_backend_lists_every_reason():
    x = torch.empty(3, 4, device="meta")
    with pytest.raises(RuntimeError, match=r"no backend can run topk_encode on meta \(float32\): "
                                           "reference: serves cpu, cuda tensors, not meta"):
        backends.select("topk_encode", (x,))


def test_every_op_is_declared_once_with_everything_derived_from_it():
    assert {"topk_encode", "sparse_decode", "sampled_dot", "latent_transpose", "sparse_transpose_matmul",
            "tilted_group_stats", "tilted_loss", "row_sq_error", "sparse_decode_sq_error",
            "sparse_decode_residual", "project_subspace", "project_subspace_", "sparse_adam_",
            "encode_selected", "threshold_encode"} == set(OPS)
    for name, op in OPS.items():
        assert getattr(ssae_kernels.reference, name) is op.reference
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ssae::{name}", "Meta"), name  # the fake kernel
        if op.composite:
            continue
        # the cpu backend's C++ kernel sits under the CPU key; the router under CUDA (no CUDA build here)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ssae::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ssae::{name}", "CUDA"), name
        if "triton" in op.dtypes:
            module = importlib.import_module(f"ssae_kernels.triton.{op.module}")
            assert callable(getattr(module, name)), f"ssae_kernels.triton.{op.module} lacks {name}"


def test_a_missing_extension_leaves_every_op_on_the_reference_backend():
    # The compiled module cannot be imported: the router serves CPU calls, with one warning.
    code = """
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ssae_kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, ssae_kernels
from ssae_kernels import backends
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    v, i = ssae_kernels.topk_encode(torch.randn(3, 4), torch.randn(9, 4), None, 2)
print(backends.BACKENDS["cpu"].unavailable())
print(tuple(i.shape), [str(w.message)[:80] for w in caught])
"""
    out = run_python(code).splitlines()
    assert "ssae_kernels._C is not available (ImportError: blocked for the test)" in out[0]
    assert out[1].startswith("(3, 2)") and "falls back to the dense reference backend" in out[1]


def test_info_reports_backends_and_the_op_table():
    out = subprocess.run([sys.executable, "-m", "ssae_kernels.info"], capture_output=True, text=True, check=True).stdout
    assert "backends for cpu tensors" in out and "cpu        available" in out
    table = out[out.index("op x backend x dtype"):]
    encode_row = next(line for line in table.splitlines() if line.startswith("topk_encode "))
    assert "cpu: f32 f64 bf16 f16" in encode_row and "triton: f32 bf16 f16" in encode_row


def test_cpu_calls_import_neither_triton_nor_dynamo():
    # A fresh interpreter without TRITON_INTERPRET or a GPU: import, a call of every public op family,
    # and a backward pass import neither Triton nor torch._dynamo (torch's import does not either).
    code = """
import sys, torch, ssae_kernels as sk
assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules
x, W = torch.randn(3, 4), torch.randn(9, 4, requires_grad=True)
v, i = sk.topk_encode(x, W, torch.zeros(9), 2)
loss = sk.sparse_decode_mse(v, i, W, None, x, t=1.0) + sk.tilted_loss(v.sum(1), 0.5)
loss = loss + sk.project_subspace(W, torch.linalg.qr(torch.randn(9, 2)).Q).sum()
loss.backward()
print("triton" in sys.modules, "torch._dynamo" in sys.modules, tuple(i.shape))
"""
    assert run_python(code).split() == ["False", "False", "(3,", "2)"]


def test_import_and_first_call_stay_small():
    # The cold-start memory bar (<= 20 MB for the import and first call together);
    # the time is measured by benchmarks/bench_overhead.py, not asserted here.
    code = """
import resource, torch
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
x, W = torch.randn(4, 64), torch.randn(256, 64)
before = rss_mb()
import ssae_kernels
ssae_kernels.topk_encode(x, W, None, 8)
print(rss_mb() - before)
"""
    assert float(run_python(code)) <= 20.0
