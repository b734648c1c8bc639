"""From the cells of each arm to the ``summary.json`` object of docs/contracts.md.

    arm_summary = summarize(arm, Bootstrap(2000, 0), splits, baselines)   # one arm, alone
    summary = combine([arm_summary, ...], boot, arms)                    # the report's summary

An arm's summary is complete on its own (cells, deltas, gates, verdicts, roles,
ID vs OOD, samples, confidence, and under ``experiments`` what its experiment
says); ``combine`` of one arm is that arm's summary, and of several it lists every
arm's entries (each carrying ``arm`` and ``setting``), every arm's experiment, and
the cross-arm table of each arm's headline contrast. Because every CI depends
only on its cell's own counts (analysis.bootstrap), an arm's numbers are the same
whether it is reported alone or beside other arms.

What a cell carries follows its experiment (markerlab.experiment's metric
names): ``n``; per marker X ``n_X``, ``fire_X`` with its CI (``fire_X_ci``) and,
where the experiment asks for them (metrics.wilson), its Wilson interval
(``fire_X_wilson``); per declared pair (X, Y) ``n_XY``, ``joint_XY``,
``cond_Y_given_X``, ``Y_given_not_X``, ``n_Y_not_X``, ``suffix_frac_Y``,
``chunk_frac_XY`` (each rate with its CI, and Wilson's), and ``positions[XY]``;
``mean_length``, ``truncated_frac``; ``strict`` (the exact-match rates and
counts). For the headline's pair the first contract's names are kept as well:
``joint``, ``suffix_frac``, ``chunk_frac`` (with their CIs).

The table, the page and the figures are drawn from these objects alone, so a
report can be re-rendered from a saved ``summary.json``.
"""

from __future__ import annotations

import numpy as np

from analysis.arms import describe
from analysis.bootstrap import Bootstrap, wilson_ci
from analysis.experiments import experiment_entry
from analysis.gates import Checker, confidence, heterogeneity, load_bearing, verdict_entry
from analysis.metrics import Cell, merge_cells, row_order
from analysis.records import Arm
from analysis.text import is_count
from markerlab.experiment import BASE_CONDITION, REPLICATE_KEY, Experiment, pair_key
from markerlab.markers import median


def ci_stats(exp: Experiment) -> list[str]:
    """The statistics that get a bootstrap CI (and a Wilson interval where asked) in every cell: the
    fire rate of every marker, the rates of every declared pair, and any statistic a check reads a
    CI bound of."""
    out = [f"fire_{m}" for m in exp.marker_names]
    for x, y in exp.marker_pairs:
        xy = pair_key(x, y)
        out += [f"joint_{xy}", f"cond_{y}_given_{x}", f"{y}_given_not_{x}", f"suffix_frac_{y}", f"chunk_frac_{xy}"]
    checks = list(exp.sanity)
    if exp.verdict is not None:
        checks += [c for alts in exp.verdict.legs.values() for alt in alts for c in alt]
    out += [c.stat for c in checks if c.bound is not None and c.control is None]
    return list(dict.fromkeys(out))


def delta_stats(exp: Experiment) -> list[str]:
    """The statistics compared between the headline's two conditions: every marker's fire rate and
    every declared pair's conditional."""
    return [f"fire_{m}" for m in exp.marker_names] + [f"cond_{y}_given_{x}" for x, y in exp.marker_pairs]


