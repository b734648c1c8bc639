"""The experiment's gates and verdict, evaluated per pair of one arm; the ID-vs-OOD heterogeneity
trigger; the load-bearing cells; and the confidence rule derived from them.

    checker = Checker(exp, cells, cis, contrast)           # one arm's cells (analysis.summary builds it)
    sanity = [checker.entry(check, pair) for check in exp.sanity]
    verdict = verdict_entry(exp, checker, pair, headline)  # the verdict rule, Kleene logic
    confidence(verdicts, sanity, het, seeds)

A check (markerlab.experiment.Check, e.g. "donor T fire_A >= 0.80",
"recipient T-C cond_B_given_A.lo <= 0") is read against the cells of one pair:
`who` is a role (every persona of that role in the pair), a persona, or `every`
(every persona evaluated in that condition); where it names several personas it
holds only if it holds for each. The value is the cell's statistic (``.lo`` /
``.hi``: a bound of its 95% bootstrap CI), or for "X-Y" the paired difference of
the statistic between conditions X and Y (its paired CI for the bounds); a count
(``n_A``) is compared as is. A value that is undefined (no such cell, a zero
denominator, no CI) or whose denominator is below the check's ``min_n`` is
neither passed nor failed: ``passed`` is None and ``note`` says why.

Booleans combine with three-valued (Kleene) logic. A verdict's leg is an OR of
alternatives, each an AND of checks; an outcome holds when all its legs hold;
outcomes are tried in precedence order and the first that holds is the verdict,
``otherwise`` when none does. An outcome that cannot be decided leaves the
verdict undecided unless a decided higher-precedence outcome already holds (so a
known miss still decides, and an unknown never silently falls through to a
lower outcome).

Confidence (``confidence``), from the gates of one arm, by this rule:

- LOW when any sanity gate failed or could not be decided, or any verdict could
  not be decided;
- MODERATE when every gate is decided and every sanity gate passed, but the
  ID-vs-OOD heterogeneity trigger fires or the arm has a single seed (no
  replicate that could show the between-seed spread);
- HIGH otherwise.

Heterogeneity: on a load-bearing cell (``load_bearing``), the headline metric on
the in-distribution questions and on the out-of-distribution ones diverge by the
experiment's ``report.heterogeneity`` or more; cells where either is undefined
cannot trigger it and are listed as undecided.
"""

from __future__ import annotations

from collections.abc import Callable

from analysis.metrics import ROLE_ORDER, Cell, condition_rank
from analysis.text import is_count, margin, stat_value
from markerlab.experiment import EVERY, ROLES, Check, Experiment


def k_and(*values: bool | None) -> bool | None:
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


def k_or(*values: bool | None) -> bool | None:
    if any(v is True for v in values):
        return True
    if any(v is None for v in values):
        return None
    return False


def k_not(a: bool | None) -> bool | None:
    return None if a is None else not a


# contrast(pair, personas, statistic, treatment, control) -> {"value", "ci", "den", ...} or None
Contrast = Callable[[str, tuple, str, str, str], dict | None]


def where_of(check: Check) -> str:
    """The condition part of a check as written: "T", or "T-C" for a contrast."""
    return check.condition if check.control is None else f"{check.condition}-{check.control}"


