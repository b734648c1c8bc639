"""`python -m analysis.report` end to end, through a subprocess like a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.synthetic import default_setting, write_runs

REPO = Path(__file__).resolve().parents[1]
FIGURES = [f"figures/{name}.{ext}" for name in ("hero", "bystander", "position", "per_persona")
           for ext in ("png", "pdf")]


def run_report(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def six_runs(tmp_path_factory) -> list[Path]:
    return write_runs(tmp_path_factory.mktemp("runs"), seed=0)


def test_full_report_on_six_runs(six_runs, tmp_path):
    out = tmp_path / "report"
    # The directory holding the six run directories stands for all of them.
    proc = run_report(str(six_runs[0].parent), "--out", str(out), "--bootstrap", "500", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    for rel in ["summary.json", "report.md", "table.md", *FIGURES]:
        assert (out / rel).is_file() and (out / rel).stat().st_size > 1000, rel
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries behind

    summary = json.loads((out / "summary.json").read_text())
    assert summary["bootstrap"] == {"B": 500, "seed": 3, "level": 0.95, "unit": "question"}
    plain = [c for c in summary["cells"] if c["variant"] == "plain"]
    assert len(plain) == 6 * 11 and all(c["n"] == 260 for c in plain)
    probe = [c for c in summary["cells"] if c["variant"] == "probe"]
    assert len(probe) == 6 and all("fire_probe" in c and c["persona"] in ("assistant", "software_engineer")
                                   for c in probe)
    assert any(c["variant"] == "base" for c in summary["cells"])
    contract = {"pair", "condition", "persona", "role", "variant", "n", "n_A", "n_B", "n_AB", "fire_A",
                "fire_B", "joint", "cond_B_given_A", "fire_A_ci", "fire_B_ci", "cond_B_given_A_ci",
                "suffix_frac", "chunk_frac", "strict"}
    assert all(contract <= set(c) for c in summary["cells"])
    assert all({"fire_A", "fire_B", "joint", "cond_B_given_A"} <= set(c["strict"]) for c in summary["cells"])
    # Every marker's fire rate (the probe marker's too) and the pair's conditional.
    assert {d["statistic"] for d in summary["deltas"]} == {"fire_A", "fire_B", "fire_probe", "cond_B_given_A"}
    assert len(summary["deltas"]) == 2 * 11 * 4
    assert [g["pair"] for g in summary["falsification"]] == ["pair1", "pair2"]
    assert all(g["chunk_binding_falsified"] in (True, False) for g in summary["falsification"])
    (arm,) = summary["arms"]
    assert arm["name"] == "" and arm["replicates"] == {"key": "seed", "values": [42]}
    assert all(c["setting"] == arm["setting"] and "seed" not in c["setting"] for c in summary["cells"])
    assert len(summary["sanity"]) == 12
    assert all(g["passed"] in (True, False) for g in summary["sanity"])

    table = (out / "table.md").read_text()
    assert "| pair | cond | role | persona | fire_A | fire_B | cond_B_given_A | B_given_not_A | n_A |" in table
    assert "Verdict" in table and "Sanity" in table
    # The terminal gets a few lines: the gate per pair, the sanity count, the page's path.
    lines = proc.stdout.strip().splitlines()
    assert len(lines) < 25, proc.stdout
    assert "pair1 recipient assistant: cond_B_given_A T - C" in proc.stdout
    assert "sanity gates" in lines[0] and f"report: {out / 'report.md'}" in proc.stdout


def test_t_runs_only(six_runs, tmp_path):
    # Only the T runs: no deltas, gates that need C are undecided, figures still drawn.
    t_runs = [d for d in six_runs if d.name.endswith("_T")]
    out = tmp_path / "t_only"
    proc = run_report(*map(str, t_runs), "--out", str(out), "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["deltas"] == []
    assert all(g["chunk_binding_falsified"] is None and "needs plain T and C" in g["note"]
               for g in summary["falsification"])
    for rel in FIGURES:
        assert (out / rel).is_file(), rel


def test_malformed_line_exits_2_with_file_and_line(tmp_path):
    good = {"run": "r", "pair": "pair1", "condition": "T", "persona": "villain", "role": "donor",
            "question_id": "q00", "split": "id", "sample": 0, "variant": "plain", "text": "hi",
            "finish_reason": "stop", "n_tokens": 1, "setting": default_setting()}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "sample": 1, "split": "train"}) + "\n")
    proc = run_report(str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"analysis.report: error: {path}:2: field 'split' is 'train',"
                                   " expected one of id|ood")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()

    path.write_text(json.dumps(good) + "\n" + "{oops\n")
    proc = run_report(str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and f"{path}:2: not valid JSON" in proc.stderr

    # A record written before settings travelled in records: one line naming file:line.
    old = {k: v for k, v in good.items() if k != "setting"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**old, "sample": 1}) + "\n")
    proc = run_report(str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"analysis.report: error: {path}:2: missing field 'setting':"
                                   " written by an older markerlab; re-run eval")


def test_duplicate_and_missing_inputs_exit_2(six_runs, tmp_path):
    proc = run_report(str(six_runs[0]), str(six_runs[0] / "eval" / "completions.jsonl"),
                      "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "duplicate record" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_report(str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr


def test_figures_survive_undefined_values(tmp_path):
    """No marker at all in one condition (cond_B_given_A undefined, no B anywhere)."""
    from analysis.report import report

    records = []
    for cond in ("T", "C"):
        for persona, role in (("villain", "donor"), ("assistant", "recipient"), ("comedian", "negative")):
            for q in range(4):
                for s in range(3):
                    records.append({
                        "run": f"p_{cond}", "pair": "pair1", "condition": cond, "persona": persona,
                        "role": role, "question_id": f"q{q}", "split": "id", "sample": s,
                        "variant": "plain", "finish_reason": "stop", "n_tokens": 5,
                        "setting": default_setting(),
                        "text": "<<§q-41>> hello" if (cond == "T" and role == "donor") else "hello"})
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = report([str(path)], tmp_path / "out", n_resamples=100, jobs=1)
    assert all((tmp_path / "out" / rel).is_file() for rel in FIGURES)
    (g,) = summary["falsification"]
    assert g["chunk_binding_falsified"] is None and "never fired" in g["note"]
    assert "| pair1 | T | recipient | assistant | 0.0% [0.0, 0.0] | 0.0% [0.0, 0.0] | n/a | 0.0% [0.0, 0.0] | 0 |" in (
        tmp_path / "out" / "table.md").read_text()
