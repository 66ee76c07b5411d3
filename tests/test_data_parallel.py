"""Data-parallel training (ssae_kernels.data_parallel) in 2 gloo processes: the same weights and dead counts as
one process on the same seed and data, checkpoints that resume with another world size, and a rank that dies
ending the others with an error instead of a hang."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def _acts(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, d, generator=g) * 3
    return centres[torch.randint(0, 64, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _train(out_dir, steps, *, arch="topk", data_parallel=None, resume=False, dead_tokens=10**9, optimizer="adam"):
    from ssae_kernels.trainer import TrainConfig, Trainer, new_sae

    acts = _acts()
    sae = new_sae(acts, 96, 4, arch=arch, dead_tokens=dead_tokens)
    trainer = Trainer(sae, acts, TrainConfig(steps=steps, batch_size=128, lr=3e-3, checkpoint_every=3,
                                             optimizer=optimizer), out_dir, progress=False, data_parallel=data_parallel)
    trainer.begin(resume=resume)
    trainer.train()
    trainer.flush()  # (SparseAdam's pending steps)
    return sae


def _init(rank, init_file, seconds=60):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=seconds))


def _same(a, b, what):
    for name, value in a.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, b.state_dict()[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{what}: {name}: {m}")
        else:
            assert torch.equal(value, b.state_dict()[name]), f"{what}: {name}"


def _equal_worker(rank, tmp, arch, optimizer):
    from ssae_kernels.data_parallel import DataParallel

    _init(rank, os.path.join(tmp, "init"))
    try:
        parallel = _train(os.path.join(tmp, "dp"), 6, arch=arch, data_parallel=DataParallel(), optimizer=optimizer)
        single = _train(os.path.join(tmp, f"single{rank}"), 6, arch=arch, optimizer=optimizer)
        _same(parallel, single, f"rank {rank}")
        if rank == 0:  # rank 0 wrote the run's files, the other rank none
            assert os.path.isdir(os.path.join(tmp, "dp", "checkpoint"))
            with open(os.path.join(tmp, "dp", "metrics.jsonl")) as f:
                assert len(f.readlines()) == 1  # log_every 10: the last step
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch,optimizer", [("topk", "adam"), ("relu", "adam"), ("topk", "sparse-adam")])
def test_two_ranks_train_as_one_process(tmp_path, arch, optimizer):
    # (sparse-adam: the ranks exchange only the rows they touched, DataParallel.merge_touched)
    mp.spawn(_equal_worker, args=(str(tmp_path), arch, optimizer), nprocs=WORLD, join=True)


def test_dead_counts_combine_over_the_ranks(tmp_path):
    # a latent that fired on either rank restarts its count on both (AuxK then trains the same dead set; its
    # loss is normalised per rank, so only the dead counts are compared, after one step)
    mp.spawn(_dead_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)


def _dead_worker(rank, tmp):
    from ssae_kernels.data_parallel import DataParallel

    _init(rank, os.path.join(tmp, "init"))
    try:
        parallel = _train(os.path.join(tmp, "dp"), 1, data_parallel=DataParallel(), dead_tokens=256)
        single = _train(os.path.join(tmp, f"single{rank}"), 1, dead_tokens=256)
        assert torch.equal(parallel.tokens_since_fired, single.tokens_since_fired)
        assert int((parallel.tokens_since_fired == 0).sum()) > 0
    finally:
        dist.destroy_process_group()


def _resume_worker(rank, tmp):
    from ssae_kernels.data_parallel import DataParallel

    _init(rank, os.path.join(tmp, "init"))
    try:  # one process trained 3 steps into tmp/run; two ranks continue to 6
        resumed = _train(os.path.join(tmp, "run"), 6, data_parallel=DataParallel(), resume=True)
        _same(resumed, _train(os.path.join(tmp, f"straight{rank}"), 6), f"rank {rank}")
        # and two ranks train 3 steps into tmp/parallel, for one process to continue
        _train(os.path.join(tmp, "parallel"), 3, data_parallel=DataParallel())
    finally:
        dist.destroy_process_group()


def test_checkpoints_resume_with_another_world_size(tmp_path):
    # (the schedule of a 3-step run equals the first 3 steps of a 6-step one: no decay yet, warmup of 1 step)
    _train(str(tmp_path / "run"), 3)
    mp.spawn(_resume_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    resumed = _train(str(tmp_path / "parallel"), 6, resume=True)
    _same(resumed, _train(str(tmp_path / "straight"), 6), "one process after two")


def _dying_worker(rank, tmp, shard):
    from ssae_kernels.data_parallel import DataParallel
    from ssae_kernels.trainer import TrainConfig, Trainer, new_sae

    _init(rank, os.path.join(tmp, "init"), seconds=20)
    acts = _acts()
    sae = new_sae(acts, 96, 4, shard_group=dist.group.WORLD if shard == "latents" else None)
    trainer = Trainer(sae, acts, TrainConfig(steps=50, batch_size=128, lr=3e-3, checkpoint_every=3),
                      os.path.join(tmp, "run"), progress=False,
                      data_parallel=DataParallel() if shard == "batch" else None)
    trainer.begin(resume=False)

    def die(t):
        if rank == 1 and t.step == 5:
            os._exit(0)  # no error, no goodbye: the process is simply gone

    try:
        trainer.train(on_step=die)
    except Exception as e:  # rank 0: the collective with the dead rank fails
        with open(os.path.join(tmp, "error"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        return
    raise AssertionError("rank 0 trained on although rank 1 died")


@pytest.mark.parametrize("shard", ["batch", "latents"])
def test_a_rank_that_dies_ends_the_others_with_an_error(tmp_path, shard):
    # rank 1 leaves with status 0; rank 0 must come back with the error (within the group's timeout), not hang
    mp.spawn(_dying_worker, args=(str(tmp_path), shard), nprocs=WORLD, join=True)
    assert (tmp_path / "error").read_text()
    from ssae_kernels.trainer import checkpoint_step, recover_checkpoint

    assert checkpoint_step(recover_checkpoint(str(tmp_path / "run"))) == 3  # the last checkpoint is usable


def test_unsupported_settings_are_refused(monkeypatch, tmp_path):
    from ssae_kernels.data_parallel import DataParallel, unsupported
    from ssae_kernels.recipes.common import UsageError
    from ssae_kernels.recipes.train import TrainRunConfig, check
    from ssae_kernels.sae import SAE_CLASSES

    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        DataParallel()
    assert unsupported(SAE_CLASSES["topk"], "adam", False) is None
    assert unsupported(SAE_CLASSES["relu"], "adam", False) is None
    assert unsupported(SAE_CLASSES["topk"], "sparse-adam", False) is None
    assert unsupported(SAE_CLASSES["topk"], "adam", True) == "TERM (only ERM)"
    assert unsupported(SAE_CLASSES["jumprelu"], "adam", False) == "a JumpReLUSAE"
    assert unsupported(SAE_CLASSES["batchtopk"], "adam", False) == "a BatchTopKSAE"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: refused before anything is loaded
    with pytest.raises(UsageError, match="under torchrun .* does not support a BatchTopKSAE yet"):
        check(TrainRunConfig(out=str(tmp_path / "a"), arch="batchtopk"))
    with pytest.raises(UsageError, match="does not support TERM"):
        check(TrainRunConfig(out=str(tmp_path / "b"), tilt=1.0))


def test_ssae_train_under_torchrun_equals_one_process(tmp_path):
    # the whole command on 2 processes, data-parallel and latent-sharded, against the same command in one
    # process (AuxK off: data parallelism normalises it per rank)
    import json
    import shutil
    import subprocess
    import sys

    from tiny_model import save_tiny, write_corpus

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python executable")
    tiny, corpus = save_tiny(str(tmp_path / "tiny")), write_corpus(str(tmp_path))
    base = ["train", "--model", tiny, "--layer", "1", "--text", corpus, "--max-tokens", "3000", "--context", "32",
            "--latents", "64", "--k", "4", "--steps", "12", "--batch-size", "256", "--eval-fraction", "0.2",
            "--eval-min-tokens", "0", "--ce-sequences", "2", "--checkpoint-every", "5", "--quiet",
            "--activation-cache", str(tmp_path / "acts"), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ssae_kernels.cli", *base, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert one["world_size"] == 1
    for shard in ("batch", "latents"):
        parallel = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ssae_kernels.cli",
                                   *base, "--shard", shard, "--out", str(tmp_path / shard)], capture_output=True,
                                  text=True, env=env, timeout=600)
        assert parallel.returncode == 0, parallel.stderr[-3000:]
        two = json.loads((tmp_path / shard / "report.json").read_text())
        assert two["world_size"] == 2 and two["steps"] == 12 and two["shard"] == shard
        assert two["latents_per_rank"] == (32 if shard == "latents" else 64)
        assert abs(one["fvu"] - two["fvu"]) < 1e-3, (shard, one["fvu"], two["fvu"])