class Checker:
    """Reads checks against one arm's cells.

    ``cells``: (pair, condition, persona) -> Cell, the plain cells and the base
    floor's; ``cis``: the same keys -> {statistic: [lo, hi] or None}, the cells'
    bootstrap CIs; ``contrast``: paired differences between conditions.
    """

    def __init__(self, exp: Experiment, cells: dict[tuple, Cell], cis: dict[tuple, dict], contrast: Contrast):
        self.exp, self.cells, self.cis, self.contrast = exp, cells, cis, contrast
        self.stats = exp.statistics()

    def personas(self, who: str, pair: str, condition: str, control: str | None = None) -> list[str]:
        """The personas a check's `who` names in (pair, condition), present in `control` too for a contrast."""
        present = [p for (pr, c, p) in self.cells if pr == pair and c == condition]
        if control is not None:
            present = [p for p in present if (pair, control, p) in self.cells]
        if who == EVERY:
            return sorted(present)
        if who in ("donor", "recipient") and pair in self.exp.pairs:
            return [self.exp.pairs[pair][0 if who == "donor" else 1]]
        if who in ROLES:
            return sorted(p for p in present if self.cells[(pair, condition, p)].role == who)
        return [who]

    def value(self, check: Check, pair: str, persona: str) -> tuple[float | None, int | None, str]:
        """(value, denominator, why undefined) of ``check`` for one persona of ``pair``."""
        what = f"{pair} {where_of(check)} {persona}"
        if check.control is not None:
            for cond in (check.condition, check.control):
                if (pair, cond, persona) not in self.cells:
                    return None, None, f"no cell for {pair} {cond} {persona}"
            d = self.contrast(pair, (persona,), check.stat, check.condition, check.control)
            if d is None or d["value"] is None:
                return None, d and d.get("den"), f"{what}: {check.stat} undefined in {check.condition} or " \
                                                 f"{check.control} ({self._why(check.stat)})"
            if check.bound is None:
                return d["value"], d["den"], ""
            if d["ci"] is None:
                return None, d["den"], f"{what}: no paired CI (bootstrap off, or no resample defined it in both)"
            return d["ci"][0 if check.bound == "lo" else 1], d["den"], ""
        cell = self.cells.get((pair, check.condition, persona))
        if cell is None:
            return None, None, f"no cell for {pair} {check.condition} {persona}"
        if is_count(check.stat):
            return cell.count(cell.schema.count_column(check.stat)), cell.count("n"), ""
        den = cell.count(cell.schema.stats[check.stat][1])
        value = cell.stat(check.stat)
        if value is None:
            return None, den, f"{what}: {check.stat} undefined ({self._why(check.stat)})"
        if check.bound is None:
            return value, den, ""
        ci = self.cis.get((pair, check.condition, persona), {}).get(check.stat)
        if ci is None:
            return None, den, f"{what}: no CI for {check.stat} (bootstrap off, or no resample defined it)"
        return ci[0 if check.bound == "lo" else 1], den, ""

    def _why(self, stat: str) -> str:
        den = self.stats[stat][1] if stat in self.stats else None
        if den is None or den == "n":
            return "no completions"
        if den.startswith("not_"):
            return f"marker {den[4:]} fired in every completion"
        if den.startswith("strict_"):
            return f"marker {den[7:]} never fired exactly"
        return f"marker {den} never fired"

    def entry(self, check: Check, pair: str) -> dict:
        """One check of one pair: {pair, gate, check, value, threshold, passed, condition, persona, note, ...}.

        Over several personas, ``value`` and ``persona`` are the deciding one's: a failing one
        (the furthest off), else an undecided one, else the closest to its threshold.
        """
        personas = self.personas(check.who, pair, check.condition, check.control)
        out = {"pair": pair, "gate": check.name, "check": check.text, "who": check.who,
               "statistic": check.stat, "bound": check.bound, "op": check.op, "threshold": check.threshold,
               "min_n": check.min_n, "condition": where_of(check), "value": None, "n": None, "passed": None,
               "persona": personas[0] if len(personas) == 1 else check.who, "personas": personas}
        if not personas:
            out["note"] = f"no cell of {check.who} in {pair} {where_of(check)}"
            return out
        results = []
        for persona in personas:
            value, den, note = self.value(check, pair, persona)
            passed = None
            if value is not None and check.min_n and (den or 0) < check.min_n:
                note = f"{pair} {where_of(check)} {persona}: denominator {den} is below min_n {check.min_n}"
            elif value is not None:
                passed = check.holds(value)
            results.append((persona, value, den, passed, note))
        passed = k_and(*(r[3] for r in results))
        if passed is False:
            deciding = max((r for r in results if r[3] is False), key=lambda r: abs(r[1] - check.threshold))
        elif passed is None:
            deciding = next(r for r in results if r[3] is None)
        else:
            deciding = min(results, key=lambda r: abs(r[1] - check.threshold))
        persona, value, den, _, note = deciding
        out.update(value=value, n=den, passed=passed)
        if len(personas) > 1:
            out["persona"] = persona
            n_bad = sum(r[3] is not True for r in results)
            out["note"] = (f"{persona} decides, of {len(personas)} personas" + (f" ({n_bad} not passed)" if n_bad else "")
                           + (f"; {note}" if note else ""))
        elif note:
            out["note"] = note
        return out


