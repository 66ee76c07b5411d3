"""SAE-feature subspace finetuning (ssae_kernels/recipes/subspace/) on a tiny Llama built from a config."""

import json
import os

import pytest
import torch

import ssae_kernels
from ssae_kernels import cli
from ssae_kernels.recipes import subspace as S
from ssae_kernels.data import BUILTIN, REFUSAL_MARKERS, BehaviourPair, Example, load_behaviour, matches_markers
from ssae_kernels.data.refusal import is_refusal
from ssae_kernels.sae import SAEConfig, TopKSAE
from tiny_model import build_model, build_tokenizer, save_tiny, write_corpus

WIDTH, INTERMEDIATE = 32, 64  # tiny_model.build_model

QUESTIONS = ["What is a list?", "How do generators work?", "Explain the with statement.", "What is a dictionary?",
             "How do I raise an exception?", "What does yield do?", "How do I add two numbers?",
             "What is a context manager?", "How are lists built?", "What is insertion order?", "What does finally do?",
             "What is a frame?"]
HELD_OUT = ["How do I handle errors?", "What is a sequence?", "How does iteration work?", "What is a key?"]


def tiny_pair():
    # " values" is one token of the tiny tokenizer: the tiny model can learn to say it in a few steps.
    return BehaviourPair("tiny", [Example(q, "values", "No") for q in QUESTIONS], [], HELD_OUT, [], ("values",))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def random_sae(seed=0, latents=96, k=8):
    return TopKSAE(SAEConfig(d_in=WIDTH, num_latents=latents, k=k), generator=torch.Generator().manual_seed(seed))


def tiny_subspaces(model, tokenizer, layers=(1,), per_layer=16, variance=0.8, latents=96, k=8):
    saes = {layer: random_sae(layer, latents, k) for layer in layers}
    pair = tiny_pair()
    mean_t = S.mean_feature_activations(model, tokenizer, saes, [(e.prompt, e.target) for e in pair.train])
    mean_c = S.mean_feature_activations(model, tokenizer, saes, [(e.prompt, e.contrast) for e in pair.train])
    selections = S.select_features(mean_t, mean_c, per_layer=per_layer)
    return S.subspaces_from_features(saes, selections, variance), selections, saes


# ---- the projection on a subspace built by the recipe ----------------------------------------------


def test_projection_identities_on_a_built_subspace(tiny):
    model, tokenizer = tiny
    subspaces, _, _ = tiny_subspaces(model, tokenizer)
    U = subspaces[1].U
    G = model.model.layers[1].mlp.down_proj.weight.detach().clone()  # [32, 64]: a real weight shape
    P = ssae_kernels.project_subspace(G, U, check=True)
    C = ssae_kernels.project_subspace(G, U, complement=True)
    torch.testing.assert_close(ssae_kernels.project_subspace(P, U), P, rtol=0, atol=1e-6)  # idempotent
    assert float((U.T @ C).abs().max()) < 1e-6  # complement orthogonal to span(U)
    torch.testing.assert_close(P + C, G, rtol=0, atol=1e-6)  # P + C = G
    assert 0.05 < float(P.norm() / G.norm()) < 0.95  # a proper subspace: neither 0 nor everything


# ---- selection and construction ----------------------------------------------------------------------


def test_select_features_ranks_by_relative_score():
    mean_t = {3: torch.tensor([0.0, 5.0, 1.0, 2.0, 0.5])}
    mean_c = {3: torch.tensor([4.0, 1.0, 0.0, 2.5, 0.0])}
    sel = S.select_features(mean_t, mean_c, per_layer=3)[3]
    assert sel.ids == [1, 2, 4]  # delta 4, 1, 0.5 (latents 0 and 3 favour the contrast)
    assert sel.delta == pytest.approx([4.0, 1.0, 0.5])
    assert sel.relative == pytest.approx([1.0, 0.25, 0.125])  # delta / max E_contrast = delta / 4
    both = S.select_features(mean_t, mean_c, per_layer=2, signs="both")[3]
    assert both.ids == [0, 1]  # |delta| 4 and 4, ties by index
    with pytest.raises(ValueError, match="no latent separates"):
        S.select_features({0: torch.zeros(3)}, {0: torch.ones(3)})


