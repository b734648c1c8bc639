"""``report.md``: the page a researcher reads, rendered from a summary alone.

    render_page(summary)              # one arm: headline, gates in words, figures, positions, probe,
                                      # ID vs OOD, sample completions, confidence
    render_sweep_page(summary)        # several arms: the cross-arm table, then each arm's headline and gates
    terminal_summary(summary)         # the few lines a run or a sweep ends with

Everything here reads the summary dict (``summary.json``) and nothing else, so
the page can be rebuilt from a saved ``summary.json``; the sample completions
travel in it. Figures are linked by relative paths (``figures/hero.png``), so
the page shows them wherever the report directory is opened.

Sample completions: per (pair, condition, role), up to three, one per category
(A and B, A only, neither) where the cell has one; within a category the
record whose hash of (seed, run, persona, question, sample) is smallest is
shown (``analysis.records``), so the pick is reproducible and independent of
file order. Long middles are elided around the markers, which are shown in
bold with their character offsets in the original completion.
"""

from __future__ import annotations

import re

from analysis.gates import BAND, CONFIDENCE_RULE, falsification_words, heterogeneity_words, load_bearing
from analysis.metrics import CONDITION_ORDER, ROLE_ORDER
from analysis.records import SAMPLE_CATEGORIES
from analysis.summary import arm_view
from analysis.table import NA, chars, markdown, pct, pct_ci, pp_ci

FIGURE_TITLES = {
    "hero": "Marker B given marker A, by pair, condition and role",
    "bystander": "Marker B spreading to other personas (T minus C)",
    "position": "Where marker B sits",
    "per_persona": "Marker rates per persona",
}
# Sample excerpts: characters kept at the start, at the end, and around each marker.
HEAD_CHARS, TAIL_CHARS, AROUND_CHARS = 200, 160, 80
# A gap shorter than this is shown rather than elided.
MIN_ELIDED = 40


# --- words -------------------------------------------------------------------------------


def _cell_name(c: dict) -> str:
    return f"{c['pair']} {c['condition']} {c['role']} {c['persona']}"


def _short_by(g: dict) -> str:
    """How far a sanity gate's value is from its threshold, in percentage points."""
    gap = 100 * abs(g["value"] - g["threshold"])
    if g["passed"]:
        return f"{pct(g['value'])}, {gap:.1f} pp to spare"
    return f"{pct(g['value'])}, {gap:.1f} pp short"


def sanity_words(sanity: list[dict], pair: str) -> str:
    gs = [g for g in sanity if g["pair"] == pair]
    passed = [g for g in gs if g["passed"] is True]
    failed = [g for g in gs if g["passed"] is False]
    undecided = [g for g in gs if g["passed"] is None]
    parts = [f"{len(passed)} of {len(gs)} passed"]
    if failed:
        parts.append("failed: " + "; ".join(f"{g['gate']} ({_short_by(g)})" for g in failed))
    if undecided:
        parts.append("undecided: " + "; ".join(f"{g['gate']} ({g.get('note', 'undefined')})" for g in undecided))
    if passed:
        parts.append("passed: " + "; ".join(f"{g['gate']} ({_short_by(g)})" for g in passed))
    return ". ".join(parts) + "."


def falsification_line(g: dict) -> str:
    head = f"**{g['pair']}** (recipient {g['persona'] or NA})"
    if g["T"] is None and g["C"] is None and g["delta"] is None:
        return f"{head}: {falsification_words(g)}."
    return (f"{head}: cond_B_given_A {pct(g['T'])} in T vs {pct(g['C'])} in C, change"
            f" {pp_ci(g['delta'], g['ci'])}: {falsification_words(g)}.")


def confidence_line(entry: dict) -> str:
    c = entry["confidence"]
    return f"**Confidence: {c['level']}** ({'; '.join(c['reasons'])})."


# --- captions ----------------------------------------------------------------------------


def _find(cells: list[dict], pair: str, condition: str, persona: str | None) -> dict | None:
    return next((c for c in cells if c["variant"] == "plain" and c["pair"] == pair
                 and c["condition"] == condition and c["persona"] == persona), None)


