"""SAE-feature subspace finetuning (SAILS) end to end on the built-in default, offline:

    python python/subspace_finetune.py --out runs/subspace

SmolLM2-135M-Instruct learns to refuse AdvBench's harmful requests while still answering XSTest's safe ones
(splits shipped in ssae_kernels/data/safety; answers to the safe prompts distilled from the model itself):
the latents of a TopK SAE on layer 15 that separate refusing from complying give the subspace U, and a LoRA
whose output factor is U trains on the layer's o_proj and down_proj, beside projected gradients, plain LoRA
and full finetuning on the same data and step budget. Writes OUT/report.{json,md}, OUT/completions.jsonl
and the tuned adapter in OUT/adapter. Every option of ``ssae subspace`` applies (``--help``).

    python python/subspace_finetune.py --tune --out runs/subspace_tune   # hyperparameters on dev only
    ssae subspace eval --adapter runs/subspace/adapter --prompts FILE.csv --column prompt --out result.json
"""

import sys

from ssae_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["subspace", *sys.argv[1:]]))
