"""SAE checkpoint formats: our own (checksums, config and shape checks), SAELens and sparsify (loading with
checks, export read back by our loader and by the peers' own loaders) and ``ssae export``."""

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssae_kernels
from ssae_kernels import formats
from ssae_kernels.recipes import export
from ssae_kernels.recipes.common import UsageError
from ssae_kernels.sae import SAE, SAEConfig, TopKSAE, sae_class
from ssae_kernels.storage import CorruptFileError

WEIGHTS = {"ssae": "sae.safetensors", "saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}


def _trained_like_sae(d=12, M=40, k=5, scale=1.0):
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(d_in=d, num_latents=M, k=k))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.input_scale.fill_(scale)
    return sae


def _dense(values, indices, M):
    return torch.zeros(values.shape[0], M).scatter_(1, indices.long(), values.float())


def _close(actual, expected):
    """Equal up to float32 rounding of the folded weights, relative to the size of the values."""
    actual, expected = actual.detach(), expected.detach()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _flip_data_byte(path):
    """Flips one byte in the middle of the tensor data (after the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + (len(data) - start) // 2] ^= 0x5A
    with open(path, "wb") as f:
        f.write(data)


def _edit_cfg(directory, **changes):
    path = os.path.join(directory, "cfg.json")
    with open(path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)


def _written(tmp_path, fmt, sae=None):
    directory = str(tmp_path / fmt)
    formats.export_sae(sae or _trained_like_sae(scale=0.37), directory, fmt)
    return directory


# ---- our format ------------------------------------------------------------------------------


def test_our_format_round_trip(tmp_path):
    sae = _trained_like_sae(scale=0.37)
    sae.tokens_since_fired[:3] = 7
    sae.save(str(tmp_path))
    assert json.loads((tmp_path / "checksums.json").read_text()).keys() == {"sae.safetensors"}
    back = formats.load_sae(str(tmp_path))
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.randn(30, 12)
    torch.testing.assert_close(back(x), sae(x))


def test_save_over_an_existing_directory_updates_the_checksum(tmp_path):
    _trained_like_sae().save(str(tmp_path))
    other = TopKSAE(SAEConfig(d_in=12, num_latents=40, k=5), generator=torch.Generator().manual_seed(9))
    other.save(str(tmp_path))
    assert torch.equal(TopKSAE.load(str(tmp_path)).W_dec, other.W_dec)


def test_flipped_byte_in_the_weights_is_detected(tmp_path):
    _trained_like_sae().save(str(tmp_path))
    _flip_data_byte(tmp_path / "sae.safetensors")
    with pytest.raises(CorruptFileError, match=r"sae\.safetensors: contents do not match"):
        TopKSAE.load(str(tmp_path))
    with pytest.raises(CorruptFileError, match=r"sae\.safetensors"):
        formats.load_sae(str(tmp_path))


def test_directory_without_checksums_still_loads(tmp_path):
    sae = _trained_like_sae()
    sae.save(str(tmp_path))
    os.remove(tmp_path / "checksums.json")  # as written before checksums existed
    assert torch.equal(TopKSAE.load(str(tmp_path)).W_enc, sae.W_enc)


def test_unreadable_files_name_themselves(tmp_path):
    _trained_like_sae().save(str(tmp_path))
    (tmp_path / "checksums.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"checksums\.json"):
        TopKSAE.load(str(tmp_path))
    os.remove(tmp_path / "checksums.json")
    (tmp_path / "sae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CorruptFileError, match=r"sae\.safetensors: not a readable safetensors file"):
        TopKSAE.load(str(tmp_path))


@pytest.mark.parametrize("changes,message", [
    ({"k": None}, r"cfg\.json: missing key 'k'"),
    ({"d_in": None}, r"cfg\.json: missing key 'd_in'"),
    ({"k": "5"}, r"cfg\.json: key 'k' must be a positive int, got '5'"),
    ({"k": 41}, r"cfg\.json: k = 41 must not exceed num_latents = 40"),
    ({"compute_dtype": "float16"}, r"cfg\.json: compute_dtype must be"),
    ({"expansion": 4, "zeta": 1}, r"cfg\.json: unknown keys \['expansion', 'zeta'\]"),
])
def test_bad_config_names_file_and_key(tmp_path, changes, message):
    _trained_like_sae().save(str(tmp_path))
    _edit_cfg(str(tmp_path), **changes)
    with pytest.raises(ValueError, match=message):
        TopKSAE.load(str(tmp_path))


@pytest.mark.parametrize("changes,message", [
    ({"d_in": 13}, r"sae\.safetensors: tensor 'W_enc' has shape \[40, 12\], expected \[40, 13\] "
                   r"\(num_latents=40, d_in=13 in .*cfg\.json\)"),
    ({"num_latents": 41}, r"sae\.safetensors: tensor 'W_enc' has shape \[40, 12\], expected \[41, 12\]"),
])
def test_wrong_shapes_in_our_format(tmp_path, changes, message):
    _trained_like_sae().save(str(tmp_path))
    _edit_cfg(str(tmp_path), **changes)
    with pytest.raises(ValueError, match=message):
        TopKSAE.load(str(tmp_path))


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.pop("b_enc"), r"sae\.safetensors: missing tensor 'b_enc'"),
    (lambda w: w.update(extra=torch.zeros(2)), r"sae\.safetensors: unexpected tensors \['extra'\]"),
    (lambda w: w.update(b_dec=torch.zeros(11)), r"tensor 'b_dec' has shape \[11\], expected \[12\]"),
    (lambda w: w.update(input_scale=torch.ones(1)), r"tensor 'input_scale' has shape \[1\], expected \[\]"),
])
def test_missing_extra_and_misshapen_tensors(tmp_path, edit, message):
    _trained_like_sae().save(str(tmp_path))
    os.remove(tmp_path / "checksums.json")
    tensors = load_file(tmp_path / "sae.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "sae.safetensors")
    with pytest.raises(ValueError, match=message):
        TopKSAE.load(str(tmp_path))


# ---- SAELens and sparsify directories ---------------------------------------------------------


def test_loads_saelens_directories(tmp_path):
    sae = _trained_like_sae()
    save_file({"W_enc": sae.W_enc.detach().T.contiguous(), "b_enc": sae.b_enc.detach(), "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 12, "d_sae": 40, "k": 5, "architecture": "topk",
                                                   "apply_b_dec_to_input": True, "normalize_activations": "none",
                                                   "rescale_acts_by_decoder_norm": False}))
    assert formats.detect_format(str(tmp_path)) == "saelens"
    x = torch.randn(30, 12)
    torch.testing.assert_close(formats.load_sae(str(tmp_path))(x), sae(x))


def test_loads_saelens_without_b_dec_on_the_input(tmp_path):
    sae = _trained_like_sae()
    save_file({"W_enc": sae.W_enc.detach().T.contiguous(), "b_enc": sae.b_enc.detach(), "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 12, "d_sae": 40, "k": 5, "architecture": "topk",
                                                   "apply_b_dec_to_input": False}))
    x = torch.randn(30, 12)
    pre = x @ sae.W_enc.detach().T + sae.b_enc.detach()  # SAELens: the encoder sees x itself
    top = pre.topk(5, dim=1)
    expected = ssae_kernels.reference.sparse_decode(torch.relu(top.values), top.indices, sae.W_dec.detach(), sae.b_dec.detach())
    torch.testing.assert_close(formats.load_sae(str(tmp_path))(x), expected, rtol=1e-4, atol=1e-4)


def test_loads_sparsify_directories(tmp_path):
    sae = _trained_like_sae()
    save_file({"encoder.weight": sae.W_enc.detach(), "encoder.bias": sae.b_enc.detach(), "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                                                   "num_latents": 40, "k": 5, "multi_topk": False,
                                                   "skip_connection": False, "transcode": False, "d_in": 12}))
    assert formats.detect_format(str(tmp_path)) == "sparsify"
    x = torch.randn(30, 12)
    torch.testing.assert_close(formats.load_sae(str(tmp_path))(x), sae(x))


def test_unsupported_checkpoints_are_rejected(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "gated"}))
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="SAELens architecture 'gated' is not supported"):
        formats.load_sae(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        formats.load_sae(str(tmp_path / "missing"))


@pytest.mark.parametrize("fmt,changes,message", [
    ("saelens", {"d_in": 13}, r"tensor 'W_enc' has shape \[12, 40\], expected \[13, 40\] \(d_in=13, d_sae=40 in "
                              r".*cfg\.json\)"),
    ("saelens", {"d_sae": 39}, r"sae_weights\.safetensors: tensor 'W_enc' .* \(d_in=12, d_sae=39 in .*cfg\.json\)"),
    ("saelens", {"k": None}, r"cfg\.json: missing key 'k'"),
    ("saelens", {"d_sae": None}, r"cfg\.json: missing key 'd_sae'"),
    ("saelens", {"k": 0}, r"cfg\.json: key 'k' must be a positive int"),
    ("sparsify", {"d_in": 13}, r"sae\.safetensors: tensor 'encoder\.weight' has shape \[40, 12\], expected "
                               r"\[40, 13\] \(num_latents=40, d_in=13 in .*cfg\.json\)"),
    ("sparsify", {"num_latents": 41}, r"tensor 'encoder\.weight' .* \(num_latents=41, d_in=12 in .*cfg\.json\)"),
    ("sparsify", {"num_latents": 0, "expansion_factor": 4}, r"expected \[48, 12\]"),  # 0: d_in * expansion_factor
    ("sparsify", {"k": None}, r"cfg\.json: missing key 'k'"),  # sparsify itself would default to k = 32
    ("sparsify", {"d_in": None}, r"cfg\.json: missing key 'd_in'"),
    ("sparsify", {"k": 41}, r"cfg\.json: k=41 exceeds the 40 latents"),
])
def test_foreign_configs_that_do_not_fit_are_rejected(tmp_path, fmt, changes, message):
    directory = _written(tmp_path, fmt)
    _edit_cfg(directory, **changes)
    with pytest.raises(ValueError, match=message):
        formats.load_sae(directory)


@pytest.mark.parametrize("fmt", ["ssae", "saelens", "sparsify"])
def test_bad_json_names_the_file(tmp_path, fmt):
    directory = _written(tmp_path, fmt)
    with open(os.path.join(directory, "cfg.json"), "w") as f:
        f.write('{"d_in": 12,')
    with pytest.raises(ValueError, match=r"cfg\.json: not valid JSON"):
        formats.load_sae(directory)
    with open(os.path.join(directory, "cfg.json"), "w") as f:
        f.write("[12, 40]")
    with pytest.raises(ValueError, match=r"cfg\.json: expected a JSON object, found list"):
        formats.load_sae(directory)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_flipped_byte_in_exported_weights_is_detected(tmp_path, fmt):
    directory = _written(tmp_path, fmt)
    _flip_data_byte(os.path.join(directory, WEIGHTS[fmt]))
    with pytest.raises(CorruptFileError, match=WEIGHTS[fmt].replace(".", r"\.")):
        formats.load_sae(directory)


# ---- export --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_round_trip(tmp_path, fmt):
    sae = _trained_like_sae(d=32, M=128, k=8, scale=0.37)
    sae.cfg.dead_tokens = 5000
    directory = _written(tmp_path, fmt, sae)
    assert formats.detect_format(directory) == fmt
    assert set(os.listdir(directory)) == {"cfg.json", WEIGHTS[fmt], "checksums.json"}
    back = formats.load_sae(directory)
    assert back.cfg == sae.cfg and float(back.input_scale) == pytest.approx(0.37)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(back, name), getattr(sae, name), msg=name)
    x = 3 * torch.randn(64, 32)
    _close(back(x), sae(x))
    _close(_dense(*back.encode(x), 128), _dense(*sae.encode(x), 128))


def test_export_folds_input_scale_into_the_weights(tmp_path):
    sae = _trained_like_sae(scale=0.37)
    w = load_file(formats.export_sae(sae, str(tmp_path), "saelens"))
    torch.testing.assert_close(w["W_enc"], 0.37 * sae.W_enc.detach().T)
    torch.testing.assert_close(w["W_dec"], sae.W_dec.detach() / 0.37)
    torch.testing.assert_close(w["b_dec"], sae.b_dec.detach() / 0.37)
    torch.testing.assert_close(w["b_enc"], sae.b_enc.detach())
    # The peer's forward, written out: TopK of ReLU pre-activations of (x - b_dec), decoded plus b_dec.
    x = 3 * torch.randn(30, 12)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(5, dim=1)
    x_hat = torch.einsum("nk,nkd->nd", torch.relu(top.values), w["W_dec"][top.indices]) + w["b_dec"]
    _close(x_hat, sae(x))


def test_export_rejects_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'pickle'"):
        formats.export_sae(_trained_like_sae(), str(tmp_path), "pickle")


def test_saelens_loads_our_export(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _trained_like_sae(d=32, M=128, k=8, scale=0.37)
    directory = _written(tmp_path, "saelens", sae)
    peer = sae_lens.SAE.load_from_disk(directory)
    assert type(peer).__name__ == "TopKSAE" and peer.cfg.k == 8 and not peer.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(peer.W_dec.detach(), sae.W_dec.detach() / 0.37)  # no renormalisation on load
    x = 3 * torch.randn(64, 32)
    with torch.no_grad():
        _close(peer(x), sae(x))
        _close(peer.encode(x), _dense(*sae.encode(x), 128))


def test_sparsify_loads_our_export(tmp_path, monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    from sparsify import sparse_coder, utils

    # sparsify picks its Triton decoder whenever triton is importable, also for CPU tensors; on the CPU use
    # its own eager fallback (what SPARSIFY_DISABLE_TRITON=1 selects at import).
    monkeypatch.setattr(sparse_coder, "decoder_impl", utils.eager_decode)
    sae = _trained_like_sae(d=32, M=128, k=8, scale=0.37)
    directory = _written(tmp_path, "sparsify", sae)
    peer = sparsify.SparseCoder.load_from_disk(directory)
    assert peer.cfg.k == 8 and peer.num_latents == 128 and peer.cfg.activation == "topk"
    torch.testing.assert_close(peer.W_dec.detach(), sae.W_dec.detach() / 0.37)  # no renormalisation on load
    x = 3 * torch.randn(64, 32)
    with torch.no_grad():
        out = peer(x)
        _close(out.sae_out, sae(x))
        encoded = peer.encode(x)
        _close(_dense(encoded.top_acts, encoded.top_indices, 128), _dense(*sae.encode(x), 128))


# ---- ssae export -------------------------------------------------------------------------------


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="ssae")
    export.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["export", *argv])


def test_export_command_converts_between_formats(tmp_path, capsys):
    sae = _trained_like_sae(scale=0.37)
    sae.save(str(tmp_path / "ours"))
    args = _parse("--sae", str(tmp_path / "ours"), "--format", "saelens", "--out", str(tmp_path / "sl"))
    result = args.handler(args)
    assert result["out"] == str(tmp_path / "sl") and result["source_format"] == "ssae"
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "sl"))
    # --sae takes any format load_sae reads: SAELens to sparsify
    result = export.run(export.ExportConfig(sae=str(tmp_path / "sl"), format="sparsify", out=str(tmp_path / "sp")))
    assert result["source_format"] == "saelens" and formats.detect_format(str(tmp_path / "sp")) == "sparsify"
    x = 3 * torch.randn(30, 12)
    _close(formats.load_sae(str(tmp_path / "sp"))(x), sae(x))


def test_export_command_refuses_a_non_empty_out(tmp_path):
    _trained_like_sae().save(str(tmp_path / "ours"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    args = _parse("--sae", str(tmp_path / "ours"), "--format", "sparsify", "--out", str(tmp_path / "out"))
    with pytest.raises(UsageError, match=r"--out .* exists and is not empty \(pass --overwrite"):
        args.handler(args)
    formats.export_sae(_trained_like_sae(), str(tmp_path / "out"), "saelens")  # an earlier export, another format
    args = _parse("--sae", str(tmp_path / "ours"), "--format", "sparsify", "--out", str(tmp_path / "out"),
                  "--overwrite")
    args.handler(args)
    assert sorted(os.listdir(tmp_path / "out")) == ["cfg.json", "checksums.json", "notes.txt", "sae.safetensors"]
    assert formats.detect_format(str(tmp_path / "out")) == "sparsify"


def test_export_command_errors_name_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--sae .*: no such directory"):
        export.run(export.ExportConfig(sae=str(tmp_path / "nothing"), format="saelens", out=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="--sae .*empty.*no cfg.json"):
        export.run(export.ExportConfig(sae=str(tmp_path / "empty"), format="saelens", out=str(tmp_path / "o")))
    _trained_like_sae().save(str(tmp_path / "ours"))
    _flip_data_byte(tmp_path / "ours" / "sae.safetensors")
    with pytest.raises(UsageError, match=r"--sae .*sae\.safetensors: contents do not match"):
        export.run(export.ExportConfig(sae=str(tmp_path / "ours"), format="saelens", out=str(tmp_path / "o")))
    with pytest.raises(UsageError, match="--format must be one of"):
        export.run(export.ExportConfig(sae=str(tmp_path / "ours"), format="onnx", out=str(tmp_path / "o")))
    with pytest.raises(UsageError, match="--out .* is the --sae directory"):
        export.run(export.ExportConfig(sae=str(tmp_path / "ours"), format="saelens", out=str(tmp_path / "ours"),
                                       overwrite=True))
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        _parse("--sae", str(tmp_path / "ours"), "--out", str(tmp_path / "o"))  # --format is required


# ---- threshold architectures: ReLU (SAELens standard), JumpReLU, BatchTopK; Gemma Scope -----------------


def _threshold_sae(arch, d=16, M=60, scale=0.37, max_k=60):
    """An SAE of ``arch`` with random weights whose codes hold a few latents per row."""
    torch.manual_seed(5)
    sae = sae_class(SAEConfig(d_in=d, num_latents=M, k=4, arch=arch, max_k=max_k))(
        SAEConfig(d_in=d, num_latents=M, k=4, arch=arch, max_k=max_k))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_().sub_(1.0)
        sae.b_dec.normal_()
        sae.input_scale.fill_(scale)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 2.0)
        elif arch == "batchtopk":
            sae.threshold.fill_(0.8)
    return sae


def _dense_sum(values, indices, M):
    """[N, M] from a code whose empty slots hold value 0 at index 0 (added, so they change nothing)."""
    return torch.zeros(values.shape[0], M).scatter_add_(1, indices.long(), values.float())


ARCH_FORMATS = [("relu", "saelens"), ("jumprelu", "saelens"), ("batchtopk", "saelens"), ("jumprelu", "gemmascope"),
                ("batchtopk", "gemmascope")]


@pytest.mark.parametrize("arch,fmt", ARCH_FORMATS)
def test_threshold_architectures_round_trip(tmp_path, arch, fmt):
    sae = _threshold_sae(arch)
    directory = str(tmp_path / fmt)
    formats.export_sae(sae, directory, fmt)
    assert formats.detect_format(directory) == fmt
    back = formats.load_sae(directory)
    # Gemma Scope keeps no metadata: a BatchTopK SAE comes back as the JumpReLU SAE it equals
    assert back.cfg.arch == (arch if fmt == "saelens" else "jumprelu")
    x = 3 * torch.randn(50, 16)
    _close(back(x), sae(x))
    _close(_dense_sum(*back.encode(x), 60), _dense_sum(*sae.encode(x), 60))


def test_gemmascope_loads_from_the_file_and_folds_b_dec(tmp_path):
    sae = _threshold_sae("jumprelu", scale=1.0)
    formats.export_sae(sae, str(tmp_path), "gemmascope")
    import numpy as np

    with np.load(tmp_path / "params.npz") as data:
        p = {key: torch.from_numpy(data[key]).double() for key in data.files}
    assert sorted(p) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"] and p["W_enc"].shape == (16, 60)
    x = 3 * torch.randn(40, 16, dtype=torch.float64)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope's encoder: x itself, no b_dec
    expected = (torch.relu(pre) * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]
    _close(formats.load_sae(str(tmp_path / "params.npz"))(x.float()).double(), expected)


def test_loaded_thresholds_act_like_the_peers(tmp_path):
    # SAELens and Gemma Scope compute ReLU(pre) * (pre > theta): a negative threshold acts as 0
    sae = _threshold_sae("jumprelu", scale=1.0)
    with torch.no_grad():
        sae.threshold[:30] = -1.5
    formats.export_sae(sae, str(tmp_path), "saelens")
    loaded = formats.load_sae(str(tmp_path))
    assert bool((loaded.threshold[:30] == 0).all()) and torch.equal(loaded.threshold[30:], sae.threshold[30:])
    x = 3 * torch.randn(40, 16)
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    pre = x @ w["W_enc"] + w["b_enc"] - w["b_dec"] @ w["W_enc"]
    _close(loaded(x), (torch.relu(pre) * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"])


def test_max_k_caps_loaded_threshold_saes(tmp_path):
    sae = _threshold_sae("relu", scale=1.0)
    formats.export_sae(sae, str(tmp_path), "saelens")
    x = 3 * torch.randn(40, 16)
    full = formats.load_sae(str(tmp_path))
    assert full.cfg.max_k == 60
    capped = formats.load_sae(str(tmp_path), max_k=3)
    values, indices = capped.encode(x)
    want_values, want_indices, _ = ssae_kernels.threshold_encode(x, capped.W_enc, capped.b_enc, 0.0, 3,
                                                                  b_dec=capped.b_dec)
    assert values.shape == (40, 3) and torch.equal(indices, want_indices)


def test_gemmascope_without_cfg_gets_default_settings(tmp_path):
    sae = _threshold_sae("jumprelu", M=2000, scale=1.0)
    formats.export_sae(sae, str(tmp_path), "gemmascope")
    loaded = formats.load_sae(str(tmp_path))
    assert loaded.cfg.max_k == formats.DEFAULT_MAX_K and loaded.cfg.k == formats.DEFAULT_MAX_K // 4


@pytest.mark.parametrize("arch,fmt", [("relu", "sparsify"), ("relu", "gemmascope"), ("topk", "gemmascope")])
def test_formats_that_cannot_hold_an_architecture_say_so(tmp_path, arch, fmt):
    sae = _trained_like_sae() if arch == "topk" else _threshold_sae(arch)
    with pytest.raises(ValueError, match=f"format '{fmt}' cannot hold a {arch} SAE"):
        formats.export_sae(sae, str(tmp_path), fmt)


def test_bad_gemmascope_files_are_named(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"params\.npz: not a readable \.npz file"):
        formats.load_sae(str(tmp_path))
    import numpy as np

    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32), W_dec=np.zeros((8, 4), np.float32),
             b_enc=np.zeros(8, np.float32), b_dec=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="missing array 'threshold'"):
        formats.load_sae(str(tmp_path))
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32), W_dec=np.zeros((8, 5), np.float32),
             b_enc=np.zeros(8, np.float32), b_dec=np.zeros(4, np.float32), threshold=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"tensor 'W_dec' has shape \[8, 5\], expected \[8, 4\]"):
        formats.load_sae(str(tmp_path))


def test_a_batchtopk_file_with_different_thresholds_is_refused(tmp_path):
    sae = _threshold_sae("batchtopk")
    formats.export_sae(sae, str(tmp_path), "saelens")
    path = str(tmp_path / "sae_weights.safetensors")
    w = load_file(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    w["threshold"][3] += 1
    save_file(w, path, metadata=metadata)
    os.remove(tmp_path / "checksums.json")
    with pytest.raises(ValueError, match="a BatchTopK SAE has one threshold"):
        formats.load_sae(str(tmp_path))


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_saelens_loads_our_threshold_saes(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _threshold_sae(arch, d=32, M=128, max_k=128)
    directory = _written(tmp_path, "saelens", sae)
    peer = sae_lens.SAE.load_from_disk(directory)
    assert type(peer).__name__ == ("StandardSAE" if arch == "relu" else "JumpReLUSAE")
    x = 3 * torch.randn(64, 32)
    with torch.no_grad():
        _close(peer(x), sae(x))
        _close(peer.encode(x), _dense_sum(*sae.encode(x), 128))


@pytest.mark.parametrize("peer_class", ["StandardSAE", "JumpReLUSAE"])
def test_we_load_what_saelens_saves(tmp_path, peer_class):
    sae_lens = pytest.importorskip("sae_lens")
    cls = getattr(sae_lens, peer_class)
    peer = cls(getattr(sae_lens, peer_class + "Config")(d_in=24, d_sae=90, dtype="float32", device="cpu"))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in peer.named_parameters():
            p.copy_(torch.rand_like(p) if name == "threshold" else torch.randn_like(p) - (1.0 if name == "b_enc" else 0))
    peer.save_model(str(tmp_path))
    ours = formats.load_sae(str(tmp_path))
    assert ours.cfg.arch == {"StandardSAE": "relu", "JumpReLUSAE": "jumprelu"}[peer_class]
    x = 2 * torch.randn(64, 24)
    with torch.no_grad():
        _close(ours(x), peer(x))
        _close(_dense_sum(*ours.encode(x), 90), peer.encode(x))


def test_saelens_reads_our_gemmascope_file(tmp_path, monkeypatch):
    # SAELens's own Gemma Scope loader (hub download replaced by our file, shapes by config overrides)
    pytest.importorskip("sae_lens")
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.loading import pretrained_sae_loaders as loaders

    sae = _threshold_sae("jumprelu", d=32, M=128, max_k=128)
    formats.export_sae(sae, str(tmp_path), "gemmascope")
    monkeypatch.setattr(loaders, "hf_hub_download", lambda **kwargs: str(tmp_path / "params.npz"))
    cfg, state, _ = loaders.gemma_2_sae_huggingface_loader("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_50",
                                                           cfg_overrides={"d_in": 32, "d_sae": 128,
                                                                          "normalize_activations": "none"})
    fields = {f for f in JumpReLUSAEConfig.__dataclass_fields__}
    peer = JumpReLUSAE(JumpReLUSAEConfig(**{key: value for key, value in cfg.items() if key in fields}))
    peer.load_state_dict(state)
    x = 3 * torch.randn(64, 32)
    with torch.no_grad():
        _close(peer(x), sae(x))
        _close(peer.encode(x), _dense_sum(*sae.encode(x), 128))


def test_export_command_writes_gemmascope_and_names_formats_that_cannot_hold_the_sae(tmp_path):
    _threshold_sae("jumprelu").save(str(tmp_path / "jump"))
    result = export.run(export.ExportConfig(sae=str(tmp_path / "jump"), format="gemmascope", out=str(tmp_path / "gs")))
    assert result["weights"] == str(tmp_path / "gs" / "params.npz")
    # and back, from the .npz file itself
    back = export.run(export.ExportConfig(sae=str(tmp_path / "gs" / "params.npz"), format="ssae", out=str(tmp_path / "o")))
    assert back["source_format"] == "gemmascope"
    x = 3 * torch.randn(30, 16)
    _close(SAE.load(str(tmp_path / "o"))(x), _threshold_sae("jumprelu")(x))
    _threshold_sae("relu").save(str(tmp_path / "relu"))
    with pytest.raises(UsageError, match="--format gemmascope: format 'gemmascope' cannot hold a relu SAE"):
        export.run(export.ExportConfig(sae=str(tmp_path / "relu"), format="gemmascope", out=str(tmp_path / "x")))
