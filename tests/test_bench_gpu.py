"""benchmarks/bench_gpu.py and benchmarks/gpu_check.py (`make gpu-check`) without a GPU.

bench_gpu: its arguments, the --model output, the backend listing, one run() of a tiny shape on CPU
tensors (Triton interpreter, CUDA timers replaced) that checks every GPU backend gets a row per op
(timed, or skipped with the reasons ssae_kernels.backends gives), the encode grid's definition, its
join with gpu_model.json's predictions, and one run_grid() of a tiny shape the same way.
gpu_check: the one-line exit without a GPU (before importing torch or building), its arguments,
stage time limits, and the reading of pytest's report."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssae_kernels import backends

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_gpu  # noqa: E402
import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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
    for op in bench_gpu.STEP_OPS + bench_gpu.OTHER_OPS + ("training_step",):
        assert (op, "triton") in timed and ((op, "dense") in timed or (op, "torch") in timed), op
        cuda_rows = [line for line in lines if line.startswith(f"{op:<24} cuda ")]
        assert len(cuda_rows) == 1, out
        if _reasons("cuda"):  # not built here: skipped with the registry's reasons, not hidden
            assert "skipped:" in cuda_rows[0] and "built without CUDA" in cuda_rows[0]
    assert ("gemm_floor", "torch") in timed
    assert {("sparse_adam_", p) for p in ("triton", "triton bf16", "dense")} <= timed
    step = next(line for line in lines if line.startswith(f"{'training_step':<24} triton"))
    assert "1.00x floor" in step  # the fake timer gives every case the same time
    assert all(r["vs_dense"] == 1.0 for r in results if r["provider"] == "dense")
    written = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [(r["op"], r["provider"]) for r in written] == [(r["op"], r["provider"]) for r in results]
    assert len(calls) == len(results)


# ---- the encode grid ---------------------------------------------------------------------------


def test_grid_is_the_model_grid_of_issue_13():
    shapes = bench_gpu.grid_shapes()
    assert sorted(shapes) == sorted((4096, d, M, k) for d in (576, 2304, 4096) for M in (65536, 1048576)
                                    for k in (32, 128))
    assert len(set(shapes)) == 12
    # shapes sharing weights (N, d, M) are adjacent: run_grid makes each weight matrix once
    weights = [s[:3] for s in shapes]
    assert len([w for i, w in enumerate(weights) if i == 0 or w != weights[i - 1]]) == len(set(weights))
    assert bench_gpu.PEAK_BF16 == 989e12
    assert {"triton_encode", "cuda_encode", "gemm_floor"} <= set(bench_gpu.GRID_KERNELS)
    assert bench_gpu.model_gpu("NVIDIA H200") == "H200" and bench_gpu.model_gpu("NVIDIA H100 80GB HBM3") == "H100"
    assert bench_gpu.model_gpu("NVIDIA A100-SXM4-80GB") == "A100"


def _measured(kernel, d, M, k, fraction, N=4096):
    return dict(kernel=kernel, N=N, d=d, M=M, k=k, status="ok", fraction_of_peak=fraction, note="")


def test_predictions_join_on_kernel_and_shape(tmp_path):
    model = tmp_path / "gpu_model.json"
    model.write_text(json.dumps([
        dict(kernel="triton_encode", N=4096, d=2304, M=65536, k=32, predicted_fraction_of_peak=0.72),
        dict(kernel="triton_encode", N=4096, d=2304, M=65536, k=128, predicted_fraction_of_peak=0.55),
        dict(kernel="cuda_encode", N=4096, d=2304, M=65536, k=32, predicted_fraction_of_peak=0.40),
        dict(kernel="triton_encode", N=4096, d=576, M=1048576, k=32, predicted_fraction_of_peak=0.30),
    ]))
    measured = [
        _measured("triton_encode", 2304, 65536, 32, 0.36),
        _measured("triton_encode", 2304, 65536, 128, 0.55),
        _measured("cuda_encode", 2304, 65536, 32, 0.50),
        _measured("triton_encode", 576, 65536, 32, 0.20),        # no prediction for this M
        _measured("gemm_floor", 2304, 65536, 32, 0.80),          # the model predicts no floor
        dict(kernel="cuda_encode", N=4096, d=576, M=1048576, k=32, status="skipped", note="skipped: memory"),
    ]
    joined = bench_gpu.join_predictions(measured, bench_gpu.load_predictions(model))
    got = [(r["kernel"], r["d"], r["M"], r["k"], r["predicted_fraction_of_peak"], r["measured_over_predicted"])
           for r in joined]
    assert got == [
        ("triton_encode", 2304, 65536, 32, 0.72, pytest.approx(0.5)),
        ("triton_encode", 2304, 65536, 128, 0.55, pytest.approx(1.0)),
        ("cuda_encode", 2304, 65536, 32, 0.40, pytest.approx(1.25)),
        ("triton_encode", 576, 65536, 32, None, None),
        ("gemm_floor", 2304, 65536, 32, None, None),
        ("cuda_encode", 576, 1048576, 32, None, None),
    ]
    assert all(j["status"] == m["status"] for j, m in zip(joined, measured))  # measured rows kept as they were
    # a file holding {"rows": [...]} reads the same; no file: no predictions
    model.write_text(json.dumps({"rows": json.loads(model.read_text())}))
    assert len(bench_gpu.load_predictions(model)) == 4
    assert bench_gpu.load_predictions(tmp_path / "missing.json") == []


def test_grid_arguments_are_checked(capsys, monkeypatch):
    monkeypatch.delenv("SSAE_GPU_RESULTS", raising=False)
    args = bench_gpu.parse_args(["--grid", "--shape"])
    assert args.grid and args.shape == [] and Path(args.out) == ROOT / "benchmarks" / "results" / "gpu"
    assert (args.grid_d, args.grid_M, args.grid_k, args.grid_N) == ([576, 2304, 4096], [65536, 1048576], [32, 128], [4096])
    monkeypatch.setenv("SSAE_GPU_RESULTS", "/somewhere/gpu")
    assert bench_gpu.parse_args(["--grid", "--grid-M", "65536", "--grid-k", "32"]).out == "/somewhere/gpu"
    for bad, message in ((["--shape"], "nothing to run"), (["--grid", "--grid-d", "0"], "must be a positive integer")):
        with pytest.raises(SystemExit) as exit_:
            bench_gpu.parse_args(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_without_gpu_nothing_is_written(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--grid", "--out", str(tmp_path / "gpu")]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert not (tmp_path / "gpu").exists()  # results come only from a GPU


def test_run_grid_rows_times_and_predictions(monkeypatch, capsys, tmp_path):
    # A tiny shape on CPU tensors (the Triton interpreter); the CUDA timer replaced by fixed times:
    # the GEMM floor 1 ms, every other kernel 2 ms.
    N, d, M, k = 20, 16, 64, 4
    model = tmp_path / "gpu_model.json"
    model.write_text(json.dumps([dict(kernel="triton_encode", N=N, d=d, M=M, k=k, predicted_fraction_of_peak=1e-9)]))

    def fake_rounds(fns, repeats, warmup=2):
        for fn in fns.values():
            fn()
        return {name: [1e-3 if name == "gemm_floor" else 2e-3] * repeats for name in fns}, {}

    monkeypatch.setattr(bench_gpu, "time_rounds", fake_rounds)
    saved = []
    rows = bench_gpu.run_grid([(N, d, M, k)], 5, model, device="cpu", on_progress=lambda r: saved.append(list(r)))
    assert [r["kernel"] for r in rows] == list(bench_gpu.GRID_KERNELS) and saved == [rows]
    by = {r["kernel"]: r for r in rows}
    triton = by["triton_encode"]
    assert triton["status"] == "ok", triton
    assert triton["fraction_of_peak"] == pytest.approx(2 * N * M * d / 2e-3 / bench_gpu.PEAK_BF16)
    assert triton["vs_gemm_floor"] == pytest.approx(2.0) and by["gemm_floor"]["vs_gemm_floor"] == pytest.approx(1.0)
    assert triton["predicted_fraction_of_peak"] == 1e-9
    assert triton["measured_over_predicted"] == pytest.approx(triton["fraction_of_peak"] / 1e-9)
    assert triton["max_value_error"] < bench_gpu.VALUE_TOLERANCE and triton["note"] == ""  # same values as torch.topk
    assert by["torch_topk_mm"]["status"] == "ok" and by["torch_topk_mm"]["max_value_error"] == 0.0
    cuda_reasons = bench_gpu.backend_reasons("cuda", ("topk_encode",))
    if cuda_reasons:
        assert by["cuda_encode"]["status"] == "skipped" and all(r in by["cuda_encode"]["note"] for r in cuda_reasons)
    if by["sparsify_encode"]["status"] != "ok":
        assert by["sparsify_encode"]["note"].startswith("skipped: sparsify not importable")

    meta = dict(device="test CPU", date="today", torch=torch.__version__, cuda=None, triton="x", extension="cpu only",
                sparsify=None, commit=None, repeats=5, peak_flops=bench_gpu.PEAK_BF16)
    bench_gpu.write_results(tmp_path / "gpu", meta, [], rows)
    written = json.loads((tmp_path / "gpu" / "bench_gpu.json").read_text())
    assert written["grid"] == json.loads(json.dumps(rows)) and written["meta"]["device"] == "test CPU"
    md = (tmp_path / "gpu" / "bench_gpu.md").read_text()
    line = next(x for x in md.splitlines() if "| triton_encode |" in x)
    assert line.startswith(f"| {N} | {d} | {M} | {k} | triton_encode | 2.000 |") and "| 2.00 |" in line


def test_run_grid_skips_what_does_not_fit(monkeypatch, capsys, tmp_path):
    # Free memory replaced: first too little for the inputs, then enough for them and the dense
    # kernels' N x M scores but not for the 1 GiB allowed to a fused encode.
    N, d, M, k = 20, 16, 64, 4
    inputs = (N * d + M * d + M + d) * 2

    def fake_rounds(fns, repeats, warmup=2):
        return {name: [1e-3] * repeats for name in fns}, {}

    monkeypatch.setattr(bench_gpu, "time_rounds", fake_rounds)
    monkeypatch.setattr(bench_gpu, "_free_bytes", lambda dev: inputs)
    rows = bench_gpu.run_grid([(N, d, M, k)], 5, tmp_path / "none.json", device="cpu")
    assert all(r["status"] == "skipped" and r["note"].startswith("skipped: inputs need") for r in rows)
    monkeypatch.setattr(bench_gpu, "_free_bytes", lambda dev: 4 * inputs)
    by = {r["kernel"]: r for r in bench_gpu.run_grid([(N, d, M, k)], 5, tmp_path / "none.json", device="cpu")}
    assert by["gemm_floor"]["status"] == by["torch_topk_mm"]["status"] == "ok"
    if not bench_gpu.backend_reasons("triton", ("topk_encode",)):
        assert by["triton_encode"]["status"] == "skipped" and "needs ~1.0 GiB beyond the inputs" in by["triton_encode"]["note"]


# ---- gpu_check (`make gpu-check`) -------------------------------------------------------------

_NO_TORCH_RUN = """
import runpy, sys
sys.argv = ["gpu_check.py", *sys.argv[1:]]
try:
    runpy.run_path(%r, run_name="__main__")
