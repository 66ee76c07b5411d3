"""The architectures beyond TopK (BatchTopKSAE, JumpReLUSAE, ReLUSAE): config checks, training (each one's
sparsity control reaching L0 ~ k on clustered data), files, TERM, and the CLI's --arch options (their
touched-rows loss: tests/test_optim.py; their peer formats: tests/test_formats.py)."""

import contextlib

import pytest
import torch

from ssae_kernels.evaluate import reconstruction_metrics
from ssae_kernels.formats import export_sae
from ssae_kernels.recipes.common import UsageError
from ssae_kernels.recipes.train import TrainRunConfig, check
from ssae_kernels.sae import ARCHITECTURES, SAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE, SAEConfig, TopKSAE, sae_class
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
    with pytest.raises(ValueError, match="max_k does not apply to arch 'topk'"):
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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_files_round_trip(tmp_path, arch):
    acts = _clustered(1024)
    sae = new_sae(acts, 64, 4, arch=arch)
    Trainer(sae, acts, TrainConfig(steps=20, batch_size=256, lr=3e-3), str(tmp_path / "run"), progress=False).train()
    sae.save(str(tmp_path / "sae"))
    back = SAE.load(str(tmp_path / "sae"))
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for name, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    for got, want in zip(back.encode(acts[:50]), sae.encode(acts[:50])):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=f"format 'sparsify' cannot hold a {arch} SAE") if arch != "topk" else \
            contextlib.nullcontext():
        export_sae(sae, str(tmp_path / "peer"), "sparsify")


def test_cli_checks_arch_options(tmp_path):
    with pytest.raises(UsageError, match="--max-k does not apply to --arch topk"):
        check(TrainRunConfig(out=str(tmp_path / "a"), max_k=64))
    with pytest.raises(UsageError, match=r"--max-k 8 must lie in \[--k, --latents\]"):
        check(TrainRunConfig(out=str(tmp_path / "b"), arch="batchtopk", max_k=8))


def test_config_of_the_penalised_architectures():
    jump = SAEConfig(d_in=8, num_latents=100, k=5, arch="jumprelu")
    relu = SAEConfig(d_in=8, num_latents=100, k=5, arch="relu")
    assert (jump.bandwidth, jump.l1_coef, jump.max_k) == (0.05, None, 20)
    assert (relu.l1_coef, relu.bandwidth, relu.max_k) == (1.5, None, 20)
    assert sae_class(jump) is JumpReLUSAE and sae_class(relu) is ReLUSAE
    with pytest.raises(ValueError, match="bandwidth applies to arch 'jumprelu' only, not 'relu'"):
        SAEConfig(d_in=8, num_latents=100, k=5, arch="relu", bandwidth=0.1)
    with pytest.raises(ValueError, match="l1_coef applies to arch 'relu' only, not 'topk'"):
        SAEConfig(d_in=8, num_latents=100, k=5, l1_coef=1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="bandwidth must be a positive finite number"):
            SAEConfig(d_in=8, num_latents=100, k=5, arch="jumprelu", bandwidth=bad)
    with pytest.raises(ValueError, match="l1_coef must be a non-negative finite number"):
        SAEConfig(d_in=8, num_latents=100, k=5, arch="relu", l1_coef=-0.5)
    assert SAEConfig(d_in=8, num_latents=100, k=5, arch="relu", l1_coef=0).l1_coef == 0.0


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_initialisation_starts_at_l0_k(arch):
    acts = _clustered()
    sae = new_sae(acts, 128, 6, arch=arch)
    assert abs(reconstruction_metrics(sae, acts)["l0"] - 6) <= 0.5


def test_jumprelu_training_holds_l0_at_k(tmp_path):
    acts = _clustered()
    sae = new_sae(acts, 128, 4, arch="jumprelu")
    start = reconstruction_metrics(sae, acts)
    first = sae.threshold.detach().clone()
    Trainer(sae, acts, TrainConfig(steps=300, batch_size=256, lr=3e-3), str(tmp_path), progress=False).train()
    after = reconstruction_metrics(sae, acts)
    assert abs(after["l0"] - 4) <= 0.2 * 4 and after["fvu"] < 0.5 * start["fvu"]
    assert not torch.equal(sae.threshold.detach(), first)  # the thresholds learned (per latent)
    assert float(sae.threshold.detach().std()) > 0