def test_build_subspace_keeps_the_variance_fraction():
    torch.manual_seed(1)
    d = 40
    basis = torch.linalg.qr(torch.randn(d, 3, dtype=torch.float64)).Q
    # 30 unit directions mostly in a 3-D subspace (energies ~ 70/20/10 %) plus a little noise
    coef = torch.randn(30, 3, dtype=torch.float64) * torch.tensor([3.0, 1.6, 1.15], dtype=torch.float64)
    dirs = coef @ basis.T + 0.01 * torch.randn(30, d, dtype=torch.float64)
    U, explained, S_ = S.build_subspace(dirs, 0.8)
    unit = dirs / dirs.norm(dim=1, keepdim=True)
    energy = torch.linalg.svdvals(unit) ** 2
    energy = energy / energy.sum()
    want = int((torch.cumsum(energy, 0) < 0.8).sum()) + 1  # the smallest rank reaching 80%
    assert U.shape == (d, want) and 1 <= want <= 3
    assert explained >= 0.8 and explained == pytest.approx(float(energy[:want].sum()), abs=1e-6)
    assert float((U.T.double() @ U.double() - torch.eye(want, dtype=torch.float64)).abs().max()) < 1e-6
    # span(U) lies inside the planted subspace
    assert float((U.double() - basis @ (basis.T @ U.double())).norm()) < 0.05
    U_all, explained_all, _ = S.build_subspace(dirs, 1.0)
    assert U_all.shape[1] > U.shape[1] and explained_all == pytest.approx(1.0)
    with pytest.raises(ValueError, match="variance must be in"):
        S.build_subspace(dirs, 0.0)


def test_feature_means_cover_response_tokens_only(tiny):
    model, tokenizer = tiny
    ids, start = S.encode_example(tokenizer, "What is a list?", "values")
    assert tokenizer.decode(ids[start:]) == " values" + tokenizer.eos_token
    assert ids[:start] == S.encode_prompt(tokenizer, "What is a list?")
    sae = random_sae()
    means = S.mean_feature_activations(model, tokenizer, {1: sae}, [("What is a list?", "values")])[1]
    # by hand: the SAE on layer 1's output at the response positions
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, start:]
    values, indices = sae.encode(hidden)
    want = torch.zeros(96).index_add_(0, indices.reshape(-1), values.reshape(-1).float()) / hidden.shape[0]
    torch.testing.assert_close(means, want, rtol=1e-5, atol=1e-6)


def test_features_and_subspace_round_trip(tmp_path, tiny):
    model, tokenizer = tiny
    subspaces, selections, _ = tiny_subspaces(model, tokenizer)
    S.save_features(str(tmp_path / "f.json"), selections)
    S.save_subspaces(str(tmp_path / "s.safetensors"), subspaces)
    back_f = S.load_features(str(tmp_path / "f.json"))
    back_s = S.load_subspaces(str(tmp_path / "s.safetensors"))
    assert back_f[1].ids == selections[1].ids and back_f[1].relative == selections[1].relative
    assert torch.equal(back_s[1].U, subspaces[1].U) and back_s[1].feature_ids == subspaces[1].feature_ids


# ---- adapters -------------------------------------------------------------------------------------


def test_adapter_parameter_counts(tiny):
    model, tokenizer = tiny
    subspaces, _, _ = tiny_subspaces(model, tokenizer, layers=(0, 2))
    r0, r2 = subspaces[0].rank, subspaces[2].rank
    d_ins = WIDTH + INTERMEDIATE  # o_proj reads 32 (4 heads x 8), down_proj reads 64
    adapters = S.attach_subspace_adapters(model, subspaces)
    assert [n for n, _, _ in adapters.targets] == ["layers.0.self_attn.o_proj", "layers.0.mlp.down_proj",
                                                   "layers.2.self_attn.o_proj", "layers.2.mlp.down_proj"]
    assert adapters.num_trainable() == (r0 + r2) * d_ins  # only the r x d_in factors
    adapters.remove()
    lora = S.attach_lora_adapters(model, {0: r0, 2: r2})
    assert lora.num_trainable() == (r0 + r2) * (d_ins + 2 * WIDTH)  # r (d_in + d_out) per module
    lora.remove()
    pg = S.ProjectedGradient(model, subspaces)
    assert pg.num_trainable() == 2 * (WIDTH * WIDTH + WIDTH * INTERMEDIATE)  # the full weights
    assert pg.num_effective() == (r0 + r2) * d_ins
    pg.restore()
    assert not any(p.requires_grad for p in model.parameters())


