"""Specialized SAEs (Muhamed, Diab, Smith, arXiv 2411.00743): select subdomain data by retrieval from a
seed set, finetune a general SAE on it with ERM or TERM, and measure reconstruction on the tail.

- ``corpus``: the built-in offline texts (Python's documentation and docstrings; subdomain asyncio);
- ``selection``: the corpus chunks nearest to the seeds (``ssae select``);
- ``finetune``: a general SAE finetuned on their activations (``ssae finetune``);
- ``tail``: the tail evaluation of several SAEs side by side (``ssae eval``);
- ``commands``: those three subcommands; ``pipeline``: all of it end to end (``ssae specialized``,
  ``SpecializedConfig`` and ``run``).
"""

from . import commands, pipeline
from .commands import EvalConfig, FinetuneConfig, SelectConfig, run_eval, run_finetune, run_select
from .corpus import (ASYNCIO_SEEDS, BUILTIN_CORPUS, BUILTIN_EVAL, BUILTIN_SEEDS, HELD_OUT_MODULES, builtin_split,
                     read_seeds, read_source, stdlib_docstrings)
from .finetune import (calibrate_tilt, finetune, from_general, match_scale, parse_tilt, scale_for_finetuning,
                       start_finetune, with_replay)
from .pipeline import SpecializedConfig, run
from .selection import Selection, check_retrieval, read_selection, select, write_selection
from .tail import (TailEval, evaluate_saes, frequency_bins, frequency_ranks, tail_metrics, tail_notes, token_counts,
                   write_tail_report)


def add_subcommands(sub) -> None:
    """Registers ``ssae select``, ``finetune``, ``eval`` and ``specialized``; each sets ``handler``."""
    commands.add_subcommands(sub)
    pipeline.add_subcommand(sub)


__all__ = [
    "ASYNCIO_SEEDS", "BUILTIN_CORPUS", "BUILTIN_EVAL", "BUILTIN_SEEDS", "HELD_OUT_MODULES", "EvalConfig",
    "FinetuneConfig", "SelectConfig", "Selection", "SpecializedConfig", "TailEval", "add_subcommands",
    "builtin_split", "calibrate_tilt", "check_retrieval", "evaluate_saes", "finetune", "frequency_bins", "frequency_ranks",
    "from_general", "match_scale", "parse_tilt", "read_seeds", "read_selection", "read_source", "run", "run_eval",
    "run_finetune", "run_select", "scale_for_finetuning", "select", "start_finetune", "stdlib_docstrings",
    "tail_metrics", "tail_notes", "token_counts", "with_replay", "write_selection", "write_tail_report",
]