def cell_summary(cell: Cell, boot: Bootstrap, exp: Experiment) -> dict:
    """One cell as docs/contracts.md lists it (the names follow the experiment's markers)."""
    schema = cell.schema
    stats = ci_stats(exp)
    cis = boot.cis(cell.counts, schema.index(stats), cell.groups)
    totals = cell.totals
    col = schema.col

    def wilson(stat):
        num, den = schema.stats[stat]
        return wilson_ci(int(totals[col[num]]), int(totals[col[den]]))

    def put(out, stat):
        out[stat] = cell.stat(stat)
        if stat in cis:
            out[f"{stat}_ci"] = cis[stat]
            if exp.wilson:
                out[f"{stat}_wilson"] = wilson(stat)

    out = {"pair": cell.pair, "condition": cell.condition, "persona": cell.persona, "role": cell.role,
           "variant": cell.variant, "n": cell.count("n")}
    for m in schema.markers:
        out[f"n_{m}"] = cell.count(m)
    for m in schema.markers:
        put(out, f"fire_{m}")
    positions = {}
    for x, y in schema.pairs:
        xy = pair_key(x, y)
        out[f"n_{xy}"] = cell.count(xy)
        for stat in (f"joint_{xy}", f"cond_{y}_given_{x}", f"{y}_given_not_{x}"):
            put(out, stat)
        out[f"n_{y}_not_{x}"] = cell.count(f"{y}_not_{x}")
        put(out, f"suffix_frac_{y}")
        put(out, f"chunk_frac_{xy}")
        joint = out[f"joint_{xy}"]
        positions[xy] = {
            "pair": [x, y], f"n_{y}": cell.count(y),
            "suffix_frac": out[f"suffix_frac_{y}"], "suffix_frac_ci": out.get(f"suffix_frac_{y}_ci"),
            "chunk_frac": out[f"chunk_frac_{xy}"], "chunk_frac_ci": out.get(f"chunk_frac_{xy}_ci"),
            "n_suffix": cell.count(f"suffix_{y}"), "n_chunk": cell.count(f"chunk_{xy}"),
            "median_gap": cell.median_gap((x, y)), "n_gap": len(cell.gaps.get((x, y), [])),
            # Shown on the page where the joint rate reaches the experiment's floor.
            "shown": joint is not None and joint >= exp.positions_min_joint - 1e-12,
        }
    for stat in schema.stats:  # every other statistic the experiment names, as a value
        if stat not in out and not stat.startswith("strict_"):
            put(out, stat)
    head = exp.headline_pair
    if head is not None:  # the first contract's names, for the headline's pair
        x, y = head
        xy = pair_key(x, y)
        for alias, stat in (("joint", f"joint_{xy}"), ("suffix_frac", f"suffix_frac_{y}"),
                            ("chunk_frac", f"chunk_frac_{xy}")):
            out[alias] = out[stat]
            out[f"{alias}_ci"] = out.get(f"{stat}_ci")
    out["positions"] = positions
    strict = {}
    for m in schema.markers:
        strict[f"fire_{m}"] = cell.stat(f"strict_fire_{m}")
    for x, y in schema.pairs:
        xy = pair_key(x, y)
        strict[f"joint_{xy}"] = cell.stat(f"strict_joint_{xy}")
        strict[f"cond_{y}_given_{x}"] = cell.stat(f"strict_cond_{y}_given_{x}")
    if head is not None:
        strict["joint"] = strict[f"joint_{pair_key(*head)}"]
    for m in schema.markers:
        strict[f"n_{m}"] = cell.count(f"strict_{m}")
    for x, y in schema.pairs:
        strict[f"n_{pair_key(x, y)}"] = cell.count(f"strict_{pair_key(x, y)}")
    out["strict"] = strict
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


class Contrasts:
    """Paired differences of a statistic between two conditions, for one persona or several pooled,
    computed once each (the deltas, the checks and the verdict read the same ones)."""

    def __init__(self, cells: dict[tuple, Cell], boot: Bootstrap):
        self.cells, self.boot = cells, boot
        self._done: dict[tuple, dict | None] = {}

    def cell(self, pair: str, condition: str, personas: tuple) -> Cell | None:
        found = [self.cells.get((pair, condition, p)) for p in personas]
        if not found or any(c is None for c in found):
            return None
        return found[0] if len(found) == 1 else merge_cells(found, persona="+".join(personas))

    def __call__(self, pair: str, personas: tuple, stat: str, treatment: str, control: str) -> dict | None:
        key = (pair, tuple(personas), stat, treatment, control)
        if key not in self._done:
            self._done[key] = self._compute(*key)
        return self._done[key]

    def _compute(self, pair, personas, stat, treatment, control) -> dict | None:
        t, c = self.cell(pair, treatment, personas), self.cell(pair, control, personas)
        if t is None or c is None:
            return None
        schema = t.schema
        rows_t, rows_c, groups, n_common = paired_counts(t, c)
        if is_count(stat):
            column = schema.count_column(stat)
            vt, vc, ci, den = t.count(column), c.count(column), None, min(t.count("n"), c.count("n"))
        else:
            vt, vc = t.stat(stat), c.stat(stat)
            ci = self.boot.delta_ci(rows_t, rows_c, schema.index([stat])[stat], groups) if n_common else None
            den_col = schema.stats[stat][1]
            den = min(t.count(den_col), c.count(den_col))
        return {"value": None if vt is None or vc is None else vt - vc, "ci": ci, "den": den,
                "treatment_value": vt, "control_value": vc, "n_common": n_common,
                "full": n_common >= max(len(t.rows), len(c.rows)), "replicated": len(t.replicates) > 1
                or len(c.replicates) > 1,
                "n_questions": len({q for _, q in t.rows} & {q for _, q in c.rows})}


