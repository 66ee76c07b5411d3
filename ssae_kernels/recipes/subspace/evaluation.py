"""``ssae subspace eval``: the refusal rate of a saved adapter (``OUT/adapter`` of ``ssae subspace``) on any
file of prompts, judged by :func:`ssae_kernels.data.refusal.is_refusal`."""

from __future__ import annotations

import csv
import json
import os

from ... import models
from ...data.refusal import is_refusal
from ..common import UsageError, set_threads
from .adapters import load_adapter, read_adapter_config
from .finetuning import generate


def read_prompts(path: str, column: str) -> list[str]:
    """The non-empty cells of ``column`` in the CSV file ``path`` (with a header row)."""
    if not os.path.isfile(path):
        raise UsageError(f"--prompts {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise UsageError(f"--prompts {path} has no column {column!r}; its columns: "
                             f"{', '.join(reader.fieldnames or []) or 'none'}")
        prompts = [row[column].strip() for row in reader if (row[column] or "").strip()]
    if not prompts:
        raise UsageError(f"--prompts {path}: column {column!r} has no prompts")
    return prompts


def evaluate_adapter(adapter_dir: str, prompts_file: str, column: str, *, model: str | None = None,
                     max_new_tokens: int | None = None, device: str = "cpu", threads: int | None = None,
                     progress: bool = True) -> dict:
    """{'refusal_rate', 'n', ...}: the base model with the adapter of ``adapter_dir`` attached, greedy
    completions of every prompt (``max_new_tokens``, by default the run's), each judged by ``is_refusal``."""
    try:
        config = read_adapter_config(adapter_dir)
    except ValueError as error:
        raise UsageError(f"--adapter: {error}") from None
    prompts = read_prompts(prompts_file, column)
    set_threads(threads)
    source = model or config["model"]
    lm, tokenizer = models.load_model(source, device=device)
    for p in lm.parameters():
        p.requires_grad_(False)
    try:
        adapters = load_adapter(lm, adapter_dir)
    except ValueError as error:
        raise UsageError(f"--adapter: {error}") from None
    tokens = max_new_tokens or config.get("max_new_tokens", 32)
    replies = generate(lm, tokenizer, prompts, max_new_tokens=tokens, progress=progress)
    adapters.remove()
    refused = [is_refusal(r) for r in replies]
    return {"refusal_rate": sum(refused) / len(refused), "n": len(refused), "prompts": prompts_file,
            "column": column, "adapter": adapter_dir, "method": config["method"], "model": source,
            "max_new_tokens": tokens,
            "replies": [{"prompt": p, "reply": r, "refusal": j} for p, r, j in zip(prompts, replies, refused)]}


def write_evaluation(result: dict, path: str) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
