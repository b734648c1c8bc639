"""The gates, per pair of one arm (EXPERIMENT.md, "Gates"), the ID-vs-OOD
heterogeneity trigger, and the confidence rule derived from them.

Falsification: the recipient's cond_B_given_A(T) - cond_B_given_A(C) is within
+-6 pp AND its paired 95% CI contains 0. When both hold the gate *triggers*:
``chunk_binding_falsified`` is true, the write-up's result ("both inside the
<=6pp falsification band"). The field is named for the outcome, so no reader
can invert it.

Gates read plain-variant cells. A gate whose value is undefined (no such cell, or
a ratio with a zero denominator) is neither passed nor failed: ``passed`` is None
and ``note`` says why. Booleans combine with three-valued (Kleene) logic, so a
known miss (outside the band) still decides ``chunk_binding_falsified`` when the
other half is unknown.

Confidence (``confidence``), from the gates of one arm, by this rule:

- LOW when any sanity gate failed or could not be decided, or any
  falsification gate could not be decided;
- MODERATE when every gate is decided and every sanity gate passed, but the
  ID-vs-OOD heterogeneity trigger fires or the arm has a single seed (no
  replicate that could show the between-seed spread);
- HIGH otherwise: every sanity gate passed, every gate decided, no
  heterogeneity trigger, and two or more seeds.

Heterogeneity: on a load-bearing cell (``load_bearing``), cond_B_given_A on the
in-distribution questions and on the out-of-distribution ones diverge by
``HETEROGENEITY_PP`` (15 pp) or more; cells where either is undefined (no A
fired in that split) cannot trigger it and are listed as undecided.
"""

from __future__ import annotations

from analysis.metrics import CONDITION_ORDER, ROLE_ORDER
from markerlab.experiment import TREATMENT

# Falsification: the recipient's T-minus-C change in cond_B_given_A is "no
# transfer" when it is within this band and its paired CI contains 0.
BAND = 0.06
# Floating-point slack for comparisons against thresholds (0.8 vs 208/260).
EPS = 1e-12

# (gate name, condition, role, statistic, comparison, threshold)
SANITY = (
    ("donor_fire_A >= 0.80", "T", "donor", "fire_A", ">=", 0.80),
    ("donor_fire_B >= 0.80", "T", "donor", "fire_B", ">=", 0.80),
    ("donor_cond_B_given_A >= 0.90", "T", "donor", "cond_B_given_A", ">=", 0.90),
    ("recipient_fire_A >= 0.80", "T", "recipient", "fire_A", ">=", 0.80),
    ("donor_cond_B_given_A_ci_lo >= 0.80", "T", "donor", "cond_B_given_A_ci_lo", ">=", 0.80),
    ("recipient_fire_B_in_C <= 0.05", "C", "recipient", "fire_B", "<=", 0.05),
)


def k_and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def k_not(a: bool | None) -> bool | None:
    return None if a is None else not a


def _value(cell: dict | None, stat: str) -> float | None:
    if cell is None:
        return None
    if stat.endswith("_ci_lo"):
        ci = cell.get(stat[: -len("_lo")])
        return None if ci is None else ci[0]
    return cell.get(stat)


def _why_undefined(cell: dict | None, stat: str, what: str) -> str:
    if cell is None:
        return f"no plain cell for {what}"
    if stat.startswith("cond_B_given_A") and cell["n_A"] == 0:
        return f"{what}: marker A never fired, so cond_B_given_A is undefined"
    if stat.endswith("_ci_lo"):
        return f"{what}: no CI (bootstrap off, or no resample defined the statistic)"
    return f"{what}: {stat} undefined"


