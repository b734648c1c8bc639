"""``report.md``: the page a researcher reads, rendered from a summary alone.

    render_page(summary)              # one arm: headline, the headline contrast, gates and verdict in words,
                                      # figures, positions, probe, ID vs OOD, sample completions, confidence
    render_sweep_page(summary)        # several arms: the cross-arm table, then each arm's headline and gates
    terminal_summary(summary)         # the few lines a run or a sweep ends with

Everything here reads the summary dict (``summary.json``) and nothing else, so
the page can be rebuilt from a saved ``summary.json``; the sample completions
travel in it, and so does what each experiment says (``summary["experiments"]``:
its markers, headline, checks and the verdict's words), which is where every
label, column and sentence about markers, conditions and roles comes from.
Figures are linked by relative paths (``figures/hero.png``), so the page shows
them wherever the report directory is opened.

Sample completions: per (pair, condition, role), up to three, one per category
(for the headline's marker pair X, Y: "X and Y", "X only", "neither") where the
cell has one; within a category the record whose hash of (seed, run, persona,
question, sample) is smallest is shown (``analysis.records``), so the pick is
reproducible and independent of file order. Long middles are elided around the
markers, which are shown in bold, labelled by name with their character offsets
in the original completion.
"""

from __future__ import annotations

import re

from analysis.gates import CONFIDENCE_RULE, check_words, heterogeneity_words, load_bearing
from analysis.metrics import PROBE, ROLE_ORDER, condition_rank
from analysis.summary import arm_view, experiment_of
from analysis.table import firsts, rate, rate_columns, verdict_legend, wilson_note
from analysis.text import NA, bootstrap_words, chars, markdown, pct, pct_ci, pp_ci, yes_no
from markerlab.experiment import pair_key

FIGURES = ("hero", "bystander", "position", "per_persona")
# Sample excerpts: characters kept at the start, at the end, and around each marker.
HEAD_CHARS, TAIL_CHARS, AROUND_CHARS = 200, 160, 80
# A gap shorter than this is shown rather than elided.
MIN_ELIDED = 40


def figure_titles(exp: dict) -> dict[str, str]:
    """The figures' titles, in the experiment's words."""
    h = exp["headline"]
    pair = h.get("pair")
    moving = pair[1] if pair else h["metric"]
    return {
        "hero": f"{h['metric']} by pair, condition and role",
        "bystander": f"Marker {moving} spreading to other personas ({h['treatment']} minus {h['control']})"
        if pair else f"{h['metric']} per persona ({h['treatment']} minus {h['control']})",
        "position": "Where the second marker of each pair sits",
        "per_persona": "Marker rates per persona",
    }


# --- words -------------------------------------------------------------------------------


def sanity_words(sanity: list[dict], pair: str) -> str:
    """A pair's sanity gates: the count, then each check with its value, one line each."""
    gs = [g for g in sanity if g["pair"] == pair]
    passed = sum(g["passed"] is True for g in gs)
    failed = sum(g["passed"] is False for g in gs)
    undecided = sum(g["passed"] is None for g in gs)
    head = f"{passed} of {len(gs)} passed" + (f", {failed} failed" if failed else "") + \
        (f", {undecided} undecided" if undecided else "") + "."
    return head + "".join(f"\n  - {check_words(g)}" for g in gs)


def verdict_line(g: dict, exp: dict) -> str:
    """One pair's verdict: the headline contrast, the outcome in the experiment's words, each leg."""
    h = exp["headline"]
    t, c = h["treatment"], h["control"]
    head = f"**{g['pair']}** ({h['role']} {g.get('persona') or NA})"
    contrast = (f"{h['metric']} {pct(g.get(t))} in {t} vs {pct(g.get(c))} in {c}, change"
                f" {pp_ci(g.get('delta'), g.get('ci'))}")
    if g["outcome"] is None:
        outcome = f"**undecided** ({g.get('note') or 'not enough data'})"
    else:
        outcome = f"**{g['says']}**"
    legs = []
    for leg in g["legs"]:
        checks = "; ".join(check_words(x) for x in leg["checks"])
        says = f" ({leg['says']})" if leg["says"] else ""
        legs.append(f"{leg['name']}{says}: {yes_no(leg['passed'])} [{checks}]")
    tags = f" Tags: {', '.join(g['tags'])}." if g.get("tags") else ""
    return f"{head}: {contrast}: {outcome}. " + "; ".join(legs) + "." + tags


