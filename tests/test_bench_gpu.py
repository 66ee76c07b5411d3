"""benchmarks/bench_gpu.py without a GPU: its arguments, the --model output, the backend listing,
and one run() of a tiny shape on CPU tensors (Triton interpreter, CUDA timers replaced) that checks
every GPU backend gets a row per op: timed, or skipped with the reasons ssae_kernels.backends gives."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ssae_kernels import backends

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_gpu  # noqa: E402


def _reasons(name):
    """The backend's reasons over the step's ops, straight from the registry."""
    found = []
    for op in bench_gpu.STEP_OPS:
        found += [r for r in backends.BACKENDS[name].not_supported_reasons(op, torch.device("cuda")) if r not in found]
    return found


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.main(["--repeats", "4"])
    assert exit_.value.code == 2 and "--repeats must be at least 5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.main(["--backends", "cpu"])
    assert exit_.value.code == 2 and "invalid choice: 'cpu'" in capsys.readouterr().err


def test_model_needs_no_gpu(capsys):
    assert bench_gpu.main(["--model", "--gpu", "A100", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    N, d, M, k = bench_gpu.SHAPES["ref"]
    assert f"model, A100, ref: N={N} d={d} M={M} k={k}, 4-byte inputs" in out
    floor = next(line for line in out.splitlines() if line.startswith("dense GEMM floor"))
    assert f"{2 * N * M * d / 1e9:.2f}" in floor.split()  # GFLOP of x @ W_enc.T
    for kernel in ("encode (fused GEMM + top-k)", "sparse_decode", "sampled_dot", "latent_transpose",
                   "sparse_transpose_matmul"):
        assert any(line.startswith(kernel) for line in out.splitlines()), kernel


@pytest.mark.parametrize("chosen", [None, ["cuda"]])
def test_without_gpu_lists_backends_and_exits_0(monkeypatch, capsys, chosen):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main() must leave it alone here; restored anyway
    assert bench_gpu.main([] if chosen is None else ["--backends", *chosen]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("backend ")]
    names = chosen or list(bench_gpu.GPU_BACKENDS)
    assert [line.split(":")[0] for line in listed] == [f"backend {name}" for name in names]
    for name, line in zip(names, listed):
        reasons = _reasons(name)
        if reasons:
            assert "skipped" in line and all(r in line for r in reasons), line
        else:
            assert line == f"backend {name}: available"
    assert "no CUDA device here" in out


def test_run_gives_every_backend_a_row(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(bench_gpu.SHAPES, "tiny", (20, 16, 64, 4))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "no GPU (test)")
    calls = []

    def fake_time(fn, repeats):
        calls.append(fn)
        fn()
        return [1e-3] * repeats

    monkeypatch.setattr(bench_gpu, "cuda_time", fake_time)
    monkeypatch.setattr(bench_gpu, "peak_memory", lambda fn: 0)
    out_json = tmp_path / "gpu.jsonl"
    results = bench_gpu.run("tiny", torch.float32, 5, str(out_json), device="cpu")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert not any("failed:" in line and " triton " in line for line in lines), out
    timed = {(r["op"], r["provider"]) for r in results}
    for op in bench_gpu.STEP_OPS + ("training_step",):
        assert (op, "triton") in timed and ((op, "dense") in timed or (op, "torch") in timed), op
        cuda_rows = [line for line in lines if line.startswith(f"{op:<24} cuda ")]
        assert len(cuda_rows) == 1, out
        if _reasons("cuda"):  # not built here: skipped with the registry's reasons, not hidden
            assert "skipped:" in cuda_rows[0] and "built without CUDA" in cuda_rows[0]
    assert ("gemm_floor", "torch") in timed
    step = next(line for line in lines if line.startswith(f"{'training_step':<24} triton"))
    assert "1.00x floor" in step  # the fake timer gives every case the same time
    assert all(r["vs_dense"] == 1.0 for r in results if r["provider"] == "dense")
    written = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [(r["op"], r["provider"]) for r in written] == [(r["op"], r["provider"]) for r in results]
    assert len(calls) == len(results)
