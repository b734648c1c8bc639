"""``report.html``: the whole report in one self-contained page, every completion browsable.

    write_html(summary, inputs, out)          # out/report.html, from the summary and the records
    embed_json(obj)                           # JSON safe inside <script type="application/json">

The page holds what report.md leads with (each arm's confidence line, the
headline table of its cells, sortable, the gates and verdict in words, the
figures) and a browser over every completion of the report: filters for every
field of a record (arm, pair, condition, seed, persona, role, split, variant,
finish reason), a present/absent filter per marker of the experiment, and a
free-text search; markers are highlighted at the character offsets the
experiment's matcher (markerlab.markers, the one the metrics use) finds, each
labelled by its name in the experiment's colour. Clicking a row of the table
filters the browser to that cell, and the count shown is then the cell's n:
records are read exactly as analysis.records counts them (a base-floor draw
that several runs repeat is shown once).

Self-contained: no network, no CDN; it opens from ``file://``. The figures are
embedded as data URIs, the script and style inline (``report_page.js`` and
``report_page.css`` beside this module). Data is embedded as JSON with ``<``,
``>``, ``&`` and U+2028/U+2029 escaped (``embed_json``), so no completion text can
close the script element; above ``COMPRESS_ABOVE`` characters of text the texts
are word-coded (``word_code``: a vocabulary and a stream of indices) and both
blocks gzipped and base64-encoded, which the page inflates with the browser's
``DecompressionStream`` (17,160 completions of 600 tokens: about 11 MB,
docs/benchmarks.md). The page builds every element from text (``textContent``),
never from HTML strings, so a completion that contains markup
is shown as the characters it is.

Colours: marker k of an experiment (in the file's declaration order) gets
``MARKER_COLORS[k]``, so the colours follow the experiment and a new marker
gets one without an edit here.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np

from analysis.arms import arm_id
from analysis.gates import load_bearing
from analysis.page import FIGURES, captions, confidence_line, experiment_line, figure_titles, gates_section
from analysis.records import KEY_FIELDS, Input, read_records
from analysis.summary import arm_view, experiment_of
from analysis.table import firsts, order_of, rate_columns
from analysis.text import pct_ci
from markerlab.experiment import REPLICATE_KEY, pair_key
from markerlab.io import atomic_write_text
from markerlab.markers import Matcher

__all__ = ["COMPRESS_ABOVE", "MARKER_COLORS", "embed_json", "marker_colors", "page_data", "records_data",
           "render_html", "word_code", "word_decode", "write_html"]

MARKER_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
# Texts of more than this many characters in all are word-coded and gzipped (and base64-encoded) in the page.
COMPRESS_ABOVE = 1 << 20
# The record fields the browser filters on, each stored once per distinct value.
CATEGORICAL = ("arm", "pair", "condition", "persona", "role", "split", "variant", "finish_reason", "question_id",
               "run", REPLICATE_KEY)
# word_code turns this many texts at a time into varints (bounds its arrays' memory).
WORD_CODE_CHUNK = 2048
ASSETS = Path(__file__).parent
_JSON_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def embed_json(obj) -> str:
    """``obj`` as JSON that can sit inside a ``<script>`` element: ``<``, ``>``, ``&`` and the line
    separators U+2028/U+2029 are written as ``\\u`` escapes (outside strings JSON has none of them),
    so no string in it can close the element or open a comment; ``JSON.parse`` reads it back unchanged."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, escaped in _JSON_ESCAPES:
        text = text.replace(ch, escaped)
    return text


def marker_colors(experiment: dict) -> dict[str, str]:
    """marker name -> colour, by the experiment's declaration order of its markers."""
    return {m: MARKER_COLORS[k % len(MARKER_COLORS)] for k, m in enumerate(experiment["markers"])}


# --- the records ----------------------------------------------------------------------------