def test_jumprelu_loss_trains_the_threshold_and_refuses_touched_rows(tmp_path):
    acts = _clustered(512)
    sae = new_sae(acts, 64, 4, arch="jumprelu")
    out = sae.loss(acts[:256])
    assert out.sparsity is not None and torch.equal(out.total, out.reconstruction + sae.cfg.aux_coef * out.aux
                                                    + out.sparsity)
    out.total.backward()
    assert sae.threshold.grad is not None and bool(sae.threshold.grad.abs().sum() > 0)
    with pytest.raises(NotImplementedError, match="JumpReLUSAE"):
        sae.loss(acts[:256], touched_rows=True)
    with pytest.raises(ValueError, match="'sparse-adam' cannot train a JumpReLUSAE"):
        Trainer(sae, acts, TrainConfig(steps=1, optimizer="sparse-adam"), str(tmp_path), progress=False)


def test_relu_penalty_is_l1_weighted_by_decoder_norms():
    acts = _clustered(512)
    sae = new_sae(acts, 64, 4, arch="relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64).unsqueeze(1))  # rows of different norms
    x = acts[:100]
    out = sae.loss(x)
    pre = reference_pre(sae, x)
    want = sae.cfg.l1_coef * (torch.relu(pre) * sae.W_dec.detach().norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out.sparsity.detach(), want, rtol=1e-5, atol=1e-5)


def reference_pre(sae, x):
    from ssae_kernels.reference import pre_activations

    return pre_activations(x * sae.input_scale, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_larger_penalty_means_sparser_code(tmp_path, arch):
    # relu: the L1 coefficient sets L0; jumprelu: k is the target it holds
    acts = _clustered()
    results = []
    for setting in ((0.3, 3.0) if arch == "relu" else (8, 2)):
        kw = dict(l1_coef=setting) if arch == "relu" else {}
        sae = new_sae(acts, 128, setting if arch == "jumprelu" else 4, arch=arch, **kw)
        Trainer(sae, acts, TrainConfig(steps=150, batch_size=256, lr=3e-3), str(tmp_path / str(setting)),
                progress=False).train()
        results.append(reconstruction_metrics(sae, acts)["l0"])
    assert results[0] > 1.5 * results[1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_term_trains_every_architecture(tmp_path, arch):
    acts = _clustered(1024)
    sae = new_sae(acts, 64, 4, arch=arch)
    for streaming in (False, True):
        trainer = Trainer(sae, acts, TrainConfig(steps=5, batch_size=256, lr=3e-3, tilt=0.5, streaming_term=streaming),
                          str(tmp_path / str(streaming)), progress=False)
        trainer.train()
        assert trainer.step == 5 and all(bool(torch.isfinite(p).all()) for p in sae.parameters())


def test_cli_checks_penalty_options(tmp_path):
    with pytest.raises(UsageError, match="--bandwidth applies to --arch jumprelu only, not topk"):
        check(TrainRunConfig(out=str(tmp_path / "a"), bandwidth=0.1))
    with pytest.raises(UsageError, match="--l1-coef applies to --arch relu only, not jumprelu"):
        check(TrainRunConfig(out=str(tmp_path / "b"), arch="jumprelu", l1_coef=1.0))
    with pytest.raises(UsageError, match="--bandwidth must be a positive finite number, got 0"):
        check(TrainRunConfig(out=str(tmp_path / "c"), arch="jumprelu", bandwidth=0.0))
    with pytest.raises(UsageError, match="--l1-coef must be a non-negative finite number"):
        check(TrainRunConfig(out=str(tmp_path / "d"), arch="relu", l1_coef=float("nan")))
    with pytest.raises(UsageError, match="--optimizer sparse-adam cannot train --arch jumprelu"):
        check(TrainRunConfig(out=str(tmp_path / "e"), arch="jumprelu", optimizer="sparse-adam"))