def confidence_line(entry: dict) -> str:
    c = entry["confidence"]
    return f"**Confidence: {c['level']}** ({'; '.join(c['reasons'])})."


# --- captions ----------------------------------------------------------------------------


def _find(cells: list[dict], pair: str, condition: str, persona: str | None) -> dict | None:
    return next((c for c in cells if c["variant"] == "plain" and c["pair"] == pair
                 and c["condition"] == condition and c["persona"] == persona), None)


def captions(s: dict) -> dict[str, str]:
    """One sentence per figure, from the numbers it shows."""
    exp = experiment_of(s)
    h = exp["headline"]
    metric, t_name, c_name = h["metric"], h["treatment"], h["control"]
    pair_xy = h.get("pair")
    den = f"n_{pair_xy[0]}" if pair_xy and metric.startswith("cond_") else "n"
    cells, personas = s["cells"], s.get("personas", {})
    parts = []
    for pair in personas:
        p = personas[pair]
        who = p.get(h["role"]) if h["role"] in ("donor", "recipient") else None
        main_t = _find(cells, pair, t_name, who)
        main_c = _find(cells, pair, c_name, who)
        don_t = _find(cells, pair, t_name, p.get("donor"))
        bits = []
        if main_t is not None:
            bits.append(f"the {h['role']} {who} has {metric} {pct(main_t.get(metric))} in {t_name}"
                        f" ({den}={main_t[den]})"
                        + (f" vs {pct(main_c.get(metric))} in {c_name} ({den}={main_c[den]})" if main_c else ""))
        if don_t is not None and who != p.get("donor"):
            bits.append(f"the donor {p['donor']} {pct(don_t.get(metric))}")
        if bits:
            parts.append(f"{pair}: " + ", ".join(bits))
    hero = ("In " + "; in ".join(parts) + ".") if parts else f"No plain cells of the {h['role']}."

    moving = f"fire_{pair_xy[1]}" if pair_xy else metric
    moved = [d for d in s["deltas"] if d["statistic"] == moving and d["delta"] is not None and d["role"] != "donor"]
    if moved:
        top = max(moved, key=lambda d: (abs(d["delta"]), d["pair"], d["persona"]))
        bystander = (f"The largest change in {moving} outside the donors is {top['pair']} {top['persona']}"
                     f" ({top['role']}), {pp_ci(top['delta'], top['ci'])} from {c_name} to {t_name}"
                     f" (of {len(moved)} personas compared).")
    else:
        bystander = f"No persona has both a {t_name} and a {c_name} cell, so each condition's {moving} is shown as is."

    position = []
    for x, y in exp["marker_pairs"]:
        xy = pair_key(x, y)
        shown = [c for c in cells if c["variant"] == "plain" and c[f"n_{y}"] > 0 and c["positions"][xy]["shown"]]
        n_y = sum(c[f"n_{y}"] for c in shown)
        if not n_y:
            position.append(f"No plain cell shows where {y} sits relative to {x}.")
            continue
        n_suffix = sum(c["positions"][xy]["n_suffix"] for c in shown)
        n_chunk = sum(c["positions"][xy]["n_chunk"] for c in shown)
        donors = [tp for tp in s.get("training_positions", []) if tp["role"] == "donor" and tp.get(f"n_{y}")]
        train = ""
        if donors:
            tn = sum(tp[f"n_{y}"] for tp in donors)
            ts = sum((tp.get("pairs", {}).get(xy) or {}).get("n_suffix", 0) for tp in donors)
            tc = sum((tp.get("pairs", {}).get(xy) or {}).get("n_chunk", 0) for tp in donors)
            train = f" (the donors' training answers: {pct(ts / tn)} and {pct(tc / tn)})"
        position.append(f"Of the {n_y} plain completions with {y} in {len(shown)} cells, {pct(n_suffix / n_y)}"
                        f" end with it (last 50 characters) and {pct(n_chunk / n_y)} have it within 150 characters"
                        f" after {x}{train}.")

    per = []
    for pair in personas:
        ts = [c for c in cells if c["variant"] == "plain" and c["pair"] == pair and c["condition"] == t_name]
        if ts:
            fired = ", ".join(f"{m} in {sum(1 for c in ts if c[f'n_{m}'] > 0)}" for m in exp["trained_markers"])
            per.append(f"{pair} {t_name} has marker {fired} of {len(ts)} personas")
    per_persona = ("; ".join(per) + ".") if per else f"No {t_name} cells."
    return {"hero": hero, "bystander": bystander, "position": " ".join(position), "per_persona": per_persona}