def test_adapters_start_as_identity_and_remove_cleanly(tiny):
    model, tokenizer = tiny
    subspaces, _, _ = tiny_subspaces(model, tokenizer)
    ids = torch.tensor([S.encode_example(tokenizer, "What is a list?", "values")[0]])
    with torch.no_grad():
        before = model(ids).logits
        adapters = S.attach_subspace_adapters(model, subspaces)
        assert torch.equal(model(ids).logits, before)  # B = 0
        for p in adapters.parameters():
            p.normal_()
        assert not torch.allclose(model(ids).logits, before)
        adapters.remove()
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("method", ["subspace", "projected", "lora"])
def test_updates_stay_in_span_over_a_short_run(tiny, method):
    model, tokenizer = tiny
    subspaces, _, _ = tiny_subspaces(model, tokenizer)
    encoded = S.training_examples(tokenizer, tiny_pair())
    cfg = S.FinetuneConfig(steps=6, lr=0.1 if method != "projected" else 0.01, batch_size=4)
    before = {n: m.weight.detach().clone() for n, m in S.residual_writers(model, 1)}
    if method == "projected":
        pg = S.ProjectedGradient(model, subspaces)
        S.finetune(model, tokenizer, encoded, pg.parameters(), cfg, after_step=pg.after_step)
        deltas = pg.delta_weights()
        pg.restore()
        for n, m in S.residual_writers(model, 1):
            assert torch.equal(m.weight, before[n])
    else:
        adapters = (S.attach_subspace_adapters(model, subspaces) if method == "subspace"
                    else S.attach_lora_adapters(model, {1: subspaces[1].rank}))
        S.finetune(model, tokenizer, encoded, adapters.parameters(), cfg)
        deltas = adapters.delta_weights()
        adapters.remove()
    assert all(float(d.norm()) > 1e-4 for d in deltas.values()), "the run must actually update the weights"
    spans = S.out_of_span(deltas, subspaces)
    if method == "lora":  # the unconstrained comparison leaves the span: the measure can fail
        assert min(spans.values()) > 0.3
    else:
        assert max(spans.values()) < 1e-5, spans


def test_projected_gradient_hook_projects_each_gradient(tiny):
    model, tokenizer = tiny
    subspaces, _, _ = tiny_subspaces(model, tokenizer)
    U = subspaces[1].U
    pg = S.ProjectedGradient(model, subspaces)
    ids, mask, response = S.pad_batch([S.encode_example(tokenizer, q, "values") for q in QUESTIONS[:3]], 0, "cpu")
    S.lm_loss(model, ids, mask, response).backward()
    for w in pg.parameters():
        assert float(w.grad.norm()) > 0
        assert float((w.grad - U @ (U.T @ w.grad)).norm() / w.grad.norm()) < 1e-5
    pg.restore()


def test_a_short_run_moves_the_target_metric(tiny):
    # Tied input and output embeddings, as in SmolLM2: the latents most active on the target
    # response then lean towards its token's embedding, so their span can raise its logit. (In
    # the untied random model no 8-dim subspace need contain a direction that makes " values"
    # the argmax: plain LoRA, free in its output factor, learns it there and the subspace mostly
    # does not; with the tie, every SAE seed in 0..5 reached >= 0.75.)
    model, tokenizer = tiny
    model.lm_head.weight = model.model.embed_tokens.weight
    pair = tiny_pair()
    subspaces, _, _ = tiny_subspaces(model, tokenizer, latents=256, k=16)
    assert subspaces[1].rank < WIDTH // 2  # a real restriction
    chunks = [S.encode_prompt(tokenizer, q) for q in QUESTIONS[:4]]
    base = S.evaluate_behaviour(model, tokenizer, pair, chunks, max_new_tokens=4)
    adapters = S.attach_subspace_adapters(model, subspaces)
    S.finetune(model, tokenizer, S.training_examples(tokenizer, pair), adapters.parameters(),
               S.FinetuneConfig(steps=12, lr=0.1, batch_size=4))
    tuned = S.evaluate_behaviour(model, tokenizer, pair, chunks, max_new_tokens=4)
    adapters.remove()
    assert base["target_metric"] == 0.0
    assert tuned["target_metric"] >= 0.75, tuned["examples"]


