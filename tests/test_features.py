"""ssae_kernels.features on a tiny model: the per-latent statistics from the sparse codes' transpose against a
dense float64 computation of the same SAE's activations."""

import pytest
import torch

from ssae_kernels import activations, features
from ssae_kernels.sae import SAEConfig, TopKSAE
from tiny_model import TEXTS, build_model, build_tokenizer


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, num_latents=40, k=4), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(40, generator=g))
    codes = features.encode_text(model, tokenizer, sae, TEXTS[:12], 1, context=24, max_tokens=300, batch_size=5,
                                 progress=False)
    acts = activations.harvest(model, tokenizer, TEXTS[:12], 1, context=24, max_tokens=300, progress=False).acts
    return model, tokenizer, sae, codes, acts


@torch.no_grad()
def _dense(sae, acts):
    """Every token's TopK activation of every latent, float64: [N, M]."""
    x = acts.double() * sae.input_scale.double()
    pre = (x - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
    top = pre.topk(sae.cfg.k, dim=1)
    return torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))


def test_codes_follow_the_text(setup):
    _, _, sae, codes, acts = setup
    assert codes.values.shape == (300, 4) and len(codes.tokens) == 300
    torch.testing.assert_close(codes.values.double(), _dense(sae, acts).gather(1, codes.indices.long()), atol=1e-5,
                               rtol=1e-5)
    for t in (0, 17, 299):  # (sequence, position) name the token
        assert codes.chunks[int(codes.sequences[t])][int(codes.positions[t])] == int(codes.tokens[t])


def test_statistics_equal_a_dense_computation(setup):
    _, _, sae, codes, acts = setup
    dense = _dense(sae, acts)
    stats = features.latent_statistics(codes, 40, contexts=5, bins=4, samples=3)
    fired = dense > 0
    assert torch.equal(stats.count, fired.sum(0))
    torch.testing.assert_close(stats.frequency, fired.double().mean(0))
    torch.testing.assert_close(stats.max.double(), dense.max(0).values, atol=1e-5, rtol=1e-5)
    for m in range(40):
        column = dense[:, m]
        n = int(fired[:, m].sum())
        order = torch.sort(column, descending=True, stable=True).indices[:min(5, n)]
        assert stats.top[m, :len(order)].tolist() == order.tolist(), m
        assert (stats.top[m, len(order):] == -1).all()
        torch.testing.assert_close(stats.top_values[m, :len(order)].double(), column[order], atol=1e-5, rtol=1e-5)
        if n:
            torch.testing.assert_close(stats.mean[m].double(), column[fired[:, m]].mean(), atol=1e-5, rtol=1e-5)
            assert int(stats.histogram[m].sum()) == n and int(stats.histogram[m, -1]) >= 1  # the max, last bin
            lower = set(torch.sort(column, descending=True, stable=True).indices[(n + 1) // 2:n].tolist())
            drawn = [t for t in stats.samples[m].tolist() if t >= 0]
            assert set(drawn) <= lower and len(drawn) == min(3, len(lower))
    assert int(stats.count.sum()) > 0 and (stats.count > 5).any()  # the check saw real groups


def test_activation_window_reads_the_latent_around_a_token(setup):
    _, _, sae, codes, acts = setup
    dense = _dense(sae, acts)
    t = 40
    latent = int(codes.indices[t, 0])
    tokens, values, at = features.activation_window(codes, t, latent, radius=3)
    assert tokens[at] == int(codes.tokens[t]) and len(tokens) <= 7
    rows = range(t - at, t - at + len(tokens))
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), dense[list(rows), latent], atol=1e-5,
                               rtol=1e-5)
    seq = int(codes.sequences[t])
    assert all(int(codes.sequences[r]) == seq for r in rows)


def test_logit_effects_and_nearest_latents(setup):
    model, _, sae, _, _ = setup
    latents = torch.tensor([0, 7, 39])
    boosted, suppressed = features.logit_effects(model, sae.W_dec.detach(), latents, top=3)
    logits = (sae.W_dec.detach()[latents] * model.model.norm.weight.detach()) @ model.lm_head.weight.detach().T
    assert boosted.tolist() == logits.topk(3, dim=1).indices.tolist()
    assert suppressed.tolist() == (-logits).topk(3, dim=1).indices.tolist()
    found, cosines = features.nearest_latents(sae.W_dec.detach(), latents, top=2)
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    sims = W[latents] @ W.T
    sims[torch.arange(3), latents] = -2
    assert found.tolist() == sims.topk(2, dim=1).indices.tolist()
    torch.testing.assert_close(cosines, sims.topk(2, dim=1).values)


