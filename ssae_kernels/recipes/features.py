"""``ssae features``: a static site (index.html, one page per latent, data files) showing what each latent of an
SAE responds to, computed in one streaming pass over a text (``ssae_kernels.features``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import models, text
from .common import (HelpFormatter, UsageError, add_out_args, add_threads_arg, check_positive, check_sources,
                     config_from_args, run_settings, set_threads)
from .rundir import RUN_FILE, open_run
from .specialized.corpus import read_source

REPORT_KEYS = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "num_latents", "k")


@dataclass
class FeaturesConfig:
    out: str
    sae: str | None = None
    compare: tuple[str, ...] | None = None  # ("general=DIR", "specialized=DIR")
    # a finetuned SAE's latents start at cosine 1 with the general SAE's: on the default specialized recipe the
    # lowest ends at 0.78 and 2.8% fall below 0.9
    novel_below: float = 0.9
    model: str | None = None  # None: the SAE's training run's (else the built-in model)
    layer: int | None = None
    text: str | None = None
    text_field: str | None = None
    context: int | None = None
    max_tokens: int = 50_000
    latents: str = "all"
    contexts: int = 10
    samples: int = 4
    radius: int = 8
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False


def add_subcommands(sub) -> None:
    p = sub.add_parser("features", help="a static site of what each latent of an SAE responds to",
                       description="Encodes a text with the SAE in one streaming pass and writes OUT/index.html "
                                   "(every latent, sortable, searchable) and a page per latent: its frequency, "
                                   "activation histogram, top contexts, contexts from its lower activations, the "
                                   "output tokens it promotes and suppresses, its nearest latents. Opens from file://.",
                       formatter_class=HelpFormatter)
    p.add_argument("--sae", default=None, help="an SAE directory, ours, SAELens or sparsify (default: none; or --compare)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("general=DIR", "specialized=DIR"),
                   help="instead of --sae: the specialized SAE's latents with no close match in the general one, "
                        "ranked by their activation on --text, the new tail features of the SSAE recipe (default: none)")
    p.add_argument("--novel-below", type=float, default=FeaturesConfig.novel_below,
                   help="with --compare: a latent is new when its max decoder cosine to the general SAE is below this")
    p.add_argument("--model", default=None, help="model (default: the SAE's training run's, else the built-in one)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer the SAE reads (default: its training run's, else 15)")
    p.add_argument("--text", default=None, help="text to encode (default: its training run's, else builtin:python-docs)")
    p.add_argument("--text-field", default=None, help="field holding the text in .jsonl/.parquet records (default: its training run's, else text)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: its training run's, else 256)")
    p.add_argument("--max-tokens", type=int, default=50_000, help="tokens to encode")
    p.add_argument("--latents", default="all", help="'all', or N: the first N latents")
    p.add_argument("--contexts", type=int, default=10, help="top-activating contexts per latent")
    p.add_argument("--samples", type=int, default=4, help="random contexts per latent from its lower activations")
    p.add_argument("--radius", type=int, default=8, help="tokens shown on each side of a context's token")
    p.add_argument("--device", default="cpu", help="torch device")
    add_threads_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random contexts")
    add_out_args(p, "index.html, latent.html, data/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_handler)


def _handler(args) -> None:
    cfg = config_from_args(FeaturesConfig, args)
    cfg.compare = tuple(cfg.compare) if cfg.compare else None
    summary = run(cfg)
    print(json.dumps(summary, indent=2))
    print(f"open: {os.path.join(args.out, 'index.html')}")


def training_run(sae_dir: str) -> tuple[dict, dict]:
    """(settings, report) of the ``ssae train`` or ``ssae specialized`` run an SAE directory came from (OUT/sae,
    OUT/layer-L/sae, OUT/ssae_term/sae, ...), each {} when it came from elsewhere."""
    for run_dir, layer_dir in ((os.path.dirname(sae_dir), None),
                               (os.path.dirname(os.path.dirname(sae_dir)), os.path.dirname(sae_dir))):
        path = os.path.join(run_dir, RUN_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("command") not in ("train", "specialized"):
                return {}, {}
            settings = dict(saved["config"])
            if saved["command"] == "specialized":  # its SAEs are about the subdomain of its held-out text
                settings["text"] = settings.get("eval_text")
            if layer_dir is not None and os.path.basename(layer_dir).startswith("layer-"):
                settings["layer"] = int(os.path.basename(layer_dir)[len("layer-"):])
            report_path = os.path.join(os.path.dirname(sae_dir), "report.json")
            report = json.load(open(report_path)) if os.path.isfile(report_path) else {}
            return settings, report
    return {}, {}


def resolve(cfg: FeaturesConfig) -> tuple[FeaturesConfig, dict]:
    """The config with every unset source taken from the SAE's training run (or the defaults), and that run's
    report."""
    if not os.path.isdir(cfg.sae):
        raise UsageError(f"--sae {cfg.sae}: no such directory")
    settings, report = training_run(cfg.sae)
    defaults = {"model": models.BUILTIN, "layer": 15, "text": text.BUILTIN, "text_field": "text", "context": 256}
    for key, default in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, default if settings.get(key) is None else settings[key])
    return cfg, report


def check(cfg: FeaturesConfig) -> None:
    check_positive(max_tokens=cfg.max_tokens, contexts=cfg.contexts, radius=cfg.radius)
    if cfg.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {cfg.samples}")
    if cfg.latents != "all" and not (cfg.latents.isdigit() and int(cfg.latents) >= 1):
        raise UsageError(f"--latents must be 'all' or a positive number, got {cfg.latents!r}")
    if cfg.context < 2:
        raise UsageError(f"--context must be >= 2, got {cfg.context}")
    check_sources(cfg.model, (cfg.text,), cfg.text_field)


def run(cfg: FeaturesConfig) -> dict:
    """Writes the site; returns a summary (latents shown, tokens encoded, seconds, files and bytes written)."""
    from .. import features

    if cfg.compare:
        return compare(cfg)
    if cfg.sae is None:
        raise UsageError("give --sae DIR (or --compare general=DIR specialized=DIR)")
    cfg, report = resolve(cfg)
    check(cfg)
    set_threads(cfg.threads)
    started = time.perf_counter()
    sae = _load(cfg.sae, cfg.device)
    M = sae.cfg.num_latents
    shown = M if cfg.latents == "all" else int(cfg.latents)
    if shown > M:
        raise UsageError(f"--latents {shown} is out of range: the SAE in {cfg.sae} has {M} latents")
    with open_run(cfg.out, "features", run_settings(cfg), overwrite=cfg.overwrite):
        model, tokenizer, docs = _model_and_text(cfg, sae, "--sae " + cfg.sae)
        codes = features.encode_text(model, tokenizer, sae, docs, cfg.layer, context=cfg.context,
                                     max_tokens=cfg.max_tokens, progress=not cfg.quiet)
        encoded = time.perf_counter()
        stats = features.latent_statistics(codes, M, contexts=cfg.contexts, samples=cfg.samples, seed=cfg.seed)
        name = os.path.join(*os.path.normpath(os.path.abspath(cfg.sae)).split(os.sep)[-2:])
        title = f"SAE features: {name} ({cfg.model}, layer {cfg.layer})"
        written = write_latent_site(cfg, title, {**{key: report[key] for key in REPORT_KEYS if key in report},
                                                 "tokens encoded": len(codes.tokens)},
                                    model, tokenizer, codes, stats, sae.W_dec.detach(), list(range(shown)), {})
    return {"latents": shown, "tokens": len(codes.tokens), "encode_seconds": encoded - started,
            "total_seconds": time.perf_counter() - started, **written}


def compare(cfg: FeaturesConfig) -> dict:
    """``--compare general=A specialized=B``: the site of B's latents whose decoder direction has no match
    in A (max cosine below --novel-below), ranked by their activation per token on the text."""
    from .. import features

    named = dict(part.split("=", 1) for part in cfg.compare if "=" in part)
    if set(named) != {"general", "specialized"} or len(cfg.compare) != 2:
        raise UsageError(f"--compare takes general=DIR specialized=DIR, got {' '.join(cfg.compare)}")
    if not 0 < cfg.novel_below <= 1:
        raise UsageError(f"--novel-below must be in (0, 1], got {cfg.novel_below}")
    cfg.sae = named["specialized"]
    cfg, _ = resolve(cfg)
    check(cfg)
    set_threads(cfg.threads)
    started = time.perf_counter()
    general, specialized = _load(named["general"], cfg.device), _load(named["specialized"], cfg.device)
    if general.cfg.d_in != specialized.cfg.d_in:
        raise UsageError(f"--compare: the general SAE reads d_in = {general.cfg.d_in}, the specialized one "
                         f"{specialized.cfg.d_in}: they are not of one layer")
    with open_run(cfg.out, "features", run_settings(cfg), overwrite=cfg.overwrite):
        model, tokenizer, docs = _model_and_text(cfg, specialized, "--compare specialized=" + named["specialized"])
        codes = features.encode_text(model, tokenizer, specialized, docs, cfg.layer, context=cfg.context,
                                     max_tokens=cfg.max_tokens, progress=not cfg.quiet)
        written = write_comparison(cfg, model, tokenizer, codes, general, specialized)
    return {**written, "tokens": len(codes.tokens), "total_seconds": time.perf_counter() - started}


def write_comparison(cfg: FeaturesConfig, model, tokenizer, codes, general, specialized) -> dict:
    """The comparison site of ``compare`` from the specialized SAE's codes of the text."""
    from .. import features

    M = specialized.cfg.num_latents
    stats = features.latent_statistics(codes, M, contexts=cfg.contexts, samples=cfg.samples, seed=cfg.seed)
    closest = features.max_cosine(specialized.W_dec.detach(), general.W_dec.detach())
    novel = (closest < cfg.novel_below).nonzero().squeeze(1)
    ranked = novel[torch.sort(stats.activation[novel], descending=True, stable=True).indices].tolist()
    title = (f"Specialized latents with no match in the general SAE (max decoder cosine < {cfg.novel_below:g}), "
             "by activation on the text")
    summary = {"specialized latents": M, "general latents": general.cfg.num_latents, "novel": len(ranked),
               "novel that fired": int((stats.count[novel] > 0).sum()), "tokens encoded": len(codes.tokens)}
    written = write_latent_site(cfg, title, summary, model, tokenizer, codes, stats, specialized.W_dec.detach(), ranked,
                                {"activation per token": stats.activation, "max cosine to general": closest})
    return {**written, "novel": len(ranked)}


