"""Markdown tables from a summary: the headline table (EXPERIMENT.md, "The
write-up's numbers"), the gates, and the detail tables below them."""

from __future__ import annotations

from analysis.metrics import CONDITION_ORDER, ROLE_ORDER

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


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _order(cell: dict) -> tuple:
    return (cell["pair"], CONDITION_ORDER.get(cell["condition"], 9),
            ROLE_ORDER.get(cell["role"], 9), cell["persona"])


def cells_of(summary: dict, variant: str) -> list[dict]:
    return sorted((c for c in summary["cells"] if c["variant"] == variant), key=_order)


def headline(summary: dict) -> str:
    """The write-up's table: one row per plain cell, loose match, 95% CIs in brackets."""
    rows = [[c["pair"], c["condition"], c["role"], c["persona"],
             pct_ci(c["fire_A"], c["fire_A_ci"]), pct_ci(c["fire_B"], c["fire_B_ci"]),
             pct_ci(c["cond_B_given_A"], c["cond_B_given_A_ci"]), c["n_A"]]
            for c in cells_of(summary, "plain")]
    return markdown(["pair", "cond", "role", "persona", "fire_A", "fire_B", "cond_B_given_A", "n_A"], rows)


def gates(summary: dict) -> str:
    fals = markdown(
        ["pair", "recipient", "cond_B_given_A T", "cond_B_given_A C", "T - C [95% CI]",
         "within +-6 pp", "CI contains 0", "falsified", "note"],
        [[g["pair"], g["persona"] or NA, pct(g["T"]), pct(g["C"]), pp_ci(g["delta"], g["ci"]),
          yes_no(g["within_band"]), yes_no(g["ci_contains_zero"]), yes_no(g["falsified"]),
          g.get("note", "")] for g in summary["falsification"]])
    sanity = markdown(
        ["pair", "gate", "cond", "persona", "value", "passed", "note"],
        [[g["pair"], g["gate"], g["condition"], g["persona"] or NA, pct(g["value"]),
          yes_no(g["passed"]), g.get("note", "")] for g in summary["sanity"]])
    return f"Falsification (per pair)\n\n{fals}\n\nSanity (per pair)\n\n{sanity}"


def details(summary: dict) -> str:
    parts = []
    if summary["deltas"]:
        by = {}
        for d in summary["deltas"]:
            by.setdefault((d["pair"], d["persona"], d["role"]), {})[d["statistic"]] = d
        rows = [[pair, role, persona] + [pp_ci(s[k]["T_minus_C"], s[k]["ci"]) for k in ("fire_A", "fire_B", "cond_B_given_A")]
                for (pair, persona, role), s in sorted(by.items(), key=lambda kv: (kv[0][0], ROLE_ORDER.get(kv[0][2], 9), kv[0][1]))]
        parts.append("## T minus C (paired by question)\n\n"
                     + markdown(["pair", "role", "persona", "fire_A", "fire_B", "cond_B_given_A"], rows))

    rows = [[c["pair"], c["condition"], c["role"], c["persona"], c["n"], c["n_B"],
             pct_ci(c["suffix_frac"], c["suffix_frac_ci"]), pct_ci(c["chunk_frac"], c["chunk_frac_ci"]),
             pct(c["strict"]["fire_A"]), pct(c["strict"]["fire_B"]), pct(c["strict"]["cond_B_given_A"]),
             c["n_truncated"]]
            for c in cells_of(summary, "plain")]
    parts.append("## Positions and strict match (plain cells)\n\n"
                 "suffix_frac: last B ends within 50 characters of the end; chunk_frac: a B starts"
                 " at most 150 characters after the first A ends; both among completions with B.\n\n"
                 + markdown(["pair", "cond", "role", "persona", "n", "n_B", "suffix_frac", "chunk_frac",
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
        parts.append(f"## {title}\n\n" + markdown(header, rows))
    return "\n\n".join(parts)


def render(summary: dict) -> str:
    """The whole ``table.md``."""
    b = summary["bootstrap"]
    intro = (f"Loose match (case-insensitive, whitespace runs collapsed). Brackets: {round(100 * b['level'])}%"
             f" question-cluster percentile bootstrap CI (B={b['B']}, seed={b['seed']}); n/a = undefined.")
    out = [f"# markerlab report\n\n{intro}\n\n## Headline\n\n{headline(summary)}",
           f"## Gates\n\n{gates(summary)}", details(summary)]
    if summary.get("warnings"):
        out.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in summary["warnings"]))
    return "\n\n".join(out) + "\n"
