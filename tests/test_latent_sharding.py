"""Latent-sharded training (ssae_kernels.latent_sharding) in 2 gloo processes: the same SAE as one process on the
same seed and data (AuxK, TERM and uneven shards included), checkpoints that hold the whole dictionary and
resume with another world size, and settings it does not train refused."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
LATENTS = 97  # uneven shards: 49 + 48


def _acts(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, d, generator=g) * 3
    return centres[torch.randint(0, 64, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _train(out_dir, steps, *, sharded=False, resume=False, dead_tokens=10**9, tilt=0.0):
    from ssae_kernels.trainer import TrainConfig, Trainer, new_sae

    acts = _acts()
    sae = new_sae(acts, LATENTS, 4, dead_tokens=dead_tokens, shard_group=dist.group.WORLD if sharded else None)
    trainer = Trainer(sae, acts, TrainConfig(steps=steps, batch_size=128, lr=3e-3, checkpoint_every=3, tilt=tilt),
                      out_dir, progress=False)
    trainer.begin(resume=resume)
    trainer.train()
    return sae


def _init(rank, init_file):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _same_rows(sharded, single, what):
    """The shard equals its rows of the single-process SAE; replicated tensors equal the whole."""
    rows = slice(sharded.latents.start, sharded.latents.stop)
    for name, value in sharded.state_dict().items():
        expected = single.state_dict()[name]
        if name in ("W_enc", "b_enc", "W_dec", "tokens_since_fired"):
            expected = expected[rows]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=2e-5, msg=lambda m: f"{what}: {name}: {m}")
        else:
            assert torch.equal(value, expected), f"{what}: {name}"


def _equal_worker(rank, tmp, dead_tokens, tilt):
    from ssae_kernels.trainer import checkpoint_step

    _init(rank, os.path.join(tmp, "init"))
    try:
        sharded = _train(os.path.join(tmp, "sharded"), 6, sharded=True, dead_tokens=dead_tokens, tilt=tilt)
        single = _train(os.path.join(tmp, f"single{rank}"), 6, dead_tokens=dead_tokens, tilt=tilt)
        assert len(sharded.latents) == (49, 48)[rank]
        _same_rows(sharded, single, f"rank {rank}")
        if dead_tokens < 10**9:  # AuxK took part
            assert int(sharded.dead_mask().sum()) > 0 or int(single.dead_mask().sum()) > 0
        if rank == 0:  # one checkpoint of the whole dictionary, as one process writes it
            from ssae_kernels.sae import SAE

            assert checkpoint_step(os.path.join(tmp, "sharded", "checkpoint")) == 6
            whole = SAE.load(os.path.join(tmp, "sharded", "checkpoint"))
            assert whole.W_enc.shape == (LATENTS, 16)
            torch.testing.assert_close(whole.W_dec, single.W_dec, rtol=1e-4, atol=2e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dead_tokens,tilt", [(10**9, 0.0), (256, 0.0), (10**9, 2.0)],
                         ids=["plain", "auxk", "term"])
def test_two_ranks_train_as_one_process(tmp_path, dead_tokens, tilt):
    mp.spawn(_equal_worker, args=(str(tmp_path), dead_tokens, tilt), nprocs=WORLD, join=True)


def _resume_worker(rank, tmp):
    _init(rank, os.path.join(tmp, "init"))
    try:  # one process trained 3 steps into tmp/run; two ranks, each with its latents, continue to 6
        resumed = _train(os.path.join(tmp, "run"), 6, sharded=True, resume=True, dead_tokens=256)
        _same_rows(resumed, _train(os.path.join(tmp, f"straight{rank}"), 6, dead_tokens=256), f"rank {rank}")
        _train(os.path.join(tmp, "sharded"), 3, sharded=True, dead_tokens=256)  # for one process to continue
    finally:
        dist.destroy_process_group()


def test_checkpoints_resume_with_another_world_size(tmp_path):
    # (the schedule of a 3-step run equals the first 3 steps of a 6-step one: no decay yet, warmup of 1 step)
    _train(str(tmp_path / "run"), 3, dead_tokens=256)
    mp.spawn(_resume_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    resumed = _train(str(tmp_path / "sharded"), 6, resume=True, dead_tokens=256)
    straight = _train(str(tmp_path / "straight"), 6, dead_tokens=256)
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, straight.state_dict()[name], rtol=1e-4, atol=2e-5)


def test_shard_ranges_cover_the_latents_once():
    from ssae_kernels.latent_sharding import shard_range

    for M, R in [(97, 2), (8, 8), (10, 3), (4608, 7)]:
        ranges = [shard_range(M, r, R) for r in range(R)]
        assert [i for part in ranges for i in part] == list(range(M))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_settings_latent_sharding_does_not_train_are_refused(monkeypatch, tmp_path):
    from ssae_kernels.recipes.common import UsageError
    from ssae_kernels.recipes.train import TrainRunConfig, check

    with pytest.raises(UsageError, match="--shard latents trains --arch topk with --optimizer adam, not --arch relu"):
        check(TrainRunConfig(out=str(tmp_path / "a"), arch="relu", shard="latents"))
    with pytest.raises(UsageError, match="not --arch topk with --optimizer sparse-adam"):
        check(TrainRunConfig(out=str(tmp_path / "b"), optimizer="sparse-adam", shard="latents"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="4 processes cannot share --latents 3"):
        check(TrainRunConfig(out=str(tmp_path / "c"), latents=3, k=2, shard="latents"))
    # TERM passes the sharding checks (the next check, of the model's path, is what fails here)
    with pytest.raises(UsageError, match="no such directory"):
        check(TrainRunConfig(out=str(tmp_path / "d"), tilt=1.0, shard="latents", model=str(tmp_path / "no-model")))