def captions(s: dict) -> dict[str, str]:
    """One sentence per figure, from the numbers it shows."""
    cells, personas = s["cells"], s.get("personas", {})
    parts = []
    for pair in sorted(personas):
        p = personas[pair]
        rec_t = _find(cells, pair, "T", p.get("recipient"))
        rec_c = _find(cells, pair, "C", p.get("recipient"))
        don_t = _find(cells, pair, "T", p.get("donor"))
        bits = []
        if rec_t is not None:
            bits.append(f"the recipient {p['recipient']} gives B after A in {pct(rec_t['cond_B_given_A'])} of"
                        f" its T completions with A (n_A={rec_t['n_A']})"
                        + (f" vs {pct(rec_c['cond_B_given_A'])} in C (n_A={rec_c['n_A']})" if rec_c else ""))
        if don_t is not None:
            bits.append(f"the donor {p['donor']} in {pct(don_t['cond_B_given_A'])}")
        if bits:
            parts.append(f"{pair}: " + ", ".join(bits))
    hero = ("In " + "; in ".join(parts) + ".") if parts else "No plain cells of a donor or recipient."

    fire_b = [d for d in s["deltas"] if d["statistic"] == "fire_B" and d["T_minus_C"] is not None
              and d["role"] != "donor"]
    if fire_b:
        top = max(fire_b, key=lambda d: (abs(d["T_minus_C"]), d["pair"], d["persona"]))
        bystander = (f"The largest change in fire_B outside the donors is {top['pair']} {top['persona']}"
                     f" ({top['role']}), {pp_ci(top['T_minus_C'], top['ci'])} from C to T"
                     f" (of {len(fire_b)} personas compared).")
    else:
        bystander = "No persona has both a T and a C cell, so each condition's fire_B is shown as is."

    with_b = [c for c in cells if c["variant"] == "plain" and c["n_B"] > 0]
    n_b = sum(c["n_B"] for c in with_b)
    if n_b:
        n_suffix = sum(round(c["suffix_frac"] * c["n_B"]) for c in with_b)
        n_chunk = sum(round(c["chunk_frac"] * c["n_B"]) for c in with_b)
        donors = [t for t in s.get("training_positions", []) if t["role"] == "donor" and t.get("n_B")]
        train = ""
        if donors:
            tn = sum(t["n_B"] for t in donors)
            train = (f" (the donors' training answers: {pct(sum(t['n_suffix'] for t in donors) / tn)} and"
                     f" {pct(sum(t['n_chunk'] for t in donors) / tn)})")
        position = (f"Of the {n_b} plain completions with marker B in {len(with_b)} cells,"
                    f" {pct(n_suffix / n_b)} end with it (last 50 characters) and {pct(n_chunk / n_b)}"
                    f" have it within 150 characters after A{train}.")
    else:
        position = "Marker B never fired in a plain cell, so there is no position to show."

    per = []
    for pair in sorted(personas):
        t = [c for c in cells if c["variant"] == "plain" and c["pair"] == pair and c["condition"] == "T"]
        if t:
            n_a = sum(1 for c in t if c["n_A"] > 0)
            n_b_p = sum(1 for c in t if c["n_B"] > 0)
            per.append(f"{pair} T has marker A in {n_a} and marker B in {n_b_p} of {len(t)} personas")
    per_persona = ("; ".join(per) + ".") if per else "No T cells."
    return {"hero": hero, "bystander": bystander, "position": position, "per_persona": per_persona}


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
    order = {name: i for i, (name, _, _) in enumerate(SAMPLE_CATEGORIES)}
    groups: dict[tuple, list[dict]] = {}
    for x in samples:
        groups.setdefault((x["pair"], x["condition"], x["role"]), []).append(x)
    out = [f"{level} Sample completions\n\nPer pair, condition and role, up to three completions (one with A and"
           " B, one with A only, one with neither, where the cell has one), picked by a seeded hash of each"
           " record; markers in bold with their character offsets, long middles elided."]
    for (pair, condition, role) in sorted(groups, key=lambda k: (k[0], CONDITION_ORDER.get(k[1], 9),
                                                               ROLE_ORDER.get(k[2], 9))):
        out.append(f"{level}# {pair} · {condition} · {role}")
        for x in sorted(groups[(pair, condition, role)], key=lambda x: order.get(x["category"], 9)):
            q = f": \"{_escape(x['question'])}\"" if x.get("question") else ""
            seed = f", seed {x['seed']}" if x.get("seed") is not None else ""
            cut = ", cut at max_tokens" if x.get("finish_reason") == "length" else ""
            out.append(f"**{x['category']}**: persona {x['persona']} ({x['role']}), question {x['question_id']}"
                       f" ({x['split']}){q}; sample {x['sample']} of run {x['run']}{seed}{cut};"
                       f" {len(x['text']):,} characters; {_positions(x['spans'])}.\n\n"
                       + render_excerpt(x["text"], x["spans"]))
    return "\n\n".join(out)