# ---- ssae features -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model's directory, a corpus, and an SAE trained on its layer 1 by ``ssae train``."""
    from ssae_kernels import cli
    from tiny_model import save_tiny, write_corpus

    tmp = tmp_path_factory.mktemp("features")
    tiny, corpus = save_tiny(str(tmp / "tiny")), write_corpus(str(tmp))
    assert cli.main(["train", "--model", tiny, "--layer", "1", "--text", corpus, "--max-tokens", "2000", "--context",
                     "32", "--latents", "48", "--k", "4", "--steps", "10", "--batch-size", "256", "--eval-fraction",
                     "0.2", "--eval-min-tokens", "0", "--ce-sequences", "2", "--quiet", "--out", str(tmp / "run")]) == 0
    return tmp, tiny, corpus


def _site_data(out):
    """(index, latents) of a site, read back from its data scripts."""
    import json

    def payload(path, marker):
        text = (out / "data" / path).read_text()
        start = text.index(marker) + len(marker)
        return json.loads(text[start:text.rindex(")" if marker.endswith(", ") else ";")])

    index = payload("index.js", "SSAE_DATA.index = ")
    latents = {}
    for path in sorted((out / "data").glob("latents-*.js")):
        latents.update(payload(path.name, "Object.assign(SSAE_DATA.latents || {}, "))
    return index, latents


def test_ssae_features_writes_a_site_from_the_runs_settings(trained):
    from ssae_kernels import cli

    tmp, _, _ = trained
    out = tmp / "site"
    # the model, layer and text come from the SAE's run
    assert cli.main(["features", "--sae", str(tmp / "run" / "sae"), "--out", str(out), "--contexts", "3",
                     "--max-tokens", "400", "--quiet"]) == 0
    for name in ("index.html", "latent.html", "browser.js", "style.css", "data/index.js"):
        assert (out / name).is_file(), name
    index, latents = _site_data(out)
    assert [row["latent"] for row in index["latents"]] == list(range(48)) and set(latents) == {str(m) for m in range(48)}
    assert index["summary"]["tokens encoded"] == 400 and "fvu" in index["summary"]
    firing = [page for page in latents.values() if page["count"]]
    assert firing and all(len(page["top"]) == min(3, page["count"]) for page in latents.values())
    for page in firing:
        assert sum(page["histogram"]) == page["count"] and len(page["nearest"]) == 5 and len(page["boosted"]) == 10
        values = [context["value"] for context in page["top"]]
        assert values == sorted(values, reverse=True) and values[0] == pytest.approx(page["max"], abs=1e-3)
        for context in page["top"]:
            assert context["acts"][context["at"]] == context["value"] and len(context["tokens"]) == len(context["acts"])


