"""The falsification gate and the six sanity gates, per pair (EXPERIMENT.md, "Gates").

Gates read plain-variant cells. A gate whose value is undefined (no such cell, or
a ratio with a zero denominator) is neither passed nor failed: ``passed`` is None
and ``note`` says why. Booleans combine with three-valued (Kleene) logic, so a
known failure still decides ``falsified`` when the other half is unknown.
"""

from __future__ import annotations

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

    ``falsified`` is ``not (within_band and ci_contains_zero)``.
    """
    gate = {"pair": pair, "persona": recipient, "band": BAND, "delta": None, "ci": None,
            "T": None, "C": None, "within_band": None, "ci_contains_zero": None,
            "falsified": None}
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
    gate["falsified"] = k_not(k_and(gate["within_band"], gate["ci_contains_zero"]))
    if notes:
        gate["note"] = "; ".join(notes)
    return gate
