"""benchmarks/bench_large.py at toy sizes: every case runs and the report says what it measured."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_large  # noqa: E402
from peers import available_peers  # noqa: E402

TOY = dict(d=16, batch=64, k=4, first_to_go=False)


@pytest.mark.parametrize("optimizer", bench_large.OPTIMIZERS)
def test_optimizer_worker(optimizer):
    r = bench_large.optimizer_worker(512, optimizer, warmup=1, repeats=2, **TOY)
    assert r["seconds"] > 0 and len(r["samples"]) == 2
    assert (r["touched_rows"] == 512) if optimizer == "adam" else (0 < r["touched_rows"] <= 64 * 4)


@pytest.mark.parametrize("provider", bench_large.STEP_PROVIDERS)
def test_step_worker(provider):
    if provider == "eai-sparsify" and available_peers()["eai-sparsify"]:
        pytest.skip(f"eai-sparsify: {available_peers()['eai-sparsify']}")
    r = bench_large.step_worker(512, provider, warmup=1, repeats=1, **TOY)
    assert r["seconds"] > 0 and r["peak_bytes"] > 0


def test_report_and_last_line():
    M = 1048576
    results = {"environment": {"cpu": "test cpu", "threads": 2},
               "optimizer": {f"{M}/adam": {"seconds": 2.0, "peak_bytes": 2e10, "touched_rows": M},
                             f"{M}/sparse-adam": {"seconds": 0.3, "peak_bytes": 1.5e10, "touched_rows": 123456},
                             f"{M}/sparse-adam-bf16": {"error": "out of memory (allocation failed)"}},
               "step": {f"{M}/ssae (sparse-adam)": {"seconds": 80.0, "peak_bytes": 1.6e10},
                        f"{M}/dense pytorch": {"error": "out of memory (allocation failed)"}}}
    text = bench_large.markdown(results)
    assert ("| 1,048,576 | 2.000 | 0.300 | 0.150 | out of memory (allocation failed) | - | 11.8% | 20.00 / 15.00 / - |"
            in text)
    assert "| 1,048,576 | dense pytorch | out of memory (allocation failed) | - | - |" in text
    assert bench_large.last_line(results) == "peak_gb=16.00 step_s=80.00 opt_sparse/dense=0.150"
    assert bench_large.last_line({"environment": {}}) == "peak_gb=- step_s=- opt_sparse/dense=-"