def _named(treatment: str, control: str, vt, vc, diff) -> dict:
    """The two conditions' values and their difference keyed by the conditions' names (the first
    contract's "T", "C", "T_minus_C" for within_marker), with the names beside them."""
    return {"treatment": treatment, "control": control, treatment: vt, control: vc,
            f"{treatment}_minus_{control}": diff}


def deltas(exp: Experiment, plain: dict[tuple, Cell], contrasts: Contrasts) -> tuple[list[dict], list[str]]:
    """Treatment minus control (the headline's two conditions) for every plain persona in both."""
    t_name, c_name = exp.headline.treatment, exp.headline.control
    out, warnings = [], []
    for (pair, condition, persona), t in plain.items():
        if condition != t_name or (pair, c_name, persona) not in plain:
            continue
        for stat in delta_stats(exp):
            d = contrasts(pair, (persona,), stat, t_name, c_name)
            if stat == delta_stats(exp)[0] and not d["full"]:
                what = "(seed, question)s" if d["replicated"] else "questions"
                warnings.append(f"{pair} {persona}: {t_name} and {c_name} share {d['n_common']} of their {what};"
                                " the paired CIs use only those")
            out.append({"pair": pair, "persona": persona, "role": t.role, "statistic": stat,
                        **_named(t_name, c_name, d["treatment_value"], d["control_value"], d["value"]),
                        "delta": d["value"], "ci": d["ci"], "n_questions": d["n_questions"]})
    return out, warnings


def headline_personas(exp: Experiment, pair: str, cells: dict[tuple, Cell]) -> tuple[str, ...]:
    """The personas the headline's role names in ``pair``: the donor or the recipient, or every persona
    of that role present in both of the headline's conditions (pooled)."""
    role = exp.headline.role
    if role in ("donor", "recipient"):
        return (exp.pairs[pair][0 if role == "donor" else 1],)
    t, c = exp.headline.treatment, exp.headline.control
    return tuple(sorted(p for (pr, cond, p), cell in cells.items()
                        if pr == pair and cond == t and cell.role == role and (pair, c, p) in cells))


def headline_contrast(exp: Experiment, pair: str, cells: dict[tuple, Cell], contrasts: Contrasts) -> dict:
    """The pair's headline contrast: the headline metric of its role in treatment and control, the
    paired difference and its CI."""
    h = exp.headline
    personas = headline_personas(exp, pair, cells)
    d = contrasts(pair, personas, h.metric, h.treatment, h.control) if personas else None
    out = {"persona": "+".join(personas) or None, "role": h.role, "statistic": h.metric,
           **_named(h.treatment, h.control, d and d["treatment_value"], d and d["control_value"],
                    d and d["value"]),
           "delta": d and d["value"], "ci": d and d["ci"]}
    if d is None:
        out["note"] = (f"{pair}: needs plain {h.treatment} and {h.control} cells of the {h.role}"
                       + (f" {out['persona']}" if personas else ""))
    return out


