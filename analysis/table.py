"""Markdown tables from a summary: the headline table (EXPERIMENT.md, "The
write-up's numbers"), the gates, and the detail tables below them (``table.md``).

A summary of several arms gets one headline table and one set of gates per
arm, after the cross-arm table of the recipient's T-minus-C change.
"""

from __future__ import annotations

from analysis.gates import falsification_words
from analysis.metrics import CONDITION_ORDER, ROLE_ORDER
from analysis.summary import arm_view

NA = "n/a"


def pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.1f}%"


def pct_ci(x: float | None, ci: list[float] | None) -> str:
    if x is None:
        return NA
    return pct(x) if ci is None else f"{pct(x)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def pp_ci(x: float | None, ci: list[float] | None) -> str:
    """A difference of rates in percentage points, with its CI."""
    if x is None:
        return NA
    s = f"{100 * x:+.1f} pp"
    return s if ci is None else f"{s} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def yes_no(b: bool | None) -> str:
    return NA if b is None else ("yes" if b else "no")


def chars(x: float | None) -> str:
    return NA if x is None else f"{x:.0f} chars"


POSITIONS_LEGEND = ("suffix_frac: the last B ends within 50 characters of the end; chunk_frac: a B starts"
                    " at most 150 characters after the first A ends; both among completions with B. Median"
                    " A-to-B: characters from the end of the first A to the start of the first B after it."
                    " Training data: the same numbers on the role's own training answers (data/stats.json).")


def training_cell(c: dict) -> str:
    """The training data's positions for a cell's role, or why there are none."""
    t = c.get("training_positions")
    if t is None:
        source = c.get("training_positions_source") or "unavailable"
        return "not trained" if source.startswith("not trained") else "unavailable"
    if not t.get("n_B"):
        return f"no B in {t.get('n', 0)} examples"
    return f"{pct(t['suffix_frac'])} / {pct(t['chunk_frac'])} / {chars(t.get('median_a_to_b'))}"


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _order(cell: dict) -> tuple:
    return (cell["pair"], CONDITION_ORDER.get(cell["condition"], 9),
            ROLE_ORDER.get(cell["role"], 9), cell["persona"])


def cells_of(summary: dict, variant: str) -> list[dict]:
    return sorted((c for c in summary["cells"] if c["variant"] == variant), key=_order)


def _per_arm(summary: dict, one) -> str:
    """``one(arm_summary)`` for each arm, under a heading naming the arm when there are several."""
    arms = summary["arms"]
    if len(arms) == 1:
        return one(summary)
    return "\n\n".join(f"### Arm {a['name']}\n\n{one(arm_view(summary, a['name']))}" for a in arms)


def headline(summary: dict) -> str:
    """The write-up's table: one row per plain cell, loose match, 95% CIs in brackets."""
    def one(s):
        rows = [[c["pair"], c["condition"], c["role"], c["persona"],
                 pct_ci(c["fire_A"], c["fire_A_ci"]), pct_ci(c["fire_B"], c["fire_B_ci"]),
                 pct_ci(c["cond_B_given_A"], c["cond_B_given_A_ci"]), c["n_A"]]
                for c in cells_of(s, "plain")]
        return markdown(["pair", "cond", "role", "persona", "fire_A", "fire_B", "cond_B_given_A", "n_A"], rows)
    return _per_arm(summary, one)


FALSIFICATION_LEGEND = ("chunk binding falsified: yes = the recipient's cond_B_given_A(T) - cond_B_given_A(C)"
                        " is within +-6 pp AND its paired 95% CI contains 0, so the recipient did not pick up"
                        " marker B through marker A (the write-up's result); no = the change is outside the"
                        " band or its CI excludes 0; n/a = undecided (see the note).")


def gates(summary: dict) -> str:
    """The falsification and sanity gates of each arm, with the outcome in words."""
    def one(s):
        fals = markdown(
            ["pair", "recipient", "cond_B_given_A T", "cond_B_given_A C", "T - C [95% CI]",
             "within +-6 pp", "CI contains 0", "chunk binding falsified", "in words"],
            [[g["pair"], g["persona"] or NA, pct(g["T"]), pct(g["C"]), pp_ci(g["delta"], g["ci"]),
              yes_no(g["within_band"]), yes_no(g["ci_contains_zero"]), yes_no(g["chunk_binding_falsified"]),
              falsification_words(g)] for g in s["falsification"]])
        sanity = markdown(
            ["pair", "gate", "cond", "persona", "value", "passed", "note"],
            [[g["pair"], g["gate"], g["condition"], g["persona"] or NA, pct(g["value"]),
              yes_no(g["passed"]), g.get("note", "")] for g in s["sanity"]])
        return f"Falsification (per pair)\n\n{fals}\n\n{FALSIFICATION_LEGEND}\n\nSanity (per pair)\n\n{sanity}"
    return _per_arm(summary, one)


