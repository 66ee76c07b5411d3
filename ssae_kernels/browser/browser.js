// The feature browser: an index of every latent and one page per latent, from the data files that
// `ssae features` writes beside these pages (plain scripts, so the site works from file:// with no server).
"use strict";

const SSAE = (() => {
  const data = () => window.SSAE_DATA || {};

  function element(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    for (const child of children) node.append(child);
    return node;
  }

  // a token as text, its line breaks visible
  const readable = (token) => token.replace(/\n/g, "\u21b5");

  function format(value) {
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) >= 0.01 || value === 0 ? value.toFixed(3) : value.toExponential(2);
  }

  function showSummary(table, summary) {
    const row = element("tr");
    for (const [key, value] of Object.entries(summary)) row.append(element("td", {}, `${key} ${format(value)}`));
    table.append(row);
  }

  function showIndex() {
    const index = data().index;
    document.getElementById("title").textContent = index.title;
    document.title = index.title;
    showSummary(document.getElementById("summary"), index.summary);
    const head = document.querySelector("#latents thead tr");
    const body = document.querySelector("#latents tbody");
    const columns = ["latent", ...index.columns, "top tokens"];
    for (const name of columns) head.append(element("th", {"data-key": name}, name));
    const rows = index.latents.map((entry) => {
      const row = element("tr", {"data-latent": String(entry.latent), "data-search": entry.search.toLowerCase()});
      row.append(element("td", {}, element("a", {href: `latent.html?latent=${entry.latent}`}, `#${entry.latent}`)));
      for (const name of index.columns) row.append(element("td", {}, format(entry.metrics[name])));
      row.append(element("td", {class: "tokens"}, ...entry.top.map((token) => element("span", {}, readable(token)))));
      row.entry = entry;
      return row;
    });
    body.append(...rows);
    const shown = document.getElementById("shown");
    const search = document.getElementById("search");
    const filter = () => {
      const query = search.value.trim().toLowerCase();
      let count = 0;
      for (const row of rows) {
        const visible = !query || row.dataset.search.includes(query);
        row.hidden = !visible;
        count += visible;
      }
      shown.textContent = `${count} of ${rows.length} latents`;
    };
    search.addEventListener("input", filter);
    search.value = new URLSearchParams(location.search).get("q") || "";  // index.html?q=... opens a search
    head.addEventListener("click", (event) => {
      const key = event.target.dataset.key;
      if (!key || key === "top tokens") return;
      const value = (row) => (key === "latent" ? -row.entry.latent : row.entry.metrics[key]);
      rows.sort((a, b) => value(b) - value(a));
      body.append(...rows);
      for (const cell of head.children) cell.classList.toggle("sorted", cell === event.target);
    });
    filter();
  }

  function context(entry, peak) {
    const line = element("div", {class: "context"}, element("span", {class: "value"}, format(entry.value)));
    entry.tokens.forEach((token, i) => {
      const strength = peak > 0 ? Math.max(0, entry.acts[i]) / peak : 0;
      const span = element("span", {title: format(entry.acts[i])}, readable(token));
      span.style.background = `rgba(224, 123, 36, ${strength.toFixed(3)})`;
      if (i === entry.at) span.classList.add("at");
      line.append(span);
    });
    return line;
  }

  function histogram(counts, peak) {
    const width = 320, height = 80, bar = width / counts.length, most = Math.max(1, ...counts);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    counts.forEach((count, i) => {
      const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const h = (count / most) * (height - 2);
      rect.setAttribute("x", i * bar);
      rect.setAttribute("y", height - h);
      rect.setAttribute("width", bar - 1);
      rect.setAttribute("height", h);
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = `${count} tokens in (${format((i * peak) / counts.length)}, ${format(((i + 1) * peak) / counts.length)}]`;
      rect.append(title);
      svg.append(rect);
    });
    return svg;
  }

  function render(latent) {
    const entry = (data().latents || {})[latent];
    const main = document.getElementById("latent");
    main.replaceChildren();
    if (!entry) {
      main.append(element("p", {}, `latent ${latent} is not in this site`));
      return;
    }
    document.title = `latent ${latent}`;
    main.append(element("h1", {}, `Latent #${latent}`));
    main.append(element("p", {}, `fires on ${format(entry.frequency * 100)}% of tokens (${entry.count}); ` +
                                  `max activation ${format(entry.max)}, mean ${format(entry.mean)}`));
    main.append(element("h2", {}, "Activation histogram"), histogram(entry.histogram, entry.max));
    main.append(element("h2", {}, "Top activating contexts"), ...entry.top.map((c) => context(c, entry.max)));
    if (entry.samples.length) {
      main.append(element("h2", {}, "Random contexts from the lower half of its activations"),
                  ...entry.samples.map((c) => context(c, entry.max)));
    }
    const tokens = (list) => element("p", {class: "tokens"}, ...list.map((t) => element("span", {}, readable(t))));
    main.append(element("h2", {}, "Output tokens it promotes"), tokens(entry.boosted));
    main.append(element("h2", {}, "Output tokens it suppresses"), tokens(entry.suppressed));
    main.append(element("h2", {}, "Nearest latents (decoder cosine)"),
                element("p", {}, ...entry.nearest.map((n) => element("span", {},
                  element("a", {href: `latent.html?latent=${n.latent}`}, `#${n.latent}`), ` ${format(n.cosine)}  `))));
  }

  function showLatent() {
    const first = data().index.latents[0];
    const latent = Number(new URLSearchParams(location.search).get("latent") || (first ? first.latent : 0));
    const script = document.createElement("script");
    script.src = `data/latents-${Math.floor(latent / data().index.chunk_size)}.js`;
    script.onload = () => render(latent);
    script.onerror = () => render(latent);
    document.body.append(script);
  }

  return {showIndex, showLatent};
})();
