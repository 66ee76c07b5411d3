"""The memory planner: against the measured peak of real training steps, its search, and where it is used."""

import pathlib
import sys

import pytest

from ssae_kernels import cli, memory

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_memory  # noqa: E402


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize("size", [(65536, 512, 2048, 32, "float32"), (98304, 384, 4096, 32, "bfloat16"),
                                  (262144, 256, 1024, 32, "float32", "sparse-adam"),
                                  (262144, 256, 1024, 32, "float32", "sparse-adam", "bfloat16")],
                         ids=["float32", "bfloat16", "sparse-adam", "sparse-adam-bf16-moments"])
def test_the_plan_is_within_10_percent_of_the_measured_peak(size):
    result = bench_memory.compare(*size)
    # what the SAE adds to the process, planned and measured: the runtime is the same figure on both sides
    planned = result["planned_peak"] - result["runtime_bytes"]
    measured = result["measured_peak"] - result["runtime_bytes"]
    assert measured > 500e6  # the SAE, not the runtime, dominates what is compared
    assert abs(planned - measured) <= 0.10 * measured, result


def test_components_follow_the_sizes():
    fp32 = memory.plan(1 << 20, 576, 4096, 32)
    params = (2 * (1 << 20) * 576 + (1 << 20) + 576) * 4
    assert fp32.components["gradients (float32)"] == params
    assert fp32.components["optimizer states (adam)"] == 2 * params
    assert memory.plan(1 << 20, 576, 4096, 32, optimizer="sgd").components["optimizer states (sgd)"] == 0
    sparse = memory.plan(1 << 20, 576, 4096, 32, optimizer="sparse-adam").components
    assert sparse["gradients (float32, touched rows)"] == 2 * 4096 * 32 * (2 * 576 + 1) * 4 + 576 * 4
    assert sparse["optimizer states (sparse-adam)"] == 2 * params + (1 << 20) * 8  # + a step index per latent
    half = memory.plan(1 << 20, 576, 4096, 32, optimizer="sparse-adam", optimizer_state="bfloat16").components
    assert half["optimizer states (sparse-adam, bfloat16 moments)"] == params + (1 << 20) * 8
    with pytest.raises(ValueError, match="needs optimizer 'sparse-adam'"):
        memory.plan(1 << 20, 576, 4096, 32, optimizer="adam", optimizer_state="bfloat16")
    bf16 = memory.plan(1 << 20, 576, 4096, 32, compute_dtype="bfloat16")
    assert bf16.total - fp32.total == (1 << 20) * 576 * 2
    with_data = memory.plan(1 << 20, 576, 4096, 32, dataset_tokens=100_000)
    assert with_data.total - fp32.total == 100_000 * 576 * 4
    # nothing grows with N x M: doubling the batch adds the same at any dictionary size
    for M in (1 << 16, 1 << 22):
        grow = memory.plan(M, 576, 8192, 32).total - memory.plan(M, 576, 4096, 32).total
        assert grow == memory.plan(1 << 10, 576, 8192, 32).total - memory.plan(1 << 10, 576, 4096, 32).total


@pytest.mark.parametrize("vary", ["latents", "batch"])
def test_largest_is_the_boundary(vary):
    budget = memory.parse_bytes("24GB")
    sizes = dict(latents=1 << 20, d_in=576, batch=4096, k=32)
    n = memory.largest(budget, vary, **sizes)
    step = 256 if vary == "latents" else 64
    assert memory.plan(**{**sizes, vary: n}).total <= budget < memory.plan(**{**sizes, vary: n + step}).total


def test_parse_bytes():
    assert memory.parse_bytes("24GB") == 24 * 10**9
    assert memory.parse_bytes("80 GiB") == 80 * 2**30
    assert memory.parse_bytes("512MB") == 512 * 10**6
    assert memory.parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a memory size"):
        memory.parse_bytes("lots")


def test_ssae_plan_prints_the_components_and_the_largest_sizes(capsys):
    assert cli.main(["plan", "--latents", "1048576", "--d", "576", "--device-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states (adam)" in out and "fits in 24.0 GB" in out and "latents; largest batch" in out
    assert cli.main(["plan", "--latents", "1048576", "--d", "4096", "--device-memory", "24GB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert cli.main(["plan", "--latents", "1024", "--d", "64", "--device-memory", "lots"]) == 2
    assert "--device-memory: not a memory size" in capsys.readouterr().err


def test_train_refuses_a_size_that_does_not_fit_before_allocating(tmp_path, monkeypatch, capsys):
    from tiny_model import save_tiny, write_corpus

    model_dir, corpus = save_tiny(str(tmp_path / "tiny")), write_corpus(str(tmp_path))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**9)

    def no_harvest(*args, **kwargs):
        raise AssertionError("activations were harvested before the memory check")

    monkeypatch.setattr("ssae_kernels.activations.harvest", no_harvest)
    args = ["train", "--model", model_dir, "--layer", "1", "--text", corpus, "--latents", str(1 << 24), "--k", "4",
            "--eval-fraction", "0.2", "--eval-min-tokens", "0", "--quiet", "--out", str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "by the memory planner (ssae plan --latents 16777216 --d 32" in err and "1.0 GB are free" in err
    assert not (tmp_path / "run").exists()


def test_ssae_plan_bfloat16_moments_fit_a_larger_dictionary(capsys):
    largest = {}
    for state in ("float32", "bfloat16"):
        assert cli.main(["plan", "--latents", "1048576", "--d", "576", "--device-memory", "24GB", "--optimizer",
                         "sparse-adam", "--optimizer-state", state]) == 0
        largest[state] = int(capsys.readouterr().out.split("at this width and batch: ")[1].split(" latents")[0]
                             .replace(",", ""))
    assert largest["bfloat16"] > 1.3 * largest["float32"]
    assert cli.main(["plan", "--latents", "1024", "--d", "64", "--device-memory", "24GB",
                     "--optimizer-state", "bfloat16"]) == 2
    assert "needs optimizer 'sparse-adam'" in capsys.readouterr().err


def test_train_plans_a_threshold_architecture_at_its_code_width(monkeypatch):
    # BatchTopK, JumpReLU and ReLU codes are max_k wide (default 4 k), not k
    from ssae_kernels.recipes.common import UsageError
    from ssae_kernels.recipes.train import TrainRunConfig, check_memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1)
    for arch, max_k, width in (("topk", None, 32), ("jumprelu", None, 128), ("relu", 200, 200)):
        with pytest.raises(UsageError, match=f"--batch 4096 --k {width} "):
            check_memory(TrainRunConfig(out="unused", arch=arch, max_k=max_k), 576)
