"""Paired behaviour data for subspace finetuning: prompts with a target-style and a contrast-style response.

The built-in pair (``builtin:advbench``, :func:`ssae_kernels.data.safety_benchmarks.safety_behaviour`) is
*refusing harmful requests while still answering safe ones*, the behaviour SAILS (arXiv 2512.23260) aligns,
on the fixed splits of AdvBench and XSTest shipped in ``ssae_kernels/data/safety``:

- ``train``: AdvBench's 300 training behaviours, each with a target response (a short refusal, one of
  :data:`REFUSAL_TEMPLATES`) and a contrast response (AdvBench's own compliant opener, "Sure, here is
  ...": the style of compliance for feature selection, nothing actionable). Only targets are trained on.
- ``keep``: XSTest's 125 training safe prompts, answered by the base model itself (self-distillation,
  see the recipe), trained on alongside the refusals so that the model keeps answering safe questions.
- ``eval`` / ``control``: AdvBench's 160 test behaviours (safety rate) and XSTest's 100 test safe prompts
  (over-refusal); ``held_out``: XSTest's 200 unsafe contrasts, evaluation only.
- ``dev`` / ``dev_control``: AdvBench's 60 and XSTest's 25 dev prompts, for choosing hyperparameters
  (``ssae subspace --tune``), so the held-out numbers are never used to pick a setting.

Its judge is :func:`ssae_kernels.data.refusal.is_refusal`.

Other behaviour pairs load from JSON lines (:func:`load_behaviour`), one record per line:
``{"prompt", "target", "contrast"}`` (training pairs), ``{"prompt", "response", "split": "keep"}`` (or
without ``response``: answered by the base model), ``{"prompt", "split": "eval"}``, ``{"prompt", "split":
"control"}``, optionally ``{"prompt", "split": "dev"}`` and ``{"prompt", "split": "dev_control"}`` (the
validation split for tuning), and the judge as target markers, ``{"markers": [...]}``: a completion is in
the target style when its lower-cased text contains any of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from .refusal import REFUSAL_MARKERS

BUILTIN = "builtin:advbench"


@dataclass
class Example:
    prompt: str
    target: str | None  # None in ``keep``: to be answered by the base model
    contrast: str | None = None


@dataclass
class BehaviourPair:
    name: str
    train: list[Example]  # target and contrast responses to the same prompts
    keep: list[Example] = field(default_factory=list)  # ordinary behaviour trained on as well (target only)
    eval_prompts: list[str] = field(default_factory=list)  # held out: the target style is wanted
    control_prompts: list[str] = field(default_factory=list)  # held out: it is not
    markers: tuple[str, ...] = REFUSAL_MARKERS
    dev_prompts: list[str] = field(default_factory=list)  # validation (tuning): the target style is wanted
    dev_control_prompts: list[str] = field(default_factory=list)  # validation (tuning): it is not
    held_out: dict[str, list[str]] = field(default_factory=dict)  # more evaluation-only sets, by name
    judge: Callable[[str], bool] | None = None  # is a completion in the target style? None: the markers

    def __post_init__(self):
        if not self.train:
            raise ValueError(f"behaviour pair {self.name!r} has no training pairs")
        if any(e.contrast is None or e.target is None for e in self.train):
            raise ValueError(f"behaviour pair {self.name!r}: every training pair needs a target and a contrast")
        if not self.eval_prompts:
            raise ValueError(f"behaviour pair {self.name!r} has no held-out eval prompts")
        if not self.markers and self.judge is None:
            raise ValueError(f"behaviour pair {self.name!r} has no target markers")
        # tuning on prompts that are also trained on or reported would make the held-out numbers optimistic
        seen = {e.prompt for e in self.train + self.keep} | set(self.eval_prompts) | set(self.control_prompts)
        seen |= {p for prompts in self.held_out.values() for p in prompts}
        shared = (set(self.dev_prompts) | set(self.dev_control_prompts)) & seen
        if shared:
            raise ValueError(f"behaviour pair {self.name!r}: dev prompts also in train/keep/eval/control: "
                             f"{sorted(shared)[:3]}")

    def split_prompts(self, split: str = "eval") -> tuple[list[str], list[str]]:
        """(prompts where the target style is wanted, control prompts) of ``split``: 'eval' or 'dev'."""
        if split == "eval":
            return self.eval_prompts, self.control_prompts
        if split == "dev":
            if not self.dev_prompts:
                raise ValueError(f"behaviour pair {self.name!r} has no dev prompts (JSONL split 'dev')")
            return self.dev_prompts, self.dev_control_prompts
        raise ValueError(f"split must be 'eval' or 'dev', got {split!r}")

    def is_target(self, completion: str) -> bool:
        """The pair's judge: its ``judge`` function, else :func:`matches_markers` with its markers."""
        return self.judge(completion) if self.judge is not None else matches_markers(completion, self.markers)


