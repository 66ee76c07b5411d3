"""benchmarks/bench_distributed.py at a tiny shape: both modes run in 2 processes and are recorded, with the bytes
each sends counted from its collectives."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_distributed  # noqa: E402
import harness  # noqa: E402


def test_bytes_per_step_follow_the_collectives():
    a = dict(world=2, batch=8, d=4, latents=10, k=3)
    sent = bench_distributed.bytes_per_step(a)
    params = 2 * 10 * 4 + 10 + 4
    assert sent["data parallel"] == 2 * (1 / 2) * 4 * (params + 10 + 1)
    assert sent["sharded ops"] == (1 / 2) * 2 * 8 * 3 * 12 + 2 * (1 / 2) * 4 * (8 * 4 + 8 * 3 + 4)


def test_the_benchmark_runs_both_modes(tmp_path):
    records = bench_distributed.main(["--latents", "64", "--d", "16", "--k", "4", "--batch", "64", "--warmup", "1",
                                      "--out", str(tmp_path)])
    assert {r["provider"] for r in records} == {"data parallel", "sharded ops"}
    assert all(r["median_s"] > 0 and r["extra"]["baseline_median_s"] > 0 for r in records)
    assert len(harness.load_records(tmp_path / "distributed.json")) == 2
    assert "| training step | data parallel |" in (tmp_path / "distributed.md").read_text()
