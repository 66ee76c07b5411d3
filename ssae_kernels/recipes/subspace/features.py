"""Step 1, feature selection: the SAE latents whose mean activation on response tokens separates the
target behaviour from the contrast one."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...models import check_layer, decoder_layers
from .prompts import encode_example, model_device, pad_batch, pad_token_id


class _Stop(Exception):
    """Raised by the deepest hook: the layers above it need not run."""


@torch.no_grad()
def residual_streams(model, ids, mask, layers) -> dict[int, torch.Tensor]:
    """Outputs of the given decoder layers, {layer: [B, T, d] float32}; the forward pass stops
    after the deepest of them."""
    blocks = decoder_layers(model)
    captured, handles = {}, []
    last = max(layers)

    def hook(layer):
        def fn(module, args, output):
            captured[layer] = (output[0] if isinstance(output, tuple) else output).float()
            if layer == last:
                raise _Stop
        return fn

    for layer in layers:
        handles.append(blocks[layer].register_forward_hook(hook(layer)))
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def mean_feature_activations(model, tokenizer, saes: dict, pairs: list[tuple[str, str]], *, batch_size: int = 8,
                             progress: bool = False) -> dict[int, torch.Tensor]:
    """{layer: [M] mean activation of every SAE latent over the response tokens of (prompt, response)
    pairs}, the SAE of each layer applied to that layer's output (the residual stream)."""
    layers = sorted(saes)
    for layer in layers:
        check_layer(model, layer)
    encoded = [encode_example(tokenizer, p, r) for p, r in pairs]
    sums = {layer: torch.zeros(saes[layer].cfg.num_latents, dtype=torch.float64) for layer in layers}
    count = 0
    device = model_device(model)
    for start in tqdm(range(0, len(encoded), batch_size), desc="feature means", disable=not progress):
        ids, mask, response = pad_batch(encoded[start:start + batch_size], pad_token_id(tokenizer), device)
        streams = residual_streams(model, ids, mask, layers)
        count += int(response.sum())
        for layer in layers:
            sae = saes[layer]
            x = streams[layer][response].to(sae.W_enc.device)
            values, indices = sae.encode(x)
            sums[layer].index_add_(0, indices.reshape(-1).cpu(), values.reshape(-1).double().cpu())
    if count == 0:
        raise ValueError("no response tokens to average over")
    return {layer: (s / count).float() for layer, s in sums.items()}


@dataclass
class FeatureSelection:
    layer: int
    ids: list[int]  # selected latents, best first
    delta: list[float]  # E_target - E_contrast of each
    relative: list[float]  # delta / max_m E_contrast[|a_m|]
    mean_target: list[float]
    mean_contrast: list[float]


def select_features(mean_target: dict[int, torch.Tensor], mean_contrast: dict[int, torch.Tensor], *,
                    per_layer: int = 32, signs: str = "target") -> dict[int, FeatureSelection]:
    """The top ``per_layer`` latents of each layer by relative score.

    signs="target": latents more active on target responses (positive delta only; SAILS);
    signs="both": the largest |relative score|, latents of either behaviour.
    """
    if signs not in ("target", "both"):
        raise ValueError(f"signs must be 'target' or 'both', got {signs!r}")
    if per_layer < 1:
        raise ValueError(f"per_layer must be >= 1, got {per_layer}")
    out = {}
    for layer in sorted(mean_target):
        t, c = mean_target[layer].double(), mean_contrast[layer].double()
        delta = t - c
        relative = delta / c.abs().max().clamp_min(1e-12)
        if signs == "target":
            order = torch.argsort(relative, descending=True)
            order = order[delta[order] > 0][:per_layer]
        else:
            order = torch.argsort(relative.abs(), descending=True)
            order = order[delta[order] != 0][:per_layer]
        if order.numel() == 0:
            raise ValueError(f"layer {layer}: no latent separates target from contrast (every delta is <= 0)")
        ids = order.tolist()
        out[layer] = FeatureSelection(layer, ids, delta[order].tolist(), relative[order].tolist(),
                                      t[order].tolist(), c[order].tolist())
    return out


def save_features(path: str, selections: dict[int, FeatureSelection]) -> None:
    with open(path, "w") as f:
        json.dump({str(layer): s.__dict__ for layer, s in selections.items()}, f, indent=1)


def load_features(path: str) -> dict[int, FeatureSelection]:
    with open(path) as f:
        return {int(layer): FeatureSelection(**s) for layer, s in json.load(f).items()}