@pytest.mark.parametrize("extra,message", [
    (["--latents", "49"], "--latents 49 is out of range: the SAE in"),
    (["--latents", "x"], "--latents must be 'all' or a positive number, got 'x'"),
    (["--layer", "7"], r"layer must be in [0, 3)"),
])
def test_ssae_features_bad_input(trained, capsys, extra, message):
    from ssae_kernels import cli

    tmp, _, _ = trained
    assert cli.main(["features", "--sae", str(tmp / "run" / "sae"), "--out", str(tmp / "bad"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp / "bad").exists()


def test_ssae_features_refuses_a_mismatched_model_empty_text_and_a_foreign_out(trained, tmp_path, capsys):
    from ssae_kernels import cli
    from tiny_model import build_tokenizer, save_tiny

    tmp, tiny, corpus = trained
    sae = str(tmp / "run" / "sae")
    wide = tmp_path / "wide"
    from tiny_model import build_model

    tokenizer = build_tokenizer()
    build_model(len(tokenizer), width=48).save_pretrained(str(wide))
    tokenizer.save_pretrained(str(wide))
    assert cli.main(["features", "--sae", sae, "--model", str(wide), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "its width d_in = 32 does not match" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert cli.main(["features", "--sae", sae, "--text", str(empty), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "holds no text" in capsys.readouterr().err
    foreign = tmp_path / "c"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["features", "--sae", sae, "--out", str(foreign), "--quiet"]) == 2
    assert "is not empty and holds no ssae run" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


# ---- the site in a real browser (headless Chromium; `make test` installs it when missing) -------------------


def _chromium():
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (`make browser` installs Debian's package)")
    return found


def _browse(url, *flags):
    """(stdout, the page's console messages) of headless Chromium on a file:// URL."""
    import subprocess

    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", *flags, url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def site(trained):
    from ssae_kernels import cli

    tmp, _, _ = trained
    out = tmp / "browsed"
    assert cli.main(["features", "--sae", str(tmp / "run" / "sae"), "--out", str(out), "--contexts", "3",
                     "--max-tokens", "400", "--quiet"]) == 0
    return out


def test_the_index_lists_every_latent_and_its_search_filters(site):
    import re

    index, _ = _site_data(site)
    # a token some latents' contexts hold and others not
    words = sorted({w.strip().lower() for row in index["latents"] for w in row["search"].split() if len(w.strip()) > 3})
    query = next(w for w in words if 0 < sum(w in row["search"].lower() for row in index["latents"]) < 48)
    expected = sum(query in row["search"].lower() for row in index["latents"])
    dom, console = _browse((site / "index.html").as_uri() + f"?q={query}", "--dump-dom")
    assert console == []
    assert len(re.findall(r"<tr [^>]*data-latent=\"\d+\"", dom)) == 48
    assert f">{expected} of 48 latents<" in dom
    assert len(re.findall(r"<tr [^>]*data-latent=\"\d+\"[^>]*hidden", dom)) == 48 - expected


def test_a_latent_page_renders_and_its_screenshot_is_not_blank(site, tmp_path):
    import matplotlib.image

    _, latents = _site_data(site)
    m = next(int(k) for k, page in latents.items() if page["count"])
    url = (site / "latent.html").as_uri() + f"?latent={m}"
    dom, console = _browse(url, "--dump-dom")
    assert console == []
    assert f"<h1>Latent #{m}</h1>" in dom and dom.count('class="context"') >= 1 and "<svg" in dom
    shot = tmp_path / "latent.png"
    _browse(url, "--hide-scrollbars", "--window-size=900,700", f"--screenshot={shot}")
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    inked = (pixels < 0.9).any(axis=2).mean()  # not near-white
    orange = ((pixels[..., 0] > 0.8) & (pixels[..., 2] < 0.4)).mean()  # the histogram and the shading
    assert inked > 0.01 and orange > 0.001, (inked, orange)


# ---- comparing a specialized SAE with the general one --------------------------------------------------------


def _finetuned_copy(sae, rows, seed=1):
    """A copy of ``sae`` whose decoder (and encoder) ``rows`` point elsewhere: new directions."""
    g = torch.Generator().manual_seed(seed)
    tuned = TopKSAE(sae.cfg)
    tuned.load_state_dict(sae.state_dict())
    with torch.no_grad():
        fresh = torch.nn.functional.normalize(torch.randn(len(rows), sae.cfg.d_in, generator=g), dim=1)
        tuned.W_dec[rows] = fresh
        tuned.W_enc[rows] = fresh
    return tuned


def test_comparison_lists_the_new_latents_by_their_activation(setup, tmp_path):
    from ssae_kernels.recipes.specialized.pipeline import SpecializedConfig, write_tail_features

    model, tokenizer, general, _, acts = setup
    tuned = _finetuned_copy(general, [3, 11, 29])
    eval_data = activations.harvest(model, tokenizer, TEXTS[:12], 1, context=24, max_tokens=300, progress=False)
    cfg = SpecializedConfig(out=str(tmp_path), context=24, quiet=True)
    meta = write_tail_features(cfg, model, tokenizer, TEXTS[:12], eval_data, general, tuned, progress=False)
    closest = features.max_cosine(tuned.W_dec.detach(), general.W_dec.detach())
    novel = (closest < 0.9).nonzero().squeeze(1).tolist()
    assert set(novel) >= {3, 11, 29} and meta["novel_latents"] == len(novel) and meta["page"] == "features/index.html"
    index, latents = _site_data(tmp_path / "features")
    listed = [row["latent"] for row in index["latents"]]
    assert sorted(listed) == sorted(novel) and set(latents) == {str(m) for m in novel}
    dense = _dense(tuned, eval_data.acts)
    activation = dense.sum(0) / dense.shape[0]
    assert [round(row["metrics"]["activation per token"], 5) for row in index["latents"]] == \
        [round(float(activation[m]), 5) for m in listed]
    assert activation[listed].tolist() == sorted(activation[listed].tolist(), reverse=True)
    assert all(row["metrics"]["max cosine to general"] < 0.9 for row in index["latents"])


def test_ssae_features_compare_from_the_command_line(trained, capsys):
    from ssae_kernels import cli
    from ssae_kernels.sae import SAE

    tmp, tiny, corpus = trained
    general = SAE.load(str(tmp / "run" / "sae"))
    _finetuned_copy(general, [0, 5]).save(str(tmp / "tuned"))
    out = tmp / "compared"
    assert cli.main(["features", "--compare", f"general={tmp / 'run' / 'sae'}", f"specialized={tmp / 'tuned'}",
                     "--model", tiny, "--layer", "1", "--text", corpus, "--max-tokens", "300", "--out", str(out),
                     "--quiet"]) == 0
    index, _ = _site_data(out)
    assert {0, 5} <= {row["latent"] for row in index["latents"]} and index["summary"]["novel"] >= 2
    with pytest.raises(SystemExit):  # argparse: two arguments
        cli.main(["features", "--compare", "general=x", "--out", str(tmp / "bad"), "--quiet"])
    capsys.readouterr()
    assert cli.main(["features", "--compare", "general=x", "other=y", "--out", str(tmp / "bad"), "--quiet"]) == 2
    assert "--compare takes general=DIR specialized=DIR" in capsys.readouterr().err
