"""SAE checkpoints of other libraries (SAELens, sparsify): reading them into a TopKSAE, without pickle, and
writing a TopKSAE in their formats (``export_sae``) so that their own loaders read it.

Every format is checked on load: the config must be valid JSON with the keys that give the shapes
(ValueError naming the file and key), and every tensor must have the shape those keys imply.

Our ``input_scale`` (inputs multiplied by s before encoding, x_hat divided by s) has no counterpart in the
other formats, so ``export_sae`` folds it into the weights, which is exact algebra:

    W_enc (s x - b_dec) + b_enc = (s W_enc) (x - b_dec / s) + b_enc
    (W_dec^T z + b_dec) / s     = (W_dec / s)^T z + b_dec / s

so the peer's W_enc, W_dec and b_dec are s W_enc, W_dec / s and b_dec / s: the same latents with the same
activations, and the same x_hat from raw activations. Decoder rows then have norm 1 / s; neither SAELens
(``rescale_acts_by_decoder_norm`` false) nor sparsify renormalises them on load. The weight file's header
metadata records s and the rest of our config under ``ssae_kernels`` (both peers ignore it), so ``load_sae``
undoes the fold; without it (a checkpoint trained elsewhere) s is 1.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .sae import (CONFIG_FILE, WEIGHTS_FILE, SAEConfig, TopKSAE, check_shapes, read_json_object,
                  read_safetensors, verify_weights)
from .storage import atomic_write, atomic_write_text, write_checksums

FORMATS = ("ssae", "saelens", "sparsify")
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = WEIGHTS_FILE  # sparsify also names its weights sae.safetensors
SAELENS_FORMAT_VERSION = "6.0.0"  # SAELens treats configs without a version >= 6 as old and converts them
EXTRA_KEY = "ssae_kernels"  # header metadata of exported weights: our input_scale and training settings
_EXTRA_FIELDS = ("k_aux", "aux_coef", "dead_tokens", "compute_dtype")


def detect_format(directory: str) -> str:
    """'ssae', 'saelens' or 'sparsify', from the files and config keys of ``directory``."""
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not an SAE checkpoint directory")
    cfg = read_json_object(cfg_path)
    files = set(os.listdir(directory))
    if SAELENS_WEIGHTS_FILE in files:  # only SAELens uses this name; load_sae reports a missing d_sae
        return "saelens"
    if WEIGHTS_FILE in files and "expansion_factor" in cfg:
        return "sparsify"
    if WEIGHTS_FILE in files and "num_latents" in cfg and "d_in" in cfg:
        return "ssae"
    raise ValueError(f"{directory}: unrecognised SAE checkpoint (files {sorted(files)}, config keys {sorted(cfg)})")


def load_sae(directory: str, device: str | torch.device = "cpu") -> TopKSAE:
    """A TopKSAE from a directory written by ssae-kernels, SAELens (TopK architecture) or sparsify
    (TopK SparseCoder). Weights are transposed to our [num_latents, d_in] layout as needed. A config or
    weight file that does not fit raises ValueError naming the file and the key or tensor; weights that
    differ from a recorded checksum raise ``storage.CorruptFileError``."""
    fmt = detect_format(directory)
    if fmt == "ssae":
        return TopKSAE.load(directory, device)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    cfg = read_json_object(cfg_path)
    if fmt == "saelens":
        weights_path = os.path.join(directory, SAELENS_WEIGHTS_FILE)
        arch = cfg.get("architecture", cfg.get("activation_fn"))
        if arch != "topk":
            raise ValueError(f"{directory}: SAELens architecture {arch!r} is not a TopK SAE")
        for key, ok in (("normalize_activations", ("none", False, None)),
                        ("rescale_acts_by_decoder_norm", (False, None))):
            if cfg.get(key) not in ok:
                raise ValueError(f"{directory}: SAELens option {key}={cfg[key]!r} is not supported")
        if "k" not in cfg and "k" in (cfg.get("activation_fn_kwargs") or {}):  # configs before SAELens 6
            cfg = {**cfg, "k": cfg["activation_fn_kwargs"]["k"]}
        dims = _dims(cfg_path, cfg, ("d_in", "d_sae", "k"))
        d, M = dims["d_in"], dims["d_sae"]
        verify_weights(directory, SAELENS_WEIGHTS_FILE)
        w = read_safetensors(weights_path)
        scaling = w.pop("scaling_factor", None)  # SAELens drops it when all ones and rejects it otherwise
        if scaling is not None and not torch.all(scaling == 1):
            raise ValueError(f"{weights_path}: a finetuning scaling_factor other than 1 is not supported")
        check_shapes(weights_path, w, {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",),
                                       "b_dec": ("d_in",)}, dims, cfg_path)
        W_enc, W_dec, b_enc = w["W_enc"].T, w["W_dec"], w["b_enc"]  # SAELens W_enc is [d_in, d_sae]
        if not cfg.get("apply_b_dec_to_input", True):
            # The encoder sees x, not x - b_dec: fold b_dec into the encoder bias.
            b_enc = b_enc + W_enc.float() @ w["b_dec"].float()
    else:  # sparsify
        weights_path = os.path.join(directory, SPARSIFY_WEIGHTS_FILE)
        for key in ("skip_connection", "transcode", "multi_topk"):
            if cfg.get(key):
                raise ValueError(f"{directory}: sparsify option {key}=true is not supported")
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{directory}: sparsify activation {cfg['activation']!r} is not TopK")
        # sparsify's own loader defaults a missing k to 32: we refuse to guess.
        dims = _dims(cfg_path, cfg, ("d_in", "k"))
        if cfg.get("num_latents"):
            dims.update(_dims(cfg_path, cfg, ("num_latents",)))
        else:  # sparsify: num_latents 0 means d_in * expansion_factor
            dims["num_latents"] = dims["d_in"] * _dims(cfg_path, cfg, ("expansion_factor",))["expansion_factor"]
        d, M = dims["d_in"], dims["num_latents"]
        verify_weights(directory, SPARSIFY_WEIGHTS_FILE)
        w = read_safetensors(weights_path)
        check_shapes(weights_path, w, {"encoder.weight": ("num_latents", "d_in"), "encoder.bias": ("num_latents",),
                                       "W_dec": ("num_latents", "d_in"), "b_dec": ("d_in",)}, dims, cfg_path)
        W_enc, W_dec, b_enc = w["encoder.weight"], w["W_dec"], w["encoder.bias"]
    if dims["k"] > M:
        raise ValueError(f"{cfg_path}: k={dims['k']} exceeds the {M} latents")
    scale, settings = _read_extra(weights_path)
    try:
        sae_cfg = SAEConfig(d_in=d, num_latents=M, k=dims["k"], **settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{weights_path}: metadata {EXTRA_KEY}: {e}") from None
    sae = TopKSAE(sae_cfg)
    with torch.no_grad():
        # Undo export_sae's fold of input_scale s (s = 1 for a checkpoint trained elsewhere).
        sae.W_enc.copy_(W_enc.double() / scale)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec.double() * scale)
        sae.b_dec.copy_(w["b_dec"].double() * scale)
        sae.input_scale.fill_(scale)
    return sae.to(device)


def export_sae(sae: TopKSAE, directory: str, fmt: str) -> str:
    """Writes ``sae`` to ``directory`` in format ``fmt``: 'saelens' (a TopK SAE that
    ``sae_lens.SAE.load_from_disk`` reads), 'sparsify' (a TopK SparseCoder that
    ``sparsify.SparseCoder.load_from_disk`` reads) or 'ssae' (ours, ``TopKSAE.save``). The peer's forward
    on raw activations equals ours (input_scale folded into the weights, see the module docstring);
    ``load_sae`` reads the directory back to this SAE (input_scale and our training settings are kept in the
    weight file's header metadata). Files are written atomically, with the weights' checksum in
    ``checksums.json`` (which the peers ignore). Returns the weights file's path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    os.makedirs(directory, exist_ok=True)
    if fmt == "ssae":
        sae.save(directory)
        return os.path.join(directory, WEIGHTS_FILE)
    cfg = sae.cfg
    if cfg.arch != "topk":
        raise ValueError(f"exporting a {cfg.arch} SAE to format {fmt!r} is not supported yet (only TopK SAEs "
                         "are written in the peers' formats); --format ssae keeps it whole")
    s = float(sae.input_scale)
    if not s > 0 or s == float("inf"):
        raise ValueError(f"input_scale {s} must be positive and finite to be folded into the weights")
    with torch.no_grad():  # in float64, rounded once to float32
        W_enc = (sae.W_enc.detach().double() * s).float().cpu()
        W_dec = (sae.W_dec.detach().double() / s).float().cpu()
        b_dec = (sae.b_dec.detach().double() / s).float().cpu()
        b_enc = sae.b_enc.detach().float().cpu()
    extra = {"input_scale": s, **{name: getattr(cfg, name) for name in _EXTRA_FIELDS}}
    if fmt == "saelens":
        weights_name = SAELENS_WEIGHTS_FILE
        tensors = {"W_enc": W_enc.T.contiguous(), "W_dec": W_dec.contiguous(), "b_enc": b_enc.contiguous(),
                   "b_dec": b_dec.contiguous()}
        peer_cfg = {"architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.num_latents, "k": cfg.k,
                    "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                    "normalize_activations": "none", "reshape_activations": "none",
                    "rescale_acts_by_decoder_norm": False,
                    "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION,
                                 "sae_lens_training_version": SAELENS_FORMAT_VERSION}}
    else:
        weights_name = SPARSIFY_WEIGHTS_FILE
        tensors = {"encoder.weight": W_enc.contiguous(), "encoder.bias": b_enc.contiguous(),
                   "W_dec": W_dec.contiguous(), "b_dec": b_dec.contiguous()}
        # normalize_decoder false: after the fold the rows have norm 1 / input_scale, and further training
        # in sparsify must not renormalise them (it only affects initialisation and training, not loading).
        peer_cfg = {"activation": "topk", "expansion_factor": max(1, round(cfg.num_latents / cfg.d_in)),
                    "normalize_decoder": False, "num_latents": cfg.num_latents, "k": cfg.k, "multi_topk": False,
                    "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    weights_path = os.path.join(directory, weights_name)
    atomic_write(weights_path, lambda p: save_file(tensors, p, metadata={EXTRA_KEY: json.dumps(extra)}))
    atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(peer_cfg, indent=2))
    write_checksums(directory, [weights_name])
    return weights_path


def _dims(cfg_path: str, cfg: dict, keys) -> dict[str, int]:
    """The listed config keys, each a positive int; ValueError naming the file and the key otherwise."""
    out = {}
    for key in keys:
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing key {key!r}")
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{cfg_path}: key {key!r} must be a positive int, got {value!r}")
        out[key] = value
    return out


def _read_extra(weights_path: str) -> tuple[float, dict]:
    """(input_scale, our other config fields) from the ``ssae_kernels`` header metadata export_sae writes;
    (1, {}) for a weight file without it."""
    with safe_open(weights_path, framework="pt") as f:
        text = (f.metadata() or {}).get(EXTRA_KEY)
    if text is None:
        return 1.0, {}
    where = f"{weights_path}: header metadata {EXTRA_KEY}"
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"{where} must be a JSON object, got {extra!r}")
    unknown = sorted(set(extra) - {"input_scale", *_EXTRA_FIELDS})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    scale = extra.get("input_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"{where}: input_scale must be a positive number, got {scale!r}")
    return float(scale), {name: extra[name] for name in _EXTRA_FIELDS if name in extra}