# --- samples -----------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Markdown-escape completion text so it renders as the model wrote it."""
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", text)


def _escape_line_start(line: str) -> str:
    # What Markdown would read as a list, a heading rule or a code block at a line's start.
    line = line.lstrip()
    m = re.match(r"^(\d+)([.)])", line)
    if m:
        return f"{m.group(1)}\\{m.group(2)}{line[m.end():]}"
    if line[:1] in ("-", "+", "=", ">"):
        return "\\" + line
    return line


def excerpt_pieces(text: str, spans: dict[str, list]) -> list[tuple[str, str]]:
    """``(kind, text)`` pieces of the shown excerpt: "text", "marker:NAME@start-end" or "elided"."""
    marks = sorted(((s, e, name) for name, ss in spans.items() for s, e in ss), key=lambda x: (x[0], x[1]))
    # Overlapping markers (":: kxr-7 :: kxr-7 ::") are shown as one bold run.
    merged: list[list] = []
    for s, e, name in marks:
        if merged and s < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
            merged[-1][2].append(f"{name}@{s}-{e}")
        else:
            merged.append([s, e, [f"{name}@{s}-{e}"]])
    keep = [(0, min(HEAD_CHARS, len(text))), (max(0, len(text) - TAIL_CHARS), len(text))]
    keep += [(max(0, s - AROUND_CHARS), min(len(text), e + AROUND_CHARS)) for s, e, _ in merged]
    keep.sort()
    windows: list[list[int]] = []
    for s, e in keep:
        if windows and s - windows[-1][1] < MIN_ELIDED:
            windows[-1][1] = max(windows[-1][1], e)
        else:
            windows.append([s, e])
    pieces: list[tuple[str, str]] = []
    pos = 0
    for ws, we in windows:
        if ws > pos:
            pieces.append(("elided", f"{ws - pos:,}"))
        cursor = ws
        for s, e, labels in merged:
            if s >= cursor and e <= we:
                if s > cursor:
                    pieces.append(("text", text[cursor:s]))
                pieces.append((f"marker:{', '.join(labels)}", text[s:e]))
                cursor = e
        if cursor < we:
            pieces.append(("text", text[cursor:we]))
        pos = we
    if pos < len(text):
        pieces.append(("elided", f"{len(text) - pos:,}"))
    return pieces


def render_excerpt(text: str, spans: dict[str, list]) -> str:
    """The excerpt as a Markdown block quote: markers bold with their positions, middles elided."""
    out = []
    for kind, piece in excerpt_pieces(text, spans):
        if kind == "text":
            out.append(_escape(piece))
        elif kind == "elided":
            out.append(f" *[... {piece} characters ...]* ")
        else:
            shown = _escape(" ".join(piece.split()))  # a bold run cannot span lines
            out.append(f"**{shown}**`[{kind.split(':', 1)[1]}]`")
    body = "".join(out).strip("\n")
    lines = [_escape_line_start(line) for line in body.split("\n")]
    return "\n".join(f"> {line}  " if line.strip() else ">" for line in lines) or "> *(empty completion)*"


def _positions(spans: dict[str, list]) -> str:
    parts = [f"{name} at {', '.join(f'{s}-{e}' for s, e in ss)}" for name, ss in spans.items() if ss]
    return "; ".join(parts) if parts else "no marker"