def matches_markers(text: str, markers=REFUSAL_MARKERS) -> bool:
    """The marker rule: any marker in the lower-cased text (curly apostrophes normalised)."""
    t = text.lower().replace("\u2019", "'")
    return any(m in t for m in markers)


REFUSAL_TEMPLATES = [  # the training targets of the built-in pair's harmful prompts
    "I'm sorry, but I can't help with that. It could seriously hurt people.",
    "I can't assist with this request. It involves something illegal and harmful.",
    "I'm sorry, but I won't provide that. If you're going through a hard time, please reach out to someone you trust.",
    "I cannot help with that, because it could put people in danger.",
    "I'm not able to help with this. It would be harmful and likely illegal.",
    "Sorry, but I can't do that. Helping with this could cause real harm to others.",
    "I'm sorry, I can't provide instructions for that. It is dangerous and against the law.",
    "I can't help with that request. If you have a safety concern, I'm happy to point you to legitimate resources.",
    "I won't help with this. It could hurt someone, and it is against the law.",
    "I'm sorry, but I can't assist with anything that could harm people or break the law.",
    "I cannot provide that information. It could be used to hurt others.",
    "I'm sorry, but this is something I can't help with. Is there something else I can do for you?",
]


def load_behaviour(source: str) -> BehaviourPair:
    """``builtin:advbench`` or a JSON-lines file (format in the module docstring)."""
    if source == BUILTIN:
        from .safety_benchmarks import safety_behaviour

        return safety_behaviour()
    if source.startswith("builtin:"):
        raise ValueError(f"unknown built-in behaviour {source!r}; the built-in one is {BUILTIN!r}")
    train, keep, eval_prompts, control, dev, dev_control, markers = [], [], [], [], [], [], None
    with open(source, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if "markers" in r:
                markers = tuple(str(m).lower() for m in r["markers"])
                continue
            if "prompt" not in r:
                raise ValueError(f"{source}:{line_no}: a record needs 'prompt' (or 'markers')")
            split = r.get("split", "train")
            if split == "train":
                if "target" not in r or "contrast" not in r:
                    raise ValueError(f"{source}:{line_no}: a training record needs 'target' and 'contrast'")
                train.append(Example(r["prompt"], r["target"], r["contrast"]))
            elif split == "keep":
                keep.append(Example(r["prompt"], r.get("response")))
            elif split == "eval":
                eval_prompts.append(r["prompt"])
            elif split == "control":
                control.append(r["prompt"])
            elif split == "dev":
                dev.append(r["prompt"])
            elif split == "dev_control":
                dev_control.append(r["prompt"])
            else:
                raise ValueError(f"{source}:{line_no}: unknown split {split!r} "
                                 "(train, keep, eval, control, dev, dev_control)")
    if markers is None:
        raise ValueError(f"{source} has no {{\"markers\": [...]}} record: the target-style rule is required")
    return BehaviourPair(source, train, keep, eval_prompts, control, markers, dev, dev_control)
