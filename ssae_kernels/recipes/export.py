"""``ssae export``: an SAE (ours, SAELens, sparsify or Gemma Scope) written in another library's format, so that
its own loader reads it (``sae_lens.SAE.load_from_disk``, ``sparsify.SparseCoder.load_from_disk``, SAELens's
Gemma Scope loader) with the same forward pass as ours (see ``ssae_kernels.formats.export_sae``)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .common import HelpFormatter, UsageError, config_from_args

EXPORT_FORMATS = ("saelens", "sparsify", "gemmascope", "ssae")
CHECKPOINT_FILES = ("cfg.json", "sae.safetensors", "sae_weights.safetensors", "params.npz", "checksums.json")


@dataclass
class ExportConfig:
    sae: str  # directory in any format formats.load_sae reads
    format: str  # one of EXPORT_FORMATS
    out: str
    overwrite: bool = False  # replace the checkpoint files of a non-empty out


def run(cfg: ExportConfig) -> dict:
    """Reads ``cfg.sae`` (any format ``formats.load_sae`` reads) and writes it to ``cfg.out`` in ``cfg.format``.
    Returns {"out", "format", "source_format", "weights", "d_in", "num_latents", "k", "input_scale"}."""
    from .. import formats

    if cfg.format not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {cfg.format!r}")
    if not os.path.isdir(cfg.sae) and not (os.path.isfile(cfg.sae) and cfg.sae.endswith(".npz")):
        raise UsageError(f"--sae {cfg.sae}: no such directory (or Gemma Scope .npz file)")
    same = os.path.exists(cfg.out) and os.path.samefile(cfg.sae, cfg.out) if os.path.isdir(cfg.sae) else False
    if same:
        raise UsageError(f"--out {cfg.out} is the --sae directory itself")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} exists and is not a directory")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} exists and is not empty (pass --overwrite to replace it)")
    try:
        source_format = formats.detect_format(cfg.sae)
        sae = formats.load_sae(cfg.sae)
    except (FileNotFoundError, ValueError) as e:  # ValueError includes storage.CorruptFileError
        raise UsageError(f"--sae {cfg.sae}: {e}") from None
    if os.path.isdir(cfg.out):
        # Checkpoint files of an earlier export (perhaps in another format) must not remain; anything else in
        # --out is left alone.
        for name in CHECKPOINT_FILES:
            if os.path.isfile(os.path.join(cfg.out, name)):
                os.remove(os.path.join(cfg.out, name))
    try:
        weights = formats.export_sae(sae, cfg.out, cfg.format)
    except ValueError as e:  # a format that cannot hold the architecture
        raise UsageError(f"--format {cfg.format}: {e}") from None
    return {"out": cfg.out, "format": cfg.format, "source_format": source_format, "weights": weights,
            "d_in": sae.cfg.d_in, "num_latents": sae.cfg.num_latents, "k": sae.cfg.k,
            "input_scale": float(sae.input_scale)}


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True,
                   help="SAE directory: ours, SAELens (TopK, standard, JumpReLU, BatchTopK), sparsify (TopK) or "
                        "Gemma Scope (params.npz, or the file)")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="format to write: SAELens (sae_lens.SAE.load_from_disk; every architecture), sparsify "
                        "(sparsify.SparseCoder.load_from_disk; TopK), Gemma Scope params.npz (JumpReLU, BatchTopK) "
                        "or ours")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing the SAE files there (other files stay)")


def _handle(args: argparse.Namespace) -> dict:
    result = run(config_from_args(ExportConfig, args))
    print(f"exported {result['source_format']} SAE to {result['format']}: {result['out']}")
    return result


def add_subcommands(sub) -> None:
    """Registers ``export`` on the ``ssae`` subparsers."""
    p = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="write an SAE in SAELens, sparsify or Gemma Scope format (read by their own loaders)",
                       description="Writes an SAE (ours, SAELens, sparsify or Gemma Scope) in another library's "
                                   "format, read by that library's own loader with the same forward pass as ours.")
    add_export_args(p)
    p.set_defaults(handler=lambda args: _handle(args))

