"""SparseAdam (ssae_kernels/optim.py): dense Adam's state after a flush, its checkpoints, its use in training."""

import pytest
import torch

from ssae_kernels.optim import SkippedSteps, SparseAdam
from ssae_kernels.sae import SAEConfig, TopKSAE, sae_class
from ssae_kernels.trainer import TrainConfig, Trainer, new_sae


def run_both(M=40, d=6, steps=300, *, eps, frequencies, dtype=torch.float64, seed=0, flush_every=None):
    """The same sparse gradients through torch.optim.Adam (zeros for untouched rows) and SparseAdam,
    with a decaying learning rate; returns (dense params, sparse optimizer, its params)."""
    g = torch.Generator().manual_seed(seed)
    W, b, c = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((M, d), (M,), (d,)))
    dense = [t.clone().requires_grad_() for t in (W, b, c)]
    adam = torch.optim.Adam(dense, lr=1e-2, eps=eps, foreach=False)
    sparse = SparseAdam({"W": W, "b": b}, {"c": c}, lr=1e-2, eps=eps)
    for t in range(steps):
        lr = 1e-2 * (1 - t / steps)
        adam.param_groups[0]["lr"] = sparse.lr = lr
        rows = (torch.rand(M, generator=g) < frequencies).nonzero().squeeze(1)
        gW, gb = torch.randn(len(rows), d, generator=g, dtype=dtype), torch.randn(len(rows), generator=g, dtype=dtype)
        gc = torch.randn(d, generator=g, dtype=dtype)
        dense[0].grad = torch.zeros_like(W).index_copy_(0, rows, gW)
        dense[1].grad = torch.zeros_like(b).index_copy_(0, rows, gb)
        dense[2].grad = gc.clone()
        adam.step()
        sparse.step(rows, {"W": gW, "b": gb}, {"c": gc})
        if flush_every and (t + 1) % flush_every == 0:
            sparse.flush()
    sparse.flush()
    return adam, dense, sparse, (W, b, c)


@pytest.mark.parametrize("flush_every", [None, 37])
def test_flushed_state_is_dense_adams(flush_every):
    # Rows touched often, rarely, once early (then idle past the horizon) and never.
    frequencies = torch.cat([torch.full((10,), 0.5), torch.full((10,), 0.02), torch.zeros(20)])
    adam, dense, sparse, params = run_both(eps=1e-12, frequencies=frequencies, flush_every=flush_every)
    for p, q in zip(params, dense):
        torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-9)
    for name, q in zip(("W", "b", "c"), dense):
        m, v = sparse.state[name]
        torch.testing.assert_close(m, adam.state[q]["exp_avg"], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(v, adam.state[q]["exp_avg_sq"], rtol=1e-12, atol=1e-15)


def test_eps_is_the_only_approximation():
    # With Adam's usual eps the skipped steps' eps term is held at its first step's value: a relative
    # error of the order of eps / sqrt(v), far below the movement itself.
    frequencies = torch.full((40,), 0.1)
    _, dense, _, params = run_both(eps=1e-8, frequencies=frequencies)
    error = max(float((p - q.detach()).abs().max()) for p, q in zip(params, dense))
    assert 0 < error < 1e-5


def test_rows_idle_past_the_horizon():
    # A row touched at step 1 and next after 3 horizons sees the whole tail of its first update.
    skipped = SkippedSteps(0.9, 0.999, 1e-8, torch.device("cpu"))
    assert skipped.horizon > 100
    steps = 3 * skipped.horizon
    for t in range(1, steps + 1):
        skipped.record(t, 1e-3)
    table = skipped.table(torch.tensor([1, steps - 5, steps]), steps, torch.float64)
    r = 0.9 / 0.999**0.5
    a = [1e-3 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t) for t in range(1, steps + 1)]
    exact = sum(a[1 + j - 1] * r**j for j in range(1, steps - 1 + 1))  # steps 2..steps after last = 1
    assert table[0, 0].item() == pytest.approx(exact, rel=1e-9)
    assert table[1, 0].item() == pytest.approx(sum(a[steps - 5 + j - 1] * r**j for j in range(1, 6)), rel=1e-12)
    assert table[2].tolist() == [0.0, 1.0, 1.0, pytest.approx(1e-8 * (1 - 0.999 ** (steps + 1)) ** 0.5 / 0.999**0.5)]


def test_refuses_betas_whose_skipped_movement_does_not_decay():
    p = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"beta1 < sqrt\(beta2\)"):
        SparseAdam({"W": p}, {}, lr=1e-3, betas=(0.99, 0.9))
    with pytest.raises(ValueError, match="share their first dimension"):
        SparseAdam({"W": p, "b": torch.zeros(4)}, {}, lr=1e-3)