# ---- data, CLI ---------------------------------------------------------------------------------------


def test_builtin_behaviour_is_split_and_judged():
    pair = load_behaviour(BUILTIN)
    assert (len(pair.train), len(pair.keep), len(pair.eval_prompts), len(pair.control_prompts)) == (300, 125, 160, 100)
    assert {k: len(v) for k, v in pair.held_out.items()} == {"xstest_unsafe": 200}
    prompts = {e.prompt for e in pair.train}
    assert not prompts & set(pair.eval_prompts)  # held out
    assert all(is_refusal(e.target) and pair.is_target(e.target) for e in pair.train)  # targets are refusals
    assert not any(pair.is_target(e.contrast) for e in pair.train)  # AdvBench's openers are compliance
    assert all(e.target is None for e in pair.keep)  # answered by the base model (distill_keep)
    assert matches_markers("I\u2019m sorry, I can\u2019t do that") and not matches_markers("Sure, here it is")
    assert "i cannot" in REFUSAL_MARKERS
    with pytest.raises(ValueError, match="unknown built-in"):
        load_behaviour("builtin:refusal")


def test_builtin_dev_split_is_disjoint():
    pair = load_behaviour(BUILTIN)
    dev, dev_control = pair.split_prompts("dev")
    assert (len(dev), len(dev_control)) == (60, 25)
    used = {e.prompt for e in pair.train + pair.keep} | set(pair.eval_prompts) | set(pair.control_prompts)
    used |= set(pair.held_out["xstest_unsafe"])
    assert not (set(dev) | set(dev_control)) & used
    assert pair.split_prompts("eval") == (pair.eval_prompts, pair.control_prompts)
    assert not any(pair.is_target(p) for p in dev_control)  # a prompt must not count as a refusal itself
    with pytest.raises(ValueError, match="split must be"):
        pair.split_prompts("test")
    with pytest.raises(ValueError, match="dev prompts also in"):
        BehaviourPair("leak", pair.train, pair.keep, pair.eval_prompts, pair.control_prompts, REFUSAL_MARKERS,
                      dev + [pair.eval_prompts[0]], dev_control)
    with pytest.raises(ValueError, match="no dev prompts"):
        tiny_pair().split_prompts("dev")


def test_pick_setting_rule():
    rows = [{"lr": 1, "target_metric": 1.0, "control_target_rate": 0.0, "ppl_rise": 0.08},  # ppl too high
            {"lr": 2, "target_metric": 0.9, "control_target_rate": 0.4, "ppl_rise": 0.01},  # net 0.5
            {"lr": 3, "target_metric": 0.7, "control_target_rate": 0.0, "ppl_rise": 0.04},  # net 0.7
            {"lr": 4, "target_metric": 0.8, "control_target_rate": 0.1, "ppl_rise": 0.02}]  # net 0.7, lower ppl
    assert S.pick_setting(rows)["lr"] == 4
    assert S.pick_setting(rows, max_ppl_rise=0.1)["lr"] == 1
    assert S.pick_setting(rows, max_ppl_rise=0.005) is None
    assert S.pick_setting(rows, max_ppl_rise=0.005, closest_if_none=True)["lr"] == 2  # the smallest rise
    for r in rows:  # the rule on a confidence bound: lr 4's bound is out, lr 3's is in
        r["ppl_rise_upper"] = r["ppl_rise"] + (0.04 if r["lr"] == 4 else 0.005)
    assert S.pick_setting(rows, max_ppl_rise=0.05, rise="ppl_rise_upper")["lr"] == 3
    assert S.pick_setting(rows, max_ppl_rise=0.03, rise="ppl_rise_upper")["lr"] == 2


