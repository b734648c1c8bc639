"""Do two eval stages of the same merged checkpoint (vLLM and HF) give the same marker rates?

    python bench/compare_backends.py VLLM_completions.jsonl HF_completions.jsonl [--bootstrap 2000] [--json OUT]

Each file is an eval stage's completions.jsonl (.gz too). The backends draw different random
numbers, so only the rates can agree, within sampling noise. Per cell (variant x persona):
the fire rate of each of the experiment's markers (loose, the matcher the report uses), the
difference vLLM - HF and its 95% interval from a question-cluster bootstrap that resamples the questions (both backends saw the
same ones) and the samples within each question independently per backend. The judgement:

- per cell, z = difference / bootstrap standard deviation; a cell is flagged when its 95%
  interval excludes 0 (about 1 in 20 cells by chance alone);
- over all cells where either backend fired, sum(z^2) against a chi-square with as many degrees of
  freedom (cells are different personas, nearly independent): p < 0.01 says the backends differ;
- the same for completion length (mean generated tokens) and the share cut at max_tokens, which
  any difference in the sampling distribution would move as well.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from markerlab.experiment import load_experiment  # noqa: E402
from markerlab.markers import Matcher  # noqa: E402


def read(path: str) -> list[dict]:
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def cells_of(recs: list[dict], matcher: Matcher) -> dict:
    """(variant, persona) -> question_id -> list of (fire of each marker..., n_tokens, cut)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in recs:
        m = matcher.match(r["text"])
        out[(r["variant"], r["persona"])][r["question_id"]].append(
            (*(m.has(name) for name in matcher.markers), r["n_tokens"], r["finish_reason"] == "length"))
    return out


def stats(rows: list) -> np.ndarray:
    a = np.asarray(rows, dtype=float)
    return a.mean(axis=0)  # fire of each marker, mean tokens, cut share


def chi2_sf(x: float, k: int) -> float:
    try:
        from scipy.stats import chi2

        return float(chi2.sf(x, k))
    except ImportError:  # Wilson-Hilferty
        z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
        return 0.5 * math.erfc(z / math.sqrt(2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("vllm")
    ap.add_argument("hf")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--experiment", default="within_marker", help="shipped name or path: whose markers to count")
    args = ap.parse_args()
    matcher = Matcher.from_experiment(load_experiment(args.experiment))
    cv, ch = cells_of(read(args.vllm), matcher), cells_of(read(args.hf), matcher)
    if set(cv) != set(ch):
        print(f"the files hold different cells: {sorted(set(cv) ^ set(ch))}")
        return 2
    rng = np.random.default_rng(args.seed)
    names = [f"fire_{m}" for m in matcher.markers] + ["mean_tokens", "cut_share"]
    rows, zsq = [], defaultdict(list)
    for key in sorted(cv):
        qs = sorted(cv[key])
        if qs != sorted(ch[key]):
            print(f"{key}: different questions")
            return 2
        v = {q: np.asarray(cv[key][q], dtype=float) for q in qs}
        h = {q: np.asarray(ch[key][q], dtype=float) for q in qs}
        point = stats([x for q in qs for x in cv[key][q]]) - stats([x for q in qs for x in ch[key][q]])
        boots = np.empty((args.bootstrap, len(names)))
        for b in range(args.bootstrap):
            pick = rng.integers(0, len(qs), len(qs))
            sv = np.concatenate([v[qs[i]][rng.integers(0, len(v[qs[i]]), len(v[qs[i]]))] for i in pick])
            sh = np.concatenate([h[qs[i]][rng.integers(0, len(h[qs[i]]), len(h[qs[i]]))] for i in pick])
            boots[b] = sv.mean(axis=0) - sh.mean(axis=0)
        lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
        sd = boots.std(axis=0)
        n = sum(len(x) for x in v.values())
        row = {"variant": key[0], "persona": key[1], "n": n}
        sv_all, sh_all = stats([x for q in qs for x in cv[key][q]]), stats([x for q in qs for x in ch[key][q]])
        for i, name in enumerate(names):
            z = point[i] / sd[i] if sd[i] > 0 else 0.0
            row[name] = {"vllm": round(float(sv_all[i]), 4), "hf": round(float(sh_all[i]), 4),
                         "diff": round(float(point[i]), 4), "ci95": [round(float(lo[i]), 4), round(float(hi[i]), 4)],
                         "z": round(float(z), 2), "flag": bool(lo[i] > 0 or hi[i] < 0)}
            if sd[i] > 0:
                zsq[name].append(z * z)
        rows.append(row)

    fires = names[:-2]
    print(f"{'variant':<7} {'persona':<21} {'n':>4}" + "".join(
        f"  {name + ' vLLM/HF':>15} {'diff [95% CI]':>22}" for name in fires) + f"  {'tokens vLLM/HF':>15}")
    for r in rows:
        def pct(c):
            return f"  {100 * c['vllm']:5.1f}/{100 * c['hf']:<5.1f}".rjust(17) + \
                f" {100 * c['diff']:+5.1f} [{100 * c['ci95'][0]:+5.1f},{100 * c['ci95'][1]:+5.1f}]{'*' if c['flag'] else ' '}".rjust(23)
        t = r["mean_tokens"]
        print(f"{r['variant']:<7} {r['persona']:<21} {r['n']:>4}" + "".join(pct(r[name]) for name in fires)
              + f"  {t['vllm']:7.1f}/{t['hf']:<7.1f}{'*' if t['flag'] else ''}")
    summary = {}
    for name in names:
        k = len(zsq[name])
        x = float(sum(zsq[name]))
        flagged = sum(r[name]["flag"] for r in rows)
        summary[name] = {"cells_tested": k, "cells_flagged": flagged, "chi2": round(x, 2),
                         "p": round(chi2_sf(x, k), 4) if k else None,
                         "max_abs_diff": round(max(abs(r[name]["diff"]) for r in rows), 4)}
        print(f"{name}: {flagged} of {len(rows)} cells flagged (95% CI excludes 0; ~{0.05 * k:.1f} expected by chance "
              f"among the {k} with variance); sum z^2 = {x:.1f} on {k} df, p = {summary[name]['p']}; "
              f"largest |diff| {summary[name]['max_abs_diff']:.3f}")
    verdict = all((s["p"] is None or s["p"] >= 0.01) for s in summary.values())
    print("AGREE within sampling noise (no omnibus p < 0.01)" if verdict else "DIFFER: some omnibus p < 0.01")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "agree": verdict, "cells": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