def test_state_needs_a_flush_and_round_trips():
    W = torch.randn(5, 3)
    opt = SparseAdam({"W": W}, {}, lr=1e-2)
    opt.step(torch.tensor([1, 3]), {"W": torch.randn(2, 3)}, {})
    opt.step(torch.tensor([0]), {"W": torch.randn(1, 3)}, {})
    with pytest.raises(RuntimeError, match="flush"):
        opt.state_tensors()
    opt.flush()
    state = {name: {k: v.clone() for k, v in entry.items()} for name, entry in opt.state_tensors().items()}
    other = SparseAdam({"W": W.clone()}, {}, lr=1e-2)
    other.load_state_tensors(state)
    assert other.step_count == 2 and torch.equal(other.state["W"][0], opt.state["W"][0])


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_touched_rows_loss_has_the_dense_loss_and_gradients(arch):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=12, num_latents=64, k=4, k_aux=6, dead_tokens=10, arch=arch)
    sae = sae_class(cfg)(cfg)
    sae.tokens_since_fired[::3] = 100  # a third of the latents dead: AuxK has rows of its own
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(30, 12)
    dense = sae.loss(x, t=0.5)
    dense.total.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    sparse = sae.loss(x, t=0.5, touched_rows=True)
    sparse.total.backward()
    rows = sparse.touched.rows
    torch.testing.assert_close(sparse.total, dense.total)
    assert torch.equal(sparse.indices, dense.indices) and sparse.aux > 0
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(getattr(sparse.touched, name).grad, grads[name][rows])
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[rows] = False
        assert not grads[name][untouched].any()  # the rows left out had no gradient
    torch.testing.assert_close(sae.b_dec.grad, grads["b_dec"])


