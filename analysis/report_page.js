"use strict";
// markerlab's report.html (analysis/html.py writes the data blocks this reads).
// Every element is built from text (textContent, text nodes): no completion text is ever parsed as HTML.
(function () {
  const PAGE_SIZE = 20;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  // The few markdown forms the report's words use: paragraphs, "- " lists (one level of nesting),
  // "### " headings, **bold** and `code`.
  function inline(text) {
    const frag = document.createDocumentFragment();
    for (const part of text.split(/(\*\*[^*]+\*\*|`[^`]+`)/)) {
      if (!part) continue;
      if (part.startsWith("**") && part.endsWith("**") && part.length > 4) frag.append(el("strong", {text: part.slice(2, -2)}));
      else if (part.startsWith("`") && part.endsWith("`") && part.length > 2) frag.append(el("code", {text: part.slice(1, -1)}));
      else frag.append(document.createTextNode(part));
    }
    return frag;
  }

  function words(md) {
    const box = el("div", {class: "words"});
    for (const block of md.split(/\n\s*\n/)) {
      const lines = block.split("\n").filter(l => l.trim());
      if (!lines.length) continue;
      if (lines[0].startsWith("#")) {
        box.append(el("h3", {}, inline(lines[0].replace(/^#+\s*/, ""))));
        lines.shift();
        if (!lines.length) continue;
      }
      if (lines.every(l => /^\s*- /.test(l))) {
        const ul = el("ul");
        let last = null;
        for (const l of lines) {
          const item = el("li", {}, inline(l.replace(/^\s*- /, "")));
          if (/^\s+- /.test(l) && last) {
            let sub = last.querySelector("ul");
            if (!sub) { sub = el("ul"); last.append(sub); }
            sub.append(item);
          } else { ul.append(item); last = item; }
        }
        box.append(ul);
      } else {
        const p = el("p");
        lines.forEach((l, i) => {
          if (/^\s*- /.test(l) && i > 0) p.append(el("br"));
          else if (i > 0) p.append(" ");
          p.append(inline(l.replace(/^\s*- /, "\u2022 ")));
        });
        box.append(p);
      }
    }
    return box;
  }

  function bytesOf(node) {
    const b64 = node.textContent.trim();
    if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(b64);
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // analysis/html.py's word_code: per text, 1-based vocabulary indices as LEB128 varints, then a 0 byte.
  // Texts are decoded when first shown or searched.
  function wordDecoder(vocab, bytes, n) {
    const starts = new Uint32Array(n + 1);
    let k = 0;
    for (let i = 0; i < bytes.length; i++) if (bytes[i] === 0) starts[++k] = i + 1;
    if (k !== n) throw new Error(`the texts block holds ${k} texts, the records ${n}`);
    const cache = new Array(n);
    return i => {
      let t = cache[i];
      if (t === undefined) {
        const words = [];
        let v = 0, shift = 0;
        for (let j = starts[i], end = starts[i + 1] - 1; j < end; j++) {
          const b = bytes[j];
          v += (b & 127) * 2 ** shift;
          if (b & 128) { shift += 7; continue; }
          words.push(vocab[v - 1]);
          v = 0; shift = 0;
        }
        t = cache[i] = words.join(" ");
      }
      return t;
    };
  }

  async function loadRecords() {
    const node = document.getElementById("records");
    if (node.type === "application/json") {
      const R = JSON.parse(node.textContent);
      R.textOf = i => R.text[i];
      return R;
    }
    const [head, stream] = await Promise.all([inflate(bytesOf(node)), inflate(bytesOf(document.getElementById("texts")))]);
    const R = JSON.parse(new TextDecoder().decode(head));
    R.textOf = wordDecoder(R.vocab, stream, R.n);
    return R;
  }

  // Offsets in the records count code points (Python's); JavaScript strings count UTF-16 units.
  function unitOffsets(text) {
    if (!/[\uD800-\uDFFF]/.test(text)) return null;
    const map = [0];
    let unit = 0;
    for (const ch of text) { unit += ch.length; map.push(unit); }
    return map;
  }

  function main(meta, R) {
    const app = document.getElementById("app");
    app.textContent = "";
    const n = R.n;
    const F = R.fields;
    // marker colour per (arm, marker), from the arm's experiment
    const colorOf = {};
    for (const a of meta.arms) {
      colorOf[a.name] = Object.fromEntries(meta.experiments[a.experiment].markers.map(m => [m.name, m.color]));
    }
    const presence = R.markers.map(() => new Uint8Array(n));
    for (let i = 0; i < n; i++) {
      const s = R.spans[i];
      for (let k = 0; k < s.length; k += 3) presence[s[k]][i] = 1;
    }
    let lower = null;  // lower-cased texts, built on the first search

    app.append(el("h1", {text: meta.title}));
    for (const e of Object.values(meta.experiments)) {
      const legend = el("p", {class: "legend", "data-experiment": e.name}, `Markers of ${e.name}:`);
      for (const m of e.markers) {
        const sw = el("span", {class: "swatch", "data-marker": m.name, "data-color": m.color});
        sw.style.background = m.color;
        legend.append(sw, el("strong", {text: m.name}), " ", el("code", {text: m.text}));
      }
      app.append(legend);
    }
    if (meta.warnings.length) {
      app.append(el("h2", {text: "Warnings"}), words(meta.warnings.map(w => `- ${w}`).join("\n")));
    }

    // --- per arm: words, table, gates, figures
    for (const a of meta.arms) {
      const sec = el("section", {class: "arm", "data-arm": a.name});
      if (meta.arms.length > 1) sec.append(el("h2", {text: `Arm ${a.name}`}));
      else sec.append(el("h2", {text: "Summary"}));
      sec.append(words(a.experiment_line), el("p", {class: "muted", text: `Setting: ${a.setting}. ${a.pooled}.`}),
        el("div", {class: "confidence"}, words(a.confidence)));
      sec.append(el("h3", {text: "Cells (click a row to read its completions)"}));
      const every = el("input", {type: "checkbox"});
      sec.append(el("label", {class: "muted"}, every, " show every cell (every persona and variant), not only the load-bearing ones"));
      const table = cellTable(a, every);
      sec.append(el("div", {class: "tablewrap"}, table));
      sec.append(words(a.gates));
      if (a.figures.length) {
        sec.append(el("h3", {text: "Figures"}));
        for (const f of a.figures) {
          sec.append(el("figure", {}, el("img", {src: f.src, alt: f.title}),
            el("figcaption", {}, el("strong", {text: f.title}), ` ${f.caption}`)));
        }
      }
      app.append(sec);
    }

    function cellTable(a, every) {
      const t = a.table;
      const table = el("table", {class: "cells", "data-arm": a.name});
      const head = el("tr");
      const body = el("tbody");
      let order = t.rows.map((_, i) => i), sortCol = -1, dir = 0;
      t.columns.forEach((c, j) => {
        const th = el("th", {text: c, title: "sort"});
        th.addEventListener("click", () => {
          dir = sortCol === j ? -dir : 1;
          sortCol = j;
          head.querySelectorAll("th").forEach(x => x.removeAttribute("data-dir"));
          th.setAttribute("data-dir", String(dir));
          order = t.rows.map((_, i) => i).sort((x, y) => dir * compare(t.rows[x].values[j], t.rows[y].values[j]));
          fill();
        });
        head.append(th);
      });
      function compare(x, y) {
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        if (typeof x === "number" && typeof y === "number") return x - y;
        return String(x).localeCompare(String(y), undefined, {numeric: true});
      }
      function fill() {
        body.textContent = "";
        for (const i of order) {
          const r = t.rows[i];
          if (!every.checked && !r.load_bearing) continue;
          const tr = el("tr", {"data-n": String(r.values[5]), title: "show these completions"});
          r.values.forEach((v, j) => {
            const text = r.texts[j] !== null ? r.texts[j] : (v === null ? "n/a" : String(v));
            tr.append(el("td", {class: typeof v === "number" ? "num" : null, text}));
          });
          tr.addEventListener("click", () => showCell(r.cell));
          body.append(tr);
        }
        if (!body.children.length) body.append(el("tr", {}, el("td", {colspan: String(t.columns.length), text: "No cell."})));
      }
      every.addEventListener("change", fill);
      fill();
      table.append(el("thead", {}, head), body);
      return table;
    }

    // --- the completions browser
    const browser = el("section", {id: "browser"});
    browser.append(el("h2", {text: "Completions"}));
    const filters = el("div", {class: "filters"});
    const want = {};      // field -> code, or -1 for any
    const selects = {};
    const LABELS = {finish_reason: "finish", question_id: "question"};
    for (const f of Object.keys(F)) {
      const values = F[f].values;
      if (f === "arm" && values.length < 2) continue;
      const counts = new Array(values.length).fill(0);
      for (const c of F[f].codes) counts[c]++;
      const sel = el("select", {"data-field": f});
      sel.append(el("option", {value: "-1", text: "any"}));
      values.map((v, i) => i).sort((x, y) => String(values[x]).localeCompare(String(values[y]), undefined, {numeric: true}))
        .forEach(i => sel.append(el("option", {value: String(i), text: `${values[i] === null ? "none" : values[i]} (${counts[i]})`})));
      sel.addEventListener("change", () => { want[f] = Number(sel.value); update(); });
      want[f] = -1;
      selects[f] = sel;
      filters.append(el("label", {}, LABELS[f] || f, sel));
    }
    const markerWant = R.markers.map(() => 0);  // 0 any, 1 present, 2 absent
    const markerSelects = R.markers.map((m, k) => {
      const sel = el("select", {"data-marker": m});
      for (const [v, label] of [["0", "any"], ["1", "present"], ["2", "absent"]]) sel.append(el("option", {value: v, text: label}));
      sel.addEventListener("change", () => { markerWant[k] = Number(sel.value); update(); });
      filters.append(el("label", {}, `marker ${m}`, sel));
      return sel;
    });
    const search = el("input", {type: "search", placeholder: "text contains\u2026", id: "search"});
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 200); });
    filters.append(el("label", {}, "search", search));
    const reset = el("button", {type: "button", text: "clear filters"});
    reset.addEventListener("click", () => { clearFilters(); update(); });
    filters.append(reset);
    browser.append(filters);

    const status = el("div", {class: "status"});
    const count = el("b", {id: "count"});
    const perMarker = el("span", {class: "muted"});
    status.append(count, ` of ${n.toLocaleString("en")} completions match`, perMarker);
    const pager = el("div", {class: "pager"});
    const prev = el("button", {type: "button", text: "\u2190 previous"});
    const next = el("button", {type: "button", text: "next \u2192"});
    const where = el("span", {class: "muted"});
    pager.append(prev, next, where);
    const list = el("div", {id: "results"});
    browser.append(status, pager, list);
    app.append(browser);

    let matched = [], page = 0;
    prev.addEventListener("click", () => { if (page > 0) { page--; draw(); } });
    next.addEventListener("click", () => { if ((page + 1) * PAGE_SIZE < matched.length) { page++; draw(); } });

    function clearFilters() {
      for (const f of Object.keys(selects)) { want[f] = -1; selects[f].value = "-1"; }
      markerWant.fill(0);
      markerSelects.forEach(s => { s.value = "0"; });
      search.value = "";
    }

    function showCell(cell) {
      clearFilters();
      for (const [f, v] of Object.entries(cell)) {
        if (!(f in F)) continue;
        if (!(f in selects)) continue;  // the arm of a one-arm report
        const code = F[f].values.indexOf(v);
        want[f] = code < 0 ? -2 : code;  // a value no record has: nothing matches
        selects[f].value = String(code);
      }
      update();
      browser.scrollIntoView();
    }

    let updates = 0;
    function update() {
      const began = performance.now();
      const q = search.value.trim().toLowerCase();
      if (q && lower === null) {
        lower = new Array(n);
        for (let i = 0; i < n; i++) lower[i] = R.textOf(i).toLowerCase();
      }
      const active = Object.keys(want).filter(f => want[f] !== -1);
      const mk = markerWant.map((w, k) => [w, k]).filter(([w]) => w);
      matched = [];
      const hits = R.markers.map(() => 0);
      outer: for (let i = 0; i < n; i++) {
        for (const f of active) if (F[f].codes[i] !== want[f]) continue outer;
        for (const [w, k] of mk) if ((presence[k][i] === 1) !== (w === 1)) continue outer;
        if (q && !lower[i].includes(q)) continue;
        matched.push(i);
        for (let k = 0; k < hits.length; k++) hits[k] += presence[k][i];
      }
      count.textContent = String(matched.length);
      perMarker.textContent = R.markers.length ? ` (with marker ${R.markers.map((m, k) => `${m}: ${hits[k]}`).join(", ")})` : "";
      page = 0;
      draw();
      // for bench/bench_html.py: how long this filter took, and how many have run
      document.body.setAttribute("data-update-ms", (performance.now() - began).toFixed(1));
      document.body.setAttribute("data-updates", String(++updates));
    }

    function value(f, i) { return F[f].values[F[f].codes[i]]; }

    function card(i) {
      const text = R.textOf(i);
      const arm = value("arm", i);
      const colors = colorOf[arm] || {};
      const head = el("div", {class: "head"});
      const bits = [["pair", value("pair", i)], ["condition", value("condition", i)], ["role", value("role", i)],
        ["persona", value("persona", i)], ["variant", value("variant", i)], ["split", value("split", i)],
        ["question", value("question_id", i)], ["sample", R.sample[i]], [R.replicate_key, value(R.replicate_key, i)],
        ["run", value("run", i)]];
      if (meta.arms.length > 1) bits.unshift(["arm", arm]);
      bits.forEach(([k, v], j) => { if (j) head.append(" \u00b7 "); head.append(`${k} `, el("b", {text: v === null ? "none" : String(v)})); });
      const fin = value("finish_reason", i);
      head.append(" \u00b7 ", el("span", {class: fin === "length" ? "cut" : null, text: fin === "length" ? "cut at max_tokens" : `finished (${fin})`}),
        ` \u00b7 ${R.n_tokens[i]} tokens, ${[...text].length} characters`);
      const box = el("div", {class: "completion", "data-index": String(i)}, head);
      const qt = meta.questions[value("question_id", i)];
      if (qt) box.append(el("div", {class: "question", text: `Q: ${qt}`}));
      const s = R.spans[i];
      const spans = [];
      for (let k = 0; k < s.length; k += 3) spans.push([R.markers[s[k]], s[k + 1], s[k + 2]]);
      spans.sort((x, y) => x[1] - y[1] || y[2] - x[2]);
      box.append(el("div", {class: "muted", text: spans.length ? "markers: " + spans.map(([m, a, b]) => `${m} at ${a}\u2013${b}`).join(", ") : "no marker"}));
      const body = el("div", {class: "text"});
      const map = unitOffsets(text);
      const u = p => (map ? map[p] : p);
      let pos = 0, lastMark = null;
      for (const [m, a, b] of spans) {
        const ua = u(a), ub = u(b);
        if (ua < pos) {  // overlaps the previous highlight: named in its tooltip
          if (lastMark) lastMark.title += `; also ${m} at ${a}\u2013${b}`;
          continue;
        }
        if (ua > pos) body.append(document.createTextNode(text.slice(pos, ua)));
        const mark = el("mark", {class: "marker", "data-marker": m, "data-label": m, "data-color": colors[m] || "#888",
          title: `${m} at ${a}\u2013${b}`, text: text.slice(ua, ub)});
        mark.style.setProperty("--c", colors[m] || "#888");
        body.append(mark);
        lastMark = mark;
        pos = ub;
      }
      if (pos < text.length) body.append(document.createTextNode(text.slice(pos)));
      box.append(body);
      return box;
    }

    function draw() {
      list.textContent = "";
      const start = page * PAGE_SIZE, end = Math.min(matched.length, start + PAGE_SIZE);
      for (let j = start; j < end; j++) list.append(card(matched[j]));
      where.textContent = matched.length ? ` showing ${start + 1}\u2013${end} of ${matched.length}` : " nothing matches";
      prev.disabled = page === 0;
      next.disabled = end >= matched.length;
    }

    update();
  }

  async function start() {
    try {
      const meta = JSON.parse(document.getElementById("meta").textContent);
      const records = await loadRecords();
      main(meta, records);
      window.markerlabReadyMs = performance.now();
      document.body.setAttribute("data-ready", "1");
    } catch (e) {
      const app = document.getElementById("app");
      app.textContent = "";
      app.append(el("p", {id: "error", text: `report.html could not be shown: ${e && e.message ? e.message : e}`}));
      document.body.setAttribute("data-ready", "error");
      console.error(e);
    }
  }
  start();
})();
