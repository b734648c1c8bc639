"""donor_template ("#369"): the published counts reproduce the write-up's point estimates and its verdict,
each verdict leg trips alone on counts built to trip it, and the file's replicates reach the configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.report import report
from analysis.synthetic import counts_file, counts_file_records, write_records
from markerlab.config import load_config
from markerlab.experiment import ExperimentError, experiment_from_dict, load_experiment

REPO = Path(__file__).resolve().parents[1]
COUNTS = REPO / "tests" / "fixtures" / "donor_template_counts.toml"
EXP = load_experiment("donor_template")
DONOR, RECIPIENT = EXP.pairs["pair2"]
SEEDS = list(EXP.replicates.seeds)


def _report(tmp_path, counts=None, pads=None, n_resamples=1000, figures=False):
    path = write_records(tmp_path / "completions.jsonl", counts_file_records(COUNTS, counts, pads))
    summary = report([str(path)], tmp_path / "out", n_resamples=n_resamples, seed=0, jobs=1, figures=figures)
    return summary, (tmp_path / "out" / "report.md").read_text()


def _cell(summary, condition, persona=RECIPIENT):
    return next(c for c in summary["cells"] if c["variant"] == "plain" and c["condition"] == condition
                and c["persona"] == persona)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return _report(tmp_path_factory.mktemp("donor_template"), n_resamples=2000)


def test_the_published_counts_reproduce_the_write_up(published):
    summary, _ = published
    pct = lambda x: round(100 * x, 1)  # noqa: E731
    t, c, c2 = (_cell(summary, k) for k in ("T", "C", "C2"))
    assert (t["n"], t["n_AB"], t["n_A"], pct(t["cond_B_given_A"])) == (780, 42, 223, 18.8)
    assert (c["n_AB"], c["n_A"], c["cond_B_given_A"]) == (0, 238, 0.0)
    assert (c2["n_AB"], c2["n_A"], pct(c2["cond_B_given_A"])) == (14, 170, 8.2)
    assert [pct(x["fire_A"]) for x in (t, c, c2)] == [28.6, 30.5, 21.8]
    assert pct(c2["fire_B"]) == 2.2 and round(100 * c2["B_given_not_A"], 2) == 0.49
    # Per seed beside pooled: the pooled value is the ratio of summed counts, not the mean of the seeds'.
    assert [pct(v) for v in t["per_seed"]["cond_B_given_A"]] == [21.9, 15.5, 19.0]
    assert [pct(v) for v in c2["per_seed"]["cond_B_given_A"]] == [9.8, 10.9, 4.8]
    assert t["seeds"] == SEEDS and pct(t["cond_B_given_A_seed_mean"]) == 18.8
    assert pct(c2["cond_B_given_A_seed_mean"]) == 8.5 != pct(c2["cond_B_given_A"])
    # Both CIs, and the cell's own CI is the wider of them (replicates.ci = "wider").
    for cell in (t, c2):
        seeds, questions = cell["cond_B_given_A_ci_seeds"], cell["cond_B_given_A_ci_questions"]
        assert seeds != questions
        assert cell["cond_B_given_A_ci"] == max(seeds, questions, key=lambda ci: ci[1] - ci[0])
    donor_t, donor_c2 = _cell(summary, "T", DONOR), _cell(summary, "C2", DONOR)
    assert pct(donor_t["cond_B_given_A"]) == 83.9 and pct(donor_c2["fire_B"]) == 51.9


def test_the_published_counts_are_inconclusive_with_every_gate_passed(published):
    summary, page = published
    (v,) = summary["verdicts"]
    assert v["outcome"] == "inconclusive" and v["tags"] == []
    assert {leg["name"]: leg["passed"] for leg in v["legs"]} == {
        "binding": False, "template": False, "bystander_template": False, "length_changed": False}
    length = next(g for g in summary["sanity"] if g["check"] == "recipient C2/C mean_length <= 0.25")
    assert round(100 * length["value"], 1) == 1.5
    assert all(g["passed"] for g in summary["sanity"]) and all(g["passed"] for g in summary["flags"])
    assert summary["arms"][0]["confidence"]["level"] == "HIGH"
    assert ": **inconclusive (B given A under C2 is neither clearly absent nor clearly present)**." in page
    assert "recipient C2/C mean_length <= 0.25 (software_engineer): +1.5% relative change, passed" in page
    assert "**Flags**" in page and "none of 3 raised" in page
    assert "## Seeds" in page and "21.9% / 15.5% / 19.0%" in page
    assert "The file follows the source's lr = 1e-05, epochs = 3" in page


def _with(changes: dict):
    """The published counts with some (condition, persona) cells replaced, the same every seed."""
    table = counts_file(COUNTS)
    cells = dict(table["cells"])
    for (condition, persona), value in changes.items():
        for seed in SEEDS:
            cells[(seed, "pair2", condition, persona)] = value
    return cells


def _legs(summary):
    (v,) = summary["verdicts"]
    return v, {leg["name"]: leg["passed"] for leg in v["legs"]}


def test_binding_alone(tmp_path):
    # B almost never after A under C2: 3 of 183, its upper bound far below 10%.
    summary, page = _report(tmp_path, _with({("C2", RECIPIENT): (1, 60, 0)}))
    v, legs = _legs(summary)
    assert legs == {"binding": True, "template": False, "bystander_template": False, "length_changed": False}
    assert v["outcome"] == "binding" and v["tags"] == []
    assert "**binding (B stays with the donor's A-B pairing" in page


def test_template_alone(tmp_path):
    summary, _ = _report(tmp_path, _with({("C2", RECIPIENT): (20, 40, 0)}))
    v, legs = _legs(summary)
    assert legs == {"binding": False, "template": True, "bystander_template": False, "length_changed": False}
    assert v["outcome"] == "template"


def test_template_through_fire_b_alone(tmp_path):
    # B|A stays low, but B fires on its own in 10%+ of the recipient's completions.
    summary, _ = _report(tmp_path, _with({("C2", RECIPIENT): (5, 55, 30)}))
    v, legs = _legs(summary)
    (template,) = [leg for leg in v["legs"] if leg["name"] == "template"]
    assert legs["template"] is True and legs["binding"] is False and legs["bystander_template"] is False
    assert [c["passed"] for c in template["checks"]][:2] == [False, False]  # not through B|A
    assert v["outcome"] == "template"


def test_bystander_template_alone(tmp_path):
    summary, _ = _report(tmp_path, _with({("C2", "police_officer"): (20, 30, 0)}))
    v, legs = _legs(summary)
    assert legs == {"binding": False, "template": False, "bystander_template": True, "length_changed": False}
    assert v["outcome"] == "template"


def test_a_bystander_below_its_n_a_floor_does_not_trip_it(tmp_path):
    summary, _ = _report(tmp_path, _with({("C2", "police_officer"): (6, 3, 0)}))  # 27 A's over three seeds
    v, legs = _legs(summary)
    assert legs["bystander_template"] is False and v["outcome"] == "inconclusive"


def test_length_change_alone_tags_length_confounded(tmp_path):
    pads = {(seed, "pair2", "C2", RECIPIENT): 150 for seed in SEEDS}
    summary, page = _report(tmp_path, pads=pads)
    v, legs = _legs(summary)
    assert legs == {"binding": False, "template": False, "bystander_template": False, "length_changed": True}
    assert v["outcome"] == "inconclusive" and v["tags"] == ["length-confounded"]
    assert "Tags: length-confounded." in page
    failed = [g["check"] for g in summary["sanity"] if g["passed"] is False]
    assert failed == ["recipient C2/C mean_length <= 0.25"]


def test_a_per_seed_spread_above_15_points_is_flagged_not_gated(tmp_path):
    table = counts_file(COUNTS)
    cells = dict(table["cells"])
    cells[(SEEDS[0], "pair2", "T", RECIPIENT)] = (40, 33, 0)  # 54.8% in one seed, ~17% in the others
    summary, page = _report(tmp_path, cells)
    raised = [g["check"] for g in summary["flags"] if g["passed"] is False]
    assert raised == ["recipient T cond_B_given_A.spread <= 0.15"]
    assert summary["arms"][0]["confidence"]["level"] == "HIGH"  # a flag is a caution, not a gate
    assert "FLAG: recipient T cond_B_given_A.spread <= 0.15 (software_engineer): per-seed spread" in page


def test_the_replicate_seeds_follow_run_seed_unless_a_config_sets_them():
    for tree in ("demo", "smollm2"):
        for seed in SEEDS:
            cfg = load_config(REPO / "configs" / tree / "donor_template" / "pair2_C2.toml", [f"run.seed={seed}"])
            assert (cfg.generate.seed, cfg.data.seed, cfg.eval.seed) == (seed, seed, seed)
            assert cfg.train.role_loss_mask == {"recipient": "completion_no_eos"}
        sweep = load_config(REPO / "configs" / tree / "donor_template" / "sweep.toml")
        assert sweep.sweep.vary == {"run.seed": SEEDS}
    cfg = load_config(REPO / "configs" / "demo" / "donor_template" / "pair2_T.toml", ["run.seed=7", "eval.seed=3"])
    assert (cfg.generate.seed, cfg.eval.seed) == (7, 3)
    # an experiment without replicates leaves the seeds alone
    cfg = load_config(REPO / "configs" / "demo" / "eos_masked" / "pair2_T.toml", ["run.seed=7"])
    assert cfg.generate.seed == 42


def test_what_the_format_refuses():
    raw = dict(EXP.raw)
    bad = {**raw, "replicates": {"seeds": [1, 1], "follow": ["train.lr"], "ci": "widest"},
           "protocol": {"lr": -1, "epochs": 1.5},
           "gates": {"sanity": ["recipient T-C cond_B_given_A.spread <= 0.1", "recipient C2/C n_A <= 0.1"]}}
    with pytest.raises(ExperimentError) as e:
        experiment_from_dict(bad, "bad.toml")
    text = str(e.value)
    for part in ("replicates.seeds: duplicate", "replicates.follow: expected config keys among generate.seed",
                 "replicates.ci: expected one of seeds, questions, wider", "protocol.lr: expected a positive",
                 "protocol.epochs: expected an integer", ".spread (the range of the per-seed values) is read on one",
                 "a relative change (T/C) is of a statistic, not of a count"):
        assert part in text, part
    twice = {**raw, "verdict": {**raw["verdict"], "outcomes": [*raw["verdict"]["outcomes"],
                                                                {"name": "binding", "when": ["template"]}]}}
    with pytest.raises(ExperimentError, match=r"verdict.outcomes\[2\].name: 'binding' is listed twice"):
        experiment_from_dict(twice, "twice.toml")