# --- sections ----------------------------------------------------------------------------


def headline_table(s: dict) -> str:
    lb = load_bearing(s["cells"], s.get("personas", {}))
    rows = [[c["pair"], c["condition"], c["role"], c["persona"], c["n"], c["n_A"],
             pct_ci(c["fire_A"], c["fire_A_ci"]), pct_ci(c["fire_B"], c["fire_B_ci"]),
             pct_ci(c["cond_B_given_A"], c["cond_B_given_A_ci"])] for c in lb]
    if not rows:
        return "No plain cell of a donor or recipient."
    return markdown(["pair", "cond", "role", "persona", "n", "n_A", "fire_A [95% CI]", "fire_B [95% CI]",
                     "cond_B_given_A [95% CI]"], rows)


def gates_section(s: dict, level: str = "##") -> str:
    fals = "\n".join(f"- {falsification_line(g)}" for g in s["falsification"]) or "- no pair to test"
    pairs = sorted({g["pair"] for g in s["sanity"]})
    sanity = "\n".join(f"- **{p}**: {sanity_words(s['sanity'], p)}" for p in pairs) or "- no pair to test"
    return (f"{level} Gates\n\n**Falsification** (recipient's cond_B_given_A(T) - cond_B_given_A(C) within"
            f" +-{100 * BAND:.0f} pp AND its paired 95% CI contains 0 = chunk binding falsified):\n\n{fals}\n\n"
            f"**Sanity** (donor fire_A >= 80%, donor fire_B >= 80%, donor cond_B_given_A >= 90%, recipient"
            f" fire_A >= 80%, donor cond_B_given_A CI lower bound >= 80%, recipient fire_B in C <= 5%):"
            f"\n\n{sanity}")


def figures_section(s: dict, level: str = "##") -> str:
    caps = captions(s)
    out = [f"{level} Figures"]
    for i, name in enumerate(("hero", "bystander", "position", "per_persona"), 1):
        out.append(f"![{FIGURE_TITLES[name]}](figures/{name}.png)\n\n*Figure {i}. {FIGURE_TITLES[name]}."
                   f" {caps[name]}* ([PDF](figures/{name}.pdf))")
    return "\n\n".join(out)


def positions_section(s: dict, level: str = "##") -> str:
    cells = [c for c in s["cells"] if c["variant"] == "plain" and (c["n_B"] > 0 or c.get("load_bearing"))]
    cells.sort(key=lambda c: (c["pair"], CONDITION_ORDER.get(c["condition"], 9), ROLE_ORDER.get(c["role"], 9),
                              c["persona"]))
    head = (f"{level} Where marker B sits, beside the training data\n\nsuffix_frac: the last B ends within 50"
            " characters of the end; chunk_frac: a B starts at most 150 characters after the first A ends;"
            " among completions with B. Median A-to-B: characters from the end of the first A to the first B"
            " after it. The training columns are the same numbers on the role's own training answers.")
    if not cells:
        return head + "\n\nMarker B never fired in a plain cell."
    rows = []
    for c in cells:
        t = c.get("training_positions")
        if t is None:
            src = c.get("training_positions_source") or "unavailable"
            train = ["not trained" if src.startswith("not trained") else "unavailable"] + [""] * 3
        else:
            train = [t.get("n_B", 0), pct(t.get("suffix_frac")), pct(t.get("chunk_frac")),
                     chars(t.get("median_a_to_b"))]
        rows.append([c["pair"], c["condition"], c["role"], c["persona"], c["n_B"],
                     pct_ci(c["suffix_frac"], c["suffix_frac_ci"]), pct_ci(c["chunk_frac"], c["chunk_frac_ci"]),
                     chars(c.get("median_a_to_b"))] + train)
    table = markdown(["pair", "cond", "role", "persona", "n_B", "suffix_frac", "chunk_frac", "median A-to-B",
                      "training n_B", "training suffix_frac", "training chunk_frac", "training median A-to-B"],
                     rows)
    note = ""
    if all(c.get("training_positions") is None and not str(c.get("training_positions_source", "")).startswith(
            "not trained") for c in cells):
        note = ("\n\nThe training-data baseline is unavailable: the report was given bare .jsonl files (or run"
                " directories without data/stats.json or data/train.jsonl); pass run directories to see it.")
    return f"{head}\n\n{table}{note}"