def samples_section(s: dict, level: str = "##") -> str:
    samples = s.get("samples", [])
    if not samples:
        return ""
    exp = experiment_of(s)
    rank = condition_rank(exp["conditions"])
    pair = exp["headline"].get("pair")
    if pair:
        x, y = pair
        categories = [f"{x} and {y}", f"{x} only", "neither"]  # analysis.records.sample_categories
        what = f"one with {x} and {y}, one with {x} only, one with neither"
    else:
        categories = list(dict.fromkeys(x_["category"] for x_ in samples))
        what = "one per category"
    order = {name: i for i, name in enumerate(categories)}
    groups: dict[tuple, list[dict]] = {}
    for x_ in samples:
        groups.setdefault((x_["pair"], x_["condition"], x_["role"]), []).append(x_)
    out = [f"{level} Sample completions\n\nPer pair, condition and role, up to three completions ({what}, where"
           " the cell has one), picked by a seeded hash of each record; every marker in bold, labelled by name"
           " with its character offsets, long middles elided."]
    for (pair_, condition, role) in sorted(groups, key=lambda k: (k[0], rank.get(k[1], 99), k[1],
                                                                   ROLE_ORDER.get(k[2], 9))):
        out.append(f"{level}# {pair_} · {condition} · {role}")
        for x_ in sorted(groups[(pair_, condition, role)], key=lambda x_: order.get(x_["category"], 9)):
            q = f": \"{_escape(x_['question'])}\"" if x_.get("question") else ""
            seed = f", seed {x_['seed']}" if x_.get("seed") is not None else ""
            cut = ", cut at max_tokens" if x_.get("finish_reason") == "length" else ""
            out.append(f"**{x_['category']}**: persona {x_['persona']} ({x_['role']}), question {x_['question_id']}"
                       f" ({x_['split']}){q}; sample {x_['sample']} of run {x_['run']}{seed}{cut};"
                       f" {len(x_['text']):,} characters; {_positions(x_['spans'])}.\n\n"
                       + render_excerpt(x_["text"], x_["spans"]))
    return "\n\n".join(out)


# --- sections ----------------------------------------------------------------------------


def headline_table(s: dict) -> str:
    exp = experiment_of(s)
    lb = load_bearing(s["cells"], exp)
    stats = rate_columns(exp)
    counts = [f"n_{x}" for x in firsts(exp)]
    rows = [[c["pair"], c["condition"], c["role"], c["persona"], c["n"]] + [c[k] for k in counts]
            + [rate(c, st) for st in stats] for c in lb]
    if not rows:
        return "No plain cell of a donor or recipient."
    return markdown(["pair", "cond", "role", "persona", "n", *counts, *(f"{st} [95% CI]" for st in stats)], rows)


def _k_of(c: dict, num: str, den_value: int) -> str:
    return f"{c[num]} of {den_value}"


def contrast_section(s: dict, level: str = "##") -> str:
    """The headline's role in its two conditions, for every declared pair: the conditional and the
    second-without-first rate with their counts, bootstrap CIs and (where asked) Wilson intervals."""
    exp = experiment_of(s)
    h = exp["headline"]
    t, c = h["treatment"], h["control"]
    rank = condition_rank(exp["conditions"])
    personas = s.get("personas", {})
    rows = []
    header = ["pair", "cond", "persona", "n"]
    for x, y in exp["marker_pairs"]:
        header += [f"n_{x}", f"cond_{y}_given_{x}", f"{y}_given_not_{x}"]
    if not exp["marker_pairs"]:
        header.append(h["metric"])
    for pair in personas:
        if h["role"] in ("donor", "recipient"):
            who = [personas[pair][h["role"]]]
        else:
            who = sorted({x["persona"] for x in s["cells"] if x["pair"] == pair and x["role"] == h["role"]})
        cells = [x for x in s["cells"] if x["variant"] == "plain" and x["pair"] == pair and x["persona"] in who
                 and x["condition"] in (t, c)]
        for cell in sorted(cells, key=lambda x: (rank.get(x["condition"], 99), x["persona"])):
            row = [pair, cell["condition"], cell["persona"], cell["n"]]
            for x, y in exp["marker_pairs"]:
                n_x = cell[f"n_{x}"]
                row += [n_x, f"{_k_of(cell, f'n_{pair_key(x, y)}', n_x)}: {rate(cell, f'cond_{y}_given_{x}')}",
                        f"{_k_of(cell, f'n_{y}_not_{x}', cell['n'] - n_x)}: {rate(cell, f'{y}_given_not_{x}')}"]
            if not exp["marker_pairs"]:
                row.append(rate(cell, h["metric"]))
            rows.append(row)
    lines = [f"- **{g['pair']}**: {h['metric']} {t} - {c} {pp_ci(g.get('delta'), g.get('ci'))}"
             + (f" ({g['note']})" if g.get("note") else "") for g in s.get("headline", [])]
    table = markdown(header, rows) if rows else f"No plain {t} or {c} cell of the {h['role']}."
    return (f"{level} The headline contrast: the {h['role']} in {t} and in {c}\n\nCounts are completions"
            f" (k of the denominator); brackets are 95% bootstrap CIs.{wilson_note(exp)}\n\n{table}\n\n"
            + "\n".join(lines))


