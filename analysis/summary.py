"""From cells to the ``summary.json`` object of CONTRACTS.md.

The table and the figures are drawn from this object alone, so a report can be
re-rendered from a saved ``summary.json``.
"""

from __future__ import annotations

import numpy as np

from analysis.bootstrap import Bootstrap
from analysis.gates import falsification_gate, sanity_gates
from analysis.metrics import Cell, merge_cells

# Statistics that get a bootstrap CI in every cell (fire_probe in probe cells too).
CI_STATS = ["fire_A", "fire_B", "joint", "cond_B_given_A", "suffix_frac", "chunk_frac"]
# Statistics compared between conditions (T minus C, paired by question).
DELTA_STATS = ["fire_A", "fire_B", "cond_B_given_A"]


def cell_summary(cell: Cell, boot: Bootstrap) -> dict:
    """One cell as CONTRACTS.md lists it, plus a few extra fields."""
    stats = CI_STATS + (["fire_probe"] if cell.variant == "probe" else [])
    cis = boot.cis(cell.counts, stats)
    out = {
        "pair": cell.pair, "condition": cell.condition, "persona": cell.persona,
        "role": cell.role, "variant": cell.variant,
        "n": cell.count("n"), "n_A": cell.count("A"), "n_B": cell.count("B"),
        "n_AB": cell.count("AB"),
    }
    for s in ("fire_A", "fire_B", "joint", "cond_B_given_A"):
        out[s] = cell.stat(s)
    for s in ("fire_A", "fire_B", "cond_B_given_A"):
        out[f"{s}_ci"] = cis[s]
    out["suffix_frac"] = cell.stat("suffix_frac")
    out["chunk_frac"] = cell.stat("chunk_frac")
    out["strict"] = {s: cell.stat(f"strict_{s}") for s in ("fire_A", "fire_B", "joint", "cond_B_given_A")}
    # Extras beyond the contract.
    out["strict"].update(n_A=cell.count("strict_A"), n_B=cell.count("strict_B"),
                         n_AB=cell.count("strict_AB"))
    out["joint_ci"] = cis["joint"]
    out["suffix_frac_ci"] = cis["suffix_frac"]
    out["chunk_frac_ci"] = cis["chunk_frac"]
    if cell.variant == "probe":
        out["fire_probe"] = cell.stat("fire_probe")
        out["fire_probe_ci"] = cis["fire_probe"]
    out["n_questions"] = len(cell.question_ids)
    out["n_truncated"] = cell.count("truncated")
    out["runs"] = cell.runs
    return out


def paired_counts(t: Cell, c: Cell) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of T and C for the questions both cells have, in the same order."""
    common = sorted(set(t.question_ids) & set(c.question_ids))
    ti = {q: i for i, q in enumerate(t.question_ids)}
    ci = {q: i for i, q in enumerate(c.question_ids)}
    return t.counts[[ti[q] for q in common]], c.counts[[ci[q] for q in common]], len(common)


def deltas(cells: list[Cell], boot: Bootstrap) -> tuple[list[dict], list[str]]:
    """T minus C for every plain persona cell present in both conditions."""
    plain = {(c.pair, c.condition, c.persona): c for c in cells if c.variant == "plain"}
    out, warnings = [], []
    for (pair, condition, persona), t in plain.items():
        c = plain.get((pair, "C", persona))
        if condition != "T" or c is None:
            continue
        rows_t, rows_c, n_common = paired_counts(t, c)
        if n_common < max(len(t.question_ids), len(c.question_ids)):
            warnings.append(f"{pair} {persona}: T and C share {n_common} of their questions;"
                            " the paired CIs use only those")
        for stat in DELTA_STATS:
            vt, vc = t.stat(stat), c.stat(stat)
            out.append({
                "pair": pair, "persona": persona, "role": t.role, "statistic": stat,
                "T": vt, "C": vc, "T_minus_C": None if vt is None or vc is None else vt - vc,
                "ci": boot.delta_ci(rows_t, rows_c, stat), "n_questions": n_common,
            })
    return out, warnings


def role_cells(cells: list[Cell], boot: Bootstrap) -> list[dict]:
    """Plain cells pooled by (pair, condition, role): the hero figure's bars."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.variant == "plain":
            groups.setdefault((c.pair, c.condition, c.role), []).append(c)
    out = []
    for group in groups.values():
        s = cell_summary(merge_cells(group, persona="+".join(c.persona for c in group)), boot)
        s["personas"] = [c.persona for c in group]
        out.append(s)
    return out


def summarize(cells: list[Cell], boot: Bootstrap) -> dict:
    cell_dicts = [cell_summary(c, boot) for c in cells]
    delta_list, warnings = deltas(cells, boot)

    plain = {(d["pair"], d["condition"], d["persona"]): d for d in cell_dicts if d["variant"] == "plain"}
    pairs = sorted({pair for pair, _, _ in plain})
    personas = {pair: {} for pair in pairs}
    for d in plain.values():
        if d["role"] in ("donor", "recipient"):
            personas[d["pair"]][d["role"]] = d["persona"]

    falsification, sanity = [], []
    for pair in pairs:
        recipient = personas[pair].get("recipient")
        delta = next((d for d in delta_list if d["pair"] == pair and d["persona"] == recipient
                      and d["statistic"] == "cond_B_given_A"), None)
        falsification.append(falsification_gate(pair, recipient, delta))
        sanity.extend(sanity_gates(pair, personas[pair], plain))

    return {
        "bootstrap": {"B": boot.n_resamples, "seed": boot.seed, "level": boot.level,
                      "unit": "question"},
        "cells": cell_dicts,
        "deltas": delta_list,
        "falsification": falsification,
        "sanity": sanity,
        "roles": role_cells(cells, boot),
        "personas": personas,
        "warnings": warnings,
    }
