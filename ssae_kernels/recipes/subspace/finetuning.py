"""Step 4: finetuning with the LM loss on target responses, and the evaluation: the target-style rate of
greedy completions on held-out (or dev) prompts, on control prompts and on the pair's other held-out sets,
and perplexity on neutral text. Also the self-distillation of the kept examples' answers."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...data.behaviour import BehaviourPair, Example
from .prompts import encode_example, encode_prompt, model_device, pad_batch, pad_token_id


@dataclass
class FinetuneConfig:
    steps: int = 40  # the budget: optimizer steps of batch_size examples, drawn in shuffled passes
    lr: float = 1e-3
    batch_size: int = 8
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def training_examples(tokenizer, behaviour: BehaviourPair, keep_share: float | None = None
                      ) -> list[tuple[list[int], int]]:
    """Target responses and the kept ordinary answers, tokenized: what the LM loss is taken on. With
    ``keep_share`` the kept answers are repeated (cyclically) until they are about that fraction of the
    list, so that shuffled batches hold that share of them; None keeps the natural proportion."""
    if any(e.target is None for e in behaviour.keep):
        raise ValueError(f"behaviour pair {behaviour.name!r}: kept prompts without an answer; run distill_keep first")
    keep = behaviour.keep
    if keep_share is not None:
        if not 0 <= keep_share < 1:
            raise ValueError(f"keep_share must be in [0, 1), got {keep_share}")
        if keep:
            wanted = round(keep_share / (1 - keep_share) * len(behaviour.train))
            keep = [keep[i % len(keep)] for i in range(wanted)]
    return [encode_example(tokenizer, e.prompt, e.target) for e in behaviour.train + keep]


def distill_keep(model, tokenizer, behaviour: BehaviourPair, *, max_new_tokens: int = 48) -> dict:
    """Self-distillation: the kept prompts without an answer get the base model's greedy answer. Answers
    the pair's judge counts as target style (a refusal of a safe prompt) or that are empty are dropped,
    so the finetuning does not teach over-refusal. Changes ``behaviour.keep`` in place; returns counts
    and the dropped examples."""
    todo = [e.prompt for e in behaviour.keep if e.target is None]
    answers = dict(zip(todo, generate(model, tokenizer, todo, max_new_tokens=max_new_tokens))) if todo else {}
    kept, dropped = [], []
    for e in behaviour.keep:
        answer = e.target if e.target is not None else answers[e.prompt].strip()
        if e.target is None and (not answer or behaviour.is_target(answer)):
            dropped.append({"prompt": e.prompt, "answer": answer})
            continue
        kept.append(Example(e.prompt, answer))
    behaviour.keep[:] = kept
    return {"distilled": len(todo) - len(dropped), "dropped": len(dropped), "max_new_tokens": max_new_tokens,
            "dropped_examples": dropped}


def lm_loss(model, ids, mask, response) -> torch.Tensor:
    """Mean next-token cross entropy over the response tokens."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    target = ids[:, 1:]
    keep = response[:, 1:]
    return torch.nn.functional.cross_entropy(logits[keep].float(), target[keep])


