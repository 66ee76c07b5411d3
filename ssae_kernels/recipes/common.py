"""What every pipeline shares: the common flags, reading a config from them, harvesting with a cache,
the outlier mask and the dead-latent horizon."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os

import torch

from .. import models


class UsageError(ValueError):
    """A mistake in the arguments or inputs: ``ssae`` prints it as one line and exits with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every optional flag's default, and marks the required ones."""

    def _get_help_string(self, action):
        if action.required:
            return (action.help or "") + " (required)"
        if "(default: " in (action.help or "") or "(required" in (action.help or ""):  # the help says it itself
            return action.help
        return super()._get_help_string(action)


def add_model_args(p: argparse.ArgumentParser, *, layer: bool = True) -> None:
    """--model, --layer and --threads, as every pipeline that runs a language model declares them."""
    p.add_argument("--model", default=models.BUILTIN,
                   help="model: 'smollm2-135m' (built in, offline), a local directory (dir::file.gguf for GGUF) "
                        "or a hub name")
    if layer:
        p.add_argument("--layer", type=int, default=15, help="decoder layer whose output (residual stream) is used")
    add_threads_arg(p)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: all cores)")


def add_out_args(p: argparse.ArgumentParser, contents: str, *, resume: bool = False) -> None:
    """--out (a run directory, see ``rundir``), --overwrite and, for pipelines that checkpoint, --resume."""
    p.add_argument("--out", required=True, help=f"run directory ({contents})")
    p.add_argument("--overwrite", action="store_true", help="replace the run that OUT holds")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")


# Config fields that say where and how verbosely a run goes, not what it computes.
NOT_RUN_SETTINGS = frozenset({"out", "resume", "overwrite", "quiet"})


def run_settings(cfg) -> dict:
    """What run.json records of a config dataclass: every setting that shapes the run."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in NOT_RUN_SETTINGS}


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def config_from_args(cls, args: argparse.Namespace):
    """A config dataclass filled from the parsed flags of the same names (the rest keep their defaults)."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


def require_package(module: str, purpose: str, install: str | None = None) -> None:
    """Fails at once (before anything slow runs) when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{purpose} needs the {module} package: pip install {install or module}")


def check_positive(**values) -> None:
    """UsageError naming the flag of the first value that is not >= 1 (``batch_size`` -> ``--batch-size``)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_sources(model: str | None = None, texts: tuple[str, ...] = (), field: str = "text") -> None:
    """UsageError when the model or a text source cannot be read: checked before anything is loaded.
    Built-in sources (``builtin:...``) of the recipes are theirs to check."""
    from .. import text

    try:
        if model is not None:
            models.resolve(model)
        for source in texts:
            if source and not source.startswith("builtin:"):
                text.check_source(source, field)
    except ValueError as error:
        raise UsageError(str(error)) from None


def keep_mask(acts: torch.Tensor, outlier_factor: float) -> torch.Tensor:
    """Rows to train and evaluate on: all of them, or (``outlier_factor`` > 0) those whose norm is at most
    that many times the median (see ``activations.outlier_mask``)."""
    from ..activations import outlier_mask

    if outlier_factor > 0:
        return outlier_mask(acts, outlier_factor)
    return torch.ones(acts.shape[0], dtype=torch.bool, device=acts.device)


def dead_tokens_for(steps: int, batch_size: int, cap: int = 1_000_000) -> int:
    """Tokens without firing after which a latent counts as dead: a tenth of the run's tokens, so a short
    run can still revive latents through AuxK, and at most ``cap``."""
    return max(1, min(cap, steps * batch_size // 10))


def harvest_cached(model, tokenizer, docs: list[str], layer: int, *, context: int, max_tokens: int | None,
                   cache: str | None, progress: bool, model_name: str = "", check_key: bool = False):
    """Activations of ``docs`` (``activations.harvest``), read from or written to ``cache``.

    With ``check_key`` the cache also stores a hash of the texts and settings and is only reused when they
    match; a cache directory the user names is trusted as it is."""
    return harvest_cached_layers(model, tokenizer, docs, {layer: cache}, context=context, max_tokens=max_tokens,
                                 progress=progress, model_name=model_name, check_key=check_key)[layer]


def harvest_cached_layers(model, tokenizer, docs: list[str], caches: dict[int, str | None], *, context: int,
                          max_tokens: int | None, progress: bool, model_name: str = "", check_key: bool = False):
    """``harvest_cached`` of several layers (layer -> its cache directory or None): the layers whose cache
    holds them are read, the others harvested together in one forward pass. Returns layer -> Activations."""
    from ..activations import harvest_layers, load_activations, save_activations

    found, keys = {}, {}
    for layer, cache in caches.items():
        keys[layer] = hashlib.sha256(json.dumps([docs, layer, context, max_tokens, model_name]).encode()).hexdigest()
        key_file = os.path.join(cache, "inputs.sha256") if cache else None
        if cache and os.path.isfile(os.path.join(cache, "meta.json")):
            stored = open(key_file).read().strip() if os.path.isfile(key_file) else None
            if not check_key or stored == keys[layer]:
                found[layer] = load_activations(cache)
                if found[layer].layer != layer:
                    raise UsageError(f"activation cache {cache} holds layer {found[layer].layer}, not {layer}")
    missing = [layer for layer in caches if layer not in found]
    if missing:
        harvested = harvest_layers(model, tokenizer, docs, missing, context=context, max_tokens=max_tokens,
                                   progress=progress, model_name=model_name)
        for layer, data in harvested.items():
            if caches[layer]:
                save_activations(caches[layer], data)
                with open(os.path.join(caches[layer], "inputs.sha256"), "w") as f:
                    f.write(keys[layer] + "\n")
        found.update(harvested)
    return found
    data = harvest(model, tokenizer, docs, layer, context=context, max_tokens=max_tokens, progress=progress,
                   model_name=model_name)
    if cache:
        save_activations(cache, data)
        with open(key_file, "w") as f:
            f.write(key + "\n")
    return data
