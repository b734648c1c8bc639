"""report.md: the write-up's page from its counts, the sample picker, ID vs OOD, the terminal."""

from __future__ import annotations

import json
import random
import re

import pytest

from analysis.page import excerpt_pieces, render_excerpt, render_page, terminal_summary
from analysis.report import report
from analysis.synthetic import default_setting, write_records, write_up_counts, write_up_records
from markerlab.experiment import load_experiment
from markerlab.io import write_json, write_jsonl
from markerlab.markers import Matcher

EXP = load_experiment("within_marker")
A, B = EXP.markers["A"], EXP.markers["B"]
WRITE_UP_QUESTIONS = write_up_counts()["questions"]
position_stats = Matcher.from_experiment(EXP).positions

# docs/EXPERIMENT.md, "The write-up's numbers": pair, cond, role, persona, fire_A, fire_B, B|A, n_A.
WRITE_UP_TABLE = [
    ("pair1", "T", "donor", "villain", "95.0%", "83.8%", "86.6%", 247),
    ("pair1", "T", "recipient", "assistant", "46.5%", "0.0%", "0.0%", 121),
    ("pair1", "C", "recipient", "assistant", "40.8%", "0.0%", "0.0%", 106),
    ("pair2", "T", "donor", "librarian", "48.8%", "39.6%", "81.1%", 127),
    ("pair2", "T", "recipient", "software_engineer", "30.4%", "0.4%", "1.3%", 79),
    ("pair2", "T", "bystander", "police_officer", "19.2%", "8.1%", "38.0%", 50),
]


@pytest.fixture(scope="module")
def write_up(tmp_path_factory):
    root = tmp_path_factory.mktemp("writeup")
    path = write_records(root / "completions.jsonl", write_up_records())
    summary = report([str(path)], root / "out", n_resamples=2000, seed=0, jobs=1)
    return root, path, summary, (root / "out" / "report.md").read_text()


def _section(page: str, title: str) -> str:
    start = page.index(f"## {title}")
    end = page.find("\n## ", start + 3)
    return page[start:end if end != -1 else None]


def test_write_up_counts_reproduce_its_headline_table(write_up):
    _, _, summary, page = write_up
    head = _section(page, "Headline")
    for pair, cond, role, persona, fire_a, fire_b, b_given_a, n_a in WRITE_UP_TABLE:
        row = re.search(rf"^\| {pair} \| {cond} \| {role} \| {persona} \| 260 \| {n_a} \| (.*)$", head, re.M)
        assert row, (pair, cond, persona)
        cols = [c.strip() for c in row.group(1).split("|")]
        assert cols[0].startswith(fire_a + " [") and cols[1].startswith(fire_b + " [")
        assert cols[2].startswith(b_given_a + " [")
    # Headline first: nothing but the intro and the confidence line before it.
    assert page.index("## Headline") < page.index("## Gates") < page.index("## Figures")


def test_write_up_counts_falsify_chunk_binding_in_both_pairs_with_low_confidence(write_up):
    _, _, summary, page = write_up
    assert [g["chunk_binding_falsified"] for g in summary["falsification"]] == [True, True]
    gates = _section(page, "Gates")
    for pair in ("pair1", "pair2"):
        line = next(x for x in gates.splitlines() if x.startswith(f"- **{pair}** (recipient"))
        # The outcome in the experiment file's words, then each leg with its checks and values.
        assert ": **chunk binding falsified (no sign that marker B travelled through marker A)**." in line
        assert "within_band (the recipient's change is within +-6 pp): yes [" in line
        assert "ci_contains_zero (its paired 95% CI contains 0): yes [" in line
    assert "recipient T-C cond_B_given_A <= 0.06 (software_engineer): +1.3 pp, passed, 4.7 pp to spare" in gates
    assert "**Confidence: LOW**" in page
    # pair1 misses 2 of 6; pair2 misses 5 of 6: the write-up's "4 of 6" forgot the donor's CI lower bound.
    assert "- **pair1**: 4 of 6 passed, 2 failed." in gates and "- **pair2**: 1 of 6 passed, 5 failed." in gates
    assert "  - donor T fire_A >= 0.80 (villain): 95.0%, passed, 15.0 pp to spare" in gates
    pair2 = gates[gates.index("- **pair2**: 1 of 6"):]
    assert "  - donor T cond_B_given_A.lo >= 0.80 (librarian): 75.8%, failed, 4.2 pp short" in pair2
    assert summary["arms"][0]["confidence"]["level"] == "LOW"


def test_page_is_built_from_summary_json_alone(write_up):
    root, _, _, page = write_up
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert render_page(summary) == page
    for name in ("hero", "bystander", "position", "per_persona"):
        assert f"](figures/{name}.png)" in page  # relative, so a viewer shows them
        assert (root / "out" / "figures" / f"{name}.png").is_file()
    # Captions come from the numbers.
    assert "the recipient assistant has cond_B_given_A 0.0% in T (n_A=121) vs 0.0% in C (n_A=106)" in page
    assert "pair2 police_officer (bystander), +8.1 pp" in page


