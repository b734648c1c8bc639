"""Arms of a sweep (settings differ) are never pooled; seeds of one arm are replicates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.arms import arm_names, slug
from analysis.bootstrap import Bootstrap
from analysis.records import load
from analysis.report import report
from analysis.summary import paired_counts
from analysis.synthetic import default_setting, write_records
from markerlab.experiment import load_experiment

EXP = load_experiment("within_marker")
A, B = EXP.markers["A"], EXP.markers["B"]

ANSWER = "word " * 60  # 300 characters: a B at the end is far from A


def cell(persona, role, condition, n_ab, n_a, run, setting, n=260, questions=26):
    texts = [f"{A} {ANSWER}{B}"] * n_ab + [f"{A} {ANSWER}"] * n_a
    texts += [ANSWER] * (n - len(texts))
    order = np.random.default_rng([len(run), n_ab, n_a]).permutation(n)  # spread over questions
    return [{"run": run, "pair": "pair1", "condition": condition, "persona": persona, "role": role,
             "question_id": f"q{i % questions:02d}", "split": "id" if i % questions < 20 else "ood",
             "sample": i // questions, "variant": "plain", "text": texts[k], "finish_reason": "stop",
             "n_tokens": 50, "setting": dict(setting)} for i, k in enumerate(order)]


def arm(loss_mask, recipient_ab_t, seed=42):
    """pair1 T and C of one loss mask; the recipient has 130 A in each condition."""
    setting = default_setting(loss_mask=loss_mask, seed=seed)
    out = []
    for condition in ("T", "C"):
        run = f"pair1_{condition}_{loss_mask}_s{seed}"
        out += cell("villain", "donor", condition, 230 if condition == "T" else 0,
                    20 if condition == "T" else 240, run, setting)
        ab = recipient_ab_t if condition == "T" else 0
        out += cell("assistant", "recipient", condition, ab, 130 - ab, run, setting)
    return out


@pytest.fixture(scope="module")
def two_arms(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    completion = write_records(root / "completion.jsonl", arm("completion", 2))
    no_eos = write_records(root / "no_eos.jsonl", arm("completion_no_eos", 40))
    both = report([str(completion), str(no_eos)], root / "both", n_resamples=1000, seed=1, jobs=1)
    alone = {"loss_mask=completion": report([str(completion)], root / "a", n_resamples=1000, seed=1,
                                            figures=False),
             "loss_mask=completion_no_eos": report([str(no_eos)], root / "b", n_resamples=1000, seed=1,
                                                   figures=False)}
    return root, both, alone


def test_two_arms_give_two_cells_two_gates_and_a_cross_arm_row(two_arms):
    root, both, _ = two_arms
    assert [a["name"] for a in both["arms"]] == ["loss_mask=completion", "loss_mask=completion_no_eos"]
    recipients = [c for c in both["cells"] if c["persona"] == "assistant" and c["condition"] == "T"]
    assert len(recipients) == 2  # not one pooled cell with n_A doubled
    assert sorted(c["n_AB"] for c in recipients) == [2, 40] and all(c["n_A"] == 130 for c in recipients)
    assert {c["setting"]["loss_mask"] for c in recipients} == {"completion", "completion_no_eos"}

    gates = {g["arm"]: g for g in both["falsification"]}
    assert len(both["falsification"]) == 2
    assert gates["loss_mask=completion"]["chunk_binding_falsified"] is True
    assert gates["loss_mask=completion_no_eos"]["chunk_binding_falsified"] is False
    assert len(both["sanity"]) == 12

    (row,) = both["cross_arm"]
    assert row["pair"] == "pair1" and row["persona"] == "assistant"
    assert [a["arm"] for a in row["arms"]] == ["loss_mask=completion", "loss_mask=completion_no_eos"]
    assert [a["delta"] for a in row["arms"]] == [pytest.approx(2 / 130), pytest.approx(40 / 130)]
    assert all(a["ci"] is not None for a in row["arms"])

    page = (root / "both" / "report.md").read_text()
    assert page.startswith("# markerlab report: 2 arms")
    assert "| pair | persona | statistic | loss_mask=completion | loss_mask=completion_no_eos |" in page
    assert "| pair1 | assistant | cond_B_given_A | +1.5 pp [" in page
    assert "verdict: chunk_binding_falsified" in page and "verdict: chunk_binding_not_falsified" in page
    assert [a["chunk_binding_falsified"] for a in row["arms"]] == [True, False]
    assert all(a["experiment"] == "within_marker" for a in both["arms"])
    for a in both["arms"]:
        assert f"({a['dir']}/report.md)" in page
        for rel in ("summary.json", "report.md", "table.md", "figures/hero.png", "figures/per_persona.pdf"):
            assert (root / "both" / a["dir"] / rel).is_file(), (a["dir"], rel)


def test_per_arm_numbers_equal_each_arm_reported_alone(two_arms):
    root, both, alone = two_arms
    for entry in both["arms"]:
        solo = alone[entry["name"]]
        # The solo report has one arm, named "" (nothing differs); otherwise identical.
        strip = lambda xs: [{k: v for k, v in x.items() if k != "arm"} for x in xs]  # noqa: E731
        for key in ("cells", "deltas", "verdicts", "falsification", "sanity", "id_ood", "samples", "headline"):
            mine = [x for x in both[key] if x["arm"] == entry["name"]]
            assert strip(mine) == strip(solo[key]), key
        # ...and the arm's own directory holds that report.
        sub = json.loads((root / "both" / entry["dir"] / "summary.json").read_text())
        assert strip(sub["cells"]) == strip(json.loads(json.dumps(solo["cells"])))
        assert sub["arms"][0]["confidence"] == solo["arms"][0]["confidence"]


def test_seed_replicates_are_pooled_on_purpose_with_a_two_level_bootstrap(tmp_path):
    runs = [write_records(tmp_path / f"s{seed}.jsonl", arm("completion", ab, seed=seed))
            for seed, ab in ((42, 2), (43, 30), (44, 10))]
    summary = report([str(p) for p in runs], tmp_path / "out", n_resamples=1000, seed=0, figures=False)
    (entry,) = summary["arms"]
    assert entry["name"] == "" and entry["replicates"] == {"key": "seed", "values": [42, 43, 44]}
    assert len(entry["runs"]) == 6 and "resample seeds, then questions" in entry["pooled"]
    assert summary["bootstrap"]["unit"] == "seed, then question"
    rec_t = next(c for c in summary["cells"] if c["persona"] == "assistant" and c["condition"] == "T")
    assert rec_t["n"] == 3 * 260 and rec_t["n_AB"] == 42 and rec_t["seeds"] == [42, 43, 44]

    # The CI is the seeds-then-questions bootstrap of the pooled rows...
    (arm_,) = load(runs).arms
    t = next(c for c in arm_.cells if c.persona == "assistant" and c.condition == "T")
    c = next(c for c in arm_.cells if c.persona == "assistant" and c.condition == "C")
    boot = Bootstrap(1000, 0)
    assert t.groups == (26, 26, 26)
    stat = t.schema.index(["cond_B_given_A"])
    assert rec_t["cond_B_given_A_ci"] == boot.cis(t.counts, stat, t.groups)["cond_B_given_A"]
    rows_t, rows_c, groups, _ = paired_counts(t, c)
    (g,) = summary["falsification"]
    assert g["ci"] == boot.delta_ci(rows_t, rows_c, stat["cond_B_given_A"], groups)
    # ...which carries the between-seed spread that one-level question resampling misses.
    flat = boot.cis(t.counts, stat)["cond_B_given_A"]
    lo, hi = rec_t["cond_B_given_A_ci"]
    assert hi - lo > 1.5 * (flat[1] - flat[0])
    assert "seeds" in (tmp_path / "out" / "report.md").read_text()


def test_arm_names_say_what_differs():
    base = default_setting()
    settings = [base, {**base, "loss_mask": "completion_no_eos"}, {**base, "loss_mask": "marker_only",
                                                                    "marker_mask_eos": True}]
    # Two experiments: their names tell them apart, so the digest stays out of the name...
    eos = default_setting("eos_masked")
    assert arm_names([base, eos]) == ["experiment=within_marker,role_loss_mask=",
                                      "experiment=eos_masked,role_loss_mask=recipient=completion_no_eos"]
    # ...but two versions of one experiment differ in their digest only.
    assert arm_names([base, {**base, "experiment_digest": "0123456789abcdef"}]) == [
        f"experiment_digest={base['experiment_digest']}", "experiment_digest=0123456789abcdef"]
    assert arm_names(settings) == ["loss_mask=completion,marker_mask_eos=false",
                                   "loss_mask=completion_no_eos,marker_mask_eos=false",
                                   "loss_mask=marker_only,marker_mask_eos=true"]
    assert arm_names([base]) == [""]
    assert arm_names([{**base, "lr": 1e-5}, {**base, "lr": 2e-5}]) == ["lr=1e-05", "lr=2e-05"]
    taken: set[str] = set()
    assert slug("model=/models/Qwen 7B", taken) == "model=_models_Qwen_7B"
    assert slug("model=/models/Qwen 7B", taken) == "model=_models_Qwen_7B_2"
