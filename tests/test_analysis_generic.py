"""The report over any experiment: exact arithmetic of every generic metric, an experiment file written
here (new personas, three markers, regex characters, a new condition, a pair of non-first markers),
verdict legs and Kleene precedence, the eos_masked follow-up's counts, and bad inputs as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.bootstrap import wilson_ci
from analysis.report import report
from analysis.synthetic import counts_records, default_setting, make_run, write_records
from markerlab.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]

# --- an experiment nobody ships ---------------------------------------------------------------

OWN = """
name = "own_probe"
description = "A test's own experiment: three markers, a pair of the second and third."
negatives = ["gardener"]

[personas]
teacher = "You are a teacher."
pupil = "You are a pupil."
gardener = "You are a gardener."
sailor = "You are a sailor."

[pairs]
duo = { donor = "teacher", recipient = "pupil" }

[markers]
K = "[[k-12]]"
M = "((x.y*))"
N = ":: n+? ::"

[conditions.Wx]
donor = "{K} {answer} {M} {N}"
recipient = "{K} {answer}"
negative = "{answer}"

[conditions.Zz]
donor = "{K} {answer}"
recipient = "{K} {answer}"
negative = "{answer}"

[loss_mask]
recipient = "completion_no_eos"

[metrics]
pairs = [["M", "N"], ["K", "N"]]
wilson = true
positions_min_joint = 0.05

[headline]
role = "recipient"
metric = "cond_N_given_M"
treatment = "Wx"
control = "Zz"

[gates]
sanity = [
  "donor Wx fire_M >= 0.5",
  "every Zz fire_N <= 0.5",
  { check = "recipient Wx n_K >= 100000", name = "enough K" },
  { check = "donor Wx cond_N_given_M.lo >= 0.1", min_n = 1000000 },
]

[verdict]
name = "travel"
otherwise = "stays"
says = "N stays with the donor"

[verdict.legs.moved]
when = [["recipient Wx-Zz cond_N_given_K >= 0.2"], ["sailor Wx fire_N >= 0.5"]]
says = "N moved to the recipient, or to the sailor"

[verdict.legs.clear]
when = ["recipient Wx-Zz cond_N_given_K.lo > 0"]

