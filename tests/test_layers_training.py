"""Several hookpoints in one run: ``harvest_layers`` (one forward pass for every layer), ``ssae train --layers``
(one SAE per layer, each the SAE a one-layer run trains) and ``--distribute-layers`` under torchrun."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ssae_kernels import activations, cli
from tiny_model import TEXTS, build_model, build_tokenizer, save_tiny, write_corpus


def test_harvest_layers_equals_one_harvest_per_layer():
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    together = activations.harvest_layers(model, tokenizer, TEXTS[:5], [2, 0], context=24, batch_size=3,
                                          max_tokens=100, progress=False)
    passes = len(calls)
    for layer in (0, 2):
        alone = activations.harvest(model, tokenizer, TEXTS[:5], layer, context=24, batch_size=3, max_tokens=100,
                                    progress=False)
        assert together[layer].layer == layer and len(together[layer]) == 100
        assert torch.equal(together[layer].acts, alone.acts) and torch.equal(together[layer].tokens, alone.tokens)
    assert passes == len(calls) // 3  # one pass over the batches for both layers, as many as for one layer
    with pytest.raises(ValueError, match=r"layer must be in \[0, 3\)"):
        activations.harvest_layers(model, tokenizer, TEXTS[:2], [1, 3], progress=False)


def _args(tiny, corpus, out, *extra):
    return ["train", "--model", tiny, "--text", corpus, "--max-tokens", "2000", "--context", "32", "--latents", "64",
            "--k", "4", "--steps", "10", "--batch-size", "256", "--eval-fraction", "0.2", "--eval-min-tokens", "0",
            "--ce-sequences", "2", "--quiet", "--threads", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(tiny model dir, corpus, a 2-layer run dir, the one-layer runs' reports)"""
    tmp = tmp_path_factory.mktemp("layers")
    tiny, corpus = save_tiny(str(tmp / "tiny")), write_corpus(str(tmp))
    assert cli.main(_args(tiny, corpus, tmp / "both", "--layers", "0,2", "--activation-cache", str(tmp / "acts"))) == 0
    alone = {}
    for layer in (0, 2):
        assert cli.main(_args(tiny, corpus, tmp / f"layer{layer}", "--layer", str(layer))) == 0
        alone[layer] = json.loads((tmp / f"layer{layer}" / "report.json").read_text())
    return tiny, corpus, tmp / "both", alone


def test_one_sae_per_layer_equals_the_one_layer_runs(tiny_run):
    _, _, both, alone = tiny_run
    summary = json.loads((both / "report.json").read_text())
    assert set(summary["by_layer"]) == {"0", "2"} and summary["by_layer"] == {
        str(layer): {key: json.loads((both / f"layer-{layer}" / "report.json").read_text())[key]
                     for key in summary["by_layer"][str(layer)]} for layer in (0, 2)}
    assert "[2](layer-2/report.md)" in (both / "report.md").read_text()
    for layer in (0, 2):
        report = json.loads((both / f"layer-{layer}" / "report.json").read_text())
        assert report["layer"] == layer and report["steps"] == 10
        assert report["fvu"] == pytest.approx(alone[layer]["fvu"], rel=1e-6)
        assert report["ce_sae"] == pytest.approx(alone[layer]["ce_sae"], rel=1e-6)
        for name in ("sae/sae.safetensors", "checkpoint/trainer.json", "metrics.jsonl", "report.md"):
            assert (both / f"layer-{layer}" / name).exists(), (layer, name)
    assert os.path.isfile(both.parent / "acts" / "layer-2" / "meta.json")  # each layer's cache


def test_bad_layer_lists_are_refused(tmp_path, tiny_run, capsys):
    tiny, corpus, _, _ = tiny_run
    assert cli.main(_args(tiny, corpus, tmp_path / "bad", "--layers", "1,1")) == 2
    assert "--layers must name distinct layers >= 0, got 1,1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(_args(tiny, corpus, tmp_path / "bad", "--layers", "1,x"))
    assert "expected layer numbers separated by commas (e.g. 6,10,15), got '1,x'" in capsys.readouterr().err
    assert cli.main(_args(tiny, corpus, tmp_path / "bad", "--layers", "0,5")) == 2
    assert "layer must be in [0, 3)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_distribute_layers_under_torchrun(tiny_run, tmp_path):
    # rank r trains layer r alone: the same SAEs as the single-process run over both layers
    tiny, corpus, both, _ = tiny_run
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python executable")
    out = tmp_path / "spread"
    run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ssae_kernels.cli",
                          *_args(tiny, corpus, out, "--layers", "0,2", "--distribute-layers")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "report.json").read_text())
    for rank, layer in enumerate((0, 2)):
        report = json.loads((out / f"layer-{layer}" / "report.json").read_text())
        assert report["rank"] == rank and report["world_size"] == 2  # the rank that trained it
        assert summary["by_layer"][str(layer)]["fvu"] == pytest.approx(
            json.loads((both / f"layer-{layer}" / "report.json").read_text())["fvu"], rel=1e-6)