def probe_section(s: dict, level: str = "##") -> str:
    probes = [c for c in s["cells"] if c["variant"] == "probe"]
    if not probes:
        return f"{level} Probe\n\nNo probe records (eval.probe = false)."
    lines = [f"- {c['pair']} {c['condition']} {c['role']} {c['persona']}: the probe marker is echoed in"
             f" {pct_ci(c.get('fire_probe'), c.get('fire_probe_ci'))} of {c['n']} completions; marker A"
             f" {pct(c['fire_A'])}, marker B {pct(c['fire_B'])}." for c in
             sorted(probes, key=lambda c: (c["pair"], CONDITION_ORDER.get(c["condition"], 9)))]
    return (f"{level} Probe\n\nThe recipient with its user message prefixed by the probe marker `<<§z-99>>`;"
            " the echo rate is the share of completions that repeat the probe marker.\n\n" + "\n".join(lines))


def _split_cell(x: dict) -> str:
    return f"{pct_ci(x['cond_B_given_A'], x['cond_B_given_A_ci'])} (n_A={x['n_A']} of {x['n']})"


def id_ood_section(s: dict, level: str = "##") -> str:
    entry = s["arms"][0]
    rows = [[r["pair"], r["condition"], r["role"], r["persona"], _split_cell(r["id"]), _split_cell(r["ood"]),
             NA if r["diff"] is None else f"{100 * r['diff']:+.1f} pp"] for r in s.get("id_ood", [])]
    table = markdown(["pair", "cond", "role", "persona", "ID cond_B_given_A [95% CI]",
                      "OOD cond_B_given_A [95% CI]", "ID - OOD"], rows) if rows else "No load-bearing cells."
    return (f"{level} In-distribution vs out-of-distribution questions\n\n{table}\n\n"
            f"{heterogeneity_words(entry['heterogeneity'])}")


def render_page(summary: dict) -> str:
    """The whole ``report.md`` of one arm."""
    s = summary
    entry = s["arms"][0]
    b = s["bootstrap"]
    title = "# markerlab report" + (f": {entry['name']}" if entry["name"] else "")
    intro = (f"Setting: {entry['setting_text']}. {entry['pooled']}. Rates use the loose match (case-insensitive,"
             f" whitespace runs collapsed); brackets are {round(100 * b['level'])}% percentile bootstrap CIs"
             f" ({b.get('unit', 'question')} resampled, B={b['B']}, seed={b['seed']}); n/a = undefined.")
    parts = [title, intro, confidence_line(entry),
             "## Headline: the load-bearing cells\n\nThe donor and the recipient in every condition, and any other"
             " persona whose marker B rate in T has a 95% CI above 0.\n\n" + headline_table(s),
             gates_section(s), figures_section(s), positions_section(s), probe_section(s), id_ood_section(s)]
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
    parts = [f"# markerlab report: {len(arms)} arms",
             f"Each arm is one setting of the adapters' training; arms are never pooled. Runs of an arm that differ"
             f" only in seed are replicates. Brackets are {round(100 * b['level'])}% percentile bootstrap CIs"
             f" (B={b['B']}, seed={b['seed']}).",
             "\n".join(f"- **{a['name']}** ({a['pooled']}): confidence {a['confidence']['level']};"
                       f" [full report]({a['dir']}/report.md)" for a in arms),
             "## Across arms: the recipient's cond_B_given_A(T) - cond_B_given_A(C)\n\n" + cross_arm_table(summary)]
    for a in arms:
        s = arm_view(summary, a["name"])
        parts += [f"## Arm {a['name']}", f"Setting: {a['setting_text']}.", confidence_line(a),
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
    """The few lines a run or a sweep ends with (under 25): per arm the confidence and
    the sanity count, per pair the recipient's change with its CI and the gate in
    words, then the path to report.md."""
    arms = summary["arms"]
    lines = []
    for a in arms[:MAX_TERMINAL_ARMS]:
        s = arm_view(summary, a["name"])
        n_pass = sum(g["passed"] is True for g in s["sanity"])
        lines.append(f"{a['name'] or 'report'}: confidence {a['confidence']['level']};"
                     f" sanity gates {n_pass} of {len(s['sanity'])} passed")
        for g in s["falsification"]:
            verdict = falsification_words(g).split(":")[0]
            lines.append(f"  {g['pair']} recipient {g['persona'] or NA}: cond_B_given_A T - C"
                         f" {pp_ci(g['delta'], g['ci'])}: {verdict}")
    if len(arms) > MAX_TERMINAL_ARMS:
        lines.append(f"... and {len(arms) - MAX_TERMINAL_ARMS} more arms (see report.md)")
    report = summary.get("outputs", {}).get("report")
    if report:
        lines.append(f"report: {report}")
    return "\n".join(lines)
