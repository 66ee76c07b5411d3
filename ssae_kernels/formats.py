"""SAE checkpoints of other libraries (SAELens, sparsify, Gemma Scope): reading them into our SAEs, without
pickle, and writing ours in their formats (``export_sae``) so that their own loaders read them.

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

import dataclasses
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .sae import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEConfig, sae_class
from .storage import (atomic_write, atomic_write_text, check_shapes, read_json_object, read_safetensors, verify_weights,
                      write_checksums)

FORMATS = ("ssae", "saelens", "sparsify", "gemmascope")
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = WEIGHTS_FILE  # sparsify also names its weights sae.safetensors
GEMMASCOPE_FILE = "params.npz"
SAELENS_FORMAT_VERSION = "6.0.0"  # SAELens treats configs without a version >= 6 as old and converts them
EXTRA_KEY = "ssae_kernels"  # header metadata of exported weights: our input_scale and training settings
_EXTRA_FIELDS = ("k_aux", "aux_coef", "dead_tokens", "compute_dtype", "arch", "k", "max_k", "bandwidth", "l1_coef")
# SAELens architecture -> ours. SAELens writes a BatchTopK SAE for inference as "jumprelu" with every
# threshold equal; "batchtopk" is its training form (one topk_threshold).
SAELENS_ARCHS = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
# A threshold SAE from another library has no cap on its active latents: ours keeps at most max_k per row
# (the largest), by default this many (or every latent, when there are fewer).
DEFAULT_MAX_K = 1024


def detect_format(path: str) -> str:
    """'ssae', 'saelens', 'sparsify' or 'gemmascope', from the files and config keys of the directory ``path``
    (or a Gemma Scope ``params.npz`` itself)."""
    if os.path.isfile(path) and path.endswith(".npz") or os.path.isfile(os.path.join(path, GEMMASCOPE_FILE)):
        return "gemmascope"
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE} (nor {GEMMASCOPE_FILE}): not an SAE checkpoint "
                                "directory")
    cfg = read_json_object(cfg_path)
    files = set(os.listdir(path))
    if SAELENS_WEIGHTS_FILE in files:  # only SAELens uses this name; load_sae reports a missing d_sae
        return "saelens"
    if WEIGHTS_FILE in files and "expansion_factor" in cfg:
        return "sparsify"
    if WEIGHTS_FILE in files and "num_latents" in cfg and "d_in" in cfg:
        return "ssae"
    raise ValueError(f"{path}: unrecognised SAE checkpoint (files {sorted(files)}, config keys {sorted(cfg)})")


def load_sae(path: str, device: str | torch.device = "cpu", *, max_k: int | None = None) -> SAE:
    """An SAE from a directory written by ssae-kernels, SAELens (TopK, standard ReLU, JumpReLU, BatchTopK),
    sparsify (TopK SparseCoder) or Gemma Scope (``params.npz``, JumpReLU; the directory or the file).
    Weights are transposed to our [num_latents, d_in] layout as needed. A config or weight file that does
    not fit raises ValueError naming the file and the key or tensor; weights that differ from a recorded
    checksum raise ``storage.CorruptFileError``.

    ``max_k``: for a threshold architecture (JumpReLU, ReLU, BatchTopK), the most latents a row keeps
    (default: what our export recorded, else ``min(num_latents, DEFAULT_MAX_K)``); rows with more active
    latents keep the largest ``max_k``, so the forward equals the peer's whenever no row has more."""
    fmt = detect_format(path)
    if fmt == "ssae":
        sae = SAE.load(path, device)
        if max_k is not None and sae.cfg.arch != "topk":
            sae.cfg = dataclasses.replace(sae.cfg, max_k=max_k)
        return sae
    threshold = None
    if fmt == "gemmascope":
        weights_path = path if os.path.isfile(path) else os.path.join(path, GEMMASCOPE_FILE)
        w = _read_npz(weights_path)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            if name not in w:
                raise ValueError(f"{weights_path}: missing array {name!r} (Gemma Scope: W_enc, W_dec, b_enc, b_dec, "
                                 "threshold)")
        if w["W_enc"].dim() != 2:
            raise ValueError(f"{weights_path}: W_enc must be 2-D [d_in, d_sae], got shape {list(w['W_enc'].shape)}")
        dims = dict(zip(("d_in", "d_sae"), w["W_enc"].shape))
        check_shapes(weights_path, w, {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",),
                                       "b_dec": ("d_in",), "threshold": ("d_sae",)}, dims, weights_path)
        arch, d, M, k, cfg_path = "jumprelu", dims["d_in"], dims["d_sae"], None, weights_path
        W_enc, W_dec, b_dec = w["W_enc"].T, w["W_dec"], w["b_dec"]
        # Gemma Scope's encoder sees x itself, not x - b_dec: fold b_dec into the encoder bias
        b_enc = w["b_enc"].double() + W_enc.double() @ b_dec.double()
        threshold = w["threshold"]
        scale, settings = 1.0, {}
    elif fmt == "saelens":
        cfg_path = os.path.join(path, CONFIG_FILE)
        cfg = read_json_object(cfg_path)
        weights_path = os.path.join(path, SAELENS_WEIGHTS_FILE)
        peer_arch = cfg.get("architecture", cfg.get("activation_fn"))
        if peer_arch not in SAELENS_ARCHS:
            raise ValueError(f"{path}: SAELens architecture {peer_arch!r} is not supported (supported: "
                             f"{', '.join(SAELENS_ARCHS)})")
        arch = SAELENS_ARCHS[peer_arch]
        for key, ok in (("normalize_activations", ("none", False, None)),
                        ("rescale_acts_by_decoder_norm", (False, None))):
            if cfg.get(key) not in ok:
                raise ValueError(f"{path}: SAELens option {key}={cfg[key]!r} is not supported")
        if "k" not in cfg and "k" in (cfg.get("activation_fn_kwargs") or {}):  # configs before SAELens 6
            cfg = {**cfg, "k": cfg["activation_fn_kwargs"]["k"]}
        dims = _dims(cfg_path, cfg, ("d_in", "d_sae", *(("k",) if arch in ("topk", "batchtopk") else ())))
        d, M, k = dims["d_in"], dims["d_sae"], dims.get("k")
        verify_weights(path, SAELENS_WEIGHTS_FILE)
        w = read_safetensors(weights_path)
        scaling = w.pop("scaling_factor", None)  # SAELens drops it when all ones and rejects it otherwise
        if scaling is not None and not torch.all(scaling == 1):
            raise ValueError(f"{weights_path}: a finetuning scaling_factor other than 1 is not supported")
        spec = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",)}
        if arch == "jumprelu":
            spec["threshold"] = ("d_sae",)
        if arch == "batchtopk":
            spec["topk_threshold"] = ()
        check_shapes(weights_path, w, spec, dims, cfg_path)
        W_enc, W_dec, b_enc, b_dec = w["W_enc"].T, w["W_dec"], w["b_enc"], w["b_dec"]  # W_enc: [d_in, d_sae]
        threshold = w.get("threshold", w.get("topk_threshold"))
        if not cfg.get("apply_b_dec_to_input", True):
            # The encoder sees x, not x - b_dec: fold b_dec into the encoder bias.
            b_enc = b_enc + W_enc.float() @ w["b_dec"].float()
        scale, settings = _read_extra(weights_path)
    else:  # sparsify
        cfg_path = os.path.join(path, CONFIG_FILE)
        cfg = read_json_object(cfg_path)
        weights_path = os.path.join(path, SPARSIFY_WEIGHTS_FILE)
        for key in ("skip_connection", "transcode", "multi_topk"):
            if cfg.get(key):
                raise ValueError(f"{path}: sparsify option {key}=true is not supported")
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{path}: sparsify activation {cfg['activation']!r} is not TopK")
        # sparsify's own loader defaults a missing k to 32: we refuse to guess.
        dims = _dims(cfg_path, cfg, ("d_in", "k"))
        if cfg.get("num_latents"):
            dims.update(_dims(cfg_path, cfg, ("num_latents",)))
        else:  # sparsify: num_latents 0 means d_in * expansion_factor
            dims["num_latents"] = dims["d_in"] * _dims(cfg_path, cfg, ("expansion_factor",))["expansion_factor"]
        arch, d, M, k = "topk", dims["d_in"], dims["num_latents"], dims["k"]
        verify_weights(path, SPARSIFY_WEIGHTS_FILE)
        w = read_safetensors(weights_path)
        check_shapes(weights_path, w, {"encoder.weight": ("num_latents", "d_in"), "encoder.bias": ("num_latents",),
                                       "W_dec": ("num_latents", "d_in"), "b_dec": ("d_in",)}, dims, cfg_path)
        W_enc, W_dec, b_enc, b_dec = w["encoder.weight"], w["W_dec"], w["encoder.bias"], w["b_dec"]
        scale, settings = _read_extra(weights_path)
    if k is not None and k > M:
        raise ValueError(f"{cfg_path}: k={k} exceeds the {M} latents")
    # our export records the architecture it wrote as another one (BatchTopK as SAELens JumpReLU)
    arch = settings.pop("arch", arch)
    if threshold is not None and arch == "batchtopk":
        if threshold.dim() == 1 and not bool((threshold == threshold[0]).all()):
            raise ValueError(f"{weights_path}: a BatchTopK SAE has one threshold, found different ones")
        threshold = threshold.reshape(-1)[0]
    recorded_max_k, k = settings.pop("max_k", None), settings.pop("k", k)
    if arch != "topk":
        max_k = max_k or recorded_max_k or min(M, DEFAULT_MAX_K)
        # k: what training aims at; for a checkpoint trained elsewhere, a quarter of the cap
        k = min(k or max(1, max_k // 4), max_k)
    try:
        sae_cfg = SAEConfig(d_in=d, num_latents=M, k=k, arch=arch, **({"max_k": max_k} if arch != "topk" else {}),
                            **settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{weights_path}: {e}") from None
    sae = sae_class(sae_cfg)(sae_cfg)
    with torch.no_grad():
        # Undo export_sae's fold of input_scale s (s = 1 for a checkpoint trained elsewhere).
        sae.W_enc.copy_(W_enc.double() / scale)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec.double() * scale)
        sae.b_dec.copy_(b_dec.double() * scale)
        sae.input_scale.fill_(scale)
        if arch == "jumprelu":
            # SAELens and Gemma Scope compute ReLU(pre) * (pre > theta): a negative theta acts as 0
            sae.threshold.copy_(threshold.clamp_min(0))
        elif arch == "batchtopk":
            sae.threshold.copy_(threshold)
    return sae.to(device)


def export_sae(sae: SAE, directory: str, fmt: str) -> str:
    """Writes ``sae`` to ``directory`` in format ``fmt``:

    - 'saelens': what ``sae_lens.SAE.load_from_disk`` reads: a TopK SAE as ``topk``, a ReLU SAE as
      ``standard``, a JumpReLU or BatchTopK SAE as ``jumprelu`` (BatchTopK with its threshold for every
      latent, as SAELens itself saves one for inference);
    - 'sparsify': a TopK SparseCoder that ``sparsify.SparseCoder.load_from_disk`` reads (TopK SAEs only);
    - 'gemmascope': ``params.npz`` in Gemma Scope's layout (JumpReLU and BatchTopK SAEs);
    - 'ssae': ours (``SAE.save``).

    The peer's forward on raw activations equals ours (input_scale folded into the weights, see the module
    docstring; our threshold architectures also cap a row at max_k latents, which the peers do not).
    ``load_sae`` reads the directory back to this SAE: input_scale and our settings are kept in the weight
    file's header metadata (the safetensors formats; a Gemma Scope file keeps only the folded weights).
    Files are written atomically, with the weights' checksum in ``checksums.json`` (which the peers
    ignore). Returns the weights file's path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    os.makedirs(directory, exist_ok=True)
    if fmt == "ssae":
        sae.save(directory)
        return os.path.join(directory, WEIGHTS_FILE)
    cfg = sae.cfg
    writable = {"saelens": ("topk", "relu", "jumprelu", "batchtopk"), "sparsify": ("topk",),
                "gemmascope": ("jumprelu", "batchtopk")}[fmt]
    if cfg.arch not in writable:
        raise ValueError(f"format {fmt!r} cannot hold a {cfg.arch} SAE (it holds {', '.join(writable)}); "
                         "format 'ssae' holds every architecture")
    s = float(sae.input_scale)
    if not s > 0 or s == float("inf"):
        raise ValueError(f"input_scale {s} must be positive and finite to be folded into the weights")
    threshold = None
    with torch.no_grad():  # in float64, rounded once to float32
        W_enc = (sae.W_enc.detach().double() * s).float().cpu()
        W_dec = (sae.W_dec.detach().double() / s).float().cpu()
        b_dec = (sae.b_dec.detach().double() / s).float().cpu()
        b_enc = sae.b_enc.detach().float().cpu()
        if cfg.arch in ("jumprelu", "batchtopk"):
            threshold = sae.threshold.detach().float().cpu().expand(cfg.num_latents).contiguous()
            if not bool(torch.isfinite(threshold).all()):
                raise ValueError("this SAE has no finite threshold yet (a BatchTopK SAE estimates it in training)")
    if fmt == "gemmascope":
        # Gemma Scope's encoder sees x itself: b_dec goes into the encoder bias
        b_enc_x = (b_enc.double() - W_enc.double() @ b_dec.double()).float()
        arrays = {"W_enc": W_enc.T.contiguous(), "W_dec": W_dec, "b_enc": b_enc_x, "b_dec": b_dec,
                  "threshold": threshold}
        weights_path = os.path.join(directory, GEMMASCOPE_FILE)
        atomic_write(weights_path, lambda p: _write_npz(p, arrays))
        write_checksums(directory, [GEMMASCOPE_FILE])
        return weights_path
    extra = {"input_scale": s, **{name: getattr(cfg, name) for name in _EXTRA_FIELDS if getattr(cfg, name) is not None}}
    if fmt == "saelens":
        weights_name = SAELENS_WEIGHTS_FILE
        tensors = {"W_enc": W_enc.T.contiguous(), "W_dec": W_dec.contiguous(), "b_enc": b_enc.contiguous(),
                   "b_dec": b_dec.contiguous()}
        peer_arch = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[cfg.arch]
        if threshold is not None:
            tensors["threshold"] = threshold
        peer_cfg = {"architecture": peer_arch, "d_in": cfg.d_in, "d_sae": cfg.num_latents,
                    **({"k": cfg.k} if peer_arch == "topk" else {}),
                    "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                    "normalize_activations": "none", "reshape_activations": "none",
                    **({"rescale_acts_by_decoder_norm": False} if peer_arch == "topk" else {}),
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


def _read_npz(path: str) -> dict[str, torch.Tensor]:
    """The arrays of an .npz file as float tensors (names ``w_*`` read as ``W_*``, as SAELens does); never
    unpickles. ValueError naming the file when it cannot be read."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {("W_" + key[2:] if key.startswith("w_") else key): data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    return {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in arrays.items()}


def _write_npz(path: str, arrays: dict[str, torch.Tensor]) -> None:
    import numpy as np

    with open(path, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
        np.savez(f, **{key: value.numpy() for key, value in arrays.items()})


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

