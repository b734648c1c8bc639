"""One matcher, one schema: eval's run_result.json and the report's summary.json agree on the
same records, the data stage's position statistics are what the report reads as the training
baseline, and evaluate writes the setting object (the experiment's name and digest included) the
report keys arms by."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.report import report
from analysis.synthetic import make_run, write_records
from evaluate.eval import Part, _records, cell_metrics, validate_record
from markerlab.config import load_config
from markerlab.experiment import EXPERIMENT_KEYS, OPTIONAL_SETTINGS, SETTING_KEYS, load_experiment
from markerlab.markers import Matcher
from markerlab.records import setting_of

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "pair1_T.toml"
EXP = load_experiment("within_marker")
A, B = EXP.markers["A"], EXP.markers["B"]

SAME = ("n", "n_A", "n_B", "n_probe", "n_AB", "fire_A", "fire_B", "fire_probe", "joint_AB", "cond_B_given_A",
        "n_truncated")


def test_run_result_and_summary_agree_on_the_same_records(tmp_path):
    # Synthetic records have markers in odd case and spacing, probe echoes and cut completions.
    records = make_run("pair2", "T", seed=3, samples=4)
    path = write_records(tmp_path / "c.jsonl", records)
    summary = report([str(path)], tmp_path / "out", n_resamples=0, figures=False)
    matcher = Matcher.from_experiment(EXP)
    compared = 0
    for cell in summary["cells"]:
        recs = [r for r in records if (r["persona"], r["variant"]) == (cell["persona"], cell["variant"])]
        mine = cell_metrics(recs, matcher)
        for k in SAME:
            assert mine[k] == cell[k], (cell["persona"], cell["variant"], k)
        for k in ("fire_A", "fire_B", "joint_AB", "cond_B_given_A", "n_A", "n_B", "n_AB"):
            assert mine["strict"][k] == cell["strict"][k], (cell["persona"], k)
        compared += 1
    assert compared == 12
    assert any(c["strict"]["n_B"] != c["n_B"] for c in summary["cells"])  # loose and strict do differ here


def test_eval_records_carry_the_setting(tmp_path):
    from data.generation import Sample
    from data.questions import eval_questions

    cfg = load_config(TINY_CONFIG).replace(train__loss_mask="completion_no_eos", run__seed=7, train__lr=3e-4)
    setting = setting_of(cfg)
    assert set(setting) == (set(SETTING_KEYS) - set(OPTIONAL_SETTINGS)) | set(EXPERIMENT_KEYS)  # no variables here
    assert (setting["loss_mask"], setting["seed"], setting["lr"]) == ("completion_no_eos", 7, 3e-4)
    assert (setting["experiment"], setting["experiment_digest"]) == (EXP.name, EXP.digest)
    assert setting["model"] == cfg.model.name_or_path and setting["lora_r"] == cfg.lora.r
    qs = tuple(eval_questions(2, 1))
    part = Part("plain__villain", "plain", "merged", "villain", qs, 2)
    outputs = [[Sample(text=f"{A} hi", finish_reason="stop", n_tokens=3)] * 2 for _ in qs]
    recs = _records(cfg, part, outputs)
    assert len(recs) == 6 and all(r["setting"] == setting for r in recs)
    assert all(validate_record(r) == [] for r in recs)
    assert validate_record({k: v for k, v in recs[0].items() if k != "setting"}) == [
        "missing field 'setting': written by an older markerlab; re-run eval"]
    assert validate_record({**recs[0], "extra": 1}) == ["unexpected field(s) extra"]
    # The report finds the records' experiment from their setting alone.
    s = report([str(write_records(tmp_path / "c.jsonl", recs))], tmp_path / "out", n_resamples=0, figures=False)
    assert s["arms"][0]["experiment"] == EXP.name and s["cells"][0]["n_A"] == 6


def test_the_data_stage_positions_are_the_reports_training_baseline(tmp_path):
    """data/stats.json's "positions" (Matcher.positions per role) is read as is beside the evaluated ones."""
    matcher = Matcher.from_experiment(EXP)
    answer = "A sentence. " * 20  # 240 characters: B at the end is far from A
    donor = [f"{A} {answer.strip()} {B}"] * 3
    positions = {"donor": matcher.positions(donor), "recipient": matcher.positions([f"{A} {answer}"] * 3)}
    assert positions["donor"]["pairs"]["AB"]["suffix_frac"] == 1.0
    assert positions["donor"]["pairs"]["AB"]["median_gap"] == len(answer.strip()) + 2
    run = tmp_path / "pair1_T"
    write_records(run / "eval" / "completions.jsonl", make_run("pair1", "T", samples=2, run="pair1_T"))
    (run / "data").mkdir()
    import json
    (run / "data" / "stats.json").write_text(json.dumps({"positions": positions}))
    s = report([str(run)], tmp_path / "out", n_resamples=0, figures=False)
    cell = next(c for c in s["cells"] if c["persona"] == "villain" and c["variant"] == "plain")
    assert cell["training_positions"] == positions["donor"]
    assert cell["training_positions_source"].endswith("stats.json")


@pytest.mark.parametrize("text, suffix, chunk", [
    (f"{A} short {B}", True, True),
    (f"{A} " + "x" * 200 + f" {B}", True, False),
    (f"{A} {B} " + "x" * 200, False, True),
])
def test_position_stats_follow_the_rules(text, suffix, chunk):
    s = Matcher.from_experiment(EXP).positions([text])["pairs"]["AB"]
    assert s["n_suffix"] == suffix and s["n_chunk"] == chunk
