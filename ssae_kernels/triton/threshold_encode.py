"""Fused threshold encode in Triton: ``topk_encode``'s kernels with each score also compared with its
latent's threshold (kept only above it, and counted per row), raw values, and empty slots 0 / 0."""

from __future__ import annotations

from .topk_encode import fused_encode


def threshold_encode(x, W_enc, b_enc, threshold, max_k, b_dec=None):
    """Launcher with the schema's signature (see ssae_kernels.ops.threshold_encode)."""
    return fused_encode(x, W_enc, b_enc, max_k, b_dec, threshold)