def check_words(g: dict) -> str:
    """One check in words, with its value: "donor T fire_A >= 0.80: 85.0%, passed, 5.0 pp to spare"."""
    contrast = "-" in g["condition"]
    value = stat_value(g["statistic"], g["value"], contrast)
    label = g["check"] if g.get("gate", g["check"]) == g["check"] else f"{g['gate']} ({g['check']})"
    who = f" ({g['persona']})" if g.get("persona") and g["persona"] != g.get("who") else ""
    if len(g.get("personas") or ()) > 1 and g["value"] is not None:
        who = f" ({g['persona']} decides, of {len(g['personas'])} personas)"
    if g["passed"] is None:
        return f"{label}{who}: undecided ({g.get('note') or 'undefined'})"
    gap = margin(g["statistic"], g["value"], g["threshold"])
    state = f"passed, {gap} to spare" if g["passed"] else f"failed, {gap} short"
    return f"{label}{who}: {value}, {state}"


# --- the verdict ---------------------------------------------------------------------------


def verdict_entry(exp: Experiment, checker: Checker, pair: str, headline: dict) -> dict:
    """The experiment's verdict rule on one pair, with every leg and outcome by name.

    ``headline`` is the pair's headline contrast (``analysis.summary.headline_contrast``):
    its persona, the two conditions' values, the difference and its paired CI, which the
    entry carries beside the verdict (keyed by the conditions' names, as the contract's
    "T", "C" are).
    """
    v = exp.verdict
    out = {"pair": pair, "verdict": v.name, **headline}
    legs = []
    values: dict[str, bool | None] = {}
    for leg, alternatives in v.legs.items():
        alts = []
        for alt in alternatives:
            checks = [checker.entry(c, pair) for c in alt]
            alts.append((k_and(*(c["passed"] for c in checks)), checks))
        values[leg] = k_or(*(a[0] for a in alts))
        legs.append({"name": leg, "passed": values[leg], "says": v.leg_says.get(leg, ""),
                     "checks": [c for _, checks in alts for c in checks],
                     "alternatives": len(alts)})
    outcomes = {}
    chosen, decided = None, True
    for name, when, _ in v.outcomes:
        outcomes[name] = k_and(*(values[leg] for leg in when))
    for name, _when, _ in v.outcomes:
        if outcomes[name] is True:
            chosen = name
            break
        if outcomes[name] is None:
            decided = False
            break
    else:
        chosen = v.otherwise
    if not decided:
        chosen = None
    out["outcome"] = chosen
    out["says"] = _says(v, chosen)
    out["legs"] = legs
    # Each leg's and each outcome's boolean by name, as the contract's readers expect
    # (within_band, ci_contains_zero, chunk_binding_falsified); the names never shadow a field.
    reserved = set(out)
    for name, value in [*values.items(), *outcomes.items()]:
        if name not in reserved:
            out[name] = value
    if v.otherwise not in reserved and v.otherwise not in outcomes:
        out[v.otherwise] = None if chosen is None else chosen == v.otherwise
    out["tags"] = [t for t, when in v.tags if all(values[leg] is True for leg in when)]
    undecided = [leg for leg in legs if leg["passed"] is None]
    if chosen is None:
        notes = [c.get("note") for leg in undecided for c in leg["checks"] if c["passed"] is None]
        out["note"] = "undecided: " + "; ".join(
            ([headline["note"]] if headline.get("note") else [])
            + [f"{leg['name']} could not be decided" for leg in undecided] + list(dict.fromkeys(n for n in notes
                                                                                              if n))[:3])
    return out


def _says(v, outcome: str | None) -> str:
    if outcome is None:
        return "undecided"
    if outcome == v.otherwise:
        return v.otherwise_says or outcome.replace("_", " ")
    return next((says for name, _, says in v.outcomes if name == outcome), "") or outcome.replace("_", " ")


# --- load-bearing cells, ID vs OOD, confidence ------------------------------------------


def activity_stat(exp: Experiment) -> str:
    """The statistic that makes another persona load-bearing: the fire rate of the headline pair's
    second marker (the one that may travel), else the headline metric itself."""
    pair = exp.headline_pair
    return f"fire_{pair[1]}" if pair else exp.headline.metric


def active(cell: dict, stat: str) -> bool:
    """A persona other than the donor and the recipient 'has activity' when ``stat`` fires in its
    plain treatment cell beyond chance: its 95% CI excludes 0 (without CIs, when it is above 0)."""
    ci = cell.get(f"{stat}_ci")
    return (ci[0] > 0) if ci is not None else bool(cell.get(stat))


