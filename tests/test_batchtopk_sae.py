"""BatchTopKSAE: config checks, training (batch selection, threshold estimate, inference at L0 ~ k), files,
export refusal and the CLI's --arch / --max-k checks (its touched-rows loss: tests/test_optim.py)."""

import pytest
import torch

from ssae_kernels.evaluate import reconstruction_metrics
from ssae_kernels.formats import export_sae
from ssae_kernels.recipes.common import UsageError
from ssae_kernels.recipes.train import TrainRunConfig, check
from ssae_kernels.sae import BatchTopKSAE, SAEConfig, TopKSAE, sae_class
from ssae_kernels.trainer import TrainConfig, Trainer, new_sae


def _clustered(n=4096, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, d, generator=g) * 3
    return centres[torch.randint(0, 64, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def test_config_checks():
    cfg = SAEConfig(d_in=8, num_latents=100, k=5, arch="batchtopk")
    assert cfg.max_k == 20 and sae_class(cfg) is BatchTopKSAE
    assert SAEConfig(d_in=8, num_latents=12, k=5, arch="batchtopk").max_k == 12  # at most num_latents
    assert sae_class(SAEConfig(d_in=8, num_latents=100, k=5)) is TopKSAE
    with pytest.raises(ValueError, match="arch must be one of"):
        SAEConfig(d_in=8, num_latents=100, k=5, arch="jumprelu-ish")
    with pytest.raises(ValueError, match="max_k applies to arch 'batchtopk' only"):
        SAEConfig(d_in=8, num_latents=100, k=5, max_k=10)
    with pytest.raises(ValueError, match=r"max_k must be an int in \[k, num_latents\]"):
        SAEConfig(d_in=8, num_latents=100, k=5, arch="batchtopk", max_k=4)


def test_encode_needs_a_trained_threshold():
    sae = BatchTopKSAE(SAEConfig(d_in=8, num_latents=40, k=3, arch="batchtopk"))
    with pytest.raises(RuntimeError, match="no threshold yet"):
        sae.encode(torch.randn(4, 8))


@pytest.mark.parametrize("optimizer", ["adam", "sparse-adam"])
def test_training_reaches_l0_near_k_at_inference(tmp_path, optimizer):
    acts = _clustered()
    sae = new_sae(acts, 128, 4, arch="batchtopk")
    before = reconstruction_metrics(new_sae(acts, 128, 4), acts)["fvu"]  # a TopK SAE at initialisation
    trainer = Trainer(sae, acts, TrainConfig(steps=150, batch_size=256, lr=3e-3, optimizer=optimizer),
                      str(tmp_path), progress=False)
    trainer.train()
    assert isinstance(sae, BatchTopKSAE) and float(sae.threshold) > 0
    after = reconstruction_metrics(sae, acts)
    assert abs(after["l0"] - 4) <= 0.15 * 4  # the training threshold gives about k latents per token
    assert after["fvu"] < 0.5 * before
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))


def test_files_round_trip_and_peer_export_is_refused(tmp_path):
    acts = _clustered(1024)
    sae = new_sae(acts, 64, 4, arch="batchtopk")
    Trainer(sae, acts, TrainConfig(steps=20, batch_size=256, lr=3e-3), str(tmp_path / "run"), progress=False).train()
    sae.save(str(tmp_path / "sae"))
    back = TopKSAE.load(str(tmp_path / "sae"))
    assert isinstance(back, BatchTopKSAE) and back.cfg == sae.cfg
    assert torch.equal(back.threshold, sae.threshold)
    for got, want in zip(back.encode(acts[:50]), sae.encode(acts[:50])):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="exporting a batchtopk SAE to format 'saelens' is not supported"):
        export_sae(sae, str(tmp_path / "peer"), "saelens")


def test_cli_checks_arch_options(tmp_path):
    with pytest.raises(UsageError, match="--max-k applies to --arch batchtopk only"):
        check(TrainRunConfig(out=str(tmp_path / "a"), max_k=64))
    with pytest.raises(UsageError, match=r"--max-k 8 must lie in \[--k, --latents\]"):
        check(TrainRunConfig(out=str(tmp_path / "b"), arch="batchtopk", max_k=8))
