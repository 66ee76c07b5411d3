"""Step 4: finetuning with the LM loss on target responses, and the evaluation: the target-style rate of
greedy completions on held-out (or dev) prompts and on control prompts, and perplexity on neutral text."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...data.behaviour import BehaviourPair, matches_markers
from .prompts import encode_example, encode_prompt, model_device, pad_batch, pad_token_id


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
    device, pad = model_device(model), pad_token_id(tokenizer)
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
                loss = lm_loss(model, *pad_batch(batch, pad, device))
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
    device, pad = model_device(model), pad_token_id(tokenizer)
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
    device = model_device(model)
    nll, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = [c for c in chunks[start:start + batch_size] if len(c) >= 2]
        if not batch:
            continue
        ids, mask, _ = pad_batch([(c, 0) for c in batch], 0, device)
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
