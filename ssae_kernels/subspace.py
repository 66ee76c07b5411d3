"""SAE-feature subspace finetuning (SAILS, Wang, Ma et al., arXiv 2512.23260).

Finetune a causal LM only inside a subspace of its residual stream spanned by SAE features
that separate a wanted behaviour (target) from an unwanted one (contrast):

1. **Feature selection** (:func:`mean_feature_activations`, :func:`select_features`): mean SAE
   activation of every latent over the response tokens of target and of contrast examples, at
   one or more layers; ``delta = E_target - E_contrast`` and the relative score
   ``delta / max_m E_contrast[|a_m|]`` (scale-free, comparable across layers); the top latents
   per layer by relative score (target-side latents, as SAILS) or by its magnitude (latents of
   either behaviour, so the update can also lower the contrast behaviour's latents).
2. **Subspace construction** (:func:`build_subspace`): their decoder directions (unit norm) ->
   PCA keeping a fraction of the variance (default 0.8; uncentred, so the directions' common
   component - often the main one - is kept) -> QR -> an orthonormal basis U [d, r].
3. **Adapters** on the modules that write to the residual stream at those layers (``o_proj``
   and ``down_proj`` for Llama-style blocks):
   (a) :class:`SubspaceAdapter`: a LoRA whose output factor is the fixed U, so only the
       r x d_in factor trains and every update lies in span(U) by construction;
   (b) :class:`ProjectedGradient`: the full weights train, but every gradient is projected
       onto span(U) on the output side by :func:`ssae_kernels.project_subspace` (a gradient
       hook), and every optimizer update as well (Adam's per-coordinate scaling would leave
       the span), in place by :func:`ssae_kernels.project_subspace_`.
4. **Finetuning** with the LM loss on target responses only, and **evaluation**: the fraction
   of held-out completions in the target style (a documented marker rule, see
   :mod:`ssae_kernels.data.behaviour`) and perplexity on neutral text, against plain LoRA of
   the same rank and full finetuning.

``ssae subspace --out DIR`` runs all of it (:func:`run`); ``python/subspace_finetune.py`` is the
default demo on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data.behaviour import BUILTIN as BUILTIN_BEHAVIOUR
from .data.behaviour import BehaviourPair, load_behaviour, matches_markers
from .models import check_layer, decoder_layers
from .ops import project_subspace, project_subspace_

# ---- prompts and tokens ------------------------------------------------------------------------


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it before its answer: the chat template when the tokenizer has
    one (with the model's default system prompt), else ``User: ...\\nAssistant:`` (the answer then
    starts with a space, so the prompt's tokens are a prefix of prompt + answer)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"User: {prompt}\nAssistant:"


def _bos(tokenizer) -> list[int]:
    # A chat template writes its own start tokens; plain prompts start with BOS, as in training data.
    if getattr(tokenizer, "chat_template", None) or tokenizer.bos_token_id is None:
        return []
    return [tokenizer.bos_token_id]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of :func:`format_prompt`: what generation starts from."""
    return _bos(tokenizer) + tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """(token ids of prompt + response, index of the first response token). The response ends
    with the template's end-of-turn (or EOS), so the model also learns where to stop."""
    p = format_prompt(tokenizer, prompt)
    full = None
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(p):  # a template that rewrites the prompt part: fall back to concatenation
            full = None
    if full is None:
        full = p + " " + response + (tokenizer.eos_token or "")
    p_ids = encode_prompt(tokenizer, prompt)
    ids = _bos(tokenizer) + tokenizer(full, add_special_tokens=False)["input_ids"]
    start = 0  # the prompt's tokens are a prefix unless a merge crosses the boundary (then: from there)
    while start < min(len(p_ids), len(ids)) and p_ids[start] == ids[start]:
        start += 1
    if start >= len(ids):
        raise ValueError(f"the response {response!r} adds no tokens to the prompt {prompt!r}")
    return ids, start


def _pad_batch(encoded: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids [B, T], attention mask [B, T], response mask [B, T]), right-padded."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    response = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, (seq, start) in enumerate(encoded):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        response[i, start:len(seq)] = True
    return ids.to(device), mask.to(device), response.to(device)


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return t
    return 0


def _device(model):
    return next(model.parameters()).device


# ---- 1. feature selection ----------------------------------------------------------------------


class _Stop(Exception):
    pass


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
    device = _device(model)
    for start in tqdm(range(0, len(encoded), batch_size), desc="feature means", disable=not progress):
        ids, mask, response = _pad_batch(encoded[start:start + batch_size], _pad_id(tokenizer), device)
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


# ---- 2. subspace construction ------------------------------------------------------------------


@dataclass
class Subspace:
    layer: int
    U: torch.Tensor  # [d, r], orthonormal columns (float32)
    feature_ids: list[int]
    explained: float  # fraction of the directions' variance inside span(U)
    singular_values: list[float]

    @property
    def rank(self) -> int:
        return self.U.shape[1]


