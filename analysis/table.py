"""Markdown tables from a summary: the headline table (EXPERIMENT.md, "The write-up's numbers"),
the gates and the verdict, and the detail tables below them (``table.md``).

Columns come from the experiment each arm reports under (``summary["experiments"]``):
the fire rate of every marker its conditions teach, and per declared marker pair
the conditional and the second-without-first rate, with 95% bootstrap CIs in
brackets and, where the experiment asks for them, Wilson intervals after a W. A
summary of several arms gets one headline table and one set of gates per arm,
after the cross-arm table of every arm's headline contrast.
"""

from __future__ import annotations

from analysis.gates import check_words
from analysis.metrics import BASE, PROBE, ROLE_ORDER, condition_rank
from analysis.summary import arm_view, experiment_of
from analysis.text import NA, bootstrap_words, chars, markdown, pct, pct_ci, pp_ci, stat_value, yes_no
from markerlab.experiment import pair_key

__all__ = ["NA", "cells_of", "chars", "cross_arm_table", "details", "gates", "headline", "markdown", "pct",
           "pct_ci", "pp_ci", "render", "yes_no"]


def order_of(exp: dict):
    """Sort key of cell dicts: pair, condition in the experiment's order, role, persona."""
    rank = condition_rank(exp["conditions"])
    return lambda c: (c["pair"], rank.get(c["condition"], 99), c["condition"], ROLE_ORDER.get(c["role"], 9),
                      c["persona"])


def cells_of(summary: dict, variant: str) -> list[dict]:
    return sorted((c for c in summary["cells"] if c["variant"] == variant), key=order_of(experiment_of(summary)))


def rate(c: dict, stat: str) -> str:
    """A cell's rate with its bootstrap CI, and its Wilson interval where the summary has one."""
    return pct_ci(c.get(stat), c.get(f"{stat}_ci"), c.get(f"{stat}_wilson"))


def firsts(exp: dict) -> list[str]:
    """The first marker of each declared pair, once: the denominators of the conditionals."""
    return list(dict.fromkeys(x for x, _ in exp["marker_pairs"]))


def rate_columns(exp: dict) -> list[str]:
    """The rates a headline row shows: every trained marker's fire rate, then per declared pair its
    conditional and its second-without-first rate (the headline metric too, if it is none of these)."""
    out = [f"fire_{m}" for m in exp["trained_markers"]]
    for x, y in exp["marker_pairs"]:
        out += [f"cond_{y}_given_{x}", f"{y}_given_not_{x}"]
    if exp["headline"]["metric"] not in out:
        out.append(exp["headline"]["metric"])
    return out


def wilson_note(exp: dict) -> str:
    return (" W[...]: the Wilson 95% interval (completions taken as independent), beside the bootstrap's."
            if exp.get("wilson") else "")


def _per_arm(summary: dict, one) -> str:
    """``one(arm_summary)`` for each arm, under a heading naming the arm when there are several."""
    arms = summary["arms"]
    if len(arms) == 1:
        return one(summary)
    return "\n\n".join(f"### Arm {a['name']}\n\n{one(arm_view(summary, a['name']))}" for a in arms)


def headline(summary: dict) -> str:
    """The write-up's table: one row per plain cell, loose match, 95% CIs in brackets."""
    def one(s):
        exp = experiment_of(s)
        stats = rate_columns(exp)
        counts = [f"n_{x}" for x in firsts(exp)]
        rows = [[c["pair"], c["condition"], c["role"], c["persona"]] + [rate(c, st) for st in stats]
                + [c[k] for k in counts] for c in cells_of(s, "plain")]
        return markdown(["pair", "cond", "role", "persona", *stats, *counts], rows)
    return _per_arm(summary, one)


def verdict_table(s: dict) -> str:
    """Each pair's verdict: the headline contrast, every leg and outcome by name, the outcome in words."""
    exp = experiment_of(s)
    v = exp["verdict"]
    if v is None:
        return f"No verdict rule in experiment {exp['name']}."
    h = exp["headline"]
    t, c, metric = h["treatment"], h["control"], h["metric"]
    legs = [leg["name"] for leg in v["legs"]]
    outcomes = [o["name"] for o in v["outcomes"]]
    rows = [[g["pair"], g.get("persona") or NA, pct(g.get(t)), pct(g.get(c)), pp_ci(g.get("delta"), g.get("ci"))]
            + [yes_no(g.get(name)) for name in legs + outcomes]
            + [verdict_words(g)] for g in s["verdicts"]]
    return markdown(["pair", h["role"], f"{metric} {t}", f"{metric} {c}", f"{t} - {c} [95% CI]", *legs, *outcomes,
                     "in words"], rows)


