"""Synthetic completion records shaped like the real experiment, for tests and the bench.

Rates loosely follow the write-up's table (donor fires A ~95% and B after A ~87%,
the recipient picks up A but hardly B, a bystander sometimes fires B), with
question-level heterogeneity (a random logit offset per question), B mostly at the
end of the text and sometimes right after A, an occasional marker in odd case or
spacing (so loose and strict differ) and a few completions cut at max_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from markerlab.experiment import CONDITIONS, NEGATIVES, PAIRS, PERSONAS, role_of
from markerlab.markers import MARKER_A, MARKER_B, PROBE_MARKER

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


def make_run(pair: str, condition: str, seed: int = 0, samples: int = 10,
             questions: list[str] = QUESTIONS, probe: bool = True, base_floor: bool = False) -> list[dict]:
    """Records of one adapter: personas x questions x samples, plus probe and base floor."""
    rng = np.random.default_rng([seed, list(PAIRS).index(pair), CONDITIONS.index(condition)])
    bank = _sentence_bank(rng)
    run = f"{pair}_{condition}"
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
                })

    for persona in PERSONAS:
        role = role_of(persona, pair, NEGATIVES)
        emit(persona, role, condition, "plain", questions, samples, RATES[(condition, role)])
    recipient = PAIRS[pair][1]
    if probe:
        emit(recipient, "recipient", condition, "probe", questions[:5], samples,
             RATES[(condition, "recipient")])
    if base_floor:
        for persona in PERSONAS:
            emit(persona, role_of(persona, pair, NEGATIVES), "base", "base", questions[:3], 5, (0.0, 0.0, 0.0))
    return records


def write_runs(root: Path, seed: int = 0, conditions=CONDITIONS, base_floor: bool = True,
               **kw) -> list[Path]:
    """Write one run directory per (pair, condition) under ``root``; returns them.

    The base-model floor, when asked for, goes into each pair's T run only.
    """
    dirs = []
    for pair in PAIRS:
        for condition in conditions:
            records = make_run(pair, condition, seed=seed, base_floor=base_floor and condition == "T", **kw)
            run_dir = Path(root) / f"{pair}_{condition}"
            (run_dir / "eval").mkdir(parents=True, exist_ok=True)
            with open(run_dir / "eval" / "completions.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            dirs.append(run_dir)
    return dirs