def build_subspace(directions: torch.Tensor, variance: float = 0.8, *, center: bool = False):
    """Orthonormal basis U [d, r] of the principal subspace of ``directions`` [F, d] (rows scaled to
    unit norm) that keeps at least ``variance`` of their variance; r is the smallest such rank.

    Returns (U float32, explained variance, singular values). PCA is uncentred by default: the
    mean of feature directions that share a behaviour is itself a direction to keep.
    """
    if not 0 < variance <= 1:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if directions.dim() != 2 or directions.shape[0] < 1:
        raise ValueError(f"directions must be [F >= 1, d], got shape {tuple(directions.shape)}")
    D = directions.double()
    D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if center:
        if D.shape[0] < 2:
            raise ValueError("centred PCA needs at least two directions")
        D = D - D.mean(0)
    _, S, Vh = torch.linalg.svd(D, full_matrices=False)
    energy = S**2 / (S**2).sum()
    r = min(int((torch.cumsum(energy, 0) < variance - 1e-12).sum()) + 1, int((S > 1e-9 * S[0]).sum()))
    Q, R = torch.linalg.qr(Vh[:r].T)  # re-orthonormalised in float64
    signs = torch.sign(torch.diagonal(R))
    Q = Q * torch.where(signs == 0, 1.0, signs)  # deterministic orientation
    return Q.float().contiguous(), float(energy[:r].sum()), S.tolist()


def subspaces_from_features(saes: dict, selections: dict[int, FeatureSelection], variance: float = 0.8, *,
                            center: bool = False) -> dict[int, Subspace]:
    out = {}
    for layer, sel in selections.items():
        W_dec = saes[layer].W_dec.detach().float().cpu()
        U, explained, S = build_subspace(W_dec[sel.ids], variance, center=center)
        out[layer] = Subspace(layer, U, list(sel.ids), explained, S)
    return out


def save_subspaces(path: str, subspaces: dict[int, Subspace]) -> None:
    tensors = {f"layer{layer}.U": s.U.contiguous() for layer, s in subspaces.items()}
    tensors.update({f"layer{layer}.feature_ids": torch.tensor(s.feature_ids, dtype=torch.int64)
                    for layer, s in subspaces.items()})
    meta = {str(layer): json.dumps({"explained": s.explained, "singular_values": s.singular_values})
            for layer, s in subspaces.items()}
    save_file(tensors, path, metadata=meta)


def load_subspaces(path: str) -> dict[int, Subspace]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(path)
    out = {}
    for layer_s, info in meta.items():
        layer, info = int(layer_s), json.loads(info)
        out[layer] = Subspace(layer, tensors[f"layer{layer}.U"], tensors[f"layer{layer}.feature_ids"].tolist(),
                              info["explained"], info["singular_values"])
    return out


# ---- 3. adapters -------------------------------------------------------------------------------

# Linear layers of a decoder block whose output is added to the residual stream.
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj", "attention.dense", "mlp.dense_4h_to_h",
                    "self_attn.out_proj", "mlp.fc2")


def residual_writers(model, layer: int) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of the nn.Linear layers that write block ``layer``'s output to the residual stream."""
    check_layer(model, layer)
    block = decoder_layers(model)[layer]
    found = []
    for name in RESIDUAL_WRITERS:
        module = block
        try:
            for part in name.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.Linear):
            found.append((f"layers.{layer}.{name}", module))
    if not found:
        raise ValueError(f"decoder layer {layer} of {type(model).__name__} has none of the residual writers "
                         f"{', '.join(RESIDUAL_WRITERS)} as nn.Linear")
    return found


class SubspaceAdapter(torch.nn.Module):
    """delta y = scale * U (B x): the output factor U [d_out, r] is fixed, only B [r, d_in] trains.

    B starts at zero (the model is unchanged until trained); the weight update U B lies in
    span(U) whatever B becomes.
    """

    def __init__(self, U: torch.Tensor, d_in: int, *, scale: float = 1.0):
        super().__init__()
        self.register_buffer("U", U.detach().clone())
        self.B = torch.nn.Parameter(torch.zeros(U.shape[1], d_in, dtype=U.dtype, device=U.device))
        self.scale = scale

    def forward(self, x):
        return (x @ self.B.T) @ self.U.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.U @ self.B)