except SystemExit as exit_:
    code = exit_.code
print("exit", code, "torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
""" % str(ROOT / "benchmarks" / "gpu_check.py")


@pytest.mark.parametrize("smi", ["missing", "failing"])
def test_gpu_check_without_gpu_is_one_line_and_exits_0(tmp_path, smi):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi == "failing":  # what nvidia-smi says on a machine without a working driver
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't "
                                            "communicate with the NVIDIA driver.\"\nexit 9\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=str(bin_dir), OUT=str(tmp_path / "out"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_RUN, "--logs", str(tmp_path / "logs")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 10
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU here"), result.stdout + result.stderr
    assert ("nvidia-smi not found" if smi == "missing" else "exit 9") in lines[0]
    assert result.stderr.strip().endswith("exit 0 torch not imported"), result.stderr
    assert list(tmp_path.iterdir()) == [bin_dir]  # no logs, no results, no build


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check")
def test_make_gpu_check_without_gpu():
    started = time.monotonic()
    result = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 10
    assert result.returncode == 0 and result.stdout.startswith("gpu-check: no GPU here"), result.stdout + result.stderr
    assert len(result.stdout.splitlines()) == 1 and not result.stderr


def test_gpu_check_arguments(monkeypatch, capsys):
    monkeypatch.setenv("OUT", "/tmp/device-out")
    args = gpu_check.parse_args([])
    assert args.logs == Path("/tmp/device-out") and args.results == Path("/tmp/device-out/gpu")
    assert args.budget < 8 * 60 and args.skip == []
    monkeypatch.delenv("OUT")
    args = gpu_check.parse_args(["--skip", "build", "tests", "--budget", "300"])
    assert args.results == ROOT / "benchmarks" / "results" / "gpu" and args.skip == ["build", "tests"]
    assert args.logs == ROOT / "build" / "gpu-check" and args.budget == 300
    for bad, message in ((["--skip", "env"], "invalid choice"), (["--budget", "30"], "at least 60")):
        with pytest.raises(SystemExit) as exit_:
            gpu_check.parse_args(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # the bench it runs: the ops and step, and the grid, results where the check says
    assert "--grid" in gpu_check.BENCH and int(gpu_check.BENCH[gpu_check.BENCH.index("--repeats") + 1]) >= 5


def test_gpu_check_stage_limits(tmp_path, capsys):
    check = gpu_check.Check(60, tmp_path)
    started = time.monotonic()
    slow = check.run("slow", [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"],
                              [sys.executable, "-c", "print('never')"]], 1.5, "slow.log")
    # killed at its limit, long before it would have ended (the bound only tells a kill from a wait)
    assert slow["status"] == "timed out after 2 s" and time.monotonic() - started < 300
    assert "started" in (tmp_path / "slow.log").read_text() and "never" not in (tmp_path / "slow.log").read_text()
    failing = check.run("failing", [[sys.executable, "-c", "print('out'); raise SystemExit(3)"],
                                    [sys.executable, "-c", "print('never')"]], 30, echo=False)
    assert failing["status"] == "failed (exit 3)"
    assert [s["name"] for s in check.stages] == ["slow", "failing"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "out" in log and "never" not in log and "== slow: timed out" in log


def test_gpu_check_reads_the_test_report(tmp_path):
    junit = tmp_path / "tests.xml"
    junit.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.ops.test_topk_encode" name="test_a[triton]"/>
<testcase classname="tests.ops.test_topk_encode" name="test_a[cuda]"><failure message="assert 1 == 2"/></testcase>
<testcase classname="tests.ops.test_sparse_decode" name="test_b[cuda]"><error message="fixture broke"/></testcase>
<testcase classname="tests.ops.test_sparse_decode" name="test_c[cuda]"><skipped type="pytest.skip"
  message="cuda backend unavailable on cuda: ssae_kernels._C was built without CUDA (set SSAE_BUILD_CUDA=1 and reinstall)"/></testcase>
<testcase classname="tests.ops.test_sparse_decode" name="test_d[triton]"><skipped type="pytest.skip"
  message="CPU tensors run Triton only with TRITON_INTERPRET=1"/></testcase>
<testcase classname="tests.ops.test_sparse_decode" name="test_e[triton]"><skipped type="pytest.skip"
  message="CPU tensors run Triton only with TRITON_INTERPRET=1"/></testcase>
</testsuite></testsuites>""")
    summary = gpu_check.junit_summary(junit)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 2, 3)
    assert summary["failed_tests"] == ["tests.ops.test_topk_encode::test_a[cuda]", "tests.ops.test_sparse_decode::test_b[cuda]"]
    assert summary["skips"]["CPU tensors run Triton only with TRITON_INTERPRET=1"] == 2
    # only the skip that means "the GPU test did not run here" fails the check
    assert list(summary["environment_skips"]) == [
        "cuda backend unavailable on cuda: ssae_kernels._C was built without CUDA (set SSAE_BUILD_CUDA=1 and reinstall)"]
    md = gpu_check.check_markdown("GPU 0: test", {"torch": "x"}, [dict(name="tests", status="ok", seconds=1.0, detail="")],
                                  summary, 470)
    assert "1 passed, 2 failed, 3 skipped" in md and "(**environment**)" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="uses the skips of GPU tests on a machine without one")
