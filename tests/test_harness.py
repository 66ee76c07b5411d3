"""The benchmark harness (benchmarks/harness.py) and a tiny end-to-end run of benchmarks/bench_step.py."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def test_time_interleaved_warmup_and_rounds():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    setups = []
    s = harness.time_interleaved(fns, warmup=2, repeats=5, setup=lambda: setups.append(1))
    # warm-up rounds run but are not timed; every round calls each function once, in order
    assert calls == ["a", "b"] * 7
    assert len(setups) == 14
    assert set(s) == {"a", "b"} and len(s["a"]) == len(s["b"]) == 5
    assert all(t >= 0 for t in s["a"] + s["b"])


def test_time_fn_measures_the_call():
    import time

    s = harness.time_fn(lambda: time.sleep(0.02), warmup=1, repeats=5)
    assert len(s) == 5
    assert all(t >= 0.02 for t in s)


def test_time_fn_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeats"):
        harness.time_fn(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        harness.time_fn(lambda: None, warmup=-1)


def test_median_and_paired_ratio():
    assert harness.median([5.0, 1.0, 3.0, 2.0, 4.0]) == 3.0
    assert harness.median([1.0, 2.0, 3.0, 4.0]) == 2.5
    with pytest.raises(ValueError):
        harness.median([])
    # round by round: 2/1, 6/2, 3/3 -> median 2
    assert harness.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == 2.0
    with pytest.raises(ValueError):
        harness.paired_ratio([1.0], [1.0, 2.0])


def test_set_threads():
    import torch

    old = torch.get_num_threads()
    try:
        assert harness.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ValueError):
        harness.set_threads(0)


@pytest.mark.parametrize("megabytes, warm, chunk", [(64, 0, 0), (32, 96, 0), (24, 48, 0.25)])
def test_peak_rss_sees_a_known_allocation(megabytes, warm, chunk):
    # A fresh process measures a region that allocates (and frees again) `megabytes`, after a freed warm-up
    # allocation of `warm` MB, in one tensor or in chunks of `chunk` MB: the peak must see the bytes once.
    r = harness.run_isolated("harness:probe_allocation",
                             {"megabytes": megabytes, "warm_megabytes": warm, "chunk_megabytes": chunk}, threads=1)
    assert r["allocated_bytes"] == pytest.approx(megabytes * 1e6, rel=1e-3)
    assert r["allocated_bytes"] - 0.5e6 <= r["extra_bytes"] <= r["allocated_bytes"] * 1.03 + 2e6


def test_peak_rss_needs_the_malloc_setting():
    # Why run_isolated sets MALLOC_MMAP_THRESHOLD_: without it glibc keeps freed 250 kB blocks resident and
    # reuses them, so the same 24 MB allocation goes (nearly) unseen.
    r = harness.run_isolated("harness:probe_allocation",
                             {"megabytes": 24, "warm_megabytes": 48, "chunk_megabytes": 0.25},
                             threads=1, malloc_env=False)
    assert r["extra_bytes"] < 0.5 * r["allocated_bytes"]


def test_run_isolated_reports_failures():
    with pytest.raises(harness.IsolatedRunError, match="no_such_function"):
        harness.run_isolated("harness:no_such_function", {}, threads=1)


def _record(**kw):
    args = dict(benchmark="step", op="train_step", provider="ssae", shape={"N": 4, "d": 8, "M": 16, "k": 2},
                dtype="torch.float32", device="cpu", versions={"torch": "x", "threads": 2})
    args.update(kw)
    return harness.make_record(**args)


def test_record_format_and_append(tmp_path):
    r = _record(samples_s=[0.3, 0.1, 0.2, 0.5, 0.4], peak_extra_bytes=1234, run_id="r1", extra={"ratio": 1.5})
    assert set(harness.RECORD_KEYS) <= set(r)
    assert r["median_s"] == 0.3 and r["samples_s"] == [0.3, 0.1, 0.2, 0.5, 0.4]
    assert r["dtype"] == "float32" and r["threads"] == 2 and r["status"] == "ok" and r["peak_extra_bytes"] == 1234
    skipped = _record(status="skipped", reason="too big", run_id="r1")
    assert skipped["median_s"] is None and skipped["samples_s"] is None
    with pytest.raises(ValueError, match="reason"):
        _record(status="skipped")
    with pytest.raises(ValueError, match="status"):
        _record(status="fine")

    path = tmp_path / "sub" / "out.json"
    harness.append_records(path, [r, skipped])
    later = _record(samples_s=[1, 1, 1, 1, 1], run_id="r2")
    harness.append_records(path, [later])
    data = json.loads(path.read_text())
    assert [d["run_id"] for d in data] == ["r1", "r1", "r2"]
    assert data[0] == r
    assert harness.latest_run(data) == [later]
    assert harness.latest_run(data, benchmark="other") == []


def test_bench_step_smoke(tmp_path):
    # Every method at a tiny shape through main(): output files exist and every method has a finite time.
    import bench_step

    records = bench_step.main(["--N", "64", "--d", "32", "--M", "256", "--k", "8", "--out", str(tmp_path)])
    assert (tmp_path / "step.png").stat().st_size > 0
    md = (tmp_path / "step.md").read_text()
    saved = json.loads((tmp_path / "step.json").read_text())
    assert saved == records
    by_method = {r["provider"]: r for r in records}
    assert set(by_method) == set(bench_step.METHODS)
    for name, r in by_method.items():
        assert f"| {name} | 256 |" in md
        if name in bench_step.PEERS and r["status"] == "unavailable":
            assert r["reason"]  # a peer that does not run here says why
            continue
        assert r["status"] == "ok", (name, r["reason"])
        assert len(r["samples_s"]) == 5 and all(math.isfinite(t) and t > 0 for t in r["samples_s"])
        assert math.isfinite(r["extra"]["ratio_to_floor"])
        assert r["peak_extra_bytes"] is not None, r["extra"].get("memory_error")
    assert by_method["gemm_floor"]["extra"]["ratio_to_floor"] == 1.0
    # same weights, same math: ours and the dense formulation compute the same loss
    assert by_method["ssae"]["extra"]["loss"] == pytest.approx(by_method["dense"]["extra"]["loss"], rel=1e-5)
    assert by_method["ssae"]["extra"]["backend"] == "cpu"
