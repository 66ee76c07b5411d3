"""The per-op benchmarks (benchmarks/ops/bench_<op>.py): each runs end to end on its smallest shape and
writes finite, positive times to <out>/<op>.json and a table to <out>/<op>.md."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

OPS_BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "ops"
MODULES = ("topk_encode", "threshold_encode", "sparse_decode", "sparse_backward", "tilted_loss", "project_subspace",
           "sparse_adam")
REPEATS = 5


def _run(module, out):
    # One thread: the test checks the scripts, not the speed, and must not fight other work for the cores.
    cmd = [sys.executable, str(OPS_BENCH / f"bench_{module}.py"), "--quick", "--smoke", "--repeats", str(REPEATS),
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(OPS_BENCH.parent.parent))
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("module", MODULES)
def test_bench_script_writes_records_and_table(module, tmp_path):
    proc = _run(module, tmp_path)
    records = json.loads((tmp_path / f"{module}.json").read_text())
    assert isinstance(records, list) and records
    assert {r["benchmark"] for r in records} == {f"ops/{module}"}
    assert len({r["run_id"] for r in records}) == 1
    assert {r["shape"]["N"] if "N" in r["shape"] else r["shape"]["d"] for r in records} <= {4, 64}  # small only
    ok = [r for r in records if r["status"] == "ok"]
    assert ok, f"no case ran:\n{proc.stdout}"
    for r in records:
        # "skipped": ours does not accept the arguments yet (e.g. b_enc=None); never "error"
        assert r["status"] in ("ok", "skipped"), f"{r['op']} {r['extra']['case']}: {r['status']}: {r['reason']}"
        assert r["provider"] in ("ssae", "torch")
        assert r["threads"] == 1 and r["device"] == "cpu" and r["dtype"] == "float32"
        if r["status"] != "ok":
            assert r["reason"]
    for r in ok:
        assert len(r["samples_s"]) == REPEATS
        assert all(_positive_finite(s) for s in r["samples_s"]), r["samples_s"]
        assert _positive_finite(r["median_s"])
        assert _positive_finite(r["extra"]["ratio_to_baseline"])
        assert r["extra"]["calls_per_round"] >= 1
        # ours and the baseline compute the same thing
        assert r["extra"]["max_rel_diff"] < 1e-3, (r["op"], r["extra"]["case"], r["extra"]["max_rel_diff"])
    # every case has both providers, with the same status
    pairs = {}
    for r in records:
        pairs.setdefault((r["op"], r["extra"]["case"]), {})[r["provider"]] = r["status"]
    assert all(set(p) == {"ssae", "torch"} and len(set(p.values())) == 1 for p in pairs.values()), pairs

    table = (tmp_path / f"{module}.md").read_text()
    lines = table.splitlines()
    assert "| shape | op | case | baseline | ours ms | baseline ms | ours/baseline | max rel diff |" in lines
    rows = [line for line in lines if line.startswith("| small")]
    assert len(rows) == len(pairs)
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[4].startswith("skipped"):
            continue
        ours_ms, base_ms, ratio = (float(c) for c in cells[4:7])
        assert all(_positive_finite(v) for v in (ours_ms, base_ms, ratio)), line


def test_bench_args(monkeypatch):
    import importlib.util

    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):  # parse_args sets them
        monkeypatch.delenv(key, raising=False)  # (restored after the test)
    spec = importlib.util.spec_from_file_location("bench_ops_common", OPS_BENCH / "common.py")
    common = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, common)  # (dataclasses look their module up there)
    spec.loader.exec_module(common)
    with pytest.raises(SystemExit):
        common.parse_args("topk_encode", "doc", ["--repeats", "4"])
    args = common.parse_args("topk_encode", "doc", ["--quick"])
    assert args.shapes == ["small", "mid"] and args.repeats >= 5
    assert common.parse_args("topk_encode", "doc", ["--quick", "--smoke"]).shapes == ["small"]
    assert list(common.parse_args("topk_encode", "doc", []).shapes) == ["small", "mid", "ref"]
    assert common.SHAPES["ref"] == dict(N=2048, d=768, M=24576, k=32)  # the reference shape of docs/benchmarks.md


def test_bench_overhead_writes_both_thread_counts_and_the_cold_start(tmp_path):
    # bench_overhead.py with tiny settings: the tables and records exist; the bars are for real runs.
    script = OPS_BENCH.parent / "bench_overhead.py"
    cmd = [sys.executable, str(script), "--repeats", "5", "--calls", "3", "--cold-runs", "1", "--threads", "1", "2",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(OPS_BENCH.parent.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "overhead.md").read_text()
    for threads in (1, 2):
        assert f"| {threads} | encode |" in table and f"| {threads} | encode+decode fwd+bwd |" in table
    assert "first `topk_encode` (CPU tensors)" in table and "neither triton nor torch._dynamo (PASS)" in table
    records = json.loads((tmp_path / "overhead.json").read_text())
    timed = [r for r in records if r["op"] != "cold start"]
    assert len(timed) == 8 and all(_positive_finite(r["median_s"]) for r in timed)
    cold = next(r for r in records if r["op"] == "cold start")
    assert cold["extra"]["first_call_mb"] < 20