def gates_section(s: dict, level: str = "##") -> str:
    exp = experiment_of(s)
    parts = [f"{level} Gates"]
    if exp["verdict"] is not None:
        lines = "\n".join(f"- {verdict_line(g, exp)}" for g in s["verdicts"]) or "- no pair to test"
        parts.append(f"**Verdict: {exp['verdict']['name']}** (per pair):\n\n{lines}\n\n{verdict_legend(exp)}")
    else:
        parts.append(f"Experiment {exp['name']} has no verdict rule: its sanity gates are recorded below.")
    pairs = list(dict.fromkeys(g["pair"] for g in s["sanity"]))
    sanity = "\n".join(f"- **{p}**: {sanity_words(s['sanity'], p)}" for p in pairs) or "- no check"
    parts.append(f"**Sanity** (the experiment's checks per pair, recorded, not enforced; \"lo\"/\"hi\" read a"
                 f" bound of the 95% CI):\n\n{sanity}")
    return "\n\n".join(parts)


def figures_section(s: dict, level: str = "##") -> str:
    caps = captions(s)
    titles = figure_titles(experiment_of(s))
    out = [f"{level} Figures"]
    for i, name in enumerate(FIGURES, 1):
        out.append(f"![{titles[name]}](figures/{name}.png)\n\n*Figure {i}. {titles[name]}."
                   f" {caps[name]}* ([PDF](figures/{name}.pdf))")
    return "\n\n".join(out)


def _training(c: dict, xy: str, y: str) -> list:
    t = c.get("training_positions")
    if t is None:
        src = c.get("training_positions_source") or "unavailable"
        return ["not trained" if src.startswith("not trained") else "unavailable"] + [""] * 3
    p = (t.get("pairs") or {}).get(xy) or {}
    return [t.get(f"n_{y}", 0), pct(p.get("suffix_frac")), pct(p.get("chunk_frac")), chars(p.get("median_gap"))]


def positions_section(s: dict, level: str = "##") -> str:
    exp = experiment_of(s)
    rank = condition_rank(exp["conditions"])
    out = []
    for x, y in exp["marker_pairs"]:
        xy = pair_key(x, y)
        cells = [c for c in s["cells"] if c["variant"] == "plain" and c["positions"][xy]["shown"]
                 and (c[f"n_{y}"] > 0 or c.get("load_bearing"))]
        cells.sort(key=lambda c: (c["pair"], rank.get(c["condition"], 99), ROLE_ORDER.get(c["role"], 9),
                                  c["persona"]))
        floor = exp.get("positions_min_joint") or 0
        head = (f"{level} Where marker {y} sits relative to {x}, beside the training data\n\nsuffix_frac: the last"
                f" {y} ends within 50 characters of the end; chunk_frac: a {y} starts at most 150 characters after"
                f" the first {x} ends; among completions with {y}. Median gap: characters from the end of the first"
                f" {x} to the first {y} after it. The training columns are the same numbers on the role's own"
                " training answers." + (f" Shown for cells whose joint rate of {x} and {y} is at least {pct(floor)}."
                                        if floor else ""))
        if not cells:
            out.append(head + (f"\n\nNo plain cell has {y} with a joint rate of at least {pct(floor)}." if floor
                               else f"\n\nMarker {y} never fired in a plain cell."))
            continue
        rows = [[c["pair"], c["condition"], c["role"], c["persona"], c[f"n_{y}"],
                 pct_ci(c["positions"][xy]["suffix_frac"], c["positions"][xy]["suffix_frac_ci"]),
                 pct_ci(c["positions"][xy]["chunk_frac"], c["positions"][xy]["chunk_frac_ci"]),
                 chars(c["positions"][xy]["median_gap"])] + _training(c, xy, y) for c in cells]
        table = markdown(["pair", "cond", "role", "persona", f"n_{y}", "suffix_frac", "chunk_frac",
                          f"median {x}-to-{y}", f"training n_{y}", "training suffix_frac", "training chunk_frac",
                          f"training median {x}-to-{y}"], rows)
        note = ""
        if all(c.get("training_positions") is None and not str(c.get("training_positions_source", "")).startswith(
                "not trained") for c in cells):
            note = ("\n\nThe training-data baseline is unavailable: the report was given bare .jsonl files (or run"
                    " directories without data/stats.json or data/train.jsonl); pass run directories to see it.")
        out.append(f"{head}\n\n{table}{note}")
    return "\n\n".join(out) if out else f"{level} Positions\n\nThe experiment declares no marker pair."