def write_latent_site(cfg, title: str, summary: dict, model, tokenizer, codes, stats, W_dec, latents: list[int],
                      metrics: dict) -> dict:
    """Writes the site of ``latents`` (in that order on the index) into cfg.out: their pages from the codes'
    statistics, the output tokens of their decoder directions, their nearest latents, and ``metrics``
    (name -> [M] tensor) as columns beside frequency and activation. Returns {"latents", "files", "bytes"}."""
    from .. import features
    from ..browser import write_site

    chosen = torch.tensor(latents, dtype=torch.int64)
    boosted, suppressed = features.logit_effects(model, W_dec, chosen)
    nearest, cosines = features.nearest_latents(W_dec, chosen)
    words = _token_strings(tokenizer)
    rows, pages = [], {}
    for j, m in enumerate(tqdm(latents, desc="latent pages", unit="latent", disable=cfg.quiet)):
        page = _page(m, codes, stats, words, cfg.radius, boosted[j], suppressed[j], nearest[j], cosines[j])
        pages[m] = page
        columns = {**{name: float(values[m]) for name, values in metrics.items()}, "frequency": page["frequency"],
                   "max activation": page["max"], "mean activation": page["mean"]}
        rows.append({"latent": m, "metrics": columns, "top": [c["tokens"][c["at"]] for c in page["top"][:3]],
                     "search": " ".join("".join(c["tokens"]) for c in page["top"])})
    columns = [*metrics, "frequency", "max activation", "mean activation"]
    files = write_site(cfg.out, {"title": title, "summary": summary, "columns": columns, "latents": rows}, pages)
    return {"latents": len(latents), "files": len(files),
            "bytes": sum(os.path.getsize(os.path.join(cfg.out, name)) for name in files)}


