"""Harvesting residual-stream activations from a causal LM, and an on-disk activation cache."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .models import check_layer, decoder_layers


@dataclass
class Activations:
    """Residual-stream vectors ``acts`` [T, d] (float32) and the token id at each position ``tokens`` [T]."""

    acts: torch.Tensor
    tokens: torch.Tensor
    layer: int
    model: str = ""

    def __len__(self):
        return self.acts.shape[0]


class _StopForward(Exception):
    pass


def token_chunks(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """Documents tokenized, joined with EOS, cut into sequences of ``context`` tokens each
    starting with BOS (when the tokenizer has one). The final partial sequence is kept."""
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    bos = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id
    body = context - (1 if bos is not None else 0)
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
    if not stream:
        raise ValueError("the texts hold no tokens")
    chunks = [stream[i:i + body] for i in range(0, len(stream), body)]
    return [([bos] if bos is not None else []) + c for c in chunks]


def harvest(model, tokenizer, texts: list[str], layer: int, *, context: int = 256, batch_size: int = 16,
            max_tokens: int | None = None, progress: bool = True, model_name: str = "") -> Activations:
    """The residual stream after decoder layer ``layer`` (HF's ``hidden_states[layer + 1]``) for
    every token of ``texts``, except each sequence's first position (BOS / attention sink) and padding.
    The forward pass stops after that layer."""
    return harvest_layers(model, tokenizer, texts, [layer], context=context, batch_size=batch_size,
                          max_tokens=max_tokens, progress=progress, model_name=model_name)[layer]


def harvest_layers(model, tokenizer, texts: list[str], layers: list[int], *, context: int = 256,
                   batch_size: int = 16, max_tokens: int | None = None, progress: bool = True,
                   model_name: str = "") -> dict[int, Activations]:
    """``harvest`` of several layers from one forward pass, which stops after the last of them:
    layer -> its Activations (the same tokens for every layer)."""
    chunks = token_chunks(tokenizer, texts, context)
    acts, tokens = {layer: [] for layer in layers}, []
    total = sum(len(c) - 1 for c in chunks)
    if max_tokens is not None:
        total = min(total, max_tokens)
    named = ", ".join(map(str, sorted(set(layers))))
    with tqdm(total=total, unit="tok", desc=f"activations (layer{'s' * (len(acts) > 1)} {named})",
              disable=not progress) as bar, \
            contextlib.closing(iter_activations(model, tokenizer, chunks, layers, batch_size=batch_size)) as batches:
        for batch in batches:
            for layer in acts:
                acts[layer].append(batch.acts[layer])
            tokens.append(batch.tokens)
            bar.update(min(len(batch.tokens), total - bar.n))  # the last batch may pass max_tokens
            if max_tokens is not None and sum(t.shape[0] for t in tokens) >= max_tokens:
                break
    tok = torch.cat(tokens)[:max_tokens]
    return {layer: Activations(torch.cat(parts)[:max_tokens], tok, layer, model_name) for layer, parts in acts.items()}


@dataclass
class ActivationBatch:
    """One batch of sequences' kept tokens (every position but each sequence's first, no padding): the residual
    stream per layer ``acts`` ({layer: [n, d]} float32 on the CPU), ``tokens`` [n], and where each token sits:
    ``sequences`` [n] (index into the chunks) and ``positions`` [n]."""

    acts: dict[int, torch.Tensor]
    tokens: torch.Tensor
    sequences: torch.Tensor
    positions: torch.Tensor


@torch.no_grad()
def iter_activations(model, tokenizer, chunks: list[list[int]], layers: list[int], *, batch_size: int = 16):
    """The residual stream after each decoder layer in ``layers`` for the token ``chunks`` (``token_chunks``),
    one ``ActivationBatch`` per ``batch_size`` sequences; each forward pass stops after the last layer."""
    if not layers:
        raise ValueError("layers: none given")
    for layer in layers:
        check_layer(model, layer)
    device = next(model.parameters()).device
    captured, last = {}, max(layers)

    def hook_of(layer):
        def hook(module, args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == last:
                raise _StopForward
        return hook

    handles = [decoder_layers(model)[layer].register_forward_hook(hook_of(layer)) for layer in set(layers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start:start + batch_size]
            width = max(len(c) for c in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, c in enumerate(batch):
                ids[i, :len(c)] = torch.tensor(c)
                mask[i, :len(c)] = 1
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
            keep = mask.bool()
            keep[:, 0] = False  # BOS / first position
            where = keep.nonzero()
            yield ActivationBatch({layer: captured.pop(layer).float().cpu()[keep] for layer in set(layers)}, ids[keep],
                                  where[:, 0] + start, where[:, 1])
    finally:
        for handle in handles:
            handle.remove()


SHARD_ROWS = 1 << 19  # 512k rows per shard file


def save_activations(directory: str, data: Activations) -> None:
    """Sharded safetensors (``acts-00000.safetensors`` ...) and ``meta.json``: readable without pickle."""
    os.makedirs(directory, exist_ok=True)
    shards = 0
    for shards, start in enumerate(range(0, len(data), SHARD_ROWS), 1):
        save_file({"acts": data.acts[start:start + SHARD_ROWS].contiguous(),
                   "tokens": data.tokens[start:start + SHARD_ROWS].contiguous()},
                  os.path.join(directory, f"acts-{shards - 1:05d}.safetensors"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"rows": len(data), "d": data.acts.shape[1], "layer": data.layer, "model": data.model,
                   "shards": shards}, f, indent=2)


def load_activations(directory: str) -> Activations:
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    parts = [load_file(os.path.join(directory, f"acts-{i:05d}.safetensors")) for i in range(meta["shards"])]
    return Activations(torch.cat([p["acts"] for p in parts]), torch.cat([p["tokens"] for p in parts]),
                       meta["layer"], meta.get("model", ""))


def outlier_mask(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """True for rows whose norm is at most ``factor`` times the median norm.

    Residual streams hold rare massive-norm tokens (SmolLM2-135M layer 15: max ~24,000 against a
    median ~150) that would dominate a squared-error objective; the trainer excludes them."""
    norms = acts.norm(dim=1)
    return norms <= factor * norms.median()
