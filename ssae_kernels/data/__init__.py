"""Small datasets the project writes itself (no downloads): see :mod:`ssae_kernels.data.behaviour`."""

from .behaviour import BUILTIN, REFUSAL_MARKERS, BehaviourPair, builtin_refusal, load_behaviour, matches_markers

__all__ = ["BUILTIN", "REFUSAL_MARKERS", "BehaviourPair", "builtin_refusal", "load_behaviour", "matches_markers"]
