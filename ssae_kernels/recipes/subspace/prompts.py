"""Chat formatting, tokenization and padding of (prompt, response) examples."""

from __future__ import annotations

import torch


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


def pad_batch(encoded: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids [B, T], attention mask [B, T], response mask [B, T]) of (ids, response start) pairs,
    right-padded."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    response = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, (seq, start) in enumerate(encoded):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        response[i, start:len(seq)] = True
    return ids.to(device), mask.to(device), response.to(device)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding token, else its EOS, else 0 (padded positions are masked out anyway)."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return t
    return 0


def model_device(model) -> torch.device:
    return next(model.parameters()).device