def sanity_gates(pair: str, personas: dict[str, str], cells: dict) -> list[dict]:
    """The six sanity gates of one pair.

    ``personas`` maps role ("donor", "recipient") to the pair's persona;
    ``cells`` maps (pair, condition, persona) to plain cell summaries.
    """
    out = []
    for name, condition, role, stat, op, threshold in SANITY:
        persona = personas.get(role)
        cell = cells.get((pair, condition, persona)) if persona else None
        value = _value(cell, stat)
        gate = {"pair": pair, "gate": name, "value": value, "threshold": threshold,
                "passed": None, "condition": condition, "persona": persona}
        if persona is None:
            gate["note"] = f"no {role} persona found for {pair}"
        elif value is None:
            gate["note"] = _why_undefined(cell, stat, f"{pair} {condition} {role} {persona}")
        else:
            gate["passed"] = value >= threshold - EPS if op == ">=" else value <= threshold + EPS
        out.append(gate)
    return out


def falsification_gate(pair: str, recipient: str | None, delta: dict | None) -> dict:
    """Recipient cond_B_given_A(T) - cond_B_given_A(C): within +-BAND and CI contains 0.

    ``chunk_binding_falsified`` is ``within_band and ci_contains_zero`` (Kleene):
    true means the recipient did not pick up marker B through marker A.
    """
    gate = {"pair": pair, "persona": recipient, "band": BAND, "delta": None, "ci": None,
            "T": None, "C": None, "within_band": None, "ci_contains_zero": None,
            "chunk_binding_falsified": None}
    if recipient is None:
        gate["note"] = f"no recipient persona found for {pair}"
        return gate
    if delta is None:
        gate["note"] = f"{pair}: needs plain T and C cells of the recipient {recipient}"
        return gate
    d, ci = delta["T_minus_C"], delta["ci"]
    gate.update(delta=d, ci=ci, T=delta["T"], C=delta["C"])
    notes = []
    if d is None:
        notes.append("cond_B_given_A undefined in T or C (marker A never fired)")
    else:
        gate["within_band"] = abs(d) <= BAND + EPS
    if ci is None:
        notes.append("no paired CI (no bootstrap resample with A in both conditions)")
    else:
        gate["ci_contains_zero"] = ci[0] <= 0.0 <= ci[1]
    gate["chunk_binding_falsified"] = k_and(gate["within_band"], gate["ci_contains_zero"])
    if notes:
        gate["note"] = "; ".join(notes)
    return gate


def falsification_words(g: dict) -> str:
    """The gate's outcome in words, with the numbers that decided it."""
    f = g["chunk_binding_falsified"]
    band = f"{100 * g['band']:.0f} pp"
    if f is None:
        return f"undecided: {g.get('note', 'not enough data')}"
    if f:
        return (f"chunk binding falsified: the recipient's change is within +-{band} and its CI contains 0"
                " (no sign that marker B travelled through marker A)")
    why = []
    if g["within_band"] is False:
        why.append(f"the change is outside +-{band}")
    if g["ci_contains_zero"] is False:
        why.append("its CI excludes 0")
    return "chunk binding not falsified: " + " and ".join(why) + " (the recipient's B rate after A moved)"


# --- load-bearing cells, ID vs OOD, confidence ------------------------------------------

# |ID - OOD| of cond_B_given_A on a load-bearing cell at or above this triggers the
# heterogeneity downgrade (the write-up's ">=15pp").
HETEROGENEITY_PP = 0.15
HETEROGENEITY_STAT = "cond_B_given_A"


def active(cell: dict) -> bool:
    """A persona other than the donor and the recipient 'has activity' when marker B
    fires in its plain T cell beyond chance: the 95% CI of fire_B excludes 0 (without
    CIs, when B fired at all)."""
    ci = cell.get("fire_B_ci")
    return (ci[0] > 0) if ci is not None else bool(cell.get("n_B"))


