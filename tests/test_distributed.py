"""ssae_kernels.distributed: the latent-sharded encode and decode in 2 processes (gloo), against the
single-process ops on the same data: same indices, values and x_hat within float tolerance, complete gradients
of the replicated inputs on every rank and each rank's own rows of the weight gradients."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def _data(N, d, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    W_enc = torch.randn(M, d, generator=g, dtype=torch.float64) / d**0.5
    b_enc = 0.1 * torch.randn(M, generator=g, dtype=torch.float64)
    W_dec = torch.randn(M, d, generator=g, dtype=torch.float64) / d**0.5
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    return x, W_enc, b_enc, W_dec, b_dec


def _step(encode, decode, x, W_enc, b_enc, W_dec, b_dec, k):
    """(values, indices, x_hat, grads of everything) of encode -> decode -> a loss with weights of both signs."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    x_, We, be, Wd, bd = leaves
    values, indices = encode(x_, We, be, k, bd)
    x_hat = decode(values, indices, Wd, bd)
    weights = torch.linspace(-1, 1, values.numel(), dtype=values.dtype).view_as(values)
    loss = ((x_hat - x_) ** 2).sum() + (weights * values).sum()
    loss.backward()
    return values.detach(), indices, x_hat.detach(), [t.grad for t in leaves]


def _worker(rank, init_file, N, d, M, k, rows_of_rank0, dtype):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        import ssae_kernels
        from ssae_kernels.distributed import sharded_sparse_decode, sharded_topk_encode

        x, W_enc, b_enc, W_dec, b_dec = (t.to(dtype) for t in _data(N, d, M))
        lo, hi = (0, rows_of_rank0) if rank == 0 else (rows_of_rank0, M)
        whole = _step(lambda x, W, b, k, bd: ssae_kernels.topk_encode(x, W, b, k, b_dec=bd),
                      ssae_kernels.sparse_decode, x, W_enc, b_enc, W_dec, b_dec, k)
        sharded = _step(lambda x, W, b, k, bd: sharded_topk_encode(x, W, b, k, b_dec=bd),
                        sharded_sparse_decode, x, W_enc[lo:hi], b_enc[lo:hi], W_dec[lo:hi], b_dec, k)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        assert torch.equal(sharded[1], whole[1]), f"rank {rank}: indices differ"
        torch.testing.assert_close(sharded[0], whole[0], **tol)
        torch.testing.assert_close(sharded[2], whole[2], **tol)
        grads, want = sharded[3], whole[3]
        for name, got, expected in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), grads, want):
            if name in ("W_enc", "b_enc", "W_dec"):
                expected = expected[lo:hi]  # this rank's rows
                if not expected.numel():  # an empty shard's weights take no part in the graph
                    assert got is None, f"rank {rank}, grad {name}: {got}"
                    continue
            torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"rank {rank}, grad {name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("N,d,M,k,rows_of_rank0,dtype", [
    (16, 12, 100, 5, 50, torch.float64),    # even shards
    (9, 8, 61, 7, 20, torch.float64),       # uneven shards
    (12, 16, 40, 30, 10, torch.float64),    # k above one shard's rows: rank 0 offers all 10
    (20, 24, 300, 8, 150, torch.float32),
    (10, 8, 30, 4, 0, torch.float64),       # rank 0's shard is empty (as a latent-sharded AuxK's may be)
])
def test_sharded_encode_and_decode_equal_one_process(tmp_path, N, d, M, k, rows_of_rank0, dtype):
    mp.spawn(_worker, args=(str(tmp_path / "init"), N, d, M, k, rows_of_rank0, dtype), nprocs=WORLD, join=True)


def _mismatch_worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from ssae_kernels.distributed import sharded_topk_encode

        d = 8 if rank == 0 else 9
        try:
            sharded_topk_encode(torch.randn(4, 8), torch.randn(10, d), None, 3)
        except ValueError as e:
            message = str(e)
        else:
            raise AssertionError("mismatched shards were accepted")
        assert "rank 0: x [4, 8], W_enc_shard [10, 8], rank 1: x [4, 8], W_enc_shard [10, 9]" in message, message
    finally:
        dist.destroy_process_group()


def test_mismatched_shards_name_every_rank(tmp_path):
    mp.spawn(_mismatch_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