def probe_section(s: dict, level: str = "##") -> str:
    exp = experiment_of(s)
    probe = exp.get("probe_marker")
    probes = [c for c in s["cells"] if c["variant"] == PROBE]
    if not probes or not probe:
        return f"{level} Probe\n\nNo probe records (eval.probe = false, or the experiment has no probe marker)."
    rank = condition_rank(exp["conditions"])
    lines = [f"- {c['pair']} {c['condition']} {c['role']} {c['persona']}: the probe marker is echoed in"
             f" {pct_ci(c.get(f'fire_{probe}'), c.get(f'fire_{probe}_ci'))} of {c['n']} completions; "
             + ", ".join(f"marker {m} {pct(c.get(f'fire_{m}'))}" for m in exp["trained_markers"]) + "."
             for c in sorted(probes, key=lambda c: (c["pair"], rank.get(c["condition"], 99)))]
    return (f"{level} Probe\n\nThe {exp['probe_role']} with its user message prefixed by the probe marker"
            f" `{exp['markers'][probe]}`; the echo rate is the share of completions that repeat the probe"
            " marker.\n\n" + "\n".join(lines))


def id_ood_section(s: dict, level: str = "##") -> str:
    entry = s["arms"][0]
    exp = experiment_of(s)
    stat = exp["headline"]["metric"]
    pair = exp["headline"].get("pair")
    den = f"n_{pair[0]}" if pair and stat.startswith("cond_") else "n"

    def split_cell(x):
        return f"{pct_ci(x.get(stat), x.get(f'{stat}_ci'))} ({den}={x.get(den)} of {x['n']})"

    rows = [[r["pair"], r["condition"], r["role"], r["persona"], split_cell(r["id"]), split_cell(r["ood"]),
             NA if r["diff"] is None else f"{100 * r['diff']:+.1f} pp"] for r in s.get("id_ood", [])]
    table = markdown(["pair", "cond", "role", "persona", f"ID {stat} [95% CI]", f"OOD {stat} [95% CI]", "ID - OOD"],
                     rows) if rows else "No load-bearing cells."
    return (f"{level} In-distribution vs out-of-distribution questions\n\n{table}\n\n"
            f"{heterogeneity_words(entry['heterogeneity'])}")


def experiment_line(s: dict) -> str:
    exp = experiment_of(s)
    desc = f" {' '.join(exp['description'].split())}" if exp.get("description") else ""
    return f"Experiment **{exp['name']}** ({exp['path']}, digest {exp['digest']}).{desc}"