def records_data(summary: dict, inputs: list[Input]) -> dict:
    """Every completion of the report, columnar: categorical fields as codes into their distinct
    values, texts, and each record's marker spans (marker index, start, end in code points of the
    text, as markerlab.markers reports them). Read as analysis.records.load reads them: a base-floor
    draw repeated by several runs is kept once, so the browser's counts are the cells' n."""
    arms = {arm_id(a["setting"]): a for a in summary["arms"]}
    matchers: dict[str, Matcher] = {}
    markers: list[str] = []
    values: dict[str, dict] = {f: {} for f in CATEGORICAL}
    codes: dict[str, list[int]] = {f: [] for f in CATEGORICAL}
    sample, n_tokens, texts, spans = [], [], [], []
    base_draws: dict[tuple, str] = {}
    for inp in inputs:
        for rec, where in read_records(inp.path):
            setting = rec["setting"]
            aid = arm_id(setting)
            entry = arms.get(aid)
            if entry is None:
                continue  # cannot happen for the inputs the summary was made from
            if rec["variant"] == "base":
                draw = (aid,) + tuple(rec[f] for f in KEY_FIELDS if f != "run")
                if base_draws.get(draw) == rec["text"]:
                    continue
                base_draws.setdefault(draw, rec["text"])
            key = entry["experiment"]
            matcher = matchers.get(key)
            if matcher is None:
                exp = summary["experiments"][key]
                matcher = matchers[key] = Matcher(exp["markers"], [tuple(p) for p in exp["marker_pairs"]])
                markers += [m for m in exp["markers"] if m not in markers]
            row = {**rec, "arm": entry["name"], REPLICATE_KEY: setting.get(REPLICATE_KEY)}
            for f in CATEGORICAL:
                v = row[f]
                codes[f].append(values[f].setdefault(v, len(values[f])))
            sample.append(rec["sample"])
            n_tokens.append(rec["n_tokens"])
            text = rec["text"]
            texts.append(text)
            m = matcher.match(text)
            flat = []
            for name, ss in m.spans.items():
                k = markers.index(name)
                for s, e in ss:
                    flat += [k, s, e]
            spans.append(flat)
    return {"n": len(texts), "markers": markers, "replicate_key": REPLICATE_KEY,
            "fields": {f: {"values": list(values[f]), "codes": codes[f]} for f in CATEGORICAL},
            "sample": sample, "n_tokens": n_tokens, "text": texts, "spans": spans}


# --- what the page says -----------------------------------------------------------------------


