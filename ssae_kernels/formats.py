"""Reading SAE checkpoints of other libraries (SAELens, sparsify) into a TopKSAE, without pickle."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from .sae import CONFIG_FILE, WEIGHTS_FILE, SAEConfig, TopKSAE


def detect_format(directory: str) -> str:
    """'ssae', 'saelens' or 'sparsify', from the files and config keys of ``directory``."""
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not an SAE checkpoint directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    files = set(os.listdir(directory))
    if "sae_weights.safetensors" in files and "d_sae" in cfg:
        return "saelens"
    if WEIGHTS_FILE in files and "expansion_factor" in cfg:
        return "sparsify"
    if WEIGHTS_FILE in files and "num_latents" in cfg and "d_in" in cfg:
        return "ssae"
    raise ValueError(f"{directory}: unrecognised SAE checkpoint (files {sorted(files)}, config keys {sorted(cfg)})")


def load_sae(directory: str, device: str | torch.device = "cpu") -> TopKSAE:
    """A TopKSAE from a directory written by ssae-kernels, SAELens (TopK architecture) or sparsify
    (TopK SparseCoder). Weights are transposed to our [num_latents, d_in] layout as needed."""
    fmt = detect_format(directory)
    if fmt == "ssae":
        return TopKSAE.load(directory, device)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = json.load(f)
    if fmt == "saelens":
        w = load_file(os.path.join(directory, "sae_weights.safetensors"))
        arch = cfg.get("architecture", cfg.get("activation_fn"))
        if arch != "topk":
            raise ValueError(f"{directory}: SAELens architecture {arch!r} is not a TopK SAE")
        for key, ok in (("normalize_activations", "none"), ("rescale_acts_by_decoder_norm", False)):
            if cfg.get(key, ok) != ok:
                raise ValueError(f"{directory}: SAELens option {key}={cfg[key]!r} is not supported")
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        W_enc, W_dec = w["W_enc"].T, w["W_dec"]  # SAELens W_enc is [d_in, d_sae]
        b_dec_in = w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else None
    else:  # sparsify
        w = load_file(os.path.join(directory, WEIGHTS_FILE))
        for key in ("skip_connection", "transcode", "multi_topk"):
            if cfg.get(key):
                raise ValueError(f"{directory}: sparsify option {key}=true is not supported")
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{directory}: sparsify activation {cfg['activation']!r} is not TopK")
        k = cfg["k"]
        W_enc, W_dec = w["encoder.weight"], w["W_dec"]
        b_dec_in = w["b_dec"]
    M, d = W_dec.shape
    b_enc = w["b_enc"] if fmt == "saelens" else w["encoder.bias"]
    if b_dec_in is None:
        # The encoder sees x, not x - b_dec: fold b_dec into the encoder bias.
        b_enc = b_enc + W_enc.float() @ w["b_dec"].float()
    sae = TopKSAE(SAEConfig(d_in=d, num_latents=M, k=int(k)))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(w["b_dec"])
    return sae.to(device)