class LoRAAdapter(torch.nn.Module):
    """Plain LoRA: delta y = scale * B (A x), A [r, d_in] random, B [d_out, r] zero at the start."""

    def __init__(self, d_in: int, d_out: int, rank: int, *, scale: float = 1.0, generator=None, dtype=torch.float32,
                 device=None):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        A = (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.A = torch.nn.Parameter(A.to(dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))
        self.scale = scale

    def forward(self, x):
        return (x @ self.A.T) @ self.B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


class Adapters:
    """Adapters added to the outputs of Linear modules by forward hooks; the model's own modules and
    weights are left untouched (``remove()`` restores the model exactly)."""

    def __init__(self, targets: list[tuple[str, torch.nn.Linear, torch.nn.Module]]):
        self.targets = targets
        self.handles = [module.register_forward_hook(self._hook(adapter)) for _, module, adapter in targets]

    @staticmethod
    def _hook(adapter):
        def fn(module, args, output):
            return output + adapter(args[0]).to(output.dtype)
        return fn

    def parameters(self):
        return [p for _, _, a in self.targets for p in a.parameters()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def delta_weights(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: a.delta_weight().float() for name, _, a in self.targets}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().contiguous()
                for name, _, a in self.targets for k, v in a.state_dict().items()}

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_subspace_adapters(model, subspaces: dict[int, Subspace], *, scale: float = 1.0) -> Adapters:
    """Method (a): a :class:`SubspaceAdapter` on every residual writer of every subspace's layer."""
    targets = []
    for layer, sub in sorted(subspaces.items()):
        for name, module in residual_writers(model, layer):
            if module.out_features != sub.U.shape[0]:
                raise ValueError(f"{name} writes {module.out_features} features but U of layer {layer} is "
                                 f"{tuple(sub.U.shape)}")
            U = sub.U.to(device=module.weight.device, dtype=module.weight.dtype)
            targets.append((name, module, SubspaceAdapter(U, module.in_features, scale=scale)))
    return Adapters(targets)


def attach_lora_adapters(model, ranks: dict[int, int], *, scale: float = 1.0, seed: int = 0) -> Adapters:
    """Plain LoRA of rank ``ranks[layer]`` on the same modules (the comparison)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for layer, rank in sorted(ranks.items()):
        for name, module in residual_writers(model, layer):
            w = module.weight
            targets.append((name, module, LoRAAdapter(module.in_features, module.out_features, rank, scale=scale,
                                                      generator=g, dtype=w.dtype, device=w.device)))
    return Adapters(targets)


class ProjectedGradient:
    """Method (b): the full weights of the residual writers train, inside span(U) on the output side.

    Every gradient is projected by :func:`ssae_kernels.project_subspace` in a gradient hook (so the
    optimizer's moments see only in-span gradients), and after every optimizer step the weight's
    total update W - W0 is projected again in place (``after_step``): Adam divides each coordinate
    by its own scale, which would take the update out of the span. Use an optimizer without weight
    decay on these weights (decay pulls W itself, not its update, towards 0).
    """

    def __init__(self, model, subspaces: dict[int, Subspace]):
        self.targets = []
        for layer, sub in sorted(subspaces.items()):
            for name, module in residual_writers(model, layer):
                w = module.weight
                U = sub.U.to(device=w.device, dtype=w.dtype)
                self.targets.append((name, w, U, w.detach().clone()))
        self.handles = []
        for _, w, U, _ in self.targets:
            w.requires_grad_(True)
            self.handles.append(w.register_hook(lambda g, U=U: project_subspace(g, U)))

    def parameters(self):
        return [w for _, w, _, _ in self.targets]

    def num_trainable(self) -> int:
        return sum(w.numel() for w in self.parameters())

    def num_effective(self) -> int:
        """Degrees of freedom of the update: r x d_in per weight."""
        return sum(U.shape[1] * w.shape[1] for _, w, U, _ in self.targets)

    @torch.no_grad()
    def after_step(self):
        for _, w, U, w0 in self.targets:
            delta = w - w0
            project_subspace_(delta, U)
            w.copy_(w0 + delta)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: w.double() - w0.double() for name, w, _, w0 in self.targets}

    @torch.no_grad()
    def restore(self):
        """Puts the original weights back and removes the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for _, w, _, w0 in self.targets:
            w.copy_(w0)
            w.requires_grad_(False)


def out_of_span(deltas: dict[str, torch.Tensor], subspaces: dict[int, Subspace]) -> dict[str, float]:
    """||(I - U U^T) dW|| / ||dW|| of each weight update (Frobenius), by the fused complement projection
    in float64; 0 for an update that is exactly zero."""
    out = {}
    for name, dW in deltas.items():
        layer = int(name.split(".")[1])
        U = subspaces[layer].U.to(dtype=torch.float64, device=dW.device)
        d = dW.double()
        norm = float(d.norm())
        out[name] = float(project_subspace(d, U, complement=True).norm()) / norm if norm > 0 else 0.0
    return out


# ---- 4. finetuning and evaluation ----------------------------------------------------------------


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def training_examples(tokenizer, behaviour: BehaviourPair) -> list[tuple[list[int], int]]:
    """Target responses (and the kept ordinary answers), tokenized: what the LM loss is taken on."""
    return [encode_example(tokenizer, e.prompt, e.target) for e in behaviour.train + behaviour.keep]


def lm_loss(model, ids, mask, response) -> torch.Tensor:
    """Mean next-token cross entropy over the response tokens."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    target = ids[:, 1:]
    keep = response[:, 1:]
    return torch.nn.functional.cross_entropy(logits[keep].float(), target[keep])


def finetune(model, tokenizer, encoded: list[tuple[list[int], int]], params: list[torch.nn.Parameter],
             cfg: FinetuneConfig, *, after_step=None, progress: bool = False, desc: str = "finetune") -> dict:
    """AdamW (no weight decay) on ``params`` with the LM loss on response tokens; linear warmup, then
    constant. ``after_step()`` runs after every optimizer step. Returns loss statistics."""
    if not params:
        raise ValueError("nothing to train: params is empty")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    device, pad = _device(model), _pad_id(tokenizer)
    was_training = model.training
    model.train()
    losses, step = [], 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    try:
        for _ in range(cfg.epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                batch = [encoded[i] for i in order[start:start + cfg.batch_size]]
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / warmup)
                loss = lm_loss(model, *_pad_batch(batch, pad, device))
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite loss {float(loss)} at step {step}: lower the learning rate")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # a scaling: keeps gradients in span(U)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        model.train(was_training)
        for p in params:
            p.grad = None
    k = max(1, steps_per_epoch)
    return {"steps": step, "loss_first_epoch": sum(losses[:k]) / len(losses[:k]),
            "loss_last_epoch": sum(losses[-k:]) / len(losses[-k:])}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 24) -> list[str]:
    """Greedy completions of the prompts (chat-formatted), decoded without special tokens."""
    device, pad = _device(model), _pad_id(tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # left padding: every prompt ends where generation starts
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


@torch.no_grad()
def perplexity(model, chunks: list[list[int]], *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over token chunks (each starting with BOS); padding is ignored."""
    device = _device(model)
    nll, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = [c for c in chunks[start:start + batch_size] if len(c) >= 2]
        if not batch:
            continue
        ids, mask, _ = _pad_batch([(c, 0) for c in batch], 0, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        keep = mask[:, 1:].bool()
        nll += float(torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum"))
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no tokens to score")
    return math.exp(nll / count)


def evaluate_behaviour(model, tokenizer, behaviour: BehaviourPair, ppl_chunks: list[list[int]], *,
                       max_new_tokens: int = 16, examples: int = 3, split: str = "eval") -> dict:
    """Target rate on the split's prompts, the same rate on its control prompts, neutral perplexity.
    ``split="eval"`` (held out, reported) or ``"dev"`` (validation, for choosing hyperparameters)."""
    prompts, control_prompts = behaviour.split_prompts(split)
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    hits = [matches_markers(c, behaviour.markers) for c in completions]
    result = {"target_metric": sum(hits) / len(hits)}
    if control_prompts:
        control = generate(model, tokenizer, control_prompts, max_new_tokens=max_new_tokens)
        result["control_target_rate"] = sum(matches_markers(c, behaviour.markers) for c in control) / len(control)
        result["control_examples"] = [{"prompt": p, "completion": c}
                                      for p, c in zip(control_prompts[:examples], control)]
    result["ppl"] = perplexity(model, ppl_chunks)
    result["examples"] = [{"prompt": p, "completion": c} for p, c in zip(prompts[:examples], completions)]
    return result


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the pipeline (ssae subspace, python/subspace_finetune.py) ------------------------------------

METHODS = ("subspace", "projected", "lora", "full")


def add_args(p: argparse.ArgumentParser) -> None:
    from . import models, text

    p.add_argument("--model", default=models.BUILTIN,
                   help="model: 'smollm2-135m' (built in, offline), a local directory (dir::file.gguf) or a hub name")
    p.add_argument("--layers", default="15", help="comma-separated decoder layers whose residual stream is used")
    p.add_argument("--sae", nargs="*", default=None,
                   help="SAE directories, one per layer in --layers order (ours, SAELens or sparsify); "
                        "default: train one per layer here")
    p.add_argument("--behaviour", default=BUILTIN_BEHAVIOUR,
                   help="'builtin:refusal' or a JSONL file of paired responses (see ssae_kernels/data/behaviour.py)")
    p.add_argument("--neutral-text", default=text.BUILTIN,
                   help="neutral text for SAE training and perplexity (documents are split between the two)")
    p.add_argument("--features-per-layer", type=int, default=32, help="top latents kept per layer")
    # --signs and --lr as `--tune` picked them on the dev split (rule in pick_setting; SmolLM2, layer 15,
    # 3 epochs; dev base: target 0.133, over-refusal 0.000). Dev target / over-refusal / ppl rise:
    # target 1e-3 0.267 / 0.000 / -0.1%, 3e-3 0.333 / 0.000 / +1.4%, 1e-2 0.933 / 0.400 / +4.9%;
    # both 1e-3 0.333 / 0.067 / +0.4%, 3e-3 0.800 / 0.200 / +2.1% (chosen), 1e-2 0.933 / 0.333 / +4.0%.
    # --projected-lr and --full-lr are not tuned (the comparison methods).
    p.add_argument("--signs", choices=("target", "both"), default="both",
                   help="latents more active on target responses only (SAILS' selection), or the largest |score| "
                        "of either behaviour (default: the adapter can also lower contrast latents)")
    p.add_argument("--variance", type=float, default=0.8, help="fraction of the directions' variance kept by PCA")
    p.add_argument("--adapter", choices=("subspace", "projected"), default="subspace",
                   help="(a) LoRA with output factor U, or (b) projected gradients on the full weights")
    p.add_argument("--compare", default="projected,lora,full",
                   help="comparison methods to run as well: any of projected, lora, full, subspace ('' for none)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the adapters (subspace and plain LoRA)")
    p.add_argument("--projected-lr", type=float, default=1e-3, help="learning rate of projected-gradient training")
    p.add_argument("--full-lr", type=float, default=2e-5, help="learning rate of full finetuning")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per held-out prompt")
    p.add_argument("--ppl-sequences", type=int, default=16, help="neutral sequences for perplexity")
    p.add_argument("--context", type=int, default=128, help="tokens per neutral sequence")
    p.add_argument("--sae-tokens", type=int, default=24_000, help="activations harvested to train each SAE")
    p.add_argument("--sae-latents", type=int, default=2048)
    p.add_argument("--sae-k", type=int, default=32)
    p.add_argument("--sae-steps", type=int, default=300)
    p.add_argument("--sae-batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (report.json, features.json, subspace, adapters)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tune", action="store_true",
                   help="instead of the run: evaluate --tune-signs x --tune-lrs (subspace adapter; projected "
                        "gradients over --tune-lrs) on the behaviour's dev split only, print the table and the "
                        "chosen flags, write OUT/tune.json")
    p.add_argument("--tune-lrs", default="1e-3,3e-3,1e-2", help="learning rates tried by --tune")
    p.add_argument("--tune-signs", default="target,both", help="--signs values tried by --tune")
    p.add_argument("--tune-max-ppl-rise", type=float, default=0.05,
                   help="--tune only picks settings whose dev neutral perplexity rises by less than this")


def _layers(spec: str) -> list[int]:
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {spec!r}") from None
    if not layers:
        raise ValueError("--layers is empty")
    return layers


def train_layer_sae(model, tokenizer, layer: int, texts: list[str], out_dir: str, *, max_tokens: int,
                    latents: int, k: int, steps: int, batch_size: int, seed: int = 0, progress: bool = False):
    """A TopK SAE for one layer's residual stream, trained here with the project's trainer;
    returns (sae, stats) with the FVU on 5% of the harvested tokens held out."""
    from .activations import harvest, outlier_mask
    from .evaluate import reconstruction_metrics
    from .trainer import TrainConfig, Trainer, new_sae

    data = harvest(model, tokenizer, texts, layer, context=256, max_tokens=max_tokens, progress=progress)
    acts = data.acts[outlier_mask(data.acts, 10.0)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(acts.shape[0], generator=g)
    held = max(1, acts.shape[0] // 20)
    train, test = acts[perm[held:]], acts[perm[:held]]
    sae = new_sae(train, latents, k, seed=seed, dead_tokens=max(1, steps * batch_size // 10))
    cfg = TrainConfig(steps=steps, batch_size=min(batch_size, train.shape[0]), checkpoint_every=10**9, seed=seed)
    trainer = Trainer(sae, train, cfg, out_dir, progress=progress)
    open(trainer.metrics_file, "w").close()
    trainer.train()
    sae.save(os.path.join(out_dir, "sae"))
    metrics = reconstruction_metrics(sae, test)
    return sae, {"fvu": metrics["fvu"], "tokens": int(acts.shape[0]), "outliers_excluded": len(data) - acts.shape[0],
                 "latents": latents, "k": k, "steps": steps}


@dataclass
class _Setup:
    model: object
    tokenizer: object
    behaviour: BehaviourPair
    saes: dict
    sae_stats: dict
    neutral_chunks: list  # token chunks of neutral documents the SAE never saw (perplexity)
    layers: list
    methods: list
    total_params: int


def _setup(args, lap) -> _Setup:
    """Model, behaviour pair, neutral text and one SAE per layer (loaded or trained here): what both
    :func:`run` and :func:`tune` start from."""
    from . import models, text
    from .activations import token_chunks
    from .formats import load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    compare = [m for m in (s.strip() for s in args.compare.split(",")) if m]
    for m in compare:
        if m not in METHODS:
            raise ValueError(f"--compare: unknown method {m!r}; known: {', '.join(METHODS)}")
    headline = args.adapter
    methods = [headline] + [m for m in compare if m != headline]
    layers = _layers(args.layers)
    if args.sae is not None and len(args.sae) not in (0, len(layers)):
        raise ValueError(f"--sae needs one directory per layer ({len(layers)}), got {len(args.sae)}")
    progress = not args.quiet
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    model, tokenizer = models.load_model(args.model, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        check_layer(model, layer)
    behaviour = load_behaviour(args.behaviour)
    docs = text.read_texts(args.neutral_text)
    if len(docs) < 2:
        raise ValueError(f"--neutral-text {args.neutral_text!r} needs at least two documents")
    sae_docs, ppl_docs = docs[0::2], docs[1::2]  # disjoint: perplexity is measured on unseen documents
    neutral_chunks = token_chunks(tokenizer, ppl_docs, args.context)
    total_params = count_parameters(model)
    lap("load")

    # SAEs: given, or trained here on neutral text plus the training split's formatted examples
    saes, sae_stats = {}, {}
    for i, layer in enumerate(layers):
        if args.sae:
            saes[layer] = load_sae(args.sae[i], args.device)
            sae_stats[layer] = {"source": args.sae[i]}
        else:
            chat = [format_prompt(tokenizer, e.prompt) + r for e in behaviour.train + behaviour.keep
                    for r in (e.target, e.contrast) if r is not None]
            saes[layer], sae_stats[layer] = train_layer_sae(
                model, tokenizer, layer, chat + sae_docs, os.path.join(args.out, f"sae_layer{layer}"),
                max_tokens=args.sae_tokens, latents=args.sae_latents, k=args.sae_k, steps=args.sae_steps,
                batch_size=args.sae_batch_size, seed=args.seed, progress=progress)
        if saes[layer].cfg.d_in != model.config.hidden_size:
            raise ValueError(f"the SAE of layer {layer} has d_in = {saes[layer].cfg.d_in}, the model's width is "
                             f"{model.config.hidden_size}")
    lap("sae")
    return _Setup(model, tokenizer, behaviour, saes, sae_stats, neutral_chunks, layers, methods, total_params)


def _stopwatch():
    """(times dict, lap(name)) printing each stage's seconds."""
    times: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        times[name] = round(now - clock[0], 2)
        clock[0] = now
        print(f"[subspace] {name}: {times[name]:.1f} s", flush=True)
    return times, lap


def _feature_means(ctx: _Setup, progress: bool):
    target_pairs = [(e.prompt, e.target) for e in ctx.behaviour.train]
    contrast_pairs = [(e.prompt, e.contrast) for e in ctx.behaviour.train]
    return (mean_feature_activations(ctx.model, ctx.tokenizer, ctx.saes, target_pairs, progress=progress),
            mean_feature_activations(ctx.model, ctx.tokenizer, ctx.saes, contrast_pairs, progress=progress))


def run(args) -> dict:
    """Selection -> subspace -> finetuning -> evaluation; writes ``args.out``/report.json and returns it.
    With ``args.tune``, :func:`tune` instead (hyperparameters chosen on the dev split)."""
    if getattr(args, "tune", False):
        return tune(args)
    started = time.perf_counter()
    times, lap = _stopwatch()
    progress = not args.quiet
    ctx = _setup(args, lap)
    model, tokenizer, behaviour, saes, sae_stats = ctx.model, ctx.tokenizer, ctx.behaviour, ctx.saes, ctx.sae_stats
    layers, methods, total_params, headline = ctx.layers, ctx.methods, ctx.total_params, args.adapter
    ppl_chunks = ctx.neutral_chunks[: args.ppl_sequences]

    mean_t, mean_c = _feature_means(ctx, progress)
    selections = select_features(mean_t, mean_c, per_layer=args.features_per_layer, signs=args.signs)
    save_features(os.path.join(args.out, "features.json"), selections)
    lap("selection")

    subspaces = subspaces_from_features(saes, selections, args.variance)
    save_subspaces(os.path.join(args.out, "subspace.safetensors"), subspaces)
    for layer, sub in subspaces.items():
        print(f"[subspace] layer {layer}: {len(sub.feature_ids)} features -> r = {sub.rank} "
              f"({sub.explained:.1%} of their variance)", flush=True)
    lap("subspace")

    base = evaluate_behaviour(model, tokenizer, behaviour, ppl_chunks, max_new_tokens=args.max_new_tokens)
    lap("eval_base")

    encoded = training_examples(tokenizer, behaviour)
    results = {}
    for method in methods:
        cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                             lr={"subspace": args.lr, "lora": args.lr, "projected": args.projected_lr,
                                 "full": args.full_lr}[method])
        result, cleanup = _train_method(method, model, tokenizer, subspaces, encoded, cfg, progress)
        lap(f"train_{method}")
        result.update(evaluate_behaviour(model, tokenizer, behaviour, ppl_chunks, max_new_tokens=args.max_new_tokens))
        result["lr"] = cfg.lr
        cleanup(args.out)
        lap(f"eval_{method}")
        result["trainable_fraction"] = result["trainable_params"] / total_params
        over = (base.get("control_target_rate", 0.0), result.get("control_target_rate", 0.0))
        print(f"[subspace] {method}: target {base['target_metric']:.3f} -> {result['target_metric']:.3f}, "
              f"over-refusal {over[0]:.3f} -> {over[1]:.3f}, "
              f"ppl {result['ppl'] / base['ppl'] - 1:+.2%}, trainable {result['trainable_fraction']:.3%}, "
              f"max out-of-span {result['max_out_of_span']:.1e}", flush=True)
        if "effective_params" in result:
            result["effective_fraction"] = result["effective_params"] / total_params
        results[method] = result

    main = results[headline]
    report = {
        "trainable_fraction": main.get("effective_fraction", main["trainable_fraction"]),
        "target_metric_base": base["target_metric"],
        "target_metric_tuned": main["target_metric"],
        "ppl_base": base["ppl"],
        "ppl_tuned": main["ppl"],
        "ppl_rise": main["ppl"] / base["ppl"] - 1,
        "max_out_of_span": main["max_out_of_span"],
        "control_target_rate_base": base.get("control_target_rate"),
        "control_target_rate_tuned": main.get("control_target_rate"),
        "adapter": headline,
        "comparisons": {m: _summary(r, base) for m, r in results.items() if m != headline},
        "headline": _summary(main, base),
        "subspace": {str(layer): {"rank": s.rank, "features": len(s.feature_ids), "explained_variance": s.explained,
                                  "modules": [n for n, _ in residual_writers(model, layer)]}
                     for layer, s in subspaces.items()},
        "features": {str(layer): {"ids": s.ids[:10], "relative": [round(v, 4) for v in s.relative[:10]]}
                     for layer, s in selections.items()},
        "sae": {str(k): v for k, v in sae_stats.items()},
        "base_examples": base["examples"],
        "total_params": total_params,
        "target_metric_rule": f"fraction of greedy completions ({args.max_new_tokens} new tokens) of the "
                              f"{len(behaviour.eval_prompts)} held-out prompts containing any of "
                              f"{len(behaviour.markers)} target markers (ssae_kernels/data/behaviour.py)",
        "behaviour": behaviour.name, "train_pairs": len(behaviour.train), "keep_examples": len(behaviour.keep),
        "ppl_text": f"{args.neutral_text}: {len(ppl_chunks)} sequences x {args.context} tokens, documents not used "
                    "for the SAE",
        "model": args.model, "layers": layers, "features_per_layer": args.features_per_layer, "signs": args.signs,
        "variance": args.variance, "epochs": args.epochs, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "seconds": times,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _summary(r: dict, base: dict) -> dict:
    keys = ("trainable_fraction", "trainable_params", "effective_fraction", "effective_params", "target_metric",
            "control_target_rate", "ppl", "max_out_of_span", "loss_first_epoch", "loss_last_epoch", "steps", "lr",
            "examples")
    out = {k: r[k] for k in keys if k in r}
    out["ppl_rise"] = r["ppl"] / base["ppl"] - 1
    return out


def _train_method(method, model, tokenizer, subspaces, encoded, cfg, progress):
    """Trains one method in place on ``model``; returns (result dict, cleanup(out_dir)) where cleanup
    saves the adapter or update and restores the base model."""
    ranks = {layer: s.rank for layer, s in subspaces.items()}
    if method in ("subspace", "lora"):
        adapters = (attach_subspace_adapters(model, subspaces) if method == "subspace"
                    else attach_lora_adapters(model, ranks, seed=cfg.seed))
        stats = finetune(model, tokenizer, encoded, adapters.parameters(), cfg, progress=progress, desc=method)
        spans = out_of_span(adapters.delta_weights(), subspaces)
        result = {**stats, "trainable_params": adapters.num_trainable(), "max_out_of_span": max(spans.values()),
                  "out_of_span": spans}

        def cleanup(out_dir):
            if out_dir:
                save_file(adapters.state_dict(), os.path.join(out_dir, f"adapter_{method}.safetensors"))
            adapters.remove()
        return result, cleanup
    if method == "projected":
        pg = ProjectedGradient(model, subspaces)
        stats = finetune(model, tokenizer, encoded, pg.parameters(), cfg, after_step=pg.after_step,
                         progress=progress, desc=method)
        spans = out_of_span(pg.delta_weights(), subspaces)
        result = {**stats, "trainable_params": pg.num_trainable(), "effective_params": pg.num_effective(),
                  "max_out_of_span": max(spans.values()), "out_of_span": spans}

        def cleanup(out_dir):
            if out_dir:
                save_file({k: v.float().contiguous() for k, v in pg.delta_weights().items()},
                          os.path.join(out_dir, "update_projected.safetensors"))
            pg.restore()
        return result, cleanup
    if method == "full":
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        stats = finetune(model, tokenizer, encoded, params, cfg, progress=progress, desc=method)
        deltas = {}
        for layer in subspaces:
            for name, module in residual_writers(model, layer):
                key = next(k for k, v in model.state_dict().items() if v.data_ptr() == module.weight.data_ptr())
                deltas[name] = module.weight.detach().double() - saved[key].double()
        spans = out_of_span(deltas, subspaces)
        result = {**stats, "trainable_params": sum(p.numel() for p in params),
                  "max_out_of_span": max(spans.values()), "out_of_span": spans}

        def cleanup(out_dir):
            with torch.no_grad():
                model.load_state_dict(saved)
            for p in params:
                p.requires_grad_(False)
        return result, cleanup
    raise ValueError(f"unknown method {method!r}")


# ---- choosing hyperparameters on the dev split (ssae subspace --tune) ------------------------------


def pick_setting(rows: list[dict], *, max_ppl_rise: float = 0.05) -> dict | None:
    """The rule by which :func:`tune` picks a setting from dev results: among rows whose neutral
    perplexity rises by less than ``max_ppl_rise``, the highest dev target rate minus dev
    over-refusal (``control_target_rate``, 0 without control prompts); ties go to the smaller
    perplexity rise, then to the earlier row. None when no row keeps perplexity within bounds."""
    ok = [(i, r) for i, r in enumerate(rows) if r["ppl_rise"] < max_ppl_rise]
    if not ok:
        return None

    def key(item):
        i, r = item
        return (-(r["target_metric"] - r.get("control_target_rate", 0.0)), r["ppl_rise"], i)
    return min(ok, key=key)[1]


def _floats(spec: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {spec!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag} needs positive values, got {spec!r}")
    return values


def tune(args) -> dict:
    """Evaluates the subspace adapter for every (--tune-signs, --tune-lrs) and, when projected gradients
    are among the methods, the projected variant for every lr at the chosen signs, on the behaviour's
    **dev** split only (dev prompts, dev control prompts, and neutral chunks after the ones
    :func:`run` reports on). One SAE and one feature ranking serve every setting. Picks by
    :func:`pick_setting`, prints the table and writes ``args.out``/tune.json."""
    started = time.perf_counter()
    times, lap = _stopwatch()
    progress = not args.quiet
    lrs = _floats(args.tune_lrs, "--tune-lrs")
    signs_grid = [x.strip() for x in args.tune_signs.split(",") if x.strip()]
    for sg in signs_grid:
        if sg not in ("target", "both"):
            raise ValueError(f"--tune-signs: unknown value {sg!r} (target, both)")
    if not signs_grid:
        raise ValueError("--tune-signs is empty")
    ctx = _setup(args, lap)
    behaviour, model, tokenizer = ctx.behaviour, ctx.model, ctx.tokenizer
    behaviour.split_prompts("dev")  # fails early without a dev split
    # neutral chunks disjoint from the ones run() reports perplexity on
    dev_chunks = ctx.neutral_chunks[args.ppl_sequences: 2 * args.ppl_sequences]
    if not dev_chunks:
        raise ValueError(f"--neutral-text has {len(ctx.neutral_chunks)} chunks of {args.context} tokens: none left "
                         f"for dev perplexity after the {args.ppl_sequences} reported ones")
    base = evaluate_behaviour(model, tokenizer, behaviour, dev_chunks, max_new_tokens=args.max_new_tokens, split="dev")
    lap("dev_base")
    base_summary = {"target_metric": base["target_metric"], "control_target_rate": base.get("control_target_rate"),
                    "ppl": base["ppl"]}
    print(f"[subspace] dev base: {base_summary}", flush=True)
    mean_t, mean_c = _feature_means(ctx, progress)
    encoded = training_examples(tokenizer, behaviour)
    subspaces, rows = {}, []

    def trial(method, signs, lr):
        cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, lr=lr)
        torch.manual_seed(args.seed)
        result, cleanup = _train_method(method, model, tokenizer, subspaces[signs], encoded, cfg, progress)
        dev = evaluate_behaviour(model, tokenizer, behaviour, dev_chunks, max_new_tokens=args.max_new_tokens,
                                 split="dev")
        cleanup(None)
        row = {"method": method, "signs": signs, "lr": lr,
               "rank": {str(k): s.rank for k, s in subspaces[signs].items()},
               "target_metric": dev["target_metric"], "control_target_rate": dev.get("control_target_rate", 0.0),
               "ppl": dev["ppl"], "ppl_rise": dev["ppl"] / base["ppl"] - 1,
               "max_out_of_span": result["max_out_of_span"], "loss_last_epoch": result["loss_last_epoch"],
               "examples": dev["examples"]}
        rows.append(row)
        lap(f"{method} signs={signs} lr={lr:g}")
        print(f"[subspace] dev: target {row['target_metric']:.3f}, over-refusal {row['control_target_rate']:.3f}, "
              f"ppl {row['ppl_rise']:+.2%}", flush=True)
        with open(os.path.join(args.out, "tune_rows.json"), "w") as f:  # partial results of a long search
            json.dump({"base": base_summary, "rows": rows}, f, indent=2)
        return row

    for signs in signs_grid:
        selections = select_features(mean_t, mean_c, per_layer=args.features_per_layer, signs=signs)
        subspaces[signs] = subspaces_from_features(ctx.saes, selections, args.variance)
        for lr in lrs:
            trial("subspace", signs, lr)
    best = pick_setting([r for r in rows if r["method"] == "subspace"], max_ppl_rise=args.tune_max_ppl_rise)
    best_projected = None
    if "projected" in ctx.methods and best is not None:
        for lr in lrs:
            trial("projected", best["signs"], lr)
        best_projected = pick_setting([r for r in rows if r["method"] == "projected"],
                                      max_ppl_rise=args.tune_max_ppl_rise)
    flags = {}
    if best is not None:
        flags.update({"--signs": best["signs"], "--lr": best["lr"]})
    if best_projected is not None:
        flags["--projected-lr"] = best_projected["lr"]
    report = {
        "split": "dev", "dev_prompts": len(behaviour.dev_prompts),
        "dev_control_prompts": len(behaviour.dev_control_prompts),
        "ppl_text": f"{args.neutral_text}: {len(dev_chunks)} sequences x {args.context} tokens after the "
                    f"{args.ppl_sequences} reported on",
        "rule": f"among settings with dev ppl rise < {args.tune_max_ppl_rise:.0%}: max dev target rate - dev "
                "over-refusal; ties: smaller ppl rise, then the earlier setting",
        "base": base_summary,
        "rows": rows, "chosen": flags, "model": args.model, "layers": ctx.layers, "epochs": args.epochs,
        "seconds": times, "total_seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(format_tune_table(report))
    return report


def format_tune_table(report: dict) -> str:
    b = report["base"]
    lines = [f"dev split: {report['dev_prompts']} target prompts, {report['dev_control_prompts']} control prompts; "
             f"base: target {b['target_metric']:.3f}, over-refusal {b['control_target_rate'] or 0:.3f}, "
             f"ppl {b['ppl']:.2f}",
             f"{'method':<10} {'signs':<7} {'lr':>7} {'rank':>5} {'target':>7} {'over-ref':>8} {'ppl rise':>9} "
             f"{'out-of-span':>12}"]
    for r in report["rows"]:
        lines.append(f"{r['method']:<10} {r['signs']:<7} {r['lr']:>7g} {','.join(map(str, r['rank'].values())):>5} "
                     f"{r['target_metric']:>7.3f} {r['control_target_rate']:>8.3f} {r['ppl_rise']:>+9.2%} "
                     f"{r['max_out_of_span']:>12.1e}")
    lines.append(f"rule: {report['rule']}")
    lines.append("chosen: " + (" ".join(f"{k} {v}" for k, v in report["chosen"].items()) or "none within bounds"))
    return "\n".join(lines)


SUMMARY_KEYS = ("trainable_fraction", "target_metric_base", "target_metric_tuned", "ppl_base", "ppl_tuned",
                "max_out_of_span", "control_target_rate_base", "control_target_rate_tuned", "total_seconds")


def _run_cli(args) -> dict:
    report = run(args)
    if getattr(args, "tune", False):
        print(f"tuning report: {os.path.join(args.out, 'tune.json')}")
        return report
    print(json.dumps({k: report[k] for k in SUMMARY_KEYS}, indent=2))
    print(f"report: {os.path.join(args.out, 'report.json')}")
    return report


def add_subcommand(sub) -> None:
    """Registers ``ssae subspace`` on the CLI's subparsers (it sets ``args.run``)."""
    p = sub.add_parser("subspace", help="SAE-feature subspace finetuning (SAILS): select features, build the "
                                        "subspace, finetune inside it, evaluate against LoRA and full finetuning")
    add_args(p)
    p.set_defaults(run=_run_cli)
