import subprocess
import sys

import pytest
import torch

import ssae_kernels
from ssae_kernels import backends, reference


def small_args():
    return torch.randn(6, 5), torch.randn(20, 5), torch.randn(20), 3


@pytest.fixture
def spy_reference(monkeypatch):
    calls = []
    real = reference.topk_encode

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(reference, "topk_encode", spy)
    return calls


def test_cpu_tensors_default_to_the_cpu_backend(monkeypatch, spy_reference):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select("topk_encode", torch.device("cpu")).name == "cpu"
    ssae_kernels.topk_encode(*small_args())
    assert spy_reference == []


def test_context_manager_selects_a_backend(spy_reference):
    with ssae_kernels.use_backend("reference"):
        ssae_kernels.topk_encode(*small_args())
    assert len(spy_reference) == 1
    ssae_kernels.topk_encode(*small_args())  # restored afterwards
    assert len(spy_reference) == 1


def test_env_var_selects_a_backend(monkeypatch, spy_reference):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    ssae_kernels.topk_encode(*small_args())
    assert len(spy_reference) == 1


def test_context_manager_wins_over_env_var(monkeypatch, spy_reference):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    with ssae_kernels.use_backend("cpu"):
        ssae_kernels.topk_encode(*small_args())
    assert spy_reference == []


def test_override_applies_to_backward_too():
    x, W, b, k = small_args()
    W.requires_grad_(True)
    with ssae_kernels.use_backend("reference"), torch.profiler.profile() as prof:
        values, _ = ssae_kernels.topk_encode(x, W, b, k)
        values.sum().backward()
    keys = {e.key for e in prof.key_averages()}
    assert "ssae::sparse_transpose_matmul" in keys
    assert "aten::index_add_" in keys  # the reference definition ran, not the C++ kernel


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with ssae_kernels.use_backend("fast"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SSAE_BACKEND='fast' is not a known backend"):
        ssae_kernels.topk_encode(*small_args())


def test_requested_backend_that_cannot_serve_says_why():
    with ssae_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run topk_encode on cpu: serves cuda tensors"):
        ssae_kernels.topk_encode(*small_args())


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = backends.BACKENDS["triton"].not_supported_reasons("topk_encode", torch.device("cpu"))
    assert any("TRITON_INTERPRET=1" in r for r in reasons) or any("cannot import" in r for r in reasons)


def test_missing_extension_falls_back_to_reference_with_a_warning(monkeypatch, spy_reference):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends.BACKENDS["cpu"], "extension", None)
    monkeypatch.setattr(backends.BACKENDS["cpu"], "load_error", "ImportError: test")
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with pytest.warns(UserWarning, match="falls back to the dense reference backend.*ImportError: test"):
        ssae_kernels.topk_encode(*small_args())
    assert len(spy_reference) == 1


def test_no_backend_lists_every_reason():
    with pytest.raises(RuntimeError, match="no backend can run topk_encode on meta: reference: serves cpu, cuda tensors, not meta"):
        backends.select("topk_encode", torch.device("meta"))


def test_info_reports_backends():
    out = subprocess.run([sys.executable, "-m", "ssae_kernels.info"], capture_output=True, text=True, check=True).stdout
    assert "backends for cpu tensors" in out and "cpu        available" in out


def test_import_on_cpu_machine_with_triton_installed():
    # A fresh interpreter without TRITON_INTERPRET or a GPU: import and a call work, and our
    # Triton kernels are not even imported (torch itself may import triton).
    code = ("import sys, ssae_kernels, torch; "
            "x = torch.randn(3, 4); v, i = ssae_kernels.topk_encode(x, torch.randn(9, 4), torch.zeros(9), 2); "
            "print('ssae_kernels.triton' in sys.modules, tuple(i.shape))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "(3,", "2)"]