def _figures(s: dict, out: Path, entry: dict) -> list[dict]:
    titles, caps = figure_titles(experiment_of(s)), captions(s)
    found = []
    for i, name in enumerate(FIGURES, 1):
        png = out / entry.get("dir", ".") / "figures" / f"{name}.png"
        if png.is_file():
            found.append({"title": f"Figure {i}. {titles[name]}", "caption": caps[name],
                          "src": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")})
    return found


def _table(s: dict) -> dict:
    """The arm's cells as rows: what identifies the cell (its filter), its counts and rates (text and value)."""
    exp = experiment_of(s)
    counts = [f"n_{x}" for x in firsts(exp)]
    stats = rate_columns(exp)
    lb = {id(c) for c in load_bearing(s["cells"], exp)}
    rows = []
    for c in sorted(s["cells"], key=order_of(exp)):
        rows.append({
            "cell": {"arm": s["arms"][0]["name"], "pair": c["pair"], "condition": c["condition"],
                     "persona": c["persona"], "variant": c["variant"]},
            "load_bearing": id(c) in lb,
            "values": [c["pair"], c["condition"], c["role"], c["persona"], c["variant"], c["n"],
                       *(c.get(k) for k in counts), *(c.get(st) for st in stats)],
            "texts": [None] * (6 + len(counts)) + [pct_ci(c.get(st), c.get(f"{st}_ci"), c.get(f"{st}_wilson"))
                                                   for st in stats]})
    return {"columns": ["pair", "cond", "role", "persona", "variant", "n", *counts,
                        *(f"{st} [95% CI]" for st in stats)], "rows": rows}


def page_data(summary: dict, out: Path, questions: dict[str, str] | None = None) -> dict:
    """Everything the page shows except the records: per arm its words, table and figures, and per
    experiment its markers (text and colour), in the order the files declare them."""
    out = Path(out)
    arms = []
    for entry in summary["arms"]:
        s = arm_view(summary, entry["name"])
        arms.append({"name": entry["name"], "experiment": entry["experiment"], "setting": entry["setting_text"],
                     "pooled": entry["pooled"], "experiment_line": experiment_line(s),
                     "confidence": confidence_line(entry), "gates": gates_section(s, "###"),
                     "table": _table(s), "figures": _figures(s, out, entry)})
    experiments = {key: {"name": e["name"], "description": e["description"],
                         "markers": [{"name": m, "text": t, "color": marker_colors(e)[m]}
                                     for m, t in e["markers"].items()],
                         "pairs": e["pairs"], "headline": e["headline"],
                         "pair_keys": [pair_key(x, y) for x, y in e["marker_pairs"]]}
                   for key, e in summary["experiments"].items()}
    return {"title": "markerlab report" + (f": {len(arms)} arms" if len(arms) > 1 else
                                           f": {arms[0]['name'] or arms[0]['experiment']}"),
            "arms": arms, "experiments": experiments, "warnings": summary.get("warnings", []),
            "questions": questions or {}}


def _question_texts(ids) -> dict[str, str]:
    """The texts of the questions markerlab ships, for the ids the records use (others show their id)."""
    from data.questions import all_questions

    known = {q.id: q.text for q in all_questions()}
    return {q: known[q] for q in ids if q in known}


def word_code(texts: list[str]) -> tuple[list[str], bytes]:
    """``texts`` as a vocabulary and one byte stream: each text split at single spaces, each piece written
    as its 1-based index in the vocabulary (most frequent first) as an LEB128 varint, each text ended by
    a 0 byte (no varint of an index >= 1 holds one). Deflate then codes indices instead of letters:
    about a third smaller than the gzipped JSON of the texts (docs/benchmarks.md)."""
    # Text by text, so no list of every word is ever built (a few hundred MB at the protocol's scale).
    counts: Counter = Counter()
    for t in texts:
        counts.update(t.split(" "))
    vocab = [w for w, _ in counts.most_common()]
    index = {w: i for i, w in enumerate(vocab, 1)}
    get = index.__getitem__
    chunks = (texts[k:k + WORD_CODE_CHUNK] for k in range(0, len(texts), WORD_CODE_CHUNK))
    return vocab, b"".join(_varints(np.fromiter(chain.from_iterable(chain(map(get, t.split(" ")), (0,)) for t in part),
                                                dtype=np.uint64)) for part in chunks)


def _varints(ids: np.ndarray) -> bytes:
    """``ids`` as LEB128 varints (7 bits a byte, low bits first, the high bit set on all bytes but the last)."""
    if not len(ids):
        return b""
    width = np.ones(len(ids), dtype=np.uint8)  # bytes per varint
    for k in range(1, 10):
        width += ids >= 1 << (7 * k)
    pos = np.cumsum(width, dtype=np.int64)
    pos -= width
    out = np.zeros(int(pos[-1] + width[-1]), dtype=np.uint8)
    for k in range(int(width.max())):
        on = width > k
        out[pos[on] + k] = (ids[on] & 0x7F).astype(np.uint8) | ((width[on] > k + 1).astype(np.uint8) << 7)
        ids >>= np.uint64(7)
    return out.tobytes()


def word_decode(vocab: list[str], data: bytes) -> list[str]:
    """The inverse of ``word_code``, as the page does it."""
    texts, words, n, shift = [], [], 0, 0
    for b in data:
        n |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
            continue
        if n == 0:
            texts.append(" ".join(words))
            words = []
        else:
            words.append(vocab[n - 1])
        n, shift = 0, 0
    return texts


def _packed(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


def render_html(meta: dict, records: dict, compress: bool | None = None) -> str:
    """The page: ``meta`` (page_data) and ``records`` (records_data) as escaped JSON; where ``compress``
    (default: when the texts are more than COMPRESS_ABOVE characters) the texts are word-coded
    (``word_code``) and both blocks gzipped and base64-encoded."""
    css = (ASSETS / "report_page.css").read_text(encoding="utf-8")
    js = (ASSETS / "report_page.js").read_text(encoding="utf-8")
    for name, text in (("report_page.css", css), ("report_page.js", js)):
        if "</" in text.lower():  # would end the element early
            raise ValueError(f"{name} contains '</'")
    if compress is None:  # the texts are nearly all of it
        compress = sum(map(len, records["text"])) > COMPRESS_ABOVE
    if compress:
        vocab, stream = word_code(records["text"])
        rest = {k: v for k, v in records.items() if k != "text"}
        block = (f'<script type="application/gzip+base64" id="records">'
                 f'{_packed(embed_json({**rest, "vocab": vocab}).encode("utf-8"))}</script>\n'
                 f'<script type="application/gzip+base64" id="texts">{_packed(stream)}</script>')
    else:
        block = f'<script type="application/json" id="records">{embed_json(records)}</script>'
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(meta['title'])}</title>\n<style>\n{css}</style>\n</head>\n<body>\n"
            f'<noscript>This page needs JavaScript to show the report.</noscript>\n'
            f'<div id="app"><p id="loading">Loading {records["n"]:,} completions\u2026</p></div>\n'
            f'<script type="application/json" id="meta">{embed_json(meta)}</script>\n{block}\n'
            f"<script>\n{js}</script>\n</body>\n</html>\n")


def write_html(summary: dict, inputs: list[Input], out: Path, compress: bool | None = None) -> Path:
    """Write ``out/report.html`` for ``summary`` (as analysis.report made it from ``inputs``)."""
    out = Path(out)
    records = records_data(summary, inputs)
    meta = page_data(summary, out, _question_texts(records["fields"]["question_id"]["values"]))
    return atomic_write_text(out / "report.html", render_html(meta, records, compress))