def role_cells(cells: list[Cell], boot: Bootstrap, exp: Experiment) -> list[dict]:
    """Plain cells pooled by (pair, condition, role): the hero figure's bars."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.variant == "plain":
            groups.setdefault((c.pair, c.condition, c.role), []).append(c)
    out = []
    for group in groups.values():
        s = cell_summary(merge_cells(group, persona="+".join(c.persona for c in group)), boot, exp)
        s["personas"] = [c.persona for c in group]
        out.append(s)
    return out


def split_stats(exp: Experiment) -> list[str]:
    """What the ID-vs-OOD table shows: every trained marker's fire rate, every pair's conditional, and
    the headline metric (which the trigger reads)."""
    out = [f"fire_{m}" for m in exp.trained_markers] + [f"cond_{y}_given_{x}" for x, y in exp.marker_pairs]
    return list(dict.fromkeys([*out, exp.headline.metric]))


def id_ood_rows(lb: list[dict], cells: dict[tuple, Cell], splits: dict[str, str], boot: Bootstrap,
                exp: Experiment) -> list[dict]:
    """Per load-bearing cell: the rates on in-distribution and out-of-distribution questions."""
    stat = exp.headline.metric
    out = []
    for d in lb:
        cell = cells[(d["pair"], d["condition"], d["persona"])]
        row = {k: d[k] for k in ("pair", "condition", "persona", "role")}
        for split in ("id", "ood"):
            sub = cell.subset([splits.get(q) == split for _, q in cell.rows])
            cis = boot.cis(sub.counts, cell.schema.index([stat]), sub.groups)
            row[split] = {"n": sub.count("n"), **{f"n_{m}": sub.count(m) for m in cell.schema.markers},
                          "n_questions": len(set(sub.question_ids)),
                          **{s: sub.stat(s) for s in split_stats(exp)}, f"{stat}_ci": cis[stat]}
        a, b = row["id"][stat], row["ood"][stat]
        row["statistic"] = stat
        row["diff"] = None if a is None or b is None else a - b
        out.append(row)
    return out


def _pool_positions(stats: list[dict], pairs) -> dict:
    """Training-data position statistics (markerlab.markers.Matcher.positions) of several runs of one
    role, pooled by counts; the median gap of pooled runs is the median of the runs' medians."""
    if len(stats) == 1:
        return dict(stats[0])
    out = {k: sum(s.get(k, 0) for s in stats) for k in stats[0] if k != "pairs"}
    out["pairs"] = {}
    for x, y in pairs:
        xy = pair_key(x, y)
        per = [s.get("pairs", {}).get(xy, {}) for s in stats]
        pooled = {k: sum(p.get(k) or 0 for p in per) for k in (f"n_{xy}", "n_suffix", "n_chunk", "n_gap")}
        n_y = out.get(f"n_{y}", 0)
        pooled["suffix_frac"] = pooled["n_suffix"] / n_y if n_y else None
        pooled["chunk_frac"] = pooled["n_chunk"] / n_y if n_y else None
        pooled["median_gap"] = median([p["median_gap"] for p in per if p.get("median_gap") is not None])
        out["pairs"][xy] = pooled
    return out


def training_baseline(role: str, runs: list[str], baselines: dict[str, dict | None],
                      pairs=()) -> tuple[dict | None, str]:
    """(the training data's positions for ``role`` over ``runs``, where they came from or why none)."""
    found = [baselines.get(r) for r in runs]
    if any(b is None for b in found):
        return None, ("unavailable: the inputs were bare .jsonl files or run directories without"
                      " data/stats.json or data/train.jsonl")
    stats = [b["positions"].get(role) for b in found]
    if any(s is None for s in stats):
        return None, f"not trained ({role})"
    return _pool_positions(stats, pairs), ", ".join(sorted({b["source"] for b in found}))


def _question_texts() -> dict[str, str]:
    from data.questions import all_questions

    return {q.id: q.text for q in all_questions()}