def render_page(summary: dict) -> str:
    """The whole ``report.md`` of one arm."""
    s = summary
    entry = s["arms"][0]
    b = s["bootstrap"]
    exp = experiment_of(s)
    title = "# markerlab report" + (f": {entry['name']}" if entry["name"] else f": {exp['name']}")
    intro = (f"Setting: {entry['setting_text']}. {entry['pooled']}. Rates use the loose match (case-insensitive,"
             f" whitespace runs collapsed); brackets are {round(100 * b['level'])}% percentile bootstrap CIs"
             f" ({b.get('unit', 'question')} resampled, {bootstrap_words(b)}); n/a = undefined."
             + wilson_note(exp))
    moving = exp["headline"]["pair"][1] if exp["headline"].get("pair") else exp["headline"]["metric"]
    parts = [title, experiment_line(s), intro, confidence_line(entry),
             "## Headline: the load-bearing cells\n\nThe donor and the recipient in every condition, and any other"
             f" persona whose marker {moving} rate in {exp['headline']['treatment']} has a 95% CI above 0.\n\n"
             + headline_table(s),
             contrast_section(s), gates_section(s), figures_section(s), positions_section(s), probe_section(s),
             id_ood_section(s)]
    samples = samples_section(s)
    if samples:
        parts.append(samples)
    parts.append(f"## How the confidence line is decided\n\n{CONFIDENCE_RULE}")
    parts.append("## Files\n\n[summary.json](summary.json) (every number), [table.md](table.md) (every cell),"
                 " [figures/](figures/).")
    if s.get("warnings"):
        parts.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in s["warnings"]))
    return "\n\n".join(parts) + "\n"


def render_sweep_page(summary: dict) -> str:
    """The ``report.md`` of several arms: the cross-arm table first, then each arm in short."""
    from analysis.table import cross_arm_table

    arms = summary["arms"]
    b = summary["bootstrap"]
    names = ", ".join(summary["experiments"])
    parts = [f"# markerlab report: {len(arms)} arms",
             f"Each arm is one setting of the adapters' training under one experiment ({names}); arms are never"
             f" pooled. Runs of an arm that differ only in seed are replicates. Brackets are"
             f" {round(100 * b['level'])}% percentile bootstrap CIs ({bootstrap_words(b)}).",
             "\n".join(f"- **{a['name']}** ({a['experiment']}; {a['pooled']}): confidence"
                       f" {a['confidence']['level']}; [full report]({a['dir']}/report.md)" for a in arms),
             "## Across arms: each arm's headline contrast\n\n" + cross_arm_table(summary)]
    for a in arms:
        s = arm_view(summary, a["name"])
        parts += [f"## Arm {a['name']}", experiment_line(s), f"Setting: {a['setting_text']}.", confidence_line(a),
                  "### Headline: the load-bearing cells\n\n" + headline_table(s), gates_section(s, "###"),
                  f"Figures, positions, probe, ID vs OOD and sample completions: [{a['dir']}/report.md]"
                  f"({a['dir']}/report.md)."]
    parts.append(f"## How the confidence line is decided\n\n{CONFIDENCE_RULE}")
    if summary.get("warnings"):
        parts.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in summary["warnings"]))
    return "\n\n".join(parts) + "\n"


# --- the terminal -------------------------------------------------------------------------

MAX_TERMINAL_ARMS = 6


def terminal_summary(summary: dict) -> str:
    """The few lines a run or a sweep ends with (under 25): per arm its experiment, the confidence
    and the sanity count, per pair the headline contrast with its CI and the verdict in words, then
    the path to report.md."""
    arms = summary["arms"]
    lines = []
    for a in arms[:MAX_TERMINAL_ARMS]:
        s = arm_view(summary, a["name"])
        exp = experiment_of(s)
        h = exp["headline"]
        n_pass = sum(g["passed"] is True for g in s["sanity"])
        lines.append(f"{a['name'] or 'report'}: confidence {a['confidence']['level']};"
                     f" sanity gates {n_pass} of {len(s['sanity'])} passed; experiment {exp['name']}")
        verdicts = {g["pair"]: g for g in s["verdicts"]}
        for g in s["headline"]:
            v = verdicts.get(g["pair"])
            said = "" if v is None else f": {v['says'] if v['outcome'] is not None else 'verdict undecided'}"
            lines.append(f"  {g['pair']} {h['role']} {g.get('persona') or NA}: {h['metric']}"
                         f" {h['treatment']} - {h['control']} {pp_ci(g.get('delta'), g.get('ci'))}{said}")
    if len(arms) > MAX_TERMINAL_ARMS:
        lines.append(f"... and {len(arms) - MAX_TERMINAL_ARMS} more arms (see report.md)")
    report = summary.get("outputs", {}).get("report")
    if report:
        lines.append(f"report: {report}")
    return "\n".join(lines)