def test_gpu_check_stages_wired_together(monkeypatch, tmp_path, capsys):
    # The GPU path with stand-ins: a listed GPU, an env probe that passes, no build, two small test
    # selections (one passing, one of GPU tests that skip here) and a bench that only echoes its arguments.
    monkeypatch.setattr(gpu_check, "detect_gpus", lambda: (["GPU 0: stand-in"], ""))
    monkeypatch.setattr(gpu_check, "ENV_PROBE", "import json; print('ENV ' + json.dumps({'capability': '9.0'}))")
    monkeypatch.setattr(gpu_check, "BENCH", ["-c", "import sys; print('bench args', sys.argv[1:])"])
    logs, results = tmp_path / "logs", tmp_path / "results"
    argv = ["--logs", str(logs), "--results", str(results), "--skip", "build", "peers"]

    monkeypatch.setattr(gpu_check, "TESTS", ["tests/test_bench_gpu.py", "-k", "grid_is_the_model_grid"])
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("bench args ['--out', ") and str(results) in line for line in out)
    summary = out[out.index("== gpu-check summary: GPU 0: stand-in"):]
    assert [line.split()[:2] for line in summary[1:4]] == [["env", "ok"], ["tests", "ok"], ["bench", "ok"]]
    assert "1 passed, 0 failed, 0 skipped" in summary[2] and summary[4].startswith("total")
    assert sorted(p.name for p in logs.iterdir()) == ["bench.log", "gpu_check.log", "tests.log"]
    assert "| tests | ok |" in (results / "gpu_check.md").read_text()

    # GPU tests that skip for want of a GPU fail the check, and say why
    monkeypatch.setattr(gpu_check, "TESTS", ["tests/ops/test_sparse_decode.py", "-k", "test_gpu_sparse_decode and cuda"])
    assert gpu_check.main(argv) == 1
    out = capsys.readouterr().out
    assert "GPU tests skipped: needs a CUDA GPU" in out
    assert "(**environment**)" in (results / "gpu_check.md").read_text()