def test_normalize_decoder_rows_touches_only_those_rows():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=8, num_latents=20, k=2))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(20, 1) * 3)
    before = sae.W_dec.detach().clone()
    rows = torch.tensor([3, 7, 19])
    sae.normalize_decoder(rows)
    torch.testing.assert_close(sae.W_dec[rows].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(sae.W_dec[rows], before[rows] / before[rows].norm(dim=1, keepdim=True))
    others = torch.ones(20, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(sae.W_dec[others], before[others])


def _train(acts, tmp_path, name, **cfg):
    sae = new_sae(acts, 256, 8, seed=0, dead_tokens=1500)
    trainer = Trainer(sae, acts, TrainConfig(batch_size=256, **cfg), str(tmp_path / name), progress=False)
    trainer.begin(resume=False)
    trainer.train()
    return trainer


def fvu(sae, x):
    with torch.no_grad():
        return float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_training_quality_matches_dense_adam(tmp_path):
    torch.manual_seed(0)
    acts = torch.randn(6000, 24) @ torch.randn(24, 24) / 5
    dense = _train(acts, tmp_path, "dense", steps=120)
    sparse = _train(acts, tmp_path, "sparse", steps=120, optimizer="sparse-adam")
    assert abs(fvu(dense.sae, acts) - fvu(sparse.sae, acts)) < 0.01
    assert fvu(sparse.sae, acts) < 0.6  # it trained


def test_resume_continues_exactly_and_across_optimizers(tmp_path):
    torch.manual_seed(1)
    acts = torch.randn(3000, 16)
    whole = _train(acts, tmp_path, "whole", steps=40, checkpoint_every=20, optimizer="sparse-adam")
    sae = new_sae(acts, 256, 8, seed=0, dead_tokens=1500)
    half = Trainer(sae, acts, TrainConfig(batch_size=256, steps=40, checkpoint_every=20, optimizer="sparse-adam"),
                   str(tmp_path / "half"), progress=False)
    half.begin(resume=False)
    for _ in range(20):  # a run stopped at its checkpoint
        half.train_step()
    half.save_checkpoint()
    resumed = Trainer(new_sae(acts, 256, 8, seed=5, dead_tokens=1500), acts,
                      TrainConfig(batch_size=256, steps=40, checkpoint_every=20, optimizer="sparse-adam"),
                      str(tmp_path / "half"), progress=False)
    resumed.begin(resume=True)
    resumed.train()
    for name, p in whole.sae.named_parameters():
        torch.testing.assert_close(p, dict(resumed.sae.named_parameters())[name], rtol=0, atol=0)
    # the checkpoint is torch.optim.Adam's: a dense run resumes it
    dense = Trainer(new_sae(acts, 256, 8, seed=5, dead_tokens=1500), acts,
                    TrainConfig(batch_size=256, steps=45, checkpoint_every=20), str(tmp_path / "half"), progress=False)
    dense.begin(resume=True)
    assert dense.step == 40
    dense.train()
    assert dense.step == 45


# ---- bfloat16 moments ---------------------------------------------------------------------------------


def test_bfloat16_moments_track_float32_ones():
    # The same sparse gradients into float32 and bfloat16 moments: stochastic rounding keeps the moments
    # within a few bfloat16 steps of the float32 ones, and the weights' movement with them.
    g = torch.Generator().manual_seed(0)
    M, d, steps = 64, 32, 200
    W0 = torch.randn(M, d, generator=g)
    full, half = W0.clone(), W0.clone()
    opts = [SparseAdam({"W": full}, {}, lr=1e-2), SparseAdam({"W": half}, {}, lr=1e-2, state_dtype=torch.bfloat16)]
    for _ in range(steps):
        rows = (torch.rand(M, generator=g) < 0.3).nonzero().squeeze(1)
        grad = torch.randn(len(rows), d, generator=g) * (1 + torch.arange(d) / 4)  # columns of different scale
        for opt in opts:
            opt.step(rows, {"W": grad.clone()}, {})
    for opt in opts:
        opt.flush()
    m, v = opts[1].state["W"]
    assert m.dtype == v.dtype == torch.bfloat16
    m32, v32 = opts[0].state["W"]
    # each v carries the rounding noise of its recent steps (a few bfloat16 steps of 2^-8), without bias
    v_error = (v.float() - v32) / v32
    # (measured: median 0.75%, mean -0.02%; m 0.35% and the weights' movement 0.4% off on average)
    assert float(v_error.abs().median()) < 0.015 and abs(float(v_error.mean())) < 0.002
    assert float((m.float() - m32).abs().mean() / m32.abs().mean()) < 0.02
    moved = (full - W0).abs().mean()
    assert float((half - full).abs().mean() / moved) < 0.02


def test_state_dtype_must_be_the_params_or_bfloat16():
    with pytest.raises(ValueError, match="state_dtype must be"):
        SparseAdam({"W": torch.zeros(3, 2)}, {}, lr=1e-3, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype must be"):
        SparseAdam({"W": torch.zeros(3, 2, dtype=torch.float64)}, {}, lr=1e-3, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs optimizer 'sparse-adam'"):
        TrainConfig(optimizer_state="bfloat16")


def test_bfloat16_moments_train_resume_exactly_and_into_dense_adam(tmp_path):
    torch.manual_seed(0)
    acts = torch.randn(6000, 24) @ torch.randn(24, 24) / 5
    kw = dict(optimizer="sparse-adam", optimizer_state="bfloat16")
    dense = _train(acts, tmp_path, "dense", steps=120)
    half = _train(acts, tmp_path, "half", steps=120, checkpoint_every=60, **kw)
    assert abs(fvu(dense.sae, acts) - fvu(half.sae, acts)) < 0.01
    assert half.optimizer_state()["W_enc"]["exp_avg"].dtype == torch.bfloat16
    # the rounding bits come from (seed, step, row, column): a resumed run is the same run
    stopped = Trainer(new_sae(acts, 256, 8, seed=0, dead_tokens=1500), acts,
                      TrainConfig(batch_size=256, steps=120, checkpoint_every=60, **kw), str(tmp_path / "stopped"),
                      progress=False)
    stopped.begin(resume=False)
    for _ in range(60):
        stopped.train_step()
    stopped.save_checkpoint()
    resumed = Trainer(new_sae(acts, 256, 8, seed=5, dead_tokens=1500), acts,
                      TrainConfig(batch_size=256, steps=120, checkpoint_every=60, **kw), str(tmp_path / "stopped"),
                      progress=False)
    resumed.begin(resume=True)
    resumed.train()
    for name, p in half.sae.named_parameters():
        torch.testing.assert_close(p, dict(resumed.sae.named_parameters())[name], rtol=0, atol=0)
    # torch.optim.Adam resumes it with float32 moments
    adam = Trainer(new_sae(acts, 256, 8, seed=5, dead_tokens=1500), acts,
                   TrainConfig(batch_size=256, steps=125, checkpoint_every=60), str(tmp_path / "stopped"),
                   progress=False)
    adam.begin(resume=True)
    adam.train()
    assert adam.step == 125 and adam.optimizer_state()["W_enc"]["exp_avg"].dtype == torch.float32