def verdict_words(g: dict) -> str:
    """The verdict of one pair in words, with why."""
    if g["outcome"] is None:
        return g.get("note") or "undecided"
    legs = "; ".join(f"{leg['name']}: {yes_no(leg['passed'])}" for leg in g["legs"])
    return f"{g['says']} ({legs})" if legs else g["says"]


def verdict_legend(exp: dict) -> str:
    """The verdict rule in words, from the experiment file."""
    v = exp["verdict"]
    if v is None:
        return ""
    legs = "; ".join(f"{leg['name']} = " + " or ".join(" and ".join(alt) for alt in leg["checks"])
                     + (f" ({leg['says']})" if leg["says"] else "") for leg in v["legs"])
    outcomes = "; ".join(f"{o['name']} when {' and '.join(o['when'])}" for o in v["outcomes"])
    return (f"How the verdict \"{v['name']}\" is decided, per pair: the first outcome whose legs all hold, in"
            f" order: {outcomes}; otherwise {v['otherwise']}. Legs: {legs}. A leg that cannot be decided leaves"
            " the verdict undecided (n/a) unless an outcome before it already holds.")


def gates(summary: dict) -> str:
    """The verdict and the sanity gates of each arm, with the outcome in words."""
    def one(s):
        exp = experiment_of(s)
        sanity = markdown(
            ["pair", "check", "persona", "value", "passed", "in words", "note"],
            [[g["pair"], g["check"], g["persona"] or NA, stat_value(g["statistic"], g["value"], "-" in g["condition"]),
              yes_no(g["passed"]), check_words(g), g.get("note", "")] for g in s["sanity"]])
        return (f"Verdict (per pair)\n\n{verdict_table(s)}\n\n{verdict_legend(exp)}\n\n"
                f"Sanity (per pair)\n\n{sanity}")
    return _per_arm(summary, one)


def cross_arm_table(summary: dict) -> str:
    """Rows: pairs; columns: arms; entries: the arm's headline contrast [95% CI] and its verdict."""
    rows_in = summary.get("cross_arm") or []
    if not rows_in:
        return ""
    arms = [a["name"] for a in summary["arms"]]
    rows = []
    for r in rows_in:
        by = {a["arm"]: a for a in r["arms"]}
        rows.append([r["pair"], r.get("persona") or NA, r.get("statistic") or NA] + [
            (f"{pp_ci(by[a]['delta'], by[a]['ci'])}" + (f"; verdict: {by[a]['outcome'] or 'undecided'}"
                                                          if "outcome" in by[a] else "")
             if a in by else NA) for a in arms])
    return markdown(["pair", "persona", "statistic"] + arms, rows)


def positions_legend(exp: dict) -> str:
    return ("suffix_frac: the last second marker ends within 50 characters of the end; chunk_frac: a second"
            " marker starts at most 150 characters after the first marker ends; both among completions with the"
            " second marker. Median gap: characters from the end of the first marker to the start of the first"
            " second marker after it. Training data: the same numbers on the role's own training answers."
            + (f" Shown where the pair's joint rate is at least {pct(exp['positions_min_joint'])}."
               if exp.get("positions_min_joint") else ""))


def training_cell(c: dict, xy: str, y: str) -> str:
    """The training data's positions of a pair for a cell's role, or why there are none."""
    t = c.get("training_positions")
    if t is None:
        source = c.get("training_positions_source") or "unavailable"
        return "not trained" if source.startswith("not trained") else "unavailable"
    p = (t.get("pairs") or {}).get(xy)
    if not t.get(f"n_{y}") or p is None:
        return f"no {y} in {t.get('n', 0)} examples"
    return f"{pct(p.get('suffix_frac'))} / {pct(p.get('chunk_frac'))} / {chars(p.get('median_gap'))}"