def load_bearing(cells: list[dict], experiment: dict) -> list[dict]:
    """The plain cells a reader must see first, in display order.

    ``experiment`` is the summary's entry (analysis.experiments.experiment_entry).
    Per pair: the donor and the recipient in every condition, and every other
    persona whose treatment cell is ``active`` in the headline pair's second marker,
    in every condition.
    """
    head = experiment["headline"]
    stat = f"fire_{head['pair'][1]}" if head.get("pair") else head["metric"]
    pairs = experiment["pairs"]
    plain = [c for c in cells if c["variant"] == "plain"]
    keep = set()
    for c in plain:
        trained = pairs.get(c["pair"], {})
        if c["persona"] in (trained.get("donor"), trained.get("recipient")):
            keep.add((c["pair"], c["persona"]))
        elif c["condition"] == head["treatment"] and active(c, stat):
            keep.add((c["pair"], c["persona"]))
    order = condition_rank(experiment["conditions"])
    out = [c for c in plain if (c["pair"], c["persona"]) in keep]
    return sorted(out, key=lambda c: (c["pair"], ROLE_ORDER.get(c["role"], 9), c["persona"],
                                      order.get(c["condition"], 99)))


def heterogeneity(id_ood: list[dict], stat: str, threshold: float) -> dict:
    """The trigger over the ID-vs-OOD rows of the load-bearing cells."""
    eps = 1e-12
    fired = [r for r in id_ood if r["diff"] is not None and abs(r["diff"]) >= threshold - eps]
    undecided = [r for r in id_ood if r["diff"] is None]
    return {"statistic": stat, "threshold": threshold,
            "fires": bool(fired), "cells": [_where(r) for r in fired],
            "undecided": [_where(r) for r in undecided], "n_cells": len(id_ood)}


def _where(r: dict) -> str:
    return f"{r['pair']} {r['condition']} {r['role']} {r['persona']}"


def heterogeneity_words(h: dict) -> str:
    """The trigger as the write-up phrases it."""
    pp = f"{100 * h['threshold']:.0f}pp"
    if h["n_cells"] == 0 or len(h["undecided"]) == h["n_cells"]:
        return (f"ID-vs-OOD point estimates of {h['statistic']} could not be compared on the load-bearing cells"
                " (undefined in a split), so the heterogeneity-downgrade trigger is undecided.")
    if h["fires"]:
        return (f"ID-vs-OOD point estimates diverge by >={pp} on {len(h['cells'])} load-bearing cell(s)"
                f" ({'; '.join(h['cells'])}), so the heterogeneity-downgrade trigger fires.")
    return (f"ID-vs-OOD point estimates do not diverge by >={pp} on the load-bearing cells,"
            " so the heterogeneity-downgrade trigger does not fire.")


CONFIDENCE_RULE = ("LOW when any sanity gate failed or could not be decided, or a verdict could not"
                   " be decided; MODERATE when every gate is decided and every sanity gate passed but the"
                   " ID-vs-OOD heterogeneity trigger fires or the arm has a single seed; HIGH otherwise.")


def confidence(verdicts: list[dict], sanity: list[dict], het: dict, seeds: list) -> dict:
    """The confidence level of one arm from its gates (the rule in this module's docstring)."""
    reasons = []
    for pair in sorted({g["pair"] for g in sanity}):
        gs = [g for g in sanity if g["pair"] == pair]
        n_failed = sum(g["passed"] is False for g in gs)
        n_undecided = sum(g["passed"] is None for g in gs)
        if n_failed or n_undecided:
            reasons.append(f"{pair}: {n_failed} of {len(gs)} sanity gates failed"
                           + (f", {n_undecided} undecided" if n_undecided else ""))
    undecided = [g for g in verdicts if g["outcome"] is None]
    if undecided:
        reasons.append("verdict undecided for " + ", ".join(g["pair"] for g in undecided))
    if reasons:
        level = "LOW"
    else:
        if het["fires"]:
            reasons.append("the ID-vs-OOD heterogeneity trigger fires")
        seeds = [s for s in seeds if s is not None]
        if len(seeds) < 2:
            reasons.append("a single seed")
        level = "MODERATE" if reasons else "HIGH"
        if not reasons:
            reasons.append(f"every sanity gate passed, every verdict decided, no heterogeneity trigger,"
                           f" {len(seeds)} seeds")
    return {"level": level, "reasons": reasons, "rule": CONFIDENCE_RULE}
