"""Data the project ships (no downloads): behaviour pairs (:mod:`.behaviour`), the safety benchmarks and their
splits (:mod:`.safety_benchmarks`) and the refusal judge (:mod:`.refusal`)."""

from .behaviour import BUILTIN, BehaviourPair, Example, load_behaviour, matches_markers
from .refusal import REFUSAL_MARKERS, is_refusal, judge_agreement

__all__ = ["BUILTIN", "REFUSAL_MARKERS", "BehaviourPair", "Example", "is_refusal", "judge_agreement", "load_behaviour",
           "matches_markers"]