def load_bearing(cells: list[dict], personas: dict[str, dict[str, str]]) -> list[dict]:
    """The plain cells a reader must see first, in display order.

    Per pair: the donor and the recipient in every condition, and every other
    persona whose T cell is ``active``, in every condition.
    """
    plain = [c for c in cells if c["variant"] == "plain"]
    keep = set()
    for c in plain:
        trained = personas.get(c["pair"], {})
        if c["persona"] in (trained.get("donor"), trained.get("recipient")):
            keep.add((c["pair"], c["persona"]))
        elif c["condition"] == TREATMENT and active(c):
            keep.add((c["pair"], c["persona"]))
    out = [c for c in plain if (c["pair"], c["persona"]) in keep]
    return sorted(out, key=lambda c: (c["pair"], ROLE_ORDER.get(c["role"], 9), c["persona"],
                                      CONDITION_ORDER.get(c["condition"], 9)))


def heterogeneity(id_ood: list[dict]) -> dict:
    """The trigger over the ID-vs-OOD rows of the load-bearing cells."""
    fired = [r for r in id_ood if r["diff"] is not None and abs(r["diff"]) >= HETEROGENEITY_PP - EPS]
    undecided = [r for r in id_ood if r["diff"] is None]
    return {"statistic": HETEROGENEITY_STAT, "threshold": HETEROGENEITY_PP,
            "fires": bool(fired), "cells": [_where(r) for r in fired],
            "undecided": [_where(r) for r in undecided], "n_cells": len(id_ood)}


def _where(r: dict) -> str:
    return f"{r['pair']} {r['condition']} {r['role']} {r['persona']}"


def heterogeneity_words(h: dict) -> str:
    """The trigger as the write-up phrases it."""
    pp = f"{100 * h['threshold']:.0f}pp"
    if h["n_cells"] == 0 or len(h["undecided"]) == h["n_cells"]:
        return f"ID-vs-OOD point estimates could not be compared on the load-bearing cells (no A in a split), " \
               "so the heterogeneity-downgrade trigger is undecided."
    if h["fires"]:
        return (f"ID-vs-OOD point estimates diverge by >={pp} on {len(h['cells'])} load-bearing cell(s)"
                f" ({'; '.join(h['cells'])}), so the heterogeneity-downgrade trigger fires.")
    return (f"ID-vs-OOD point estimates do not diverge by >={pp} on the load-bearing cells,"
            " so the heterogeneity-downgrade trigger does not fire.")


CONFIDENCE_RULE = ("LOW when any sanity gate failed or could not be decided, or a falsification gate could not"
                   " be decided; MODERATE when every gate is decided and every sanity gate passed but the"
                   " ID-vs-OOD heterogeneity trigger fires or the arm has a single seed; HIGH otherwise.")


def confidence(falsification: list[dict], sanity: list[dict], het: dict, seeds: list) -> dict:
    """The confidence level of one arm from its gates (the rule in this module's docstring)."""
    failed = [g for g in sanity if g["passed"] is False]
    undecided = [g for g in sanity if g["passed"] is None]
    undecided_f = [g for g in falsification if g["chunk_binding_falsified"] is None]
    reasons = []
    pairs = sorted({g["pair"] for g in sanity})
    for pair in pairs:
        gs = [g for g in sanity if g["pair"] == pair]
        n_failed = sum(g["passed"] is False for g in gs)
        n_undecided = sum(g["passed"] is None for g in gs)
        if n_failed or n_undecided:
            reasons.append(f"{pair}: {n_failed} of {len(gs)} sanity gates failed"
                           + (f", {n_undecided} undecided" if n_undecided else ""))
    if undecided_f:
        reasons.append("falsification gate undecided for " + ", ".join(g["pair"] for g in undecided_f))
    if failed or undecided or undecided_f or not falsification:
        level = "LOW"
        if not falsification:
            reasons.append("no falsification gate")
    else:
        if het["fires"]:
            reasons.append("the ID-vs-OOD heterogeneity trigger fires")
        if len(seeds) < 2:
            reasons.append("a single seed")
        level = "MODERATE" if reasons else "HIGH"
        if not reasons:
            reasons.append(f"every sanity gate passed, no heterogeneity trigger, {len(seeds)} seeds")
    return {"level": level, "reasons": reasons, "rule": CONFIDENCE_RULE}
