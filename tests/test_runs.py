"""Run directories, crash safety and the command line's errors, on the tiny Llama."""

import json
import os
import re
import shutil

import pytest
import torch

from ssae_kernels import cli, storage
from ssae_kernels.recipes import train as train_recipe
from ssae_kernels.sae import TopKSAE
from ssae_kernels.trainer import CHECKPOINT, TrainConfig, Trainer, checkpoint_step, cut_metrics, new_sae, \
    recover_checkpoint
from tiny_model import save_tiny, write_corpus


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(str(tmp_path))


def train_args(tiny_dir, corpus, out, *extra):
    return ["train", "--model", tiny_dir, "--layer", "1", "--text", corpus, "--max-tokens", "3000", "--context", "32",
            "--latents", "64", "--k", "4", "--steps", "20", "--batch-size", "256", "--eval-fraction", "0.2",
            "--eval-min-tokens", "0", "--ce-sequences", "2", "--checkpoint-every", "10", "--quiet", "--out", str(out),
            *extra]


def one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ssae ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


# ---- run directories ---------------------------------------------------------------------------


def test_a_run_is_never_overwritten_silently(tmp_path, tiny_dir, corpus, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(tiny_dir, corpus, out)) == 0
    weights = (out / "sae" / "sae.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(train_args(tiny_dir, corpus, out, "--seed", "3")) == 2
    one_line_error(capsys, "holds an `ssae train` run; pass --resume .* or --overwrite")
    assert (out / "sae" / "sae.safetensors").read_bytes() == weights and (out / "metrics.jsonl").read_text() == metrics

    assert cli.main(train_args(tiny_dir, corpus, out, "--seed", "3", "--overwrite")) == 0
    assert "--overwrite: replacing the `ssae train` run" in capsys.readouterr().err
    assert (out / "sae" / "sae.safetensors").read_bytes() != weights
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 3


def test_resume_refuses_changed_settings_and_names_each(tmp_path, tiny_dir, corpus, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(tiny_dir, corpus, out)) == 0
    capsys.readouterr()
    changed = train_args(tiny_dir, corpus, out, "--resume", "--latents", "128", "--k", "8", "--layer", "0")
    assert cli.main(changed) == 2
    err = capsys.readouterr().err
    for flag in ("--latents 128 (the run has 64)", "--k 8 (the run has 4)", "--layer 0 (the run has 1)"):
        assert flag in err

    assert cli.main(train_args(tiny_dir, corpus, out, "--resume", "--steps", "30")) == 0
    report = json.loads((out / "report.json").read_text())
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert report["steps"] == 30 and report["num_latents"] == cfg["num_latents"] == 64 and report["k"] == cfg["k"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_resume_needs_a_run(tmp_path, tiny_dir, corpus, capsys):
    assert cli.main(train_args(tiny_dir, corpus, tmp_path / "none", "--resume")) == 2
    one_line_error(capsys, "holds no run to resume")


def test_out_that_is_a_file_or_a_foreign_directory_is_refused(tmp_path, tiny_dir, corpus, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(train_args(tiny_dir, corpus, afile)) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert cli.main(train_args(tiny_dir, corpus, afile / "sub")) == 2
    one_line_error(capsys, "cannot write in")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(train_args(tiny_dir, corpus, foreign, "--overwrite")) == 2
    one_line_error(capsys, "is not empty and holds no ssae run")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_failed_run_leaves_no_directory(tmp_path, tiny_dir, corpus, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(tiny_dir, corpus, out, "--layer", "7")) == 2  # fails after the model is loaded
    one_line_error(capsys, r"layer must be in \[0, 3\)")
    assert not out.exists()


# ---- errors before anything slow ------------------------------------------------------------------


@pytest.mark.parametrize("extra,pattern", [
    (["--k", "0"], "--k must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--k", "100"], "--k 100 must not exceed --latents 64"),
    (["--eval-fraction", "1.5"], r"--eval-fraction must be in \(0, 1\)"),
    (["--model", "no/such/dir"], "--model no/such/dir: no such directory"),
    (["--text", "missing.jsonl"], "text source missing.jsonl: no such file"),
    (["--optimizer-state", "bfloat16"], "--optimizer-state bfloat16 needs --optimizer sparse-adam"),
])
def test_bad_arguments_fail_before_the_model_loads(tmp_path, tiny_dir, corpus, capsys, monkeypatch, extra, pattern):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("ssae_kernels.models.load_model", no_model)
    assert cli.main(train_args(tiny_dir, corpus, tmp_path / "run", *extra)) == 2
    one_line_error(capsys, re.escape(pattern) if "(" not in pattern else pattern)
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_fails_at_once(tmp_path, tiny_dir, corpus, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for flag, value in (("--model", "someone/some-model"), ("--text", "someone/some-dataset")):
        assert cli.main(train_args(tiny_dir, corpus, tmp_path / "run", flag, value)) == 2
        one_line_error(capsys, "hub is unreachable")


@pytest.mark.parametrize("content,pattern", [
    (b'{"text": "fine"}\n{not json}\n', r"corpus.jsonl:2: not valid JSON"),
    (b'{"body": "x"}\n', r"corpus.jsonl:1 has no field 'text'"),
    (b'{"text": "caf\xe9"}\n', r"corpus.jsonl: not UTF-8 text"),
])
def test_bad_text_files_are_named(tmp_path, tiny_dir, capsys, content, pattern):
    bad = tmp_path / "corpus.jsonl"
    bad.write_bytes(content)
    assert cli.main(train_args(tiny_dir, str(bad), tmp_path / "run")) == 2
    one_line_error(capsys, pattern)


def test_debug_shows_the_traceback(tmp_path, tiny_dir, corpus, capsys):
    assert cli.main(["--debug", *train_args(tiny_dir, corpus, tmp_path / "run", "--k", "0")]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert cli.main([*train_args(tiny_dir, corpus, tmp_path / "run", "--k", "0"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_help_shows_every_default_and_version_exists(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.help == "==SUPPRESS==" or not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"ssae {name} {action.option_strings[0]} has no help (argparse then shows no default)"
            rendered = command.formatter_class(name)._expand_help(action)
            stated = "(default: " in rendered or "(required" in rendered  # ssae subspace --out: not with `eval`
            assert stated or action.required, f"ssae {name} {action.option_strings[0]}: {rendered}"
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and "ssae-kernels" in capsys.readouterr().out


# ---- held-out split -----------------------------------------------------------------------------------


def test_held_out_documents_meet_both_the_fraction_and_the_token_floor():
    docs = [f"doc {i}" for i in range(100)]
    counts = [50] * 100
    train, held = train_recipe.split_documents(docs, counts, 0.05, min_eval_tokens=1000)
    assert len(held) == 20 and len(train) == 80 and not set(train) & set(held)  # 1000 tokens need 20 documents
    train, held = train_recipe.split_documents(docs, counts, 0.1, min_eval_tokens=0)
    assert len(held) == 10
    assert train_recipe.split_documents(docs, counts, 0.1)[1] == held  # the same documents every time
    with pytest.raises(ValueError, match="too few"):
        train_recipe.split_documents(docs, counts, 0.05, min_eval_tokens=4000)


# ---- crash safety -------------------------------------------------------------------------------------


def _trained(tmp_path, steps):
    acts = torch.randn(600, 16)
    trainer = Trainer(new_sae(acts, 32, 4), acts, TrainConfig(steps=steps, batch_size=100, checkpoint_every=2),
                      str(tmp_path), progress=False)
    trainer.begin(resume=False)
    return trainer, acts


class Crash(BaseException):
    pass


def _count_rotation_calls(tmp_path):
    """How many os.replace / shutil.rmtree calls one save_checkpoint makes after the first one."""
    trainer, _ = _trained(tmp_path / "count", 2)
    trainer.train()
    calls = []
    real_replace, real_rmtree = os.replace, shutil.rmtree
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", lambda *a, **k: (calls.append("replace"), real_replace(*a, **k)))
        mp.setattr(shutil, "rmtree", lambda *a, **k: (calls.append("rmtree"), real_rmtree(*a, **k)))
        trainer.save_checkpoint()
    return len(calls)


def test_resume_recovers_from_a_crash_at_every_point_of_the_rotation(tmp_path):
    points = _count_rotation_calls(tmp_path)
    assert points >= 6  # atomic file writes, the checksums, and the directory renames
    for point in range(1, points + 1):
        out = tmp_path / f"crash{point}"
        trainer, acts = _trained(out, 2)
        trainer.train()  # a complete checkpoint at step 2
        trainer.cfg.steps = 4
        trainer.step = 4
        calls = [0]
        real_replace, real_rmtree = os.replace, shutil.rmtree

        def counted(real):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == point:
                    raise Crash
                return real(*args, **kwargs)
            return call

        with pytest.MonkeyPatch.context() as mp, pytest.raises(Crash):
            mp.setattr(os, "replace", counted(real_replace))
            mp.setattr(shutil, "rmtree", counted(real_rmtree))
            trainer.save_checkpoint()
        path = recover_checkpoint(str(out))
        assert path == str(out / CHECKPOINT), point
        assert checkpoint_step(path) in (2, 4), point  # the old checkpoint or the new one, never none
        assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl"], (point, os.listdir(out))
        again = Trainer(new_sae(acts, 32, 4, seed=9), acts, TrainConfig(steps=6, batch_size=100), str(out),
                        progress=False)
        again.begin(resume=True)
        assert again.step == checkpoint_step(path)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_not_resumed_from(tmp_path):
    trainer, acts = _trained(tmp_path, 2)
    trainer.train()
    _flip_last_byte(tmp_path / CHECKPOINT / "optimizer.safetensors")
    assert checkpoint_step(str(tmp_path / CHECKPOINT)) == 2  # complete; its weights are verified when loaded
    with pytest.raises(storage.CorruptFileError, match="optimizer.safetensors"):
        Trainer(new_sae(acts, 32, 4), acts, TrainConfig(steps=4, batch_size=100), str(tmp_path),
                progress=False).begin(resume=True)
    _flip_last_byte(tmp_path / CHECKPOINT / "trainer.json")
    assert checkpoint_step(str(tmp_path / CHECKPOINT)) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(new_sae(acts, 32, 4), acts, TrainConfig(steps=4, batch_size=100), str(tmp_path),
                progress=False).begin(resume=True)


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "fvu": 0.5}) + "\n" for s in range(10, 60, 10)) + '{"step": 6')
    cut_metrics(str(path), 30)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20, 30]


def test_a_checkpoint_records_checksums_of_its_files(tmp_path):
    trainer, _ = _trained(tmp_path, 2)
    trainer.train()
    manifest = storage.read_checksums(str(tmp_path / CHECKPOINT))
    assert set(manifest) == {"sae.safetensors", "optimizer.safetensors", "trainer.json"}
    assert TopKSAE.load(str(tmp_path / CHECKPOINT)).cfg.num_latents == 32


# ---- progress bars --------------------------------------------------------------------------------------


def test_progress_bars_stop_at_their_totals(tmp_path, tiny_dir, corpus, monkeypatch):
    import tqdm.auto

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def close(self):
            if self.total is not None:
                bars.append((self.desc, self.n, self.total))
            super().close()

    for module in ("activations", "evaluate", "trainer"):
        monkeypatch.setattr(f"ssae_kernels.{module}.tqdm", Recorder)
    args = train_args(tiny_dir, corpus, tmp_path / "run", "--max-tokens", "500", "--ce-sequences", "3")
    args.remove("--quiet")
    assert cli.main(args) == 0
    names = {desc.split(" ")[0] for desc, _, _ in bars}
    assert {"activations", "downstream", "train"} <= names, bars
    assert all(n == total for _, n, total in bars), bars