def _load(directory: str, device: str):
    from ..formats import load_sae

    try:
        return load_sae(directory, device)
    except (ValueError, OSError) as error:
        raise UsageError(f"{directory}: {error}") from None


def _model_and_text(cfg: FeaturesConfig, sae, which: str):
    """(model, tokenizer, documents), checked against the SAE."""
    model, tokenizer = models.load_model(cfg.model, device=cfg.device, progress=not cfg.quiet)
    models.check_layer(model, cfg.layer)
    if model.config.hidden_size != sae.cfg.d_in:
        raise UsageError(f"{which}: its width d_in = {sae.cfg.d_in} does not match {cfg.model}'s hidden "
                         f"size {model.config.hidden_size} at --layer {cfg.layer}")
    docs = read_source(cfg.text, field=cfg.text_field)  # (the specialized recipe's built-in texts too)
    if not docs:
        raise UsageError(f"--text {cfg.text}: holds no text")
    return model, tokenizer, docs


def _token_strings(tokenizer) -> list[str]:
    """Every token id's text as it reads in context (byte-level tokens decoded)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def _page(m, codes, stats, words, radius, boosted, suppressed, nearest, cosines) -> dict:
    """The data of latent m's page (``boosted`` ... ``cosines``: its rows of the per-latent results)."""
    from ..features import activation_window

    def contexts(tokens):
        shown = []
        for t in tokens.tolist():
            if t < 0:  # past the latent's count
                break
            ids, acts, at = activation_window(codes, t, m, radius)
            shown.append({"tokens": [words[i] for i in ids], "acts": [round(a, 4) for a in acts], "at": at,
                          "value": round(acts[at], 4)})
        return shown

    return {"latent": m, "count": int(stats.count[m]), "frequency": float(stats.frequency[m]),
            "max": float(stats.max[m]), "mean": float(stats.mean[m]), "histogram": stats.histogram[m].tolist(),
            "top": contexts(stats.top[m]), "samples": contexts(stats.samples[m]),
            "boosted": [words[t] for t in boosted.tolist()], "suppressed": [words[t] for t in suppressed.tolist()],
            "nearest": [{"latent": int(i), "cosine": round(float(c), 4)} for i, c in zip(nearest, cosines)]}
