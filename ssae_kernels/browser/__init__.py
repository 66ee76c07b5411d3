"""The feature browser's static pages (index.html, latent.html, browser.js, style.css) and ``write_site``, which
puts them beside the data files of an SAE's latents (plain scripts, so the site works from file://)."""

from __future__ import annotations

import json
import os
import shutil

ASSETS = ("index.html", "latent.html", "browser.js", "style.css")
CHUNK = 64  # latents per data file


def write_site(out: str, index: dict, latents: dict[int, dict]) -> list[str]:
    """Writes the pages and their data into ``out``: ``index`` (title, summary, columns, latents: one row each
    with latent, metrics, top, search) and ``latents`` (latent -> its page's data). Returns the files written."""
    here = os.path.dirname(__file__)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    written = []
    for name in ASSETS:
        shutil.copyfile(os.path.join(here, name), os.path.join(out, name))
        written.append(name)
    written.append(_script(out, "data/index.js", f"window.SSAE_DATA = window.SSAE_DATA || {{}};\n"
                                                 f"SSAE_DATA.index = {json.dumps({**index, 'chunk_size': CHUNK})};\n"))
    chunks: dict[int, dict] = {}
    for latent, entry in latents.items():
        chunks.setdefault(latent // CHUNK, {})[str(latent)] = entry
    for chunk, entries in sorted(chunks.items()):
        written.append(_script(out, f"data/latents-{chunk}.js",
                               "window.SSAE_DATA = window.SSAE_DATA || {};\nSSAE_DATA.latents = "
                               f"Object.assign(SSAE_DATA.latents || {{}}, {json.dumps(entries)});\n"))
    return written


def _script(out: str, name: str, text: str) -> str:
    with open(os.path.join(out, name), "w") as f:
        f.write(text)
    return name
