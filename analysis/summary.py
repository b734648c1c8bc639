"""From the cells of each arm to the ``summary.json`` object of docs/contracts.md.

    arm_summary = summarize(arm, Bootstrap(2000, 0), splits, baselines)   # one arm, alone
    summary = combine([arm_summary, ...])                                # the report's summary

An arm's summary is complete on its own (cells, deltas, gates, roles, ID vs OOD,
samples, confidence); ``combine`` of one arm is that arm's summary, and of
several it lists every arm's entries (each carrying ``arm`` and ``setting``)
and adds the cross-arm table of the recipient's T-minus-C change. Because
every CI depends only on its cell's own counts (analysis.bootstrap), an arm's
numbers are the same whether it is reported alone or beside other arms.

The table, the page and the figures are drawn from these objects alone, so a
report can be re-rendered from a saved ``summary.json``.
"""

from __future__ import annotations

import numpy as np

from analysis.arms import describe
from analysis.bootstrap import Bootstrap
from analysis.gates import (HETEROGENEITY_STAT, confidence, falsification_gate, heterogeneity, load_bearing,
                            sanity_gates)
from analysis.metrics import Cell, merge_cells, row_order
from analysis.records import Arm
from markerlab.experiment import CONTROL, REPLICATE_KEY, TREATMENT
from markerlab.markers import median

# Statistics that get a bootstrap CI in every cell (fire_probe in probe cells too).
CI_STATS = ["fire_A", "fire_B", "joint", "cond_B_given_A", "suffix_frac", "chunk_frac"]
# Statistics compared between conditions (T minus C, paired by question).
DELTA_STATS = ["fire_A", "fire_B", "cond_B_given_A"]
# Statistics of the ID-vs-OOD comparison (a CI for the one the trigger reads).
SPLIT_STATS = ["fire_A", "fire_B", "cond_B_given_A"]


def cell_summary(cell: Cell, boot: Bootstrap) -> dict:
    """One cell as docs/contracts.md lists it, plus a few extra fields."""
    stats = CI_STATS + (["fire_probe"] if cell.variant == "probe" else [])
    cis = boot.cis(cell.counts, stats, cell.groups)
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
    out["median_a_to_b"] = cell.median_a_to_b()
    if cell.variant == "probe":
        out["fire_probe"] = cell.stat("fire_probe")
        out["fire_probe_ci"] = cis["fire_probe"]
    out["n_questions"] = len(set(cell.question_ids))
    out["n_truncated"] = cell.count("truncated")
    out["runs"] = cell.runs
    out["seeds"] = [r for r in cell.replicates if r is not None]
    return out


def paired_counts(t: Cell, c: Cell) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], int]:
    """Rows of T and C for the (seed, question)s both cells have, in the same order,
    with their grouping by seed."""
    common = sorted(set(t.rows) & set(c.rows), key=row_order)
    ti = {r: i for i, r in enumerate(t.rows)}
    ci = {r: i for i, r in enumerate(c.rows)}
    sizes: dict = {}
    for seed, _ in common:
        sizes[seed] = sizes.get(seed, 0) + 1
    return (t.counts[[ti[r] for r in common]], c.counts[[ci[r] for r in common]], tuple(sizes.values()),
            len(common))


