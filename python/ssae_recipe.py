"""The Specialized SAE recipe end to end (Muhamed, Diab, Smith, arXiv 2411.00743) on the built-in default,
offline:

    python python/ssae_recipe.py --out runs/ssae

SmolLM2-135M-Instruct (layer 15): a general TopK SAE on Python's documentation and the standard library's
docstrings; the chunks nearest to a few asyncio seed texts (all-MiniLM-L6-v2 through the fused
``topk_encode``); the general SAE finetuned on them with ERM and with TERM, with a replayed share of
general activations; the tail evaluation of all three on asyncio modules held out of the corpus:
OUT/report.json, OUT/report.md and plots. Every option of ``ssae specialized`` applies (``--help``):
``--model``, ``--corpus``, ``--seeds`` and ``--eval-text`` take real models and corpora, ``--general DIR``
reuses a general SAE. Activations and embeddings are cached under OUT/cache, so a rerun (e.g. with another
``--tilt``) only redoes what changed.
"""

import sys

from ssae_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["specialized", *sys.argv[1:]]))
