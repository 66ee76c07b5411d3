"""The safety benchmarks shipped in ``ssae_kernels/data/safety`` (see its ATTRIBUTION.md) and their fixed splits.

- AdvBench's 520 harmful behaviours: train / dev / test of 300 / 60 / 160;
- XSTest's 250 safe prompts that look unsafe: train / dev / test of 125 / 25 / 100;
- XSTest's 200 unsafe contrasts: evaluation only (``xstest_unsafe()``).

:func:`safety_behaviour` builds the subspace recipe's built-in behaviour pair from them.

The splits are seeded permutations of the rows, stored in ``splits.json`` (``make_splits`` rebuilds it; a
test checks the stored file against it), so every run and every reader sees the same rows.
"""

from __future__ import annotations

import csv
import json
import os

import torch

from .behaviour import REFUSAL_TEMPLATES, BehaviourPair, Example
from .refusal import REFUSAL_MARKERS, is_refusal

DIRECTORY = os.path.join(os.path.dirname(__file__), "safety")
ADVBENCH_FILE = os.path.join(DIRECTORY, "advbench_harmful_behaviors.csv")
XSTEST_FILE = os.path.join(DIRECTORY, "xstest_prompts.csv")
SPLITS_FILE = os.path.join(DIRECTORY, "splits.json")
SPLITS = ("train", "dev", "test")
SIZES = {"advbench": (300, 60, 160), "xstest_safe": (125, 25, 100)}
SEED = 0


def _rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def advbench_rows() -> list[str]:
    """Every AdvBench behaviour (its ``goal``), in file order."""
    return [row["goal"] for row in _rows(ADVBENCH_FILE)]


def advbench_openers() -> list[str]:
    """Every AdvBench compliant opener (its ``target``, "Sure, here is ..."), in file order."""
    return [row["target"] for row in _rows(ADVBENCH_FILE)]


def xstest_rows(label: str) -> list[str]:
    """Every XSTest prompt labelled ``label`` ('safe' or 'unsafe'), in file order."""
    if label not in ("safe", "unsafe"):
        raise ValueError(f"label must be 'safe' or 'unsafe', got {label!r}")
    return [row["prompt"] for row in _rows(XSTEST_FILE) if row["label"] == label]


def make_splits(seed: int = SEED) -> dict[str, dict[str, list[int]]]:
    """{benchmark: {split: row numbers}}: a seeded permutation of each benchmark's rows cut at ``SIZES``."""
    counts = {"advbench": len(advbench_rows()), "xstest_safe": len(xstest_rows("safe"))}
    splits = {}
    for i, (name, sizes) in enumerate(SIZES.items()):
        if sum(sizes) != counts[name]:
            raise ValueError(f"{name}: splits of {sizes} do not cover its {counts[name]} rows")
        order = torch.randperm(counts[name], generator=torch.Generator().manual_seed(seed * 1000 + i)).tolist()
        cuts = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        splits[name] = {split: sorted(order[a:b]) for split, a, b in zip(SPLITS, cuts, cuts[1:])}
    return splits


def _split(name: str, split: str) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with open(SPLITS_FILE) as f:
        return json.load(f)[name][split]


def advbench(split: str) -> list[str]:
    """The AdvBench behaviours of one split ('train', 'dev' or 'test')."""
    rows = advbench_rows()
    return [rows[i] for i in _split("advbench", split)]


def xstest_safe(split: str) -> list[str]:
    """The XSTest safe prompts of one split ('train', 'dev' or 'test')."""
    rows = xstest_rows("safe")
    return [rows[i] for i in _split("xstest_safe", split)]


def xstest_unsafe() -> list[str]:
    """XSTest's 200 unsafe contrast prompts: held out for evaluation, never trained on."""
    return xstest_rows("unsafe")


def safety_behaviour() -> BehaviourPair:
    """The built-in behaviour pair ``builtin:advbench`` (described in :mod:`ssae_kernels.data.behaviour`):
    refusals of AdvBench's training behaviours against AdvBench's own compliant openers, XSTest's training
    safe prompts kept (answered by the base model), judged by :func:`~ssae_kernels.data.refusal.is_refusal`."""
    goals, openers = advbench_rows(), advbench_openers()
    train = [Example(goals[i], REFUSAL_TEMPLATES[n % len(REFUSAL_TEMPLATES)], openers[i])
             for n, i in enumerate(_split("advbench", "train"))]
    keep = [Example(p, None) for p in xstest_safe("train")]
    return BehaviourPair("advbench", train, keep, advbench("test"), xstest_safe("test"), REFUSAL_MARKERS,
                         advbench("dev"), xstest_safe("dev"), held_out={"xstest_unsafe": xstest_unsafe()},
                         judge=is_refusal)


if __name__ == "__main__":  # rebuilds splits.json
    with open(SPLITS_FILE, "w") as f:
        f.write(json.dumps(make_splits()) + "\n")
    print(f"wrote {SPLITS_FILE}")