def details(summary: dict, level: int = 2) -> str:
    """The detail tables (deltas, positions and strict match, probe, base floor), headings at ``level``."""
    h = "#" * level
    exp = experiment_of(summary)
    head = exp["headline"]
    t, c = head["treatment"], head["control"]
    parts = []
    if summary["deltas"]:
        stats = list(dict.fromkeys(d["statistic"] for d in summary["deltas"]))
        by: dict = {}
        for d in summary["deltas"]:
            by.setdefault((d["pair"], d["persona"], d["role"]), {})[d["statistic"]] = d
        rows = [[pair, role, persona] + [pp_ci(s[k]["delta"], s[k]["ci"]) if k in s else NA for k in stats]
                for (pair, persona, role), s in sorted(by.items(), key=lambda kv: (kv[0][0],
                                                                                   ROLE_ORDER.get(kv[0][2], 9),
                                                                                   kv[0][1]))]
        parts.append(f"{h} {t} minus {c} (paired by question)\n\n"
                     + markdown(["pair", "role", "persona", *stats], rows))

    plain = cells_of(summary, "plain")
    for x, y in exp["marker_pairs"]:
        xy = pair_key(x, y)
        rows = [[c_["pair"], c_["condition"], c_["role"], c_["persona"], c_["n"], c_[f"n_{y}"],
                 pct_ci(c_["positions"][xy]["suffix_frac"], c_["positions"][xy]["suffix_frac_ci"]),
                 pct_ci(c_["positions"][xy]["chunk_frac"], c_["positions"][xy]["chunk_frac_ci"]),
                 chars(c_["positions"][xy]["median_gap"]), training_cell(c_, xy, y)]
                for c_ in plain if c_["positions"][xy]["shown"]]
        body = markdown(["pair", "cond", "role", "persona", "n", f"n_{y}", f"suffix_frac_{y}", f"chunk_frac_{xy}",
                         f"median {x}-to-{y}", "training data: suffix / chunk / median"], rows) if rows else \
            f"No plain cell reaches the joint rate of {x} and {y} the positions need."
        parts.append(f"{h} Positions of {y} relative to {x} (plain cells)\n\n{positions_legend(exp)}\n\n{body}")

    strict_stats = [f"fire_{m}" for m in exp["trained_markers"]] + \
        [f"cond_{y}_given_{x}" for x, y in exp["marker_pairs"]]
    rows = [[c_["pair"], c_["condition"], c_["role"], c_["persona"], c_["n"]]
            + [pct(c_["strict"].get(s)) for s in strict_stats] + [chars(c_.get("mean_length")), c_["n_truncated"]]
            for c_ in plain]
    parts.append(f"{h} Strict match, length and cut completions (plain cells)\n\n"
                 + markdown(["pair", "cond", "role", "persona", "n", *(f"strict {s}" for s in strict_stats),
                             "mean length", "cut at max_tokens"], rows))

    probe = exp.get("probe_marker")
    for variant, title in ((PROBE, f"Probe (user message prefixed with the probe marker {probe})"),
                           (BASE, "Base-model floor (no adapter)")):
        cells = cells_of(summary, variant)
        if not cells:
            continue
        stats = ([f"fire_{probe}"] if variant == PROBE and probe else []) + rate_columns(exp)
        counts = [f"n_{x}" for x in firsts(exp)]
        rows = [[c_["pair"], c_["condition"], c_["role"], c_["persona"], c_["n"]] + [rate(c_, s) for s in stats]
                + [c_[k] for k in counts] for c_ in cells]
        parts.append(f"{h} {title}\n\n" + markdown(["pair", "cond", "role", "persona", "n", *stats, *counts], rows))
    return "\n\n".join(parts)


def render(summary: dict) -> str:
    """The whole ``table.md``."""
    b = summary["bootstrap"]
    intro = (f"Loose match (case-insensitive, whitespace runs collapsed). Brackets: {round(100 * b['level'])}%"
             f" {b.get('unit', 'question')}-cluster percentile bootstrap CI ({bootstrap_words(b)});"
             " n/a = undefined.")
    if any(e.get("wilson") for e in summary["experiments"].values()):
        intro += wilson_note({"wilson": True})
    out = [f"# markerlab report\n\n{intro}"]
    if len(summary["arms"]) > 1:
        out.append("## Across arms: each arm's headline contrast\n\n" + cross_arm_table(summary))
    for a in summary["arms"]:
        s = arm_view(summary, a["name"])
        exp = experiment_of(s)
        level = "##" if len(summary["arms"]) == 1 else "###"
        head = "" if len(summary["arms"]) == 1 else f"## Arm {a['name']}\n\n"
        out.append(f"{head}Experiment: {exp['name']} (digest {exp['digest']}, {exp['path']}). Setting:"
                   f" {a['setting_text']}. {a['pooled']}.")
        out.append(f"{level} Headline\n\n{headline(s)}")
        out.append(f"{level} Gates\n\n{gates(s)}")
        out.append(details(s, len(level)))
    if summary.get("warnings"):
        out.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in summary["warnings"]))
    return "\n\n".join(out) + "\n"