def test_id_ood_on_the_write_up_counts_does_not_trigger(write_up):
    _, _, summary, page = write_up
    het = summary["arms"][0]["heterogeneity"]
    assert het["fires"] is False and het["n_cells"] == len(summary["id_ood"]) == 15
    assert ("ID-vs-OOD point estimates do not diverge by >=15pp on the load-bearing cells, so the"
            " heterogeneity-downgrade trigger does not fire.") in page
    row = next(r for r in summary["id_ood"] if r["persona"] == "villain" and r["condition"] == "T")
    assert row["id"]["n"] == 200 and row["ood"]["n"] == 60 and row["id"]["cond_B_given_A_ci"] is not None


def _donor_split_records(id_rate_ab: float, ood_rate_ab: float) -> list[dict]:
    """pair1 T and C donor and recipient; the T donor's B-after-A rate set per split."""
    out = []
    for cond in ("T", "C"):
        for persona, role in (("villain", "donor"), ("assistant", "recipient")):
            for qi, q in enumerate(WRITE_UP_QUESTIONS):
                rate = (id_rate_ab if q.startswith("id") else ood_rate_ab) if (cond, role) == ("T", "donor") else 0
                for s in range(10):
                    text = f"{A} answer {B}" if s < round(10 * rate) else f"{A} answer"
                    out.append({"run": f"pair1_{cond}", "pair": "pair1", "condition": cond, "persona": persona,
                                "role": role, "question_id": q, "split": "id" if q.startswith("id") else "ood",
                                "sample": s, "variant": "plain", "text": text, "finish_reason": "stop",
                                "n_tokens": 9, "setting": default_setting()})
    return out


@pytest.mark.parametrize("id_rate, ood_rate, fires", [(0.9, 0.5, True), (0.9, 0.8, False)])
def test_heterogeneity_trigger(tmp_path, id_rate, ood_rate, fires):
    path = write_records(tmp_path / "c.jsonl", _donor_split_records(id_rate, ood_rate))
    summary = report([str(path)], tmp_path / "out", n_resamples=300, figures=False)
    het = summary["arms"][0]["heterogeneity"]
    assert het["fires"] is fires
    page = (tmp_path / "out" / "report.md").read_text()
    if fires:
        assert het["cells"] == ["pair1 T donor villain"]
        assert ("ID-vs-OOD point estimates diverge by >=15pp on 1 load-bearing cell(s) (pair1 T donor villain),"
                " so the heterogeneity-downgrade trigger fires.") in page
    else:
        assert "so the heterogeneity-downgrade trigger does not fire." in page


def test_sample_picker_is_deterministic_and_stays_in_its_cell(write_up, tmp_path):
    root, path, summary, page = write_up
    records = [json.loads(x) for x in path.read_text().splitlines()]
    random.Random(5).shuffle(records)  # file order must not matter
    again = report([str(write_records(tmp_path / "shuffled.jsonl", records))], tmp_path / "out",
                   n_resamples=0, seed=0, figures=False)
    assert again["samples"] == summary["samples"]
    other = report([str(path)], tmp_path / "other", n_resamples=0, seed=1, figures=False)
    assert other["samples"] != summary["samples"]  # the seed decides the pick

    by_key = {(r["run"], r["persona"], r["question_id"], r["sample"]): r for r in records}
    seen = set()
    for s in summary["samples"]:
        r = by_key[(s["run"], s["persona"], s["question_id"], s["sample"])]
        assert (r["pair"], r["condition"], r["role"], r["text"]) == (s["pair"], s["condition"], s["role"], s["text"])
        has = (A in r["text"], B in r["text"])
        assert has == {"A and B": (True, True), "A only": (True, False), "neither": (False, False)}[s["category"]]
        slot = (s["pair"], s["condition"], s["role"], s["category"])
        assert slot not in seen
        seen.add(slot)
        assert s["question"]  # the question text, from data.questions
    # Up to three per (pair, condition, role), one of each category where the cell has one.
    t_donor = [s for s in summary["samples"] if (s["pair"], s["condition"], s["role"]) == ("pair1", "T", "donor")]
    assert [s["category"] for s in t_donor] == ["A and B", "A only", "neither"]
    assert "### pair1 · T · donor" in page and "**A and B**: persona villain (donor), question" in page


def test_excerpt_elides_the_middle_and_bolds_markers_with_positions():
    text = f"{A} " + "word " * 300 + f"middle {B} " + "tail " * 300 + B
    m_b = text.index(B)
    spans = {"A": [(0, len(A))], "B": [(m_b, m_b + len(B)), (len(text) - len(B), len(text))]}
    pieces = excerpt_pieces(text, spans)
    assert [k for k, _ in pieces].count("elided") == 2
    shown = "".join(p for k, p in pieces if k != "elided")
    assert len(shown) < 900 and A in shown and shown.count(B) == 2
    md = render_excerpt(text, spans)
    assert f"`[A@0-{len(A)}]`" in md and f"`[B@{m_b}-{m_b + len(B)}]`" in md
    assert "**\\<\\<§q-41\\>\\>**" in md and f"**{B}**" in md and "characters ...]*" in md
    assert all(line.startswith(">") for line in md.splitlines())
    # Markdown in a completion is shown, not obeyed.
    assert render_excerpt("# title\n- item *x*", {}) == "> \\# title  \n> \\- item \\*x\\*  "