def deltas(cells: list[Cell], boot: Bootstrap) -> tuple[list[dict], list[str]]:
    """T minus C for every plain persona cell present in both conditions."""
    plain = {(c.pair, c.condition, c.persona): c for c in cells if c.variant == "plain"}
    out, warnings = [], []
    for (pair, condition, persona), t in plain.items():
        c = plain.get((pair, CONTROL, persona))
        if condition != TREATMENT or c is None:
            continue
        rows_t, rows_c, groups, n_common = paired_counts(t, c)
        if n_common < max(len(t.rows), len(c.rows)):
            what = "(seed, question)s" if len(t.replicates) > 1 or len(c.replicates) > 1 else "questions"
            warnings.append(f"{pair} {persona}: T and C share {n_common} of their {what};"
                            " the paired CIs use only those")
        for stat in DELTA_STATS:
            vt, vc = t.stat(stat), c.stat(stat)
            out.append({
                "pair": pair, "persona": persona, "role": t.role, "statistic": stat,
                "T": vt, "C": vc, "T_minus_C": None if vt is None or vc is None else vt - vc,
                "ci": boot.delta_ci(rows_t, rows_c, stat, groups) if n_common else None,
                "n_questions": len({q for _, q in t.rows} & {q for _, q in c.rows}),
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


def id_ood_rows(lb: list[dict], cells: dict[tuple, Cell], splits: dict[str, str], boot: Bootstrap) -> list[dict]:
    """Per load-bearing cell: the rates on in-distribution and out-of-distribution questions."""
    out = []
    for d in lb:
        cell = cells[(d["pair"], d["condition"], d["persona"])]
        row = {k: d[k] for k in ("pair", "condition", "persona", "role")}
        for split in ("id", "ood"):
            sub = cell.subset([splits.get(q) == split for _, q in cell.rows])
            cis = boot.cis(sub.counts, [HETEROGENEITY_STAT], sub.groups)
            row[split] = {"n": sub.count("n"), "n_A": sub.count("A"), "n_questions": len(set(sub.question_ids)),
                          **{s: sub.stat(s) for s in SPLIT_STATS},
                          f"{HETEROGENEITY_STAT}_ci": cis[HETEROGENEITY_STAT]}
        a, b = row["id"][HETEROGENEITY_STAT], row["ood"][HETEROGENEITY_STAT]
        row["statistic"] = HETEROGENEITY_STAT
        row["diff"] = None if a is None or b is None else a - b
        out.append(row)
    return out


def _pool_positions(stats: list[dict]) -> dict:
    """Training-data position statistics of several runs of one role, pooled by counts.

    The median A-to-B distance of pooled runs is the median of the runs' medians.
    """
    if len(stats) == 1:
        return dict(stats[0])
    total = {k: sum(s.get(k, 0) for s in stats) for k in ("n", "n_A", "n_B", "n_AB", "n_suffix", "n_chunk",
                                                            "n_a_to_b")}
    n_b = total["n_B"]
    total["suffix_frac"] = total["n_suffix"] / n_b if n_b else None
    total["chunk_frac"] = total["n_chunk"] / n_b if n_b else None
    total["median_a_to_b"] = median([s["median_a_to_b"] for s in stats if s.get("median_a_to_b") is not None])
    return total


def training_baseline(role: str, runs: list[str], baselines: dict[str, dict | None]) -> tuple[dict | None, str]:
    """(the training data's positions for ``role`` over ``runs``, where they came from or why none)."""
    found = [baselines.get(r) for r in runs]
    if any(b is None for b in found):
        return None, ("unavailable: the inputs were bare .jsonl files or run directories without"
                      " data/stats.json or data/train.jsonl")
    stats = [b["positions"].get(role) for b in found]
    if any(s is None for s in stats):
        return None, f"not trained ({role})"
    return _pool_positions(stats), ", ".join(sorted({b["source"] for b in found}))


def _question_texts() -> dict[str, str]:
    from data.questions import all_questions

    return {q.id: q.text for q in all_questions()}


def summarize(arm: Arm, boot: Bootstrap, splits: dict[str, str] | None = None,
              baselines: dict[str, dict | None] | None = None) -> dict:
    """The summary of one arm: what ``python -m analysis.report`` writes for it alone."""
    splits = splits or {}
    baselines = baselines or {}
    cells = arm.cells
    cell_dicts = [cell_summary(c, boot) for c in cells]
    delta_list, warnings = deltas(cells, boot)

    plain_cells = {(c.pair, c.condition, c.persona): c for c in cells if c.variant == "plain"}
    plain = {(d["pair"], d["condition"], d["persona"]): d for d in cell_dicts if d["variant"] == "plain"}
    pairs = sorted({pair for pair, _, _ in plain})
    personas: dict[str, dict[str, str]] = {pair: {} for pair in pairs}
    for d in plain.values():
        if d["role"] in ("donor", "recipient"):
            personas[d["pair"]][d["role"]] = d["persona"]

    # The training data's own positions beside each plain cell's evaluated ones.
    training = {}
    for d in plain.values():
        base, source = training_baseline(d["role"], d["runs"], baselines)
        d["training_positions"] = base
        d["training_positions_source"] = source
        if base is not None:
            training.setdefault((d["pair"], d["condition"], d["role"]), {**base, "source": source})
    training_list = [{"pair": p, "condition": c, "role": r, **v} for (p, c, r), v in sorted(training.items())]

    falsification, sanity = [], []
    for pair in pairs:
        recipient = personas[pair].get("recipient")
        delta = next((d for d in delta_list if d["pair"] == pair and d["persona"] == recipient
                      and d["statistic"] == "cond_B_given_A"), None)
        falsification.append(falsification_gate(pair, recipient, delta))
        sanity.extend(sanity_gates(pair, personas[pair], plain))

    lb = load_bearing(cell_dicts, personas)
    for d in cell_dicts:
        d["load_bearing"] = False
    for d in lb:
        d["load_bearing"] = True
    id_ood = id_ood_rows(lb, plain_cells, splits, boot)
    het = heterogeneity(id_ood)
    conf = confidence(falsification, sanity, het, arm.seeds)

    questions = _question_texts()
    samples = [{**s, "question": questions.get(s["question_id"])} for s in arm.samples]

    entry = arm_entry(arm)
    entry.update(confidence=conf, heterogeneity=het)
    labels = {"arm": arm.name, "setting": arm.setting}
    for item in (*cell_dicts, *delta_list, *falsification, *sanity, *id_ood, *training_list):
        item.update(labels)
    roles = role_cells(cells, boot)
    for item in roles:
        item.update(labels)
    return {
        "bootstrap": bootstrap_info(boot, [arm]),
        "arms": [entry],
        "cells": cell_dicts,
        "deltas": delta_list,
        "falsification": falsification,
        "sanity": sanity,
        "roles": roles,
        "personas": personas,
        "id_ood": id_ood,
        "training_positions": training_list,
        "samples": samples,
        "warnings": warnings,
    }


def bootstrap_info(boot: Bootstrap, arms: list[Arm]) -> dict:
    replicated = any(len(a.seeds) > 1 for a in arms)
    return {"B": boot.n_resamples, "seed": boot.seed, "level": boot.level,
            "unit": f"{REPLICATE_KEY}, then question" if replicated else "question"}


def arm_entry(arm: Arm) -> dict:
    """What an arm is and which runs it pooled, and how."""
    seeds = [s for s in arm.seeds if s is not None]
    if len(seeds) > 1:
        pooled = (f"{len(arm.runs)} runs pooled: replicates differing only in {REPLICATE_KEY}"
                  f" ({', '.join(map(str, seeds))}); CIs resample {REPLICATE_KEY}s, then questions within each")
    else:
        pooled = (f"{len(arm.runs)} run(s), one {REPLICATE_KEY}; CIs resample questions")
    return {"name": arm.name, "setting": arm.setting, "setting_text": describe(arm.setting),
            "replicates": {"key": REPLICATE_KEY, "values": seeds}, "runs": arm.runs, "pooled": pooled}


def cross_arm(arm_summaries: list[dict]) -> list[dict]:
    """Per pair, every arm's recipient cond_B_given_A(T) - cond_B_given_A(C) with its CI."""
    pairs = sorted({g["pair"] for s in arm_summaries for g in s["falsification"]})
    out = []
    for pair in pairs:
        row = {"pair": pair, "statistic": "cond_B_given_A", "arms": []}
        for s in arm_summaries:
            g = next((g for g in s["falsification"] if g["pair"] == pair), None)
            if g is None:
                continue
            row.setdefault("persona", g["persona"])
            row["arms"].append({"arm": s["arms"][0]["name"], "setting": s["arms"][0]["setting"],
                                "T": g["T"], "C": g["C"], "delta": g["delta"], "ci": g["ci"],
                                "chunk_binding_falsified": g["chunk_binding_falsified"]})
        out.append(row)
    return out


# The summary's lists whose entries belong to one arm (each carries "arm").
ARM_LISTS = ("cells", "deltas", "falsification", "sanity", "roles", "id_ood", "training_positions", "samples")


def arm_view(summary: dict, name: str) -> dict:
    """The part of a (combined) summary that belongs to arm ``name``, shaped like one arm's summary."""
    if len(summary["arms"]) == 1:
        return summary
    entry = next(a for a in summary["arms"] if a["name"] == name)
    out = {k: v for k, v in summary.items() if k not in ARM_LISTS and k not in ("arms", "cross_arm")}
    out["arms"] = [entry]
    for key in ARM_LISTS:
        out[key] = [x for x in summary.get(key, []) if x.get("arm") == name]
    prefix = f"{name}: "
    out["warnings"] = [w[len(prefix):] for w in summary.get("warnings", []) if w.startswith(prefix)]
    out["bootstrap"] = dict(summary["bootstrap"])
    replicated = len(entry["replicates"]["values"]) > 1
    out["bootstrap"]["unit"] = f"{REPLICATE_KEY}, then question" if replicated else "question"
    return out


def combine(arm_summaries: list[dict], boot: Bootstrap, arms: list[Arm]) -> dict:
    """The report's summary: one arm's summary as is, or every arm's entries side by side."""
    if len(arm_summaries) == 1:
        return dict(arm_summaries[0])
    out = {"bootstrap": bootstrap_info(boot, arms), "arms": [s["arms"][0] for s in arm_summaries]}
    for key in ARM_LISTS:
        out[key] = [x for s in arm_summaries for x in s[key]]
    out["warnings"] = [f"{s['arms'][0]['name']}: {w}" for s in arm_summaries for w in s["warnings"]]
    personas: dict = {}
    for s in arm_summaries:
        for pair, p in s["personas"].items():
            personas.setdefault(pair, {}).update(p)
    out["personas"] = personas
    out["cross_arm"] = cross_arm(arm_summaries)
    return out
