"""The training layer on a tiny Llama built from a config: activations, SAE, trainer, CLI (formats: test_formats.py)."""

import json
import os

import pytest
import torch

from ssae_kernels import activations, cli
from ssae_kernels.evaluate import reconstruction_metrics
from ssae_kernels.sae import SAEConfig, TopKSAE
from ssae_kernels.trainer import BatchSampler, NonFiniteLoss, TrainConfig, Trainer, new_sae
from tiny_model import TEXTS, build_model, build_tokenizer, save_tiny, write_corpus


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_model(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def test_harvest_equals_the_hidden_state_after_the_layer(tiny):
    model, tokenizer = tiny
    data = activations.harvest(model, tokenizer, TEXTS[:4], layer=1, context=24, batch_size=3, progress=False)
    chunks = activations.token_chunks(tokenizer, TEXTS[:4], 24)
    expected, expected_tokens = [], []
    for chunk in chunks:
        ids = torch.tensor([chunk])
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        expected.append(hidden[1:])  # the first position (BOS) is excluded
        expected_tokens.append(ids[0, 1:])
    torch.testing.assert_close(data.acts, torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(data.tokens, torch.cat(expected_tokens))
    assert chunks[0][0] == tokenizer.bos_token_id


def test_harvest_rejects_a_bad_layer(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"layer must be in \[0, 3\)"):
        activations.harvest(model, tokenizer, TEXTS[:2], layer=3, progress=False)


def test_activation_cache_round_trip(tmp_path, tiny):
    model, tokenizer = tiny
    data = activations.harvest(model, tokenizer, TEXTS[:3], layer=0, context=16, progress=False)
    activations.save_activations(str(tmp_path), data)
    back = activations.load_activations(str(tmp_path))
    assert torch.equal(back.acts, data.acts) and torch.equal(back.tokens, data.tokens) and back.layer == 0


def test_outlier_mask_drops_massive_norm_rows():
    acts = torch.randn(1000, 8)
    acts[[3, 500]] *= 1000
    keep = activations.outlier_mask(acts, 10.0)
    assert not keep[3] and not keep[500] and int(keep.sum()) == 998


def test_sae_init_and_config_checks():
    sae = TopKSAE(SAEConfig(d_in=8, num_latents=32, k=4))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec)
    with pytest.raises(ValueError, match="k = 40 must not exceed num_latents = 32"):
        SAEConfig(d_in=8, num_latents=32, k=40)


def _clustered(n=6000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, d, generator=g) * 3
    picks = torch.randint(0, 64, (n, 2), generator=g)
    return centers[picks[:, 0]] + 0.5 * centers[picks[:, 1]] + 0.1 * torch.randn(n, d, generator=g) + 5.0


def test_short_training_lowers_fvu(tmp_path):
    acts = _clustered()
    sae = new_sae(acts, 128, 4)
    before = reconstruction_metrics(sae, acts)["fvu"]
    Trainer(sae, acts, TrainConfig(steps=150, batch_size=256, lr=3e-3), str(tmp_path), progress=False).train()
    after = reconstruction_metrics(sae, acts)
    assert after["fvu"] < 0.5 * before
    assert after["l0"] <= 4
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))  # decoder rows stay unit-norm


def test_metrics_go_to_the_requested_loggers(tmp_path, monkeypatch):
    # Stand-ins for tensorboard's SummaryWriter and wandb record what the trainer sends them.
    import sys
    import types

    scalars, logged, closed = [], [], []

    class Writer:
        def __init__(self, log_dir):
            assert log_dir == os.path.join(str(tmp_path), "tensorboard")

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            closed.append("tensorboard")

    class Run:
        def log(self, record, step):
            logged.append((record, step))

        def finish(self):
            closed.append("wandb")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run()))
    acts = _clustered(1000)
    cfg = TrainConfig(steps=20, batch_size=128, log_every=10, log_to=("tensorboard", "wandb"))
    Trainer(new_sae(acts, 64, 4), acts, cfg, str(tmp_path), progress=False).train()
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [10, 20]
    assert [(r, s) for r, s in logged] == [(r, r["step"]) for r in records]
    assert ("fvu", records[-1]["fvu"], 20) in scalars and len(scalars) == 2 * (len(records[0]) - 1)
    assert sorted(closed) == ["tensorboard", "wandb"]