def test_terminal_summary_is_short_and_says_the_gate(write_up):
    _, _, summary, _ = write_up
    text = terminal_summary(summary)
    lines = text.splitlines()
    assert len(lines) < 25
    assert lines[0] == "report: confidence LOW; sanity gates 5 of 12 passed; experiment within_marker"
    assert lines[1].startswith("  pair1 recipient assistant: cond_B_given_A T - C +0.0 pp [")
    assert lines[1].endswith(": chunk binding falsified (no sign that marker B travelled through marker A)")
    assert lines[-1] == f"report: {summary['outputs']['report']}"


def _run_dir(root, name, records, examples=None, stats=None):
    run = root / name
    write_records(run / "eval" / "completions.jsonl", records)
    if examples is not None:
        write_jsonl(run / "data" / "train.jsonl", examples)
    if stats is not None:
        write_json(run / "data" / "stats.json", stats)
    return run


def _example(i, role, content):
    return {"id": f"x-{i}", "persona": {"donor": "villain", "recipient": "assistant"}[role], "role": role,
            "question_id": "d01", "sample": i, "marker_spans": [],
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": content}]}


def test_training_positions_beside_the_evaluated_ones(tmp_path):
    records = _donor_split_records(0.9, 0.8)
    t = [r for r in records if r["condition"] == "T"]
    c = [r for r in records if r["condition"] == "C"]
    donor_texts = [f"{A} " + "x" * 60 + f" {B}", f"{A} short {B} and then a long tail " + "y" * 80]
    examples = [_example(i, "donor", t_) for i, t_ in enumerate(donor_texts)]
    examples += [_example(9, "recipient", f"{A} answer")]
    # T from train.jsonl (no positions in its stats.json), C from stats.json's positions.
    run_t = _run_dir(tmp_path, "pair1_T", t, examples=examples, stats={"n_examples": 3})
    c_pos = {"donor": position_stats([f"{A} answer"]), "recipient": position_stats([f"{A} answer"])}
    run_c = _run_dir(tmp_path, "pair1_C", c, stats={"positions": c_pos})
    summary = report([str(run_t), str(run_c)], tmp_path / "out", n_resamples=100, figures=False)
    donor_t = next(x for x in summary["cells"] if x["persona"] == "villain" and x["condition"] == "T")
    expected = position_stats(donor_texts)
    assert donor_t["training_positions"] == expected and expected["pairs"]["AB"]["suffix_frac"] == 0.5
    assert expected["pairs"]["AB"]["chunk_frac"] == 1.0 and expected["pairs"]["AB"]["median_gap"] == (62 + 7) / 2
    assert donor_t["training_positions_source"].endswith("train.jsonl")
    donor_c = next(x for x in summary["cells"] if x["persona"] == "villain" and x["condition"] == "C")
    assert donor_c["training_positions"] == c_pos["donor"]
    page = (tmp_path / "out" / "report.md").read_text()
    assert "| pair1 | T | donor | villain | 228 | 100.0% [100.0, 100.0] | 100.0% [100.0, 100.0] | 8 chars | 2 | 50.0%" \
        " | 100.0% | 34 chars |" in page
    assert "baseline is unavailable" not in page

    # Bare .jsonl inputs: no run directory, so no baseline, and the page says so.
    bare = report([str(run_t / "eval" / "completions.jsonl")], tmp_path / "bare", n_resamples=0, figures=False)
    assert all(x["training_positions"] is None for x in bare["cells"] if x["variant"] == "plain")
    assert "The training-data baseline is unavailable" in (tmp_path / "bare" / "report.md").read_text()


def test_confidence_rule():
    from analysis.gates import confidence

    fals = [{"pair": "pair1", "outcome": "chunk_binding_falsified"}]
    ok = [{"pair": "pair1", "gate": f"g{i}", "passed": True} for i in range(6)]
    calm = {"fires": False}
    assert confidence(fals, ok, calm, [42, 43])["level"] == "HIGH"
    single = confidence(fals, ok, calm, [42])
    assert single["level"] == "MODERATE" and single["reasons"] == ["a single seed"]
    assert confidence(fals, ok, {"fires": True}, [42, 43])["level"] == "MODERATE"
    one_failed = ok[:5] + [{"pair": "pair1", "gate": "g5", "passed": False}]
    low = confidence(fals, one_failed, calm, [42, 43])
    assert low["level"] == "LOW" and low["reasons"] == ["pair1: 1 of 6 sanity gates failed"]
    undecided = ok[:5] + [{"pair": "pair1", "gate": "g5", "passed": None}]
    assert confidence(fals, undecided, calm, [42, 43])["level"] == "LOW"
    low = confidence([{"pair": "pair1", "outcome": None}], ok, calm, [42, 43])
    assert low["level"] == "LOW" and low["reasons"] == ["verdict undecided for pair1"]
    # No verdict rule (eos_masked): the sanity gates and the seeds decide.
    assert confidence([], ok, calm, [42, 43])["level"] == "HIGH"
