"""Run directories: one run per directory, described by its ``run.json``.

A pipeline opens its ``--out`` with :func:`open_run`. A fresh run refuses a directory that holds another run
(unless ``overwrite``) or anything else; a resumed run refuses flags that contradict the saved config, naming
each; a run that fails before its first checkpoint removes the directory it created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys

from .. import storage
from .common import UsageError

RUN_FILE = "run.json"


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def read_run(out: str) -> dict | None:
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}); the run directory is damaged") from None


def conflicts(saved: dict, config: dict, may_change: frozenset[str]) -> list[str]:
    """One line per setting of ``config`` that differs from the ``saved`` run's and is not in ``may_change``."""
    return [f"{_flag(key)} {config[key]!r} (the run has {saved[key]!r})"
            for key in sorted(config) if key not in may_change and key in saved and saved[key] != config[key]]


def _check_writable(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a directory")
    existing = out
    while not os.path.exists(existing):  # the nearest existing ancestor is where the directory gets created
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {existing} (permission denied or not a directory)")


@contextlib.contextmanager
def open_run(out: str, command: str, config: dict, *, resume: bool = False, overwrite: bool = False,
             may_change: frozenset[str] = frozenset(), keep: tuple[str, ...] = (), has_checkpoint=None):
    """Claims ``out`` for the run ``command`` with ``config`` (a JSON-able dict of its settings) and yields
    the saved config of the run being resumed (None for a fresh run). ``may_change`` names the settings a
    resume may change (e.g. the step count). ``has_checkpoint(out)`` says whether an interrupted run left
    something worth keeping; when the body fails and the directory was created here without one, it is
    removed. ``keep`` names entries that --overwrite leaves in place (caches keyed by their inputs)."""
    _check_writable(out)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    saved = read_run(out) if os.path.isdir(out) else None
    created = not os.path.exists(out)
    if resume:
        if saved is None:
            raise UsageError(f"--resume: {out} holds no run to resume (no {RUN_FILE})")
        if saved.get("command") != command:
            raise UsageError(f"--resume: {out} holds an `ssae {saved.get('command')}` run, not `ssae {command}`")
        bad = conflicts(saved["config"], config, may_change)
        if bad:
            raise UsageError("--resume with settings that differ from the run in " + out + ": " + "; ".join(bad)
                             + ". Resume with the run's settings, or start a new run with another --out")
    elif os.path.isdir(out) and os.listdir(out):
        if saved is None:
            raise UsageError(f"--out {out} is not empty and holds no ssae run; choose a new or empty directory")
        if not overwrite:
            raise UsageError(f"--out {out} holds an `ssae {saved.get('command')}` run; pass --resume to continue "
                             "it or --overwrite to replace it")
        entries = sorted(set(os.listdir(out)) - set(keep))
        kept = sorted(set(os.listdir(out)) & set(keep))
        print(f"ssae {command}: --overwrite: replacing the `ssae {saved.get('command')}` run in {out} "
              f"({', '.join(entries)})" + (f"; keeping {', '.join(kept)}" if kept else ""), file=sys.stderr)
        for name in entries:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    if not resume:
        storage.atomic_write_text(os.path.join(out, RUN_FILE),
                                  json.dumps({"command": command, "config": config}, indent=2))
    try:
        yield saved["config"] if resume else None
    except BaseException:
        if created and not (has_checkpoint and has_checkpoint(out)):
            shutil.rmtree(out, ignore_errors=True)
        raise
    if resume:  # the settings a resume may change are now the run's
        storage.atomic_write_text(os.path.join(out, RUN_FILE),
                                  json.dumps({"command": command, "config": config}, indent=2))