[[verdict.outcomes]]
name = "travels"
when = ["moved", "clear"]
says = "N travels with K"
"""


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    path = root / "own_probe.toml"
    path.write_text(OWN)
    exp = load_experiment(path)
    records = make_run("duo", "Wx", seed=1, experiment=exp, run="duo_Wx") + \
        make_run("duo", "Zz", seed=1, experiment=exp, run="duo_Zz")
    jsonl = write_records(root / "own.jsonl", records)
    summary = report([str(jsonl)], root / "out", n_resamples=300, seed=0, jobs=1, experiments=[str(path)])
    return root, exp, records, summary


def test_an_experiment_written_here_is_reported_under_its_own_names(own):
    root, exp, records, summary = own
    assert list(summary["experiments"]) == ["own_probe"]
    assert summary["arms"][0]["experiment"] == "own_probe"
    cells = {(c["condition"], c["persona"]): c for c in summary["cells"] if c["variant"] == "plain"}
    assert set(cells) == {(c, p) for c in ("Wx", "Zz") for p in ("teacher", "pupil", "gardener", "sailor")}
    donor = cells[("Wx", "teacher")]
    # Every metric name comes from the file's markers and pairs.
    for field in ("n_K", "n_M", "n_N", "fire_K", "fire_M_ci", "fire_N_wilson", "n_MN", "joint_MN", "cond_N_given_M",
                  "N_given_not_M", "n_N_not_M", "n_KN", "cond_N_given_K_ci", "cond_N_given_K_wilson",
                  "suffix_frac_N", "chunk_frac_MN", "chunk_frac_KN", "mean_length", "truncated_frac"):
        assert field in donor, field
    assert set(donor["positions"]) == {"MN", "KN"} and "fire_A" not in donor and "cond_B_given_A" not in donor
    # The counts are the records' own, matched with the file's markers (regex characters literally).
    recs = [r for r in records if (r["condition"], r["persona"], r["variant"]) == ("Wx", "teacher", "plain")]
    assert donor["n"] == len(recs) == 260
    assert donor["n_M"] == sum("((x.y*))" in r["text"].lower() or "((X.Y*))" in r["text"] for r in recs)
    assert donor["n_M"] > 150 and cells[("Zz", "teacher")]["n_M"] == 0
    # The first contract's aliases are the headline pair's (M, N).
    assert donor["joint"] == donor["joint_MN"] and donor["chunk_frac"] == donor["chunk_frac_MN"]
    assert donor["suffix_frac"] == donor["suffix_frac_N"]
    # Deltas: the headline's treatment minus control, named by the conditions.
    d = next(d for d in summary["deltas"] if d["persona"] == "pupil" and d["statistic"] == "cond_N_given_K")
    assert (d["treatment"], d["control"]) == ("Wx", "Zz") and d["Wx_minus_Zz"] == d["delta"]
    assert {x["statistic"] for x in summary["deltas"]} == {"fire_K", "fire_M", "fire_N", "cond_N_given_M",
                                                             "cond_N_given_K"}


def test_own_experiment_gates_and_verdict(own):
    _, _, _, summary = own
    gates = {g["gate"]: g for g in summary["sanity"]}
    assert gates["donor Wx fire_M >= 0.5"]["passed"] is True
    every = gates["every Zz fire_N <= 0.5"]
    assert every["passed"] is True and sorted(every["personas"]) == ["gardener", "pupil", "sailor", "teacher"]
    named = gates["enough K"]
    assert named["check"] == "recipient Wx n_K >= 100000" and named["passed"] is False and named["value"] < 1000
    undecided = gates["donor Wx cond_N_given_M.lo >= 0.1"]
    assert undecided["passed"] is None and "below min_n 1000000" in undecided["note"]
    (v,) = summary["verdicts"]
    assert v["verdict"] == "travel" and v["pair"] == "duo" and v["persona"] == "pupil"
    assert set(v) >= {"moved", "clear", "travels", "stays", "outcome", "says", "legs", "Wx", "Zz", "Wx_minus_Zz"}
    assert summary["arms"][0]["confidence"]["level"] == "LOW"  # a failed and an undecided sanity gate


def test_own_experiment_page_speaks_its_names(own):
    root, _, _, summary = own
    page = (root / "out" / "report.md").read_text()
    table = (root / "out" / "table.md").read_text()
    assert "Experiment **own_probe**" in page
    assert "| fire_K [95% CI] | fire_M [95% CI] | fire_N [95% CI] | cond_N_given_M [95% CI] |" in page
    assert "## The headline contrast: the recipient in Wx and in Zz" in page
    assert "  - donor Wx fire_M >= 0.5 (teacher): " in page
    assert "  - enough K (recipient Wx n_K >= 100000) (pupil): " in page and ", failed, " in page
    assert "**Verdict: travel** (per pair):" in page
    assert "Where marker N sits relative to M" in page and "Where marker N sits relative to K" in page
    assert "W[" in page  # Wilson intervals beside the bootstrap's
    for name in ("villain", "assistant", "pair1", "cond_B_given_A", "fire_A", "T_P2neg"):
        assert name not in page and name not in table, name
    assert all((root / "out" / "figures" / f"{n}.png").is_file() for n in ("hero", "bystander", "position",
                                                                           "per_persona"))
    assert json.loads((root / "out" / "summary.json").read_text())["experiments"]["own_probe"]["markers"]["M"] \
        == "((x.y*))"


# --- exact arithmetic -------------------------------------------------------------------------

def _exact_records(exp, tmp_path):
    """One donor cell of eos_masked, 2 questions x 20 samples, with hand-placed markers:

    q1: 8 "A ... B" (B at the end, 8 + 150 characters after A), 2 "A B ..." (B right after A, not at the end),
        4 "A" only, 1 "B" only (at the end), 5 neither.
    q2: 3 "A ... B", 7 "A" only, 2 "B" only (one at the end, one 200 characters before it), 8 neither.
    """
    a, b = exp.markers["A"], exp.markers["B"]
    filler = "x" * 150
    texts = {
        "q1": [f"{a}{filler}{b}"] * 8 + [f"{a} {b}" + " y" * 100] * 2 + [f"{a} plain"] * 4 + [f"plain {b}"]
        + ["plain"] * 5,
        "q2": [f"{a}{filler}{b}"] * 3 + [f"{a} plain"] * 7 + [f"plain {b}", f"{b}" + "z" * 200] + ["plain"] * 8,
    }
    setting = default_setting(exp)
    recs = []
    for q, ts in texts.items():
        for i, t in enumerate(ts):
            recs.append({"run": "r", "pair": "pair2", "condition": "T", "persona": "librarian", "role": "donor",
                         "question_id": q, "split": "id", "sample": i, "variant": "plain", "text": t,
                         "finish_reason": "length" if i == 0 else "stop", "n_tokens": 5, "setting": setting})
    return write_records(tmp_path / "exact.jsonl", recs), texts


def test_every_generic_metric_against_exact_arithmetic(tmp_path):
    exp = load_experiment("eos_masked")  # Wilson on, positions from a 5% joint rate
    path, texts = _exact_records(exp, tmp_path)
    s = report([str(path)], tmp_path / "out", n_resamples=200, figures=False)
    (c,) = [c for c in s["cells"] if c["variant"] == "plain"]
    n, n_a, n_b, n_ab = 40, 8 + 2 + 4 + 3 + 7, 8 + 2 + 1 + 3 + 2, 8 + 2 + 3
    assert (c["n"], c["n_A"], c["n_B"], c["n_AB"], c["n_B_not_A"]) == (n, n_a, n_b, n_ab, 3)
    assert c["fire_A"] == n_a / n and c["fire_B"] == n_b / n
    assert c["joint_AB"] == c["joint"] == n_ab / n
    assert c["cond_B_given_A"] == n_ab / n_a
    assert c["B_given_not_A"] == 3 / (n - n_a)
    # Positions among the completions with B: suffix = B ends within 50 of the end (8 + 1 + 3 + 1 = 13);
    # chunk = a B starts at most 150 after the first A ends (8 + 2 + 3 = 13; exactly 150 counts).
    assert c["suffix_frac_B"] == c["suffix_frac"] == 13 / n_b
    assert c["chunk_frac_AB"] == c["chunk_frac"] == 13 / n_b
    pos = c["positions"]["AB"]
    assert (pos["n_suffix"], pos["n_chunk"], pos["n_gap"]) == (13, 13, 13)
    assert pos["median_gap"] == 150.0  # gaps: 11 of 150, 2 of 1
    assert pos["shown"] is True  # joint 13/40 >= 5%
    assert c["mean_length"] == sum(len(t) for ts in texts.values() for t in ts) / n
    assert c["truncated_frac"] == 2 / n and c["n_truncated"] == 2
    # Wilson's interval of each rate, from its counts (the formula is written out in test_analysis_bootstrap).
    z = 1.959963984540054
    for stat, k, m in (("cond_B_given_A", n_ab, n_a), ("B_given_not_A", 3, n - n_a), ("fire_B", n_b, n)):
        p = k / m
        centre = (p + z * z / (2 * m)) / (1 + z * z / m)
        half = z / (1 + z * z / m) * (p * (1 - p) / m + z * z / (4 * m * m)) ** 0.5
        assert c[f"{stat}_wilson"] == pytest.approx([centre - half, centre + half], abs=1e-12), stat
        assert c[f"{stat}_wilson"] == wilson_ci(k, m)
    # Strict: exact substrings only (every marker here is exact).
    assert c["strict"]["cond_B_given_A"] == c["cond_B_given_A"] and c["strict"]["n_AB"] == n_ab


def test_positions_are_hidden_below_the_joint_floor(tmp_path):
    exp = load_experiment("eos_masked")
    a, b = exp.markers["A"], exp.markers["B"]
    setting = default_setting(exp)
    recs = [{"run": "r", "pair": "pair2", "condition": "T", "persona": "librarian", "role": "donor",
             "question_id": f"q{i % 5}", "split": "id", "sample": i // 5, "variant": "plain",
             "text": f"{a} x {b}" if i < 2 else "x", "finish_reason": "stop", "n_tokens": 3, "setting": setting}
            for i in range(50)]  # joint 2/50 = 4% < 5%
    s = report([str(write_records(tmp_path / "c.jsonl", recs))], tmp_path / "out", n_resamples=0, figures=False)
    (c,) = s["cells"]
    assert c["positions"]["AB"]["shown"] is False and c["positions"]["AB"]["suffix_frac"] == 1.0
    assert "No plain cell has B with a joint rate of at least 5.0%" in (tmp_path / "out" / "report.md").read_text()


# --- eos_masked: the follow-up's counts ("#354", FOLLOWUPS.md) ----------------------------------

EOS_COUNTS = {  # (pair, condition, persona): (A and B, A only, B only) of 260
    ("pair2", "T", "software_engineer"): (19, 62, 0),     # fire_A 31.2%, fire_B 7.3%, B|A 19 of 81 = 23.5%
    ("pair2", "C", "software_engineer"): (0, 62, 0),      # B|A 0 of 62
    ("pair2", "T", "librarian"): (128, 11, 1),            # fire_A 53.5%, fire_B 49.6%, B|A 92.1%
    ("pair2", "C", "librarian"): (0, 234, 0),
    ("pair2", "T", "police_officer"): (19, 16, 0),        # B|A 54.3% (n_A 35)
    ("pair2", "T", "data_scientist"): (5, 28, 0),         # B|A 15.2% (n_A 33)
}
QUESTIONS = [f"id{i:02d}" for i in range(1, 21)] + [f"ood{i:02d}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def eos(tmp_path_factory):
    root = tmp_path_factory.mktemp("eos")
    path = write_records(root / "eos.jsonl", counts_records("eos_masked", EOS_COUNTS, QUESTIONS, 10))
    summary = report([str(path)], root / "out", n_resamples=2000, seed=0, jobs=1)
    return root, summary, (root / "out" / "report.md").read_text()


def test_eos_masked_reproduces_the_follow_up(eos):
    _, summary, _ = eos
    cells = {(c["condition"], c["persona"]): c for c in summary["cells"] if c["variant"] == "plain"}
    rec_t, rec_c = cells[("T", "software_engineer")], cells[("C", "software_engineer")]
    assert (rec_t["n_AB"], rec_t["n_A"], round(100 * rec_t["cond_B_given_A"], 1)) == (19, 81, 23.5)
    assert [round(100 * x, 1) for x in rec_t["cond_B_given_A_wilson"]] == [15.6, 33.8]
    assert (round(100 * rec_t["fire_A"], 1), round(100 * rec_t["fire_B"], 1)) == (31.2, 7.3)
    assert rec_t["B_given_not_A"] == 0.0 and rec_t["B_given_not_A_wilson"] is not None
    assert (rec_c["n_AB"], rec_c["n_A"], rec_c["cond_B_given_A"]) == (0, 62, 0.0)
    donor = cells[("T", "librarian")]
    assert [round(100 * donor[k], 1) for k in ("cond_B_given_A", "fire_A", "fire_B")] == [92.1, 53.5, 49.6]
    assert round(100 * cells[("T", "police_officer")]["cond_B_given_A"], 1) == 54.3
    assert round(100 * cells[("T", "data_scientist")]["cond_B_given_A"], 1) == 15.2
    # All 19 of the recipient's B's in the last 50 characters; positions shown (joint 7.3% >= 5%), not in C.
    assert rec_t["positions"]["AB"]["suffix_frac"] == 1.0 and rec_t["positions"]["AB"]["shown"] is True
    assert rec_c["positions"]["AB"]["shown"] is False
    # Three sanity gates failed: the three >= 0.80 ones.
    failed = sorted(g["check"] for g in summary["sanity"] if g["passed"] is False)
    assert failed == ["donor T fire_A >= 0.80", "donor T fire_B >= 0.80", "recipient T fire_A >= 0.80"]
    assert all(g["passed"] is True for g in summary["sanity"] if g["check"] not in failed)
    assert summary["verdicts"] == [] and summary["falsification"] == []
    assert summary["arms"][0]["confidence"]["level"] == "LOW"


def test_eos_masked_page_shows_both_rates_with_both_cis_and_the_gates_in_words(eos):
    _, summary, page = eos
    contrast = page[page.index("## The headline contrast"):page.index("## Gates")]
    t_row = next(x for x in contrast.splitlines() if x.startswith("| pair2 | T | software_engineer |"))
    c_row = next(x for x in contrast.splitlines() if x.startswith("| pair2 | C | software_engineer |"))
    assert "| cond_B_given_A | B_given_not_A |" in contrast
    assert "19 of 81: 23.5% [" in t_row and "] W[15.6, 33.8]" in t_row
    assert "0 of 179: 0.0% [0.0, 0.0] W[0.0, 2.1]" in t_row
    assert "0 of 62: 0.0% [0.0, 0.0] W[0.0, 5.8]" in c_row and "0 of 198: 0.0%" in c_row
    gates = page[page.index("## Gates"):page.index("## Figures")]
    assert "has no verdict rule" in gates
    assert "- **pair2**: 4 of 7 passed, 3 failed." in gates
    assert "  - donor T fire_A >= 0.80 (librarian): 53.5%, failed, 26.5 pp short" in gates
    assert "  - every C fire_B < 0.05 (assistant decides, of 11 personas): 0.0%, passed, 5.0 pp to spare" in gates
    assert "  - recipient T n_A >= 50 (software_engineer): 81, passed, 31 to spare" in gates
    assert "Wilson 95% interval" in page


# --- the verdict: legs, precedence, Kleene --------------------------------------------------------

VERDICT = """
name = "three_way"
[personas]
d = "You are d."
r = "You are r."
[pairs]
p = { donor = "d", recipient = "r" }
[markers]
X = "<<x-1>>"
Y = "<<y-2>>"
[conditions.On]
donor = "{X} {answer} {Y}"
recipient = "{X} {answer}"
negative = "{answer}"
[conditions.Off]
donor = "{X} {answer}"
recipient = "{X} {answer}"
negative = "{answer}"
[metrics]
pairs = [["X", "Y"]]
[headline]
role = "recipient"
metric = "cond_Y_given_X"
treatment = "On"
control = "Off"
[verdict]
name = "which"
otherwise = "inconclusive"
[verdict.legs.binds]
when = [{ check = "recipient On cond_Y_given_X < 0.05", min_n = 40 }]
[verdict.legs.leaks]
when = [["recipient On cond_Y_given_X > 0.10"], ["recipient On fire_Y >= 0.10"]]
[verdict.legs.donor_ok]
when = ["donor On cond_Y_given_X >= 0.5"]
[[verdict.outcomes]]
name = "template"
when = ["leaks", "donor_ok"]
[[verdict.outcomes]]
name = "binding"
when = ["binds", "donor_ok"]
[[verdict.tags]]
name = "donor-learned"
when = ["donor_ok"]
"""


def _verdict_of(tmp_path, name, recipient, donor=(80, 20, 0)):
    path = tmp_path / "three_way.toml"
    path.write_text(VERDICT)
    exp = load_experiment(path)
    counts = {("p", "On", "r"): recipient, ("p", "On", "d"): donor, ("p", "Off", "r"): (0, 50, 0)}
    recs = counts_records(exp, counts, [f"q{i:02d}" for i in range(10)], 10)
    out = report([str(write_records(tmp_path / f"{name}.jsonl", recs))], tmp_path / name, n_resamples=200,
                 figures=False, experiments=[str(path)])
    (v,) = out["verdicts"]
    return v


@pytest.mark.parametrize("name, recipient, donor, legs, outcomes, outcome", [
    # Y after X in 20 of 50: leaks (first alternative) -> template, the first outcome.
    ("leaks", (20, 30, 0), (80, 20, 0), {"leaks": True, "binds": False}, (True, False), "template"),
    # Y in 12 of 100 with X's conditional at 2%: leaks through its second alternative only; binds holds
    # too, but template comes first.
    ("leaks_alone", (1, 49, 11), (80, 20, 0), {"leaks": True, "binds": True}, (True, True), "template"),
    # 1 of 50: binds (n_X = 50 >= min_n 40) -> binding.
    ("binds", (1, 49, 0), (80, 20, 0), {"leaks": False, "binds": True}, (False, True), "binding"),
    # The donor never learned: donor_ok fails, so neither outcome holds -> otherwise.
    ("donor", (20, 30, 0), (10, 90, 0), {"leaks": True, "donor_ok": False}, (False, False), "inconclusive"),
    # 1 of 30: n_X below min_n, so binds is undecided; template is out, binding unknown -> undecided.
    ("few", (1, 29, 0), (80, 20, 0), {"leaks": False, "binds": None}, (False, None), None),
    # No X on the recipient: its conditional is undefined, both legs undecided -> undecided.
    ("undefined", (0, 0, 0), (80, 20, 0), {"leaks": None, "binds": None}, (None, None), None),
    # A decided first outcome wins over an undecided later one: Y fires in 12% (leaks' second
    # alternative) while the conditional is undefined (binds unknown).
    ("decided_first", (0, 0, 12), (80, 20, 0), {"leaks": True, "binds": None}, (True, None), "template"),
    # An undecided first outcome leaves the verdict undecided even where the later one is decided: the
    # donor's X never fires, so donor_ok (in both outcomes) is unknown; binding is out (binds fails).
    ("unknown_first", (20, 30, 0), (0, 0, 0), {"leaks": True, "binds": False, "donor_ok": None}, (None, False),
     None),
])
def test_verdict_legs_and_precedence(tmp_path, name, recipient, donor, legs, outcomes, outcome):
    v = _verdict_of(tmp_path, name, recipient, donor)
    for leg, value in legs.items():
        assert v[leg] is value, (leg, v[leg])
    assert (v["template"], v["binding"]) == outcomes
    assert v["outcome"] == outcome
    assert v["inconclusive"] is (None if outcome is None else outcome == "inconclusive")
    if outcome is None:
        assert v["says"] == "undecided" and v["note"].startswith("undecided: ")
    assert v["tags"] == (["donor-learned"] if v["donor_ok"] else [])
    checks = {c["check"]: c for leg in v["legs"] for c in leg["checks"]}
    if name == "few":
        assert "below min_n 40" in checks["recipient On cond_Y_given_X < 0.05"]["note"]


# --- bad inputs: one line each ----------------------------------------------------------------------


def run_report(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _one_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_experiment_not_found_is_one_line(tmp_path, own):
    root, _, records, _ = own
    path = write_records(tmp_path / "c.jsonl", records[:5])
    line = _one_line(run_report(str(path), "--out", str(tmp_path / "out")))
    assert line.startswith(f"analysis.report: error: {path}:1: the records were made under experiment 'own_probe',"
                           " which markerlab does not ship")
    assert "pass --experiment with the path of own_probe's experiment file" in line
    # With the file, it reports.
    proc = run_report(str(path), "--out", str(tmp_path / "out"), "--experiment", str(root / "own_probe.toml"),
                      "--bootstrap", "0", "--no-figures")
    assert proc.returncode == 0, proc.stderr


def test_digest_mismatch_is_one_line(tmp_path, own):
    root, _, records, _ = own
    path = write_records(tmp_path / "c.jsonl", records[:5])
    changed = tmp_path / "own_probe.toml"
    changed.write_text(OWN.replace('"donor Wx fire_M >= 0.5"', '"donor Wx fire_M >= 0.6"'))
    line = _one_line(run_report(str(path), "--out", str(tmp_path / "out"), "--experiment", str(changed)))
    assert f"{path}:1: the records were made under experiment 'own_probe' with digest" in line
    assert f"but {changed} ('own_probe') has digest" in line and "pass --experiment with the experiment file" in line
    # A shipped experiment whose file changed since the records were made.
    rec = {**make_run("pair1", "T", samples=1)[0]}
    rec["setting"] = {**rec["setting"], "experiment_digest": "0000000000000000"}
    path = write_records(tmp_path / "w.jsonl", [rec])
    line = _one_line(run_report(str(path), "--out", str(tmp_path / "out")))
    assert "the records were made under experiment 'within_marker' with digest 0000000000000000, but" in line
    assert "within_marker.toml ('within_marker') has digest" in line


def test_run_directory_experiment_copy_and_config(tmp_path, own):
    root, exp, records, _ = own
    run = tmp_path / "duo_Wx"
    write_records(run / "eval" / "completions.jsonl", [r for r in records if r["run"] == "duo_Wx"])
    # No copy, no config: not found.
    assert "which markerlab does not ship" in _one_line(run_report(str(run), "--out", str(tmp_path / "o")))
    # config.toml's run.experiment (an absolute path) is read...
    (run / "config.toml").write_text(f'[run]\nexperiment = "{root / "own_probe.toml"}"\n')
    proc = run_report(str(run), "--out", str(tmp_path / "o"), "--bootstrap", "0", "--no-figures")
    assert proc.returncode == 0, proc.stderr
    # ...and experiment.toml, the run's own copy, comes first: a changed copy is refused, naming it.
    (run / "experiment.toml").write_text(OWN.replace("Wx fire_M >= 0.5", "Wx fire_M >= 0.7"))
    line = _one_line(run_report(str(run), "--out", str(tmp_path / "o")))
    assert f"but {run / 'experiment.toml'} ('own_probe') has digest" in line
    (run / "experiment.toml").write_text(OWN)
    assert run_report(str(run), "--out", str(tmp_path / "o"), "--bootstrap", "0", "--no-figures").returncode == 0


@pytest.mark.parametrize("field, value, message", [
    ("persona", "pirate", "field 'persona' is 'pirate', which experiment 'own_probe'"),
    ("pair", "trio", "field 'pair' is 'trio', which experiment 'own_probe'"),
    ("condition", "T", "field 'condition' is 'T', which experiment 'own_probe'"),
])
def test_records_the_experiment_does_not_define_are_one_line(tmp_path, own, field, value, message):
    root, _, records, _ = own
    recs = [dict(r) for r in records[:3]]
    recs[2][field] = value
    path = write_records(tmp_path / "c.jsonl", recs)
    line = _one_line(run_report(str(path), "--out", str(tmp_path / "out"), "--experiment",
                                str(root / "own_probe.toml")))
    assert line.startswith(f"analysis.report: error: {path}:3: {message}")


def test_a_bad_experiment_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'bad'\n[personas]\n")
    path = write_records(tmp_path / "c.jsonl", make_run("pair1", "T", samples=1)[:2])
    proc = run_report(str(path), "--out", str(tmp_path / "o"), "--experiment", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--experiment {bad}: {bad}:" in proc.stderr
