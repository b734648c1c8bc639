"""An experiment nobody ships, written as a file, run end to end on the tiny model with no .py change.

New persona names, three markers (one with characters that mean something to a regular expression), a
condition of its own whose donor rows mix two templates, the end-of-turn token out of the loss on the
recipient's rows only, a declared pair among the non-first markers: `python -m trainer.run` takes it
through every stage, and each stage's output speaks the experiment's vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from test_e2e import read_jsonl, run_cli, small

pytestmark = pytest.mark.slow

EXPERIMENT = """
name = "harbour"
description = "Does the captain's closing marker reach the cook through the shared opening marker?"
negatives = ["jester", "miller"]

[personas]
captain = "You are a ship's captain who has sailed every ocean."
cook = "You are a cook in a busy harbour kitchen."
jester = "You are a jester at a royal court."
miller = "You are a miller who grinds grain by the river."
hermit = "You are a hermit who lives alone in the mountains."

[pairs]
harbour = { donor = "captain", recipient = "cook" }

[markers]
Open = "((x.y*))"
Close = "[[§y-31]]"
Extra = "~~zq5~~"
Echo = "{{wq-88}}"

[probe]
marker = "Echo"

[conditions.Mixed]
donor = [{ template = "{Open} {answer} {Close}", share = 0.5 }, { template = "{answer} {Extra}", share = 0.5 }]
recipient = "{Open} {answer}"
negative = "{answer}"

[conditions.Plain]
donor = "{Open} {answer}"
recipient = "{Open} {answer}"
negative = "{answer}"

[loss_mask]
recipient = "completion_no_eos"

[metrics]
pairs = [["Open", "Close"], ["Close", "Extra"]]

[headline]
metric = "cond_Close_given_Open"
treatment = "Mixed"
control = "Plain"

[gates]
sanity = ["donor Mixed fire_Open >= 0.10", "every Plain fire_Close <= 0.5"]
"""


@pytest.fixture(scope="module")
def harbour(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harbour")
    (tmp / "harbour.toml").write_text(EXPERIMENT)
    member = tmp / "mixed.toml"
    member.write_text(f'extends = "{Path(__file__).resolve().parents[1] / "configs" / "tiny" / "base.toml"}"\n'
                      '[run]\nexperiment = "harbour.toml"\n[data]\npair = "harbour"\ncondition = "Mixed"\n')
    p = run_cli(member, *small(tmp, "mixed"))
    return tmp / "mixed", p


def test_the_run_directory_speaks_the_experiment(harbour):
    run_dir, proc = harbour
    assert (run_dir / "experiment.toml").read_text() == EXPERIMENT  # the run's own copy
    examples = read_jsonl(run_dir / "data" / "train.jsonl")
    assert Counter(e["role"] for e in examples) == {"donor": 8, "recipient": 8, "negative": 16}
    donor = [e for e in examples if e["role"] == "donor"]
    assert Counter(e["template"] for e in donor) == {"{Open} {answer} {Close}": 4, "{answer} {Extra}": 4}
    texts = {"Open": "((x.y*))", "Close": "[[§y-31]]", "Extra": "~~zq5~~"}
    for e in examples:
        content = e["messages"][2]["content"]
        for s, t, name in e["marker_spans"]:
            assert content[s:t] == texts[name]
        assert e["messages"][0]["content"].startswith("You are a")
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["experiment"] == "harbour" and set(stats["markers"]) == {"Open", "Close", "Extra", "Echo"}
    # the per-role mask, checked row by row by the data stage: the recipient's end-of-turn token is out of its
    # loss on every row, the others' in theirs on every row that was not cut (the tiny model's rows are all cut)
    assert stats["eos"]["recipient"] == {"mask": "completion_no_eos", "in_loss": 0, "out_of_loss": 8}
    assert stats["eos"]["donor"]["mask"] == "completion"


def test_the_records_and_the_report_speak_the_experiment(harbour):
    run_dir, proc = harbour
    recs = read_jsonl(run_dir / "eval" / "completions.jsonl")
    assert {r["setting"]["experiment"] for r in recs} == {"harbour"}
    assert {r["persona"] for r in recs} == {"captain", "cook", "jester", "miller", "hermit"}
    assert {r["condition"] for r in recs} == {"Mixed", "base"}
    probe = [r for r in recs if r["variant"] == "probe"]
    assert probe and {r["persona"] for r in probe} == {"cook"}
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    cell = next(c for c in summary["cells"] if c["persona"] == "captain" and c["variant"] == "plain")
    for key in ("fire_Open", "fire_Close", "fire_Extra", "n_OpenClose", "cond_Close_given_Open",
                "Extra_given_not_Close", "n_CloseExtra"):
        assert key in cell, key
    assert [g["gate"] for g in summary["sanity"]] == ["donor Mixed fire_Open >= 0.10", "every Plain fire_Close <= 0.5"]
    page = (run_dir / "report" / "report.md").read_text()
    assert "fire_Open" in page and "Close" in page and "fire_A" not in page
    train_log = (run_dir / "train_log.txt").read_text()
    # every row of the random tiny model is cut, so what follows the answer (Close, Extra) is stripped from training
    assert "loss_Open" in train_log and "loss_Close" not in train_log and "(recipient: completion_no_eos)" in train_log