def test_ppl_rise_upper_bound():
    import math
    base = [(20.0, 10), (25.0, 10), (30.0, 10), (22.0, 10)]  # (summed NLL, tokens) per sequence
    same_shift = [(n + 0.1, c) for n, c in base]  # every sequence rises alike: no uncertainty
    assert S.ppl_rise_upper(base, same_shift) == pytest.approx(math.exp(0.01) - 1)
    shifts = [0.03, -0.01, 0.02, 0.0]  # mean 0.01 per token, with spread
    noisy = [(n + 10 * d, c) for (n, c), d in zip(base, shifts)]
    expected = math.exp(0.01 + 1.645 * float(torch.tensor(shifts, dtype=torch.float64).std()) / 2) - 1
    assert S.ppl_rise_upper(base, noisy) == pytest.approx(expected)
    assert S.ppl_rise_upper(base, noisy) > math.exp(0.01) - 1
    ragged_base, ragged = [(20.0, 10), (12.0, 4)], [(20.5, 10), (12.2, 4)]  # centred on the pooled ratio
    assert S.ppl_rise_upper(ragged_base, ragged, z=0.0) == pytest.approx(math.exp(0.7 / 14) - 1)
    with pytest.raises(ValueError, match="same nonempty"):
        S.ppl_rise_upper(base, base[:2])
    with pytest.raises(ValueError, match="same nonempty"):
        S.ppl_rise_upper(base, [(n, c + 1) for n, c in base])


def test_sequence_nll_pools_to_perplexity():
    import math
    from ssae_kernels.recipes.subspace.finetuning import sequence_nll
    torch.manual_seed(0)
    model = build_model(32)
    chunks = [[1, 5, 7, 9, 11], [1, 4, 4], [1, 8, 3, 2, 6, 10, 12], [1]]  # ragged; the 1-token chunk is skipped
    per_sequence = sequence_nll(model, chunks, batch_size=2)
    assert [c for _, c in per_sequence] == [4, 2, 6]
    for (nll, count), chunk in zip(per_sequence, [chunks[0], chunks[1], chunks[2]]):  # one at a time, unpadded
        ids = torch.tensor([chunk])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        assert nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")),
                                    rel=1e-4)
    pooled = math.exp(sum(n for n, _ in per_sequence) / 12)
    assert S.perplexity(model, chunks, batch_size=3) == pytest.approx(pooled, rel=1e-5)