def test_missing_logger_library_fails_before_training(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    acts = _clustered(500)
    sae = new_sae(acts, 64, 4)
    before = sae.W_dec.detach().clone()
    with pytest.raises(ImportError, match="pip install wandb"):
        Trainer(sae, acts, TrainConfig(steps=5, batch_size=64, log_to=("wandb",)), str(tmp_path),
                progress=False).train()
    assert torch.equal(sae.W_dec, before)
    with pytest.raises(ValueError, match="log_to"):
        TrainConfig(log_to=("mlflow",))


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    acts = _clustered(3000)
    cfg = dict(steps=12, batch_size=200, lr=3e-3, checkpoint_every=5, tilt=2.0)

    straight = new_sae(acts, 64, 4, dead_tokens=600)
    Trainer(straight, acts, TrainConfig(**cfg), str(tmp_path / "a"), progress=False).train()

    class Killed(Exception):
        pass

    def kill_at_7(trainer):
        if trainer.step == 7:
            raise Killed

    first = new_sae(acts, 64, 4, dead_tokens=600)
    with pytest.raises(Killed):  # dies after step 7; the last checkpoint is from step 5
        Trainer(first, acts, TrainConfig(**cfg), str(tmp_path / "b"), progress=False).train(on_step=kill_at_7)
    resumed = new_sae(acts, 64, 4, dead_tokens=600, seed=123)  # another init: everything must come from disk
    trainer = Trainer(resumed, acts, TrainConfig(**cfg), str(tmp_path / "b"), progress=False)
    trainer.load_checkpoint()
    assert trainer.step == 5
    trainer.train()
    for name, p in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_ctrl_c_stops_cleanly_with_a_checkpoint(tmp_path):
    import signal

    acts = _clustered(1000)
    trainer = Trainer(new_sae(acts, 32, 4), acts, TrainConfig(steps=50, batch_size=100), str(tmp_path), progress=False)

    def interrupt_at_3(t):
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        trainer.train(on_step=interrupt_at_3)
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["step"] == 3


def test_batch_sampler_covers_each_epoch_once():
    sampler = BatchSampler(10, 4, seed=1)
    epoch = torch.cat([sampler.indices(i) for i in range(5)])  # 20 rows: two epochs
    assert sorted(epoch[:10].tolist()) == list(range(10)) and sorted(epoch[10:].tolist()) == list(range(10))
    assert torch.equal(BatchSampler(10, 4, seed=1).indices(3), sampler.indices(3))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    acts = _clustered(1000)
    sae = new_sae(acts, 32, 4)
    acts[5] = float("nan")
    trainer = Trainer(sae, acts, TrainConfig(steps=50, batch_size=1000, checkpoint_every=1), str(tmp_path), progress=False)
    with pytest.raises(NonFiniteLoss, match="non-finite loss .* at step 0"):
        trainer.train()


def test_dead_latents_get_the_aux_loss():
    acts = _clustered(2000)
    sae = new_sae(acts, 64, 4, dead_tokens=10)
    sae.tokens_since_fired[:40] = 100  # latents 0..39 dead
    out = sae.loss(acts[:500])
    assert float(out.aux) > 0
    out.total.backward()
    assert sae.W_enc.grad[:40].abs().sum() > 0  # the aux loss reaches dead latents' encoder rows


def test_streaming_term_training_runs(tmp_path):
    acts = _clustered(2000)
    sae = new_sae(acts, 64, 4)
    trainer = Trainer(sae, acts, TrainConfig(steps=20, batch_size=200, lr=3e-3, tilt=1.0, streaming_term=True),
                      str(tmp_path), progress=False)
    trainer.train()
    assert trainer.term.risk is not None and torch.isfinite(sae.W_dec).all()


# ---- CLI ---------------------------------------------------------------------------------


def _train_args(tiny_dir, corpus, out, *extra):
    return ["train", "--model", tiny_dir, "--layer", "1", "--text", corpus, "--max-tokens", "3000", "--context", "32",
            "--latents", "64", "--k", "4", "--steps", "30", "--batch-size", "256", "--eval-fraction", "0.2",
            "--eval-min-tokens", "0", "--ce-sequences", "4", "--quiet", "--out", str(out), *extra]


def test_cli_train_end_to_end(tmp_path, tiny_dir):
    corpus = write_corpus(str(tmp_path))
    assert cli.main(_train_args(tiny_dir, corpus, tmp_path / "run")) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for key in ("fvu", "l0", "k", "dead_fraction", "ce_loss_recovered", "tokens", "tokens_per_s", "passes",
                "eval_tokens", "eval_documents"):
        assert key in report
    assert 0 <= report["fvu"] < 1 and report["l0"] <= 4 and report["tokens"] == 30 * 256
    assert report["passes"] == pytest.approx(30 * 256 / report["unique_training_tokens"])
    for name in ("report.md", "training_curves.png", "latent_frequency.png", "metrics.jsonl",
                 "sae/cfg.json", "sae/sae.safetensors", "checkpoint/trainer.json"):
        assert (tmp_path / "run" / name).exists(), name
    # resume: more steps from the checkpoint
    assert cli.main(_train_args(tiny_dir, corpus, tmp_path / "run", "--resume", "--steps", "40")) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 40


def test_cli_empty_text(tmp_path, tiny_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert cli.main(_train_args(tiny_dir, str(empty), tmp_path / "run")) == 2
    assert "holds no text" in capsys.readouterr().err