def finetune(model, tokenizer, encoded: list[tuple[list[int], int]], params: list[torch.nn.Parameter],
             cfg: FinetuneConfig, *, after_step=None, progress: bool = False, desc: str = "finetune") -> dict:
    """AdamW (no weight decay) on ``params`` with the LM loss on response tokens for ``cfg.steps`` steps
    (batches drawn from shuffled passes over ``encoded``, the same for every method with the same seed);
    linear warmup, then constant. ``after_step()`` runs after every optimizer step. Returns loss statistics."""
    if not params:
        raise ValueError("nothing to train: params is empty")
    if not encoded:
        raise ValueError("nothing to train on: no examples")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    batches = _batches(len(encoded), cfg.batch_size, cfg.steps, cfg.seed)
    total = len(batches)
    warmup = max(1, int(cfg.warmup_fraction * total))
    device, pad = model_device(model), pad_token_id(tokenizer)
    was_training = model.training
    model.train()
    losses, step = [], 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    try:
        for indices in batches:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / warmup)
            loss = lm_loss(model, *pad_batch([encoded[i] for i in indices], pad, device))
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
    k = max(1, total // 10)
    return {"steps": step, "examples_seen": sum(len(b) for b in batches),
            "loss_first_tenth": sum(losses[:k]) / len(losses[:k]),
            "loss_last_tenth": sum(losses[-k:]) / len(losses[-k:])}


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of example indices: consecutive slices of shuffled passes over range(n)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    rng, order, out = random.Random(seed), [], []
    while len(out) < steps:
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
            continue
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 24,
             progress: bool = False) -> list[str]:
    """Greedy completions of the prompts (chat-formatted), decoded without special tokens. Prompts are
    batched by length (less padding), and the completions returned in the prompts' order."""
    device, pad = model_device(model), pad_token_id(tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
        chosen = order[start:start + batch_size]
        enc = [encoded[i] for i in chosen]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # left padding: every prompt ends where generation starts
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for i, text in zip(chosen, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
            out[i] = text
    return out


@torch.no_grad()
def sequence_nll(model, chunks: list[list[int]], *, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed next-token NLL, scored tokens) of each token chunk (each starting with BOS) of two or more
    tokens; padding is ignored."""
    device = model_device(model)
    out = []
    for start in range(0, len(chunks), batch_size):
        batch = [c for c in chunks[start:start + batch_size] if len(c) >= 2]
        if not batch:
            continue
        ids, mask, _ = pad_batch([(c, 0) for c in batch], 0, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        keep = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out += [(float(n), int(c)) for n, c in zip((nll * keep).sum(1).tolist(), keep.sum(1).tolist())]
    return out


def pooled_perplexity(per_sequence: list[tuple[float, int]]) -> float:
    """exp(mean NLL over every scored token) from :func:`sequence_nll`'s result."""
    count = sum(c for _, c in per_sequence)
    if count == 0:
        raise ValueError("no tokens to score")
    return math.exp(sum(n for n, _ in per_sequence) / count)


def perplexity(model, chunks: list[list[int]], *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over token chunks (each starting with BOS); padding is ignored."""
    return pooled_perplexity(sequence_nll(model, chunks, batch_size=batch_size))


def ppl_rise_upper(base: list[tuple[float, int]], tuned: list[tuple[float, int]], z: float = 1.645) -> float:
    """One-sided upper confidence bound (z = 1.645: 95%) on the perplexity rise, from :func:`sequence_nll` of
    the same neutral sequences before and after: exp(log ppl ratio + z * the standard error of the paired
    per-sequence mean-NLL differences) - 1. The sequences are a sample of the neutral text, and other text
    rises by what the text does, not by what this sample does; a rule on the bound does not pick a setting
    that is within bounds by luck."""
    if len(base) != len(tuned) or not base or any(b[1] != t[1] for b, t in zip(base, tuned)):
        raise ValueError(f"need the same nonempty sequences, got {len(base)} and {len(tuned)}")
    count = sum(c for _, c in base)
    log_ratio = (sum(n for n, _ in tuned) - sum(n for n, _ in base)) / count
    diffs = torch.tensor([(t - b) / c for (b, c), (t, _) in zip(base, tuned)], dtype=torch.float64)
    stderr = float(diffs.std()) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return math.exp(log_ratio + z * stderr) - 1


def evaluate_behaviour(model, tokenizer, behaviour: BehaviourPair, ppl_chunks: list[list[int]], *,
                       max_new_tokens: int = 16, examples: int = 3, split: str = "eval",
                       held_out: bool = False) -> dict:
    """Target rate on the split's prompts (``target_metric``), the same rate on its control prompts
    (``control_target_rate``) and, with ``held_out``, on each of the pair's held-out sets (``{name}_rate``);
    neutral perplexity (``ppl``; ``sequence_nll``: each sequence's summed NLL and token count); every
    completion with its judgement (``completions``). ``split="eval"`` (held out, reported) or ``"dev"``
    (validation, for choosing hyperparameters)."""
    prompts, control_prompts = behaviour.split_prompts(split)
    sets = {split: prompts, f"{split}_control": control_prompts}
    if held_out:
        sets.update(behaviour.held_out)
    result, records = {}, []
    for name, set_prompts in sets.items():
        if not set_prompts:
            continue
        replies = generate(model, tokenizer, set_prompts, max_new_tokens=max_new_tokens)
        judged = [behaviour.is_target(c) for c in replies]
        key = {split: "target_metric", f"{split}_control": "control_target_rate"}.get(name, f"{name}_rate")
        result[key] = sum(judged) / len(judged)
        records += [{"set": name, "prompt": p, "reply": c, "target_style": j}
                    for p, c, j in zip(set_prompts, replies, judged)]
    per_sequence = sequence_nll(model, ppl_chunks)
    result["ppl"] = pooled_perplexity(per_sequence)
    result["sequence_nll"] = per_sequence
    result["examples"] = [{"prompt": r["prompt"], "completion": r["reply"]} for r in records
                          if r["set"] == split][:examples]
    result["control_examples"] = [{"prompt": r["prompt"], "completion": r["reply"]}
                                  for r in records if r["set"] == f"{split}_control"][:examples]
    result["completions"] = records
    return result


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