def test_load_behaviour_from_jsonl(tmp_path):
    path = tmp_path / "pair.jsonl"
    rows = [{"prompt": "a?", "target": "yes", "contrast": "no"}, {"prompt": "b?", "split": "eval"},
            {"prompt": "c?", "split": "control"}, {"prompt": "d?", "response": "ok", "split": "keep"},
            {"markers": ["YES"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pair = load_behaviour(str(path))
    assert pair.train[0].contrast == "no" and pair.eval_prompts == ["b?"] and pair.control_prompts == ["c?"]
    assert pair.keep[0].target == "ok" and pair.markers == ("yes",)
    assert pair.dev_prompts == [] and pair.dev_control_prompts == []  # optional: older files still load
    rows[1:1] = [{"prompt": "e?", "split": "dev"}, {"prompt": "f?", "split": "dev_control"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_behaviour(str(path)).split_prompts("dev") == (["e?"], ["f?"])
    path.write_text(json.dumps({"prompt": "b?", "split": "dev"}) + "\n" + "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="dev prompts also in"):  # "b?" is an eval prompt too
        load_behaviour(str(path))
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]))
    with pytest.raises(ValueError, match="markers"):
        load_behaviour(str(path))


def test_cli_end_to_end(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"))
    corpus = write_corpus(str(tmp_path))
    data = tmp_path / "pair.jsonl"
    rows = [{"prompt": q, "target": "values", "contrast": "No"} for q in QUESTIONS]
    rows += [{"prompt": q, "split": "eval"} for q in HELD_OUT] + [{"markers": ["values"]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    code = cli.main(["subspace", "--model", model_dir, "--layers", "1", "--behaviour", str(data),
                     "--neutral-text", corpus, "--sae-tokens", "600",
                     "--sae-latents", "64", "--sae-k", "4", "--sae-steps", "5", "--sae-batch-size", "128",
                     "--steps", "12", "--batch-size", "4", "--lr", "0.1", "--compare", "lora", "--ppl-sequences", "2",
                     "--context", "16", "--max-new-tokens", "4", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("trainable_fraction", "target_metric_base", "target_metric_tuned", "ppl_base", "ppl_tuned",
                "max_out_of_span"):
        assert isinstance(report[key], float), key
    assert report["max_out_of_span"] < 1e-5
    assert report["ppl_rise"] == pytest.approx(report["ppl_tuned"] / report["ppl_base"] - 1)
    assert report["ppl_rise_upper"] >= report["ppl_rise"] - 1e-9  # centred on the rise, plus a margin
    assert set(report["comparisons"]) == {"lora"} and report["comparisons"]["lora"]["max_out_of_span"] > 0.3
    assert os.path.exists(out / "features.json") and os.path.exists(out / "subspace.safetensors")
    assert report["over_refusal_tuned"] is None and report["safety_rate_tuned"] == report["target_metric_tuned"]
    md = (out / "report.md").read_text()
    assert "| subspace LoRA (U fixed) |" in md and "| plain LoRA, same rank |" in md and "| base model |" in md
    saved = json.loads((out / "adapter" / "adapter.json").read_text())
    assert saved["method"] == "subspace" and saved["model"] == model_dir and saved["max_new_tokens"] == 4
    assert os.path.exists(out / "adapter_lora" / "adapter.safetensors")
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {(r["method"], r["set"]) for r in records} == {("base", "eval"), ("subspace", "eval"), ("lora", "eval")}
    assert sum(r["method"] == "subspace" for r in records) == len(HELD_OUT)

    # the saved adapter reproduces the run's completions of the same prompts through `ssae subspace eval`
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,question\n" + "".join(f'{i},"{q}"\n' for i, q in enumerate(HELD_OUT)))
    result_file = tmp_path / "eval" / "result.json"
    assert cli.main(["subspace", "eval", "--adapter", str(out / "adapter"), "--prompts", str(prompts),
                     "--column", "question", "--out", str(result_file), "--quiet"]) == 0
    result = json.loads(result_file.read_text())
    assert result["n"] == len(HELD_OUT) and 0.0 <= result["refusal_rate"] <= 1.0
    run_replies = {r["prompt"]: r["reply"] for r in records if r["method"] == "subspace"}
    assert {r["prompt"]: r["reply"] for r in result["replies"]} == run_replies
    assert result["refusal_rate"] == sum(is_refusal(r) for r in run_replies.values()) / len(HELD_OUT)


def test_cli_eval_rejects_bad_input(tmp_path, capsys):
    model_dir = save_tiny(str(tmp_path / "tiny"))
    other_dir = save_tiny(str(tmp_path / "wider"), width=48)
    from ssae_kernels import models

    model, tokenizer = models.load_model(model_dir)
    subspaces, _, _ = tiny_subspaces(model, tokenizer)
    adapters = S.attach_subspace_adapters(model, subspaces)
    S.save_adapter(str(tmp_path / "adapter"), "subspace", adapters.state_dict(), model, model_dir)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("question\nWhat is a list?\n")
    out = str(tmp_path / "r.json")
    base = ["subspace", "eval", "--adapter", str(tmp_path / "adapter"), "--out", out, "--quiet"]
    capsys.readouterr()
    assert cli.main(base + ["--prompts", str(prompts), "--column", "prompt"]) == 2
    assert f"{prompts} has no column 'prompt'" in capsys.readouterr().err
    assert cli.main(base + ["--prompts", str(prompts), "--column", "question", "--model", other_dir]) == 2
    err = capsys.readouterr().err
    assert "adapter.json" in err and "hidden_size 32 vs 48" in err
    assert cli.main(["subspace", "eval", "--adapter", str(tmp_path), "--prompts", str(prompts), "--column",
                     "question", "--out", out]) == 2
    assert "adapter.json: no such file" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_tune_uses_the_dev_split_only(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"))
    corpus = write_corpus(str(tmp_path))
    data = tmp_path / "pair.jsonl"
    dev = ["What is a tuple?", "How do loops end?"]
    rows = [{"prompt": q, "target": "values", "contrast": "No"} for q in QUESTIONS]
    rows += [{"prompt": q, "split": "eval"} for q in HELD_OUT] + [{"prompt": q, "split": "dev"} for q in dev]
    rows += [{"prompt": "What is a set?", "split": "dev_control"}, {"markers": ["values"]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "tune"
    code = cli.main(["subspace", "--tune", "--tune-lrs", "1e-4,0.1", "--tune-compare-lrs", "", "--tune-signs", "target",
                     "--tune-features", "32", "--model", model_dir,
                     "--layers", "1", "--behaviour", str(data), "--neutral-text", corpus, "--sae-tokens", "600",
                     "--sae-latents", "64", "--sae-k", "4", "--sae-steps", "5", "--sae-batch-size", "128",
                     "--steps", "12", "--batch-size", "4", "--compare", "projected", "--ppl-sequences", "1",
                     "--context", "16", "--max-new-tokens", "4", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "tune.json").read_text())
    assert [(r["method"], r["lr"]) for r in report["rows"]] == [("subspace", 1e-4), ("subspace", 0.1),
                                                                ("projected", 1e-4), ("projected", 0.1)]
    for r in report["rows"]:
        assert [e["prompt"] for e in r["examples"]] == dev  # dev prompts, never the eval ones
        assert r["max_out_of_span"] < 1e-5
    assert report["dev_prompts"] == 2 and report["dev_control_prompts"] == 1
    assert report["chosen"]["--signs"] == "target" and report["chosen"]["--lr"] in (1e-4, 0.1)
    assert report["chosen"]["--projected-lr"] in (1e-4, 0.1)  # always one: the comparison needs an lr
    assert report["chosen"]["--features-per-layer"] == 32 and {r["features_per_layer"] for r in report["rows"]} == {32}
    assert not os.path.exists(out / "report.json")  # tuning writes no eval report


def test_cli_rejects_bad_arguments(tmp_path):
    assert cli.main(["subspace", "--layers", "x", "--out", str(tmp_path)]) == 2
    assert cli.main(["subspace", "--compare", "nope", "--out", str(tmp_path)]) == 2


def test_report_md_lists_every_method_and_held_out_set():
    from ssae_kernels.recipes.subspace.pipeline import format_report

    row = {"trainable_fraction": 0.0004, "lr": 0.01, "safety_rate": 0.97, "over_refusal": 0.1, "ppl_rise": 0.02,
           "ppl_rise_upper": 0.025, "max_out_of_span": 1e-7}
    report = {"model": "m", "layers": [15], "held_out_prompts": {"safety": 160, "over_refusal": 100,
                                                                 "xstest_unsafe": 200},
              "steps": 40, "batch_size": 8, "safety_rate_base": 0.05, "over_refusal_base": 0.0,
              "xstest_unsafe_refusal_base": 0.01, "xstest_unsafe_refusal_tuned": 0.6, "ppl_base": 25.0,
              "adapter": "subspace", "headline": row,
              "comparisons": {"full": {**row, "trainable_fraction": 1.0, "max_out_of_span": 0.9}},
              "judge": {"rule": "r", "agreement": 0.98, "n": 70}, "subspace": {"15": {"rank": 22, "features": 32}},
              "train_pairs": 300, "keep_examples": 121, "self_distilled": {"distilled": 121}, "total_seconds": 600,
              "threads": 2}
    md = format_report(report)
    assert "| method | trainable | lr | safety rate | over-refusal | xstest_unsafe | neutral ppl |" in md
    assert "| base model | – | – | 0.05 | 0.00 | 0.01 | 25.00 | – |" in md
    assert "| subspace LoRA (U fixed) | 0.040% | 0.01 | 0.97 | 0.10 | 0.60 | +2.0% (95% ub +2.5%) | 1.0e-07 |" in md
    assert "| full finetuning | 100.000% | 0.01 | 0.97 | 0.10 | – | +2.0% (95% ub +2.5%) | 9.0e-01 |" in md
    assert "Agreement with 70 hand-labelled replies: 0.980" in md


def test_keep_share_repeats_the_kept_answers(tiny):
    _, tokenizer = tiny
    pair = BehaviourPair("k", [Example(q, "values", "No") for q in QUESTIONS], [Example("What is a key?", "a name")],
                         HELD_OUT, [], ("values",))
    natural = S.training_examples(tokenizer, pair)
    assert len(natural) == len(QUESTIONS) + 1
    balanced = S.training_examples(tokenizer, pair, keep_share=0.5)
    kept = S.encode_example(tokenizer, "What is a key?", "a name")
    assert len(balanced) == 2 * len(QUESTIONS) and balanced.count(kept) == len(QUESTIONS)
    assert S.training_examples(tokenizer, pair, keep_share=0.25).count(kept) == 4  # 0.25 / 0.75 x 12
    assert S.training_examples(tokenizer, pair, keep_share=0.0).count(kept) == 0
    with pytest.raises(ValueError, match="keep_share"):
        S.training_examples(tokenizer, pair, keep_share=1.0)
    assert cli.main(["subspace", "--keep-share", "1.5", "--out", "x"]) == 2
    from ssae_kernels.recipes.subspace.commands import add_args
    import argparse

    parser = argparse.ArgumentParser()
    add_args(parser)
    assert parser.parse_args(["--keep-share", "none"]).keep_share is None
    assert parser.parse_args([]).keep_share == 0.5


def test_evaluation_covers_control_and_held_out_sets(tiny):
    model, tokenizer = tiny
    pair = BehaviourPair("h", [Example(q, "values", "No") for q in QUESTIONS], [], HELD_OUT[:2], HELD_OUT[2:3],
                         ("values",), held_out={"extra": QUESTIONS[:3]}, judge=lambda reply: True)
    chunks = [S.encode_prompt(tokenizer, q) for q in QUESTIONS[:2]]
    result = S.evaluate_behaviour(model, tokenizer, pair, chunks, max_new_tokens=2, held_out=True)
    assert (result["target_metric"], result["control_target_rate"], result["extra_rate"]) == (1.0, 1.0, 1.0)
    assert [(r["set"], r["prompt"]) for r in result["completions"]] == (
        [("eval", p) for p in HELD_OUT[:2]] + [("eval_control", HELD_OUT[2])] + [("extra", q) for q in QUESTIONS[:3]])
    assert "extra_rate" not in S.evaluate_behaviour(model, tokenizer, pair, chunks, max_new_tokens=2)


@pytest.mark.parametrize("method", ["subspace", "lora", "projected"])
def test_a_saved_adapter_reproduces_the_trained_model(tmp_path, tiny, method):
    model, tokenizer = tiny
    subspaces, _, _ = tiny_subspaces(model, tokenizer)
    ids, mask, _ = S.pad_batch([S.encode_example(tokenizer, q, "values") for q in QUESTIONS[:3]], 0, "cpu")
    base = model(input_ids=ids, attention_mask=mask).logits
    cfg = S.FinetuneConfig(steps=3, lr=0.05 if method != "projected" else 0.01, batch_size=4)
    _, finish = S.stages.train_method(method, model, tokenizer, subspaces, S.training_examples(tokenizer, tiny_pair()),
                                      cfg, False)
    tuned = model(input_ids=ids, attention_mask=mask).logits.detach()
    finish(str(tmp_path / method), model_source="tiny")
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)  # finish restored the model
    assert not torch.allclose(tuned, base)
    adapters = S.load_adapter(model, str(tmp_path / method))
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, tuned, atol=1e-5)
    adapters.remove()
    assert json.loads((tmp_path / method / "adapter.json").read_text())["method"] == method
