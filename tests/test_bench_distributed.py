"""benchmarks/bench_distributed.py at a tiny shape: both modes run in 2 processes and are recorded, with the bytes
each sends counted from its collectives."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_distributed  # noqa: E402
import harness  # noqa: E402


def test_bytes_per_step_follow_the_collectives():
    a = dict(world=2, batch=8, d=4, latents=10, k=3)
    sent = bench_distributed.bytes_per_step(a, touched_rows=6)
    params = 2 * 10 * 4 + 10 + 4
    sharded_ops = (1 / 2) * 2 * 8 * 3 * 12 + 2 * (1 / 2) * 4 * (8 * 4 + 8 * 3 + 4)
    assert sent["data parallel, dense all-reduce"] == 2 * (1 / 2) * 4 * (params + 10 + 1)
    assert sent["data parallel, touched rows"] == (1 / 2) * 2 * (8 + 6 * (8 + 4 * 9)) + 2 * (1 / 2) * 4 * (4 + 10 + 1)
    assert sent["sharded ops"] == sharded_ops
    assert sent["latent sharded"] == sharded_ops + (1 / 2) * 2 * 8 + 16


def test_the_benchmark_runs_every_mode(tmp_path):
    records = bench_distributed.main(["--latents", "64", "--d", "16", "--k", "4", "--batch", "64", "--warmup", "1",
                                      "--out", str(tmp_path)])
    assert {r["provider"] for r in records} == {"data parallel, dense all-reduce", "data parallel, touched rows",
                                                "latent sharded", "sharded ops"}
    assert all(r["median_s"] > 0 and r["extra"]["baseline_median_s"] > 0 for r in records)
    by_mode = {r["provider"]: r["extra"] for r in records}
    assert by_mode["data parallel, dense all-reduce"]["exchange_median_s"] > 0
    assert 0 < by_mode["data parallel, touched rows"]["touched_rows_max"] <= 64
    assert len(harness.load_records(tmp_path / "distributed.json")) == 4
    text = (tmp_path / "distributed.md").read_text()
    assert "| training step (SparseAdam) | data parallel, touched rows |" in text and "Touched rows:" in text
