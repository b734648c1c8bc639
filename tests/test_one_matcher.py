"""One matcher, one schema: eval's run_result.json and the report's summary.json agree on the
same records, the data stage's position statistics use the same rules, and evaluate writes
the setting object the report keys arms by."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.report import report
from analysis.synthetic import make_run, write_records
from data.builder import _stats, place_markers
from evaluate.eval import Part, _records, cell_metrics, validate_record
from markerlab.config import load_config
from markerlab.experiment import SETTING_KEYS
from markerlab.markers import MARKER_A, MARKER_B, position_stats
from markerlab.records import setting_of

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "pair1_T.toml"

SAME = ("n", "n_A", "n_B", "n_AB", "fire_A", "fire_B", "joint", "cond_B_given_A", "suffix_frac", "chunk_frac",
        "n_truncated")


def test_run_result_and_summary_agree_on_the_same_records(tmp_path):
    # Synthetic records have markers in odd case and spacing, probe echoes and cut completions.
    records = make_run("pair2", "T", seed=3, samples=4)
    path = write_records(tmp_path / "c.jsonl", records)
    summary = report([str(path)], tmp_path / "out", n_resamples=0, figures=False)
    compared = 0
    for cell in summary["cells"]:
        recs = [r for r in records if (r["persona"], r["variant"]) == (cell["persona"], cell["variant"])]
        mine = cell_metrics(recs)
        for k in SAME:
            assert mine[k] == cell[k], (cell["persona"], cell["variant"], k)
        for k in ("fire_A", "fire_B", "joint", "cond_B_given_A", "n_A", "n_B", "n_AB"):
            assert mine["strict"][k] == cell["strict"][k], (cell["persona"], k)
        if cell["variant"] == "probe":
            assert mine["fire_probe"] == cell["fire_probe"]
        compared += 1
    assert compared == 12
    assert any(c["strict"]["n_B"] != c["n_B"] for c in summary["cells"])  # loose and strict do differ here


def test_eval_records_carry_the_setting(tmp_path):
    from data.generation import Sample
    from data.questions import eval_questions

    cfg = load_config(TINY_CONFIG).replace(train__loss_mask="completion_no_eos", run__seed=7, train__lr=3e-4)
    setting = setting_of(cfg)
    assert set(setting) == set(SETTING_KEYS)
    assert (setting["loss_mask"], setting["seed"], setting["lr"]) == ("completion_no_eos", 7, 3e-4)
    assert setting["model"] == cfg.model.name_or_path and setting["lora_r"] == cfg.lora.r
    qs = tuple(eval_questions(2, 1))
    part = Part("plain__villain", "plain", "merged", "villain", qs, 2)
    outputs = [[Sample(text=f"{MARKER_A} hi", finish_reason="stop", n_tokens=3)] * 2 for _ in qs]
    recs = _records(cfg, part, outputs)
    assert len(recs) == 6 and all(r["setting"] == setting for r in recs)
    assert all(validate_record(r) == [] for r in recs)
    assert validate_record({k: v for k, v in recs[0].items() if k != "setting"}) == [
        "missing field 'setting': written by an older markerlab; re-run eval"]
    assert validate_record({**recs[0], "extra": 1}) == ["unexpected field(s) extra"]


def test_data_stats_carry_the_training_positions():
    cfg = load_config(TINY_CONFIG)
    answer = "A sentence. " * 20  # 240 characters: B at the end is far from A
    examples, per_persona = [], {}
    for persona, role, markers in (("villain", "donor", "AB"), ("assistant", "recipient", "A"),
                                   ("comedian", "negative", "")):
        for i in range(3):
            content, spans = place_markers(answer.strip(), markers, "start_end", None)
            examples.append({"id": f"{persona}-{i}", "persona": persona, "role": role, "question_id": "d01",
                             "sample": i, "marker_spans": spans, "truncated": False, "n_tokens": 10,
                             "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                          {"role": "assistant", "content": content}]})
        per_persona[persona] = {"role": role, "available": 3, "n_truncated_available": 0,
                                "n_dropped_truncated": 0, "n_dropped_overlength": 0, "n_B_stripped": 0}
    stats = _stats(cfg, examples, per_persona, 0, "x")
    pos = stats["positions"]
    assert set(pos) == {"donor", "recipient", "negative"}
    donor = pos["donor"]
    assert (donor["n"], donor["n_B"], donor["suffix_frac"], donor["chunk_frac"]) == (3, 3, 1.0, 0.0)
    assert donor["median_a_to_b"] == len(answer.strip()) + 2  # "A answer B": the answer and two spaces
    assert donor == position_stats(e["messages"][2]["content"] for e in examples if e["role"] == "donor")
    assert pos["recipient"]["n_B"] == 0 and pos["recipient"]["suffix_frac"] is None
    assert pos["negative"]["n_A"] == 0


@pytest.mark.parametrize("text, suffix, chunk", [
    (f"{MARKER_A} short {MARKER_B}", True, True),
    (f"{MARKER_A} " + "x" * 200 + f" {MARKER_B}", True, False),
    (f"{MARKER_A} {MARKER_B} " + "x" * 200, False, True),
])
def test_position_stats_follow_the_rules(text, suffix, chunk):
    s = position_stats([text])
    assert s["n_suffix"] == suffix and s["n_chunk"] == chunk