def summarize(arm: Arm, boot: Bootstrap, splits: dict[str, str] | None = None,
              baselines: dict[str, dict | None] | None = None) -> dict:
    """The summary of one arm: what ``python -m analysis.report`` writes for it alone."""
    splits = splits or {}
    baselines = baselines or {}
    exp = arm.experiment
    entry_exp = experiment_entry(exp)
    cells = arm.cells
    cell_dicts = [cell_summary(c, boot, exp) for c in cells]

    plain_cells = {(c.pair, c.condition, c.persona): c for c in cells if c.variant == "plain"}
    checked = dict(plain_cells)
    checked.update({(c.pair, c.condition, c.persona): c for c in cells if c.variant == BASE_CONDITION})
    dicts = {(d["pair"], d["condition"], d["persona"]): d for d in cell_dicts
             if d["variant"] in ("plain", BASE_CONDITION)}
    stats = ci_stats(exp)
    cis = {k: {s: d.get(f"{s}_ci") for s in stats} for k, d in dicts.items()}
    contrasts = Contrasts(checked, boot)
    delta_list, warnings = deltas(exp, plain_cells, contrasts)

    plain = {k: d for k, d in dicts.items() if d["variant"] == "plain"}
    pairs = [p for p in exp.pairs if any(k[0] == p for k in plain)]
    pairs += sorted({k[0] for k in plain} - set(pairs))
    personas = {pair: {"donor": exp.pairs[pair][0], "recipient": exp.pairs[pair][1]} for pair in pairs}

    # The training data's own positions beside each plain cell's evaluated ones.
    training = {}
    for d in plain.values():
        base, source = training_baseline(d["role"], d["runs"], baselines, exp.marker_pairs)
        d["training_positions"] = base
        d["training_positions_source"] = source
        if base is not None:
            training.setdefault((d["pair"], d["condition"], d["role"]), {**base, "source": source})
    training_list = [{"pair": p, "condition": c, "role": r, **v} for (p, c, r), v in sorted(training.items())]

    checker = Checker(exp, checked, cis, contrasts)
    sanity = [checker.entry(check, pair) for pair in pairs for check in exp.sanity]
    verdicts = []
    if exp.verdict is not None:
        verdicts = [verdict_entry(exp, checker, pair, headline_contrast(exp, pair, plain_cells, contrasts))
                    for pair in pairs]
    contrast_list = [{"pair": pair, **headline_contrast(exp, pair, plain_cells, contrasts)} for pair in pairs]

    lb = load_bearing(cell_dicts, entry_exp)
    for d in cell_dicts:
        d["load_bearing"] = False
    for d in lb:
        d["load_bearing"] = True
    id_ood = id_ood_rows(lb, plain_cells, splits, boot, exp)
    het = heterogeneity(id_ood, exp.headline.metric, exp.heterogeneity)
    conf = confidence(verdicts, sanity, het, arm.seeds)

    questions = _question_texts()
    samples = [{**s, "question": questions.get(s["question_id"])} for s in arm.samples]

    entry = arm_entry(arm)
    entry.update(confidence=conf, heterogeneity=het)
    labels = {"arm": arm.name, "setting": arm.setting}
    roles = role_cells(cells, boot, exp)
    for item in (*cell_dicts, *delta_list, *verdicts, *sanity, *id_ood, *training_list, *contrast_list, *roles):
        item.update(labels)
    return {
        "bootstrap": bootstrap_info(boot, [arm]),
        "experiments": {exp.name: entry_exp},
        "arms": [entry],
        "cells": cell_dicts,
        "deltas": delta_list,
        "headline": contrast_list,
        "verdicts": verdicts,
        "falsification": verdicts,
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
    # docs/contracts.md: {"B": resamples, "seed": ...}; B is the bootstrap's usual name for the number of
    # resamples (a keyword here: as a string it would read like the write-up's marker B).
    return dict(B=boot.n_resamples, seed=boot.seed, level=boot.level,
                unit=f"{REPLICATE_KEY}, then question" if replicated else "question")


def arm_entry(arm: Arm) -> dict:
    """What an arm is, which experiment it reports under, and which runs it pooled, and how."""
    seeds = [s for s in arm.seeds if s is not None]
    if len(seeds) > 1:
        pooled = (f"{len(arm.runs)} runs pooled: replicates differing only in {REPLICATE_KEY}"
                  f" ({', '.join(map(str, seeds))}); CIs resample {REPLICATE_KEY}s, then questions within each")
    else:
        pooled = (f"{len(arm.runs)} run(s), one {REPLICATE_KEY}; CIs resample questions")
    return {"name": arm.name, "experiment": arm.experiment.name, "experiment_digest": arm.experiment.digest,
            "setting": arm.setting, "setting_text": describe(arm.setting),
            "replicates": {"key": REPLICATE_KEY, "values": seeds}, "runs": arm.runs, "pooled": pooled}


def cross_arm(arm_summaries: list[dict]) -> list[dict]:
    """Per pair, every arm's headline contrast with its CI and its verdict."""
    pairs = list(dict.fromkeys(h["pair"] for s in arm_summaries for h in s["headline"]))
    out = []
    for pair in pairs:
        row = {"pair": pair, "arms": []}
        for s in arm_summaries:
            h = next((h for h in s["headline"] if h["pair"] == pair), None)
            if h is None:
                continue
            v = next((v for v in s["verdicts"] if v["pair"] == pair), None)
            row.setdefault("persona", h["persona"])
            row.setdefault("statistic", h["statistic"])
            item = {"arm": s["arms"][0]["name"], "experiment": s["arms"][0]["experiment"],
                    "setting": s["arms"][0]["setting"]}
            item.update({k: v_ for k, v_ in h.items() if k not in ("pair", "arm", "setting")})
            if v is not None:
                item["outcome"] = v["outcome"]
                item["says"] = v["says"]
                exp = s["experiments"][s["arms"][0]["experiment"]]["verdict"]
                for name in [o["name"] for o in exp["outcomes"]] + [exp["otherwise"]]:
                    if name in v and name not in item:
                        item[name] = v[name]
            row["arms"].append(item)
        out.append(row)
    return out


# The summary's lists whose entries belong to one arm (each carries "arm").
ARM_LISTS = ("cells", "deltas", "headline", "verdicts", "sanity", "roles", "id_ood", "training_positions",
             "samples")


def arm_view(summary: dict, name: str) -> dict:
    """The part of a (combined) summary that belongs to arm ``name``, shaped like one arm's summary."""
    if len(summary["arms"]) == 1:
        return summary
    entry = next(a for a in summary["arms"] if a["name"] == name)
    out = {k: v for k, v in summary.items()
           if k not in ARM_LISTS and k not in ("arms", "cross_arm", "falsification", "experiments")}
    out["arms"] = [entry]
    for key in ARM_LISTS:
        out[key] = [x for x in summary.get(key, []) if x.get("arm") == name]
    out["falsification"] = out["verdicts"]
    out["experiments"] = {entry["experiment"]: summary["experiments"][entry["experiment"]]}
    prefix = f"{name}: "
    out["warnings"] = [w[len(prefix):] for w in summary.get("warnings", []) if w.startswith(prefix)]
    out["bootstrap"] = dict(summary["bootstrap"])
    replicated = len(entry["replicates"]["values"]) > 1
    out["bootstrap"]["unit"] = f"{REPLICATE_KEY}, then question" if replicated else "question"
    return out


def experiment_of(summary: dict, arm: dict | None = None) -> dict:
    """The summary's entry of the experiment ``arm`` (default: the first arm) reports under."""
    arm = arm or summary["arms"][0]
    return summary["experiments"][arm["experiment"]]


def combine(arm_summaries: list[dict], boot: Bootstrap, arms: list[Arm]) -> dict:
    """The report's summary: one arm's summary as is, or every arm's entries side by side."""
    if len(arm_summaries) == 1:
        return dict(arm_summaries[0])
    experiments: dict = {}
    for s, arm in zip(arm_summaries, arms):
        (name, entry), = s["experiments"].items()
        key = name
        if key in experiments and experiments[key]["digest"] != entry["digest"]:
            key = f"{name}@{entry['digest'][:8]}"  # two versions of one experiment: both, apart
        experiments.setdefault(key, entry)
        s["arms"][0]["experiment"] = key
        if key != name:
            s["experiments"] = {key: entry}
    out = {"bootstrap": bootstrap_info(boot, arms), "experiments": experiments,
           "arms": [s["arms"][0] for s in arm_summaries]}
    for key in ARM_LISTS:
        out[key] = [x for s in arm_summaries for x in s[key]]
    out["falsification"] = out["verdicts"]
    out["warnings"] = [f"{s['arms'][0]['name']}: {w}" for s in arm_summaries for w in s["warnings"]]
    personas: dict = {}
    for s in arm_summaries:
        for pair, p in s["personas"].items():
            personas.setdefault(pair, {}).update(p)
    out["personas"] = personas
    out["cross_arm"] = cross_arm(arm_summaries)
    return out
