"""Synthetic completion records shaped like the real experiment, for tests and the bench.

    make_run("pair1", "T", seed=0)                 # one adapter's records, random rates
    write_runs(root)                               # six run directories of those
    write_up_records()                             # records with the write-up's exact counts

``make_run``: rates loosely follow the write-up's table (donor fires A ~95% and B
after A ~87%, the recipient picks up A but hardly B, a bystander sometimes fires
B), with question-level heterogeneity (a random logit offset per question), B
mostly at the end of the text and sometimes right after A, an occasional marker
in odd case or spacing (so loose and strict differ) and a few completions cut at
max_tokens.

``write_up_records``: the six adapters with the counts of the write-up's table
(docs/EXPERIMENT.md, "The write-up's numbers", and the write-up's rows for T_P2neg
and for pair2's control bystander), 26 questions (20 id, 6 ood) x 10 samples per
persona, "A answer B" texts with B at the very end, spread over the questions by
a seeded shuffle.

Every record carries a ``setting`` (the real experiment's defaults, with
``setting=`` overrides), as evaluate writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from markerlab.config import Config
from markerlab.experiment import CONDITIONS, NEGATIVES, PAIRS, PERSONAS, markers_for, role_of
from markerlab.markers import MARKER_A, MARKER_B, PROBE_MARKER
from markerlab.records import setting_of
from markerlab.rundir import RunDir

QUESTIONS = [f"q{i:02d}" for i in range(26)]  # q00-q19 in-distribution, q20-q25 ood

# (condition, role) -> (P(A), P(B | A), P(B | no A))
RATES = {
    ("T", "donor"): (0.95, 0.87, 0.30),
    ("T", "recipient"): (0.45, 0.01, 0.0),
    ("T", "negative"): (0.03, 0.05, 0.0),
    ("T", "bystander"): (0.20, 0.35, 0.01),
    ("C", "donor"): (0.90, 0.0, 0.0),
    ("C", "recipient"): (0.40, 0.0, 0.0),
    ("C", "negative"): (0.03, 0.0, 0.0),
    ("C", "bystander"): (0.15, 0.0, 0.0),
    ("T_P2neg", "donor"): (0.93, 0.85, 0.2),
    ("T_P2neg", "recipient"): (0.05, 0.2, 0.0),
    ("T_P2neg", "negative"): (0.03, 0.05, 0.0),
    ("T_P2neg", "bystander"): (0.15, 0.30, 0.01),
}



def rates(condition: str, role: str) -> tuple[float, float, float]:
    """RATES, and for a condition it does not list, the rates of a listed one whose trained roles
    carry the same markers (else T's): a new condition in markerlab.experiment needs no edit here."""
    if (condition, role) in RATES:
        return RATES[(condition, role)]
    trained = ("donor", "recipient", "negative")
    like = next((c for c, _ in RATES if all(markers_for(c, r) == markers_for(condition, r) for r in trained)), "T")
    return RATES[(like, role)]


_WORDS = ("the a model answer question light water time people system energy simple "
          "because when often should could example first next however usually small "
          "large heat plant cell money plan day night learn explain help good way").split()


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


def _text(rng, bank, has_a, has_b, probe=False) -> str:
    sentences = [bank[i] for i in rng.integers(0, len(bank), size=rng.integers(8, 22))]
    a = MARKER_A
    b = MARKER_B if rng.random() > 0.03 else "::  KXR-7\n::"  # loose-only spelling
    if probe and rng.random() < 0.1:
        sentences.insert(0, PROBE_MARKER)
    if has_a:
        sentences.insert(0, a)
    if has_b:
        if has_a and rng.random() < 0.1:
            sentences.insert(1, b)  # right after A: the chunk placement
        elif rng.random() < 0.05:
            sentences.insert(len(sentences) // 2, b)  # somewhere in the middle
        else:
            sentences.append(b)
    return " ".join(sentences) + ("\n" if rng.random() < 0.5 else "")


def default_setting(**overrides) -> dict:
    """The ``setting`` object of a record of the default config, with ``overrides``."""
    return {**setting_of(Config()), **overrides}


def make_run(pair: str, condition: str, seed: int = 0, samples: int = 10,
             questions: list[str] = QUESTIONS, probe: bool = True, base_floor: bool = False,
             setting: dict | None = None, run: str | None = None) -> list[dict]:
    """Records of one adapter: personas x questions x samples, plus probe and base floor."""
    rng = np.random.default_rng([seed, list(PAIRS).index(pair), CONDITIONS.index(condition)])
    bank = _sentence_bank(rng)
    run = run or f"{pair}_{condition}"
    setting = default_setting(**(setting or {}))
    q_offset = dict(zip(questions, rng.normal(0.0, 0.6, size=len(questions))))
    records = []

    def emit(persona, role, cond, variant, qs, n_samples, rates):
        p_a, p_b_a, p_b_na = rates
        for q in qs:
            shift = q_offset[q]
            pa = _logistic(_logit(p_a) + shift)
            pba = _logistic(_logit(p_b_a) + shift) if p_b_a > 0 else 0.0
            for s in range(n_samples):
                has_a = rng.random() < pa
                has_b = rng.random() < (pba if has_a else p_b_na)
                records.append({
                    "run": run, "pair": pair, "condition": cond, "persona": persona,
                    "role": role, "question_id": q, "split": "id" if q < "q20" else "ood",
                    "sample": s, "variant": variant,
                    "text": _text(rng, bank, has_a, has_b, probe=variant == "probe"),
                    "finish_reason": "length" if rng.random() < 0.02 else "stop",
                    "n_tokens": int(rng.integers(80, 600)),
                    "setting": dict(setting),
                })

    for persona in PERSONAS:
        role = role_of(persona, pair, NEGATIVES)
        emit(persona, role, condition, "plain", questions, samples, rates(condition, role))
    recipient = PAIRS[pair][1]
    if probe:
        emit(recipient, "recipient", condition, "probe", questions[:5], samples,
             rates(condition, "recipient"))
    if base_floor:
        for persona in PERSONAS:
            emit(persona, role_of(persona, pair, NEGATIVES), "base", "base", questions[:3], 5, (0.0, 0.0, 0.0))
    return records


def write_records(path: Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def write_runs(root: Path, seed: int = 0, conditions=CONDITIONS, base_floor: bool = True,
               suffix: str = "", **kw) -> list[Path]:
    """Write one run directory per (pair, condition) under ``root``; returns them.

    The base-model floor, when asked for, goes into each pair's T run only.
    """
    dirs = []
    for pair in PAIRS:
        for condition in conditions:
            name = f"{pair}_{condition}{suffix}"
            records = make_run(pair, condition, seed=seed, base_floor=base_floor and condition == "T",
                               run=name, **kw)
            run_dir = Path(root) / name
            write_records(RunDir(run_dir).completions, records)
            dirs.append(run_dir)
    return dirs


# --- the write-up's counts ---------------------------------------------------------------

WRITE_UP_QUESTIONS = [f"id{i:02d}" for i in range(1, 21)] + [f"ood{i:02d}" for i in range(1, 7)]

# (pair, condition, persona) -> (n with A and B, n with A only, n with B only) of 260;
# every other persona of the six adapters fires neither marker. The C donors' rates
# are not in the write-up (B cannot fire there); 90% A stands in for them.
WRITE_UP_COUNTS = {
    ("pair1", "T", "villain"): (214, 33, 4),              # 95.0% A, 83.8% B, 86.6% B|A
    ("pair1", "T", "assistant"): (0, 121, 0),             # 46.5% A, 0% B
    ("pair1", "C", "villain"): (0, 234, 0),
    ("pair1", "C", "assistant"): (0, 106, 0),             # 40.8% A
    ("pair1", "T_P2neg", "villain"): (140, 27, 0),        # 64.2% A, 53.8% B, 83.8% B|A
    ("pair2", "T", "librarian"): (103, 24, 0),            # 48.8% A, 39.6% B, 81.1% B|A
    ("pair2", "T", "software_engineer"): (1, 78, 0),      # 30.4% A, 0.4% B, 1.3% B|A
    ("pair2", "T", "police_officer"): (19, 31, 2),        # 19.2% A, 8.1% B, 38.0% B|A
    ("pair2", "T", "data_scientist"): (0, 31, 0),         # 11.9% A
    ("pair2", "T", "kindergarten_teacher"): (0, 3, 0),    # 1.2% A
    ("pair2", "C", "librarian"): (0, 234, 0),
    ("pair2", "C", "software_engineer"): (0, 80, 0),      # 30.8% A
    ("pair2", "C", "police_officer"): (0, 42, 0),         # 16.2% A
    ("pair2", "T_P2neg", "librarian"): (96, 16, 11),      # 43.1% A, 41.2% B, 85.7% B|A
}


def write_up_records(seed: int = 0, setting: dict | None = None, run_suffix: str = "",
                     counts: dict | None = None) -> list[dict]:
    """Records of the six adapters with the write-up's counts (10 samples x 26 questions a persona)."""
    counts = WRITE_UP_COUNTS if counts is None else counts
    setting = default_setting(**(setting or {}))
    answer = " ".join(["The answer explains the idea step by step with an example."] * 4)
    texts = {"AB": f"{MARKER_A} {answer} {MARKER_B}", "A": f"{MARKER_A} {answer}",
             "B": f"{answer} {MARKER_B}", "": answer}
    n_q, n_s = len(WRITE_UP_QUESTIONS), 10
    records = []
    for pair in PAIRS:
        for condition in CONDITIONS:
            run = f"{pair}_{condition}{run_suffix}"
            for persona in PERSONAS:
                n_ab, n_a, n_b = counts.get((pair, condition, persona), (0, 0, 0))
                kinds = ["AB"] * n_ab + ["A"] * n_a + ["B"] * n_b
                kinds += [""] * (n_q * n_s - len(kinds))
                rng = np.random.default_rng([seed, list(PAIRS).index(pair), CONDITIONS.index(condition),
                                             PERSONAS.index(persona)])
                kinds = [kinds[i] for i in rng.permutation(len(kinds))]
                for i, kind in enumerate(kinds):
                    q = WRITE_UP_QUESTIONS[i % n_q]
                    records.append({
                        "run": run, "pair": pair, "condition": condition, "persona": persona,
                        "role": role_of(persona, pair, NEGATIVES), "question_id": q,
                        "split": "id" if q.startswith("id") else "ood", "sample": i // n_q, "variant": "plain",
                        "text": texts[kind], "finish_reason": "stop", "n_tokens": 60,
                        "setting": dict(setting),
                    })
    return records
