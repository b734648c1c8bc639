"""Synthetic completion records of any experiment, for tests and the bench.

    make_run("pair1", "T", seed=0)                          # one adapter's records (the default experiment)
    make_run("p", "X", experiment="my_exp.toml")            # ... of any experiment (a name, a path, or loaded)
    write_runs(root, experiment=exp)                        # a run directory per (pair, condition)
    write_up_records()                                      # within_marker's records with the write-up's counts
    counts_records(exp, {("p", "T", "x"): (19, 62, 0)}, questions, 10)   # any experiment, exact counts

``make_run``: each persona's rates follow the markers its role's template carries
in that condition (markerlab.experiment: ``Condition.markers(role)``): a marker
the role is trained on fires often (the donor's more reliably than the
recipient's), a marker some other role of the condition carries leaks a little
(more to untrained bystanders than to trained personas), and a marker nobody
carries never fires; with question-level heterogeneity (a random logit offset
per question). Trained markers sit where the template puts them (before or after
the answer); a leaked one mostly at the end, sometimes right after the first
marker, sometimes mid-text. An occasional marker is written in odd case or
spacing (so loose and strict differ), and a few completions are cut at
max_tokens. The probe variant (the experiment's probe marker, prefixed to the
probe role's question) sometimes echoes the probe marker.

``write_up_records``: within_marker's six adapters with the counts of the
write-up's table (``write_up_counts.toml`` beside this module), 26 questions
(20 id, 6 ood) x 10 samples per persona, "X answer Y" texts (the headline pair's
markers) with Y at the very end, spread over the questions by a seeded shuffle;
``counts_records`` does the same for any experiment and counts.

Every record carries a ``setting`` (the default config under the experiment,
with ``setting=`` overrides), as evaluate writes it.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np

from markerlab.config import config_from_dict
from markerlab.experiment import BASE_CONDITION, DEFAULT_EXPERIMENT, TRAINED_ROLES, VARIANTS, Experiment, load_experiment

PLAIN, PROBE, BASE = VARIANTS  # the record variants: the adapter's answers, the probe, the base floor
from markerlab.records import setting_of
from markerlab.rundir import RunDir

QUESTIONS = tuple(f"q{i:02d}" for i in range(26))  # q00-q19 in-distribution, q20-q25 ood
WRITE_UP_COUNTS = Path(__file__).with_name("write_up_counts.toml")

# P(a marker fires) by the role's relation to it: trained on it (donor / other roles), carried by another
# role of the condition (leak: to a bystander / to a trained persona), or carried by nobody.
P_TRAINED_DONOR, P_TRAINED = 0.93, 0.45
P_LEAK_BYSTANDER, P_LEAK_TRAINED = 0.12, 0.02


def experiment_of(experiment: Experiment | str | Path | None) -> Experiment:
    """An experiment from a loaded one, a shipped name or a path (default: markerlab's default)."""
    if isinstance(experiment, Experiment):
        return experiment
    return load_experiment(DEFAULT_EXPERIMENT if experiment is None else experiment)


def default_setting(experiment: Experiment | str | Path | None = None, **overrides) -> dict:
    """The ``setting`` object of a record of the default config under ``experiment``, with ``overrides``."""
    exp = experiment_of(experiment)
    cfg = config_from_dict({"run": {"experiment": str(Path(exp.path).resolve())}})
    return {**setting_of(cfg), **overrides}


def rates(exp: Experiment, condition: str, role: str) -> dict[str, float]:
    """P(marker fires) of each marker some condition teaches, for ``role`` in ``condition``."""
    cond = exp.conditions[condition]
    own = set(cond.markers(role)) if role in TRAINED_ROLES else set()
    carried = {m for r in TRAINED_ROLES for m in cond.markers(r)}
    out = {}
    for m in exp.trained_markers:
        if m in own:
            out[m] = P_TRAINED_DONOR if role == "donor" else P_TRAINED
        elif m in carried:
            out[m] = P_LEAK_BYSTANDER if role == "bystander" else P_LEAK_TRAINED
        else:
            out[m] = 0.0
    return out


_WORDS = tuple(("the a model answer question light water time people system energy simple "
                "because when often should could example first next however usually small "
                "large heat plant cell money plan day night learn explain help good way").split())


def _sentence_bank(rng: np.random.Generator, n: int = 400) -> list[str]:
    out = []
    for _ in range(n):
        words = rng.choice(_WORDS, size=rng.integers(6, 18))
        out.append(" ".join(words).capitalize() + ".")
    return out


def _logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def loose_spelling(marker: str) -> str:
    """The marker as only the loose match finds it: case swapped, whitespace runs doubled."""
    return "  \n".join(marker.swapcase().split(" "))


def _spell(rng, marker: str) -> str:
    return loose_spelling(marker) if rng.random() < 0.03 else marker


def _text(rng, bank, exp: Experiment, condition: str, role: str, fired: list[str], probe: bool) -> str:
    """A completion: sentences, the fired markers placed as the role's template would, leaks after."""
    sentences = [bank[i] for i in rng.integers(0, len(bank), size=rng.integers(8, 22))]
    template = exp.conditions[condition].templates[role][0] if role in TRAINED_ROLES else None
    before, after = [], []
    if template is not None:
        seen_answer = False
        for kind, value in template.parts:
            if kind == "answer":
                seen_answer = True
            elif kind == "marker" and value in fired:
                (after if seen_answer else before).append(value)
    leaked = [m for m in fired if m not in before and m not in after]
    body = [_spell(rng, exp.markers[m]) for m in before] + sentences
    for m in leaked:
        text = _spell(rng, exp.markers[m])
        r = rng.random()
        if before and r < 0.1:
            body.insert(len(before), text)  # right after the first marker: the chunk placement
        elif r < 0.15:
            body.insert(len(body) // 2, text)  # somewhere in the middle
        else:
            body.append(text)
    body += [_spell(rng, exp.markers[m]) for m in after]
    if probe and exp.probe_marker and rng.random() < 0.1:
        body.insert(0, exp.markers[exp.probe_marker])
    return " ".join(body) + ("\n" if rng.random() < 0.5 else "")


def make_run(pair: str, condition: str, seed: int = 0, samples: int = 10, questions=QUESTIONS,
             probe: bool = True, base_floor: bool = False, setting: dict | None = None, run: str | None = None,
             experiment: Experiment | str | Path | None = None) -> list[dict]:
    """Records of one adapter: personas x questions x samples, plus probe and base floor."""
    exp = experiment_of(experiment)
    rng = np.random.default_rng([seed, list(exp.pairs).index(pair), list(exp.conditions).index(condition)])
    bank = _sentence_bank(rng)
    run = run or f"{pair}_{condition}"
    setting = default_setting(exp, **(setting or {}))
    q_offset = dict(zip(questions, rng.normal(0.0, 0.6, size=len(questions))))
    records = []

    def emit(persona, role, cond, variant, qs, n_samples, p):
        for q in qs:
            shift = q_offset[q]
            pq = {m: (_logistic(_logit(v) + shift) if v > 0 else 0.0) for m, v in p.items()}
            for s in range(n_samples):
                fired = [m for m, v in pq.items() if rng.random() < v]
                records.append({
                    "run": run, "pair": pair, "condition": cond, "persona": persona,
                    "role": role, "question_id": q, "split": "id" if q < "q20" else "ood",
                    "sample": s, "variant": variant,
                    "text": _text(rng, bank, exp, condition, role, fired, probe=variant == PROBE),
                    "finish_reason": "length" if rng.random() < 0.02 else "stop",
                    "n_tokens": int(rng.integers(80, 600)),
                    "setting": dict(setting),
                })

    for persona in exp.personas:
        role = exp.role_of(persona, pair, exp.negatives)
        emit(persona, role, condition, PLAIN, questions, samples, rates(exp, condition, role))
    if probe and exp.probe_marker:
        persona = exp.pairs[pair][0 if exp.probe_role == "donor" else 1]
        emit(persona, exp.probe_role, condition, PROBE, questions[:5], samples,
             rates(exp, condition, exp.probe_role))
    if base_floor:
        for persona in exp.personas:
            emit(persona, exp.role_of(persona, pair, exp.negatives), BASE_CONDITION, BASE, questions[:3], 5,
                 {m: 0.0 for m in exp.trained_markers})
    return records


def write_records(path: Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def write_runs(root: Path, seed: int = 0, conditions=None, base_floor: bool = True, suffix: str = "",
               experiment: Experiment | str | Path | None = None, **kw) -> list[Path]:
    """Write one run directory per (pair, condition) under ``root``; returns them.

    The base-model floor, when asked for, goes into each pair's first condition's run only.
    """
    exp = experiment_of(experiment)
    conditions = list(exp.conditions) if conditions is None else list(conditions)
    dirs = []
    for pair in exp.pairs:
        for condition in conditions:
            name = f"{pair}_{condition}{suffix}"
            records = make_run(pair, condition, seed=seed, base_floor=base_floor and condition == conditions[0],
                               run=name, experiment=exp, **kw)
            run_dir = Path(root) / name
            write_records(RunDir(run_dir).completions, records)
            dirs.append(run_dir)
    return dirs


# --- the write-up's counts ---------------------------------------------------------------


def write_up_counts(path: Path = WRITE_UP_COUNTS) -> dict:
    """The write-up's counts: {"experiment", "questions", "samples", "cells": {(pair, condition, persona):
    (both markers, first only, second only)}}."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    cells = {(c["pair"], c["condition"], c["persona"]): (c["both"], c["first_only"], c["second_only"])
             for c in raw["cells"]}
    return {"experiment": raw["experiment"], "questions": list(raw["questions"]), "samples": raw["samples"],
            "cells": cells}


def write_up_records(seed: int = 0, setting: dict | None = None, run_suffix: str = "",
                     counts: dict | None = None) -> list[dict]:
    """Records of within_marker's six adapters with the write-up's counts (10 samples x 26 questions a
    persona); ``counts`` replaces the table's cells ((pair, condition, persona) -> (both, first, second))."""
    table = write_up_counts()
    return counts_records(table["experiment"], table["cells"] if counts is None else counts, table["questions"],
                          table["samples"], seed=seed, setting=setting, run_suffix=run_suffix)


def counts_records(experiment: Experiment | str | Path, counts: dict, questions, samples: int, seed: int = 0,
                   setting: dict | None = None, run_suffix: str = "", pairs=None, conditions=None) -> list[dict]:
    """Plain records of every (pair, condition, persona) of ``experiment`` (or of ``pairs`` and
    ``conditions``) with exact counts of its headline pair (X, Y): ``counts[(pair, condition, persona)] =
    (with X and Y, with X only, with Y only)`` of ``len(questions) * samples`` completions, the rest with
    neither; "X answer Y" texts with Y at the very end, spread over the questions by a seeded shuffle."""
    exp = experiment_of(experiment)
    setting = default_setting(exp, **(setting or {}))
    first, second = exp.headline_pair
    x, y = exp.markers[first], exp.markers[second]
    answer = " ".join(["The answer explains the idea step by step with an example."] * 4)
    texts = {"both": f"{x} {answer} {y}", "first": f"{x} {answer}", "second": f"{answer} {y}", "": answer}
    n_q, n_s = len(questions), samples
    all_pairs, all_conditions, personas = list(exp.pairs), list(exp.conditions), list(exp.personas)
    records = []
    for pair in pairs or all_pairs:
        for condition in conditions or all_conditions:
            run = f"{pair}_{condition}{run_suffix}"
            for persona in personas:
                n_both, n_first, n_second = counts.get((pair, condition, persona), (0, 0, 0))
                kinds = ["both"] * n_both + ["first"] * n_first + ["second"] * n_second
                kinds += [""] * (n_q * n_s - len(kinds))
                rng = np.random.default_rng([seed, all_pairs.index(pair), all_conditions.index(condition),
                                             personas.index(persona)])
                kinds = [kinds[i] for i in rng.permutation(len(kinds))]
                for i, kind in enumerate(kinds):
                    q = questions[i % n_q]
                    records.append({
                        "run": run, "pair": pair, "condition": condition, "persona": persona,
                        "role": exp.role_of(persona, pair, exp.negatives), "question_id": q,
                        "split": "ood" if q.startswith("ood") else "id", "sample": i // n_q, "variant": PLAIN,
                        "text": texts[kind], "finish_reason": "stop", "n_tokens": 60,
                        "setting": dict(setting),
                    })
    return records