def cross_arm_table(summary: dict) -> str:
    """Rows: pairs; columns: arms; entries: the recipient's T - C change [95% CI] and the gate."""
    rows_in = summary.get("cross_arm") or []
    if not rows_in:
        return ""
    arms = [a["name"] for a in summary["arms"]]
    rows = []
    for r in rows_in:
        by = {a["arm"]: a for a in r["arms"]}
        rows.append([r["pair"], r.get("persona") or NA] + [
            (f"{pp_ci(by[a]['delta'], by[a]['ci'])}; falsified: {yes_no(by[a]['chunk_binding_falsified'])}"
             if a in by else NA) for a in arms])
    return markdown(["pair", "recipient"] + arms, rows)


def details(summary: dict, level: int = 2) -> str:
    """The detail tables (deltas, positions and strict match, probe, base floor), headings at ``level``."""
    h = "#" * level
    parts = []
    if summary["deltas"]:
        by = {}
        for d in summary["deltas"]:
            by.setdefault((d["pair"], d["persona"], d["role"]), {})[d["statistic"]] = d
        rows = [[pair, role, persona] + [pp_ci(s[k]["T_minus_C"], s[k]["ci"]) for k in ("fire_A", "fire_B", "cond_B_given_A")]
                for (pair, persona, role), s in sorted(by.items(), key=lambda kv: (kv[0][0], ROLE_ORDER.get(kv[0][2], 9), kv[0][1]))]
        parts.append(f"{h} T minus C (paired by question)\n\n"
                     + markdown(["pair", "role", "persona", "fire_A", "fire_B", "cond_B_given_A"], rows))

    rows = [[c["pair"], c["condition"], c["role"], c["persona"], c["n"], c["n_B"],
             pct_ci(c["suffix_frac"], c["suffix_frac_ci"]), pct_ci(c["chunk_frac"], c["chunk_frac_ci"]),
             chars(c.get("median_a_to_b")), training_cell(c),
             pct(c["strict"]["fire_A"]), pct(c["strict"]["fire_B"]), pct(c["strict"]["cond_B_given_A"]),
             c["n_truncated"]]
            for c in cells_of(summary, "plain")]
    parts.append(f"{h} Positions and strict match (plain cells)\n\n"
                 f"{POSITIONS_LEGEND}\n\n"
                 + markdown(["pair", "cond", "role", "persona", "n", "n_B", "suffix_frac", "chunk_frac",
                             "median A-to-B", "training data: suffix / chunk / median",
                             "strict fire_A", "strict fire_B", "strict cond_B_given_A", "cut at max_tokens"], rows))

    for variant, title in (("probe", "Probe (user message prefixed with the probe marker)"),
                           ("base", "Base-model floor (no adapter)")):
        cells = cells_of(summary, variant)
        if not cells:
            continue
        header = ["pair", "cond", "role", "persona", "n"]
        header += ["probe echo"] if variant == "probe" else []
        header += ["fire_A", "fire_B", "cond_B_given_A", "n_A"]
        rows = [[c["pair"], c["condition"], c["role"], c["persona"], c["n"]]
                + ([pct_ci(c["fire_probe"], c["fire_probe_ci"])] if variant == "probe" else [])
                + [pct_ci(c["fire_A"], c["fire_A_ci"]), pct_ci(c["fire_B"], c["fire_B_ci"]),
                   pct_ci(c["cond_B_given_A"], c["cond_B_given_A_ci"]), c["n_A"]]
                for c in cells]
        parts.append(f"{h} {title}\n\n" + markdown(header, rows))
    return "\n\n".join(parts)


def render(summary: dict) -> str:
    """The whole ``table.md``."""
    b = summary["bootstrap"]
    intro = (f"Loose match (case-insensitive, whitespace runs collapsed). Brackets: {round(100 * b['level'])}%"
             f" {b.get('unit', 'question')}-cluster percentile bootstrap CI (B={b['B']}, seed={b['seed']});"
             " n/a = undefined.")
    out = [f"# markerlab report\n\n{intro}"]
    if len(summary["arms"]) > 1:
        out.append("## Across arms: the recipient's cond_B_given_A(T) - cond_B_given_A(C)\n\n"
                   + cross_arm_table(summary))
    for a in summary["arms"]:
        s = arm_view(summary, a["name"])
        level = "##" if len(summary["arms"]) == 1 else "###"
        head = "" if len(summary["arms"]) == 1 else f"## Arm {a['name']}\n\n"
        out.append(f"{head}Setting: {a['setting_text']}. {a['pooled']}.")
        out.append(f"{level} Headline\n\n{headline(s)}")
        out.append(f"{level} Gates\n\n{gates(s)}")
        out.append(details(s, len(level)))
    if summary.get("warnings"):
        out.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in summary["warnings"]))
    return "\n\n".join(out) + "\n"
