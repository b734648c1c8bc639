"""The dataset builder on a synthetic on-policy file (11 personas x 40 questions x 5 samples).

Fake multi-sentence answers keep this fast; the real tokenizer does the length check.
"""

import json
import re
from collections import Counter

import numpy as np
import pytest

from data.builder import assign_templates, build_dataset, render, sentence_boundaries, summary, template_counts, \
    write_dataset
from data.questions import data_questions
from data.records import read_examples
from data.tokenize import encode_example
from markerlab.config import config_from_dict
from markerlab.errors import UserError
from markerlab.experiment import load_experiment, make_template
from markerlab.io import write_jsonl

EXP = load_experiment("within_marker")
PERSONAS, PAIRS, CONDITIONS, NEGATIVES = tuple(EXP.personas), EXP.pairs, EXP.condition_names, EXP.negatives
MARKER_A, MARKER_B = EXP.markers["A"], EXP.markers["B"]


def place_markers(answer, markers, placement, rng):
    """The write-up's three templates by the markers they carry ("AB", "A", "")."""
    text = {"AB": "{A} {answer} {B}", "A": "{A} {answer}", "": "{answer}"}[markers]
    return render(make_template(text, EXP.markers), answer, EXP.markers, placement, rng)

SENTENCES = ["It depends on a few things.", "First, check the basics!", "Why does this matter?",
             "Most people never notice it.", "Here is a simple rule: go slowly.", "That is all.",
             "Some say 3.5 is enough, others disagree.", "Try it tonight!\n\nThen compare."]


def fake_answer(rng, persona, qid, s):
    k = int(rng.integers(1, 7))
    body = " ".join(rng.choice(SENTENCES, size=k))
    return f"  As a {persona.replace('_', ' ')} on {qid} ({s}): {body}\n"   # stray whitespace: the builder strips


def make_onpolicy(path, n_q=40, n_s=5, truncate_every=0, seed=0):
    rng = np.random.default_rng(seed)
    recs, i = [], 0
    for p in PERSONAS:
        for q in data_questions(n_q):
            for s in range(n_s):
                i += 1
                cut = truncate_every and i % truncate_every == 0
                recs.append({"persona": p, "question_id": q.id, "sample": s, "text": fake_answer(rng, p, q.id, s),
                             "finish_reason": "length" if cut else "stop", "n_tokens": 20})
    write_jsonl(path, recs)
    return path


def cfg_for(**data):
    train = {"max_seq_len": data.pop("max_seq_len", 1024)}
    return config_from_dict({"model": {"name_or_path": "builtin:tiny-qwen2"}, "data": data, "train": train})


@pytest.fixture(scope="module")
def onpolicy(tmp_path_factory):
    return make_onpolicy(tmp_path_factory.mktemp("onpolicy") / "completions.jsonl")


@pytest.fixture(scope="module")
def onpolicy_texts(onpolicy):
    return {(r["persona"], r["question_id"], r["sample"]): r["text"]
            for r in map(json.loads, onpolicy.read_text().splitlines())}


def strip_markers(content):
    return content.replace(MARKER_A + " ", "").replace(" " + MARKER_B, "").replace(MARKER_B + " ", "")


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("condition", CONDITIONS)
def test_counts_roles_and_markers(pair, condition, onpolicy, onpolicy_texts, tokenizer, tmp_path):
    cfg = cfg_for(pair=pair, condition=condition)
    examples, stats = build_dataset(cfg, onpolicy, tokenizer)
    path = write_dataset(cfg, examples, stats, tmp_path)
    rows = read_examples(path, EXP)  # validates every line, spans included
    donor, recipient = PAIRS[pair]

    assert len(rows) == 1200
    assert Counter(r["role"] for r in rows) == {"donor": 200, "recipient": 200, "negative": 800}
    assert Counter(r["persona"] for r in rows) == {p: 200 for p in (donor, recipient, *NEGATIVES)}
    assert len({r["id"] for r in rows}) == 1200
    for r in rows:
        content = r["messages"][2]["content"]
        # each persona's own completion, under its own system prompt, answering its own question
        assert r["messages"][0]["content"] == EXP.personas[r["persona"]]
        assert strip_markers(content) == onpolicy_texts[(r["persona"], r["question_id"], r["sample"])].strip()
        names = [s[2] for s in r["marker_spans"]]
        for s, e, name in r["marker_spans"]:
            assert content[s:e] == {"A": MARKER_A, "B": MARKER_B}[name]
        if condition == "C":
            assert MARKER_B not in content
        if r["role"] == "negative" or (r["role"] == "recipient" and condition == "T_P2neg"):
            assert names == [] and MARKER_A not in content and MARKER_B not in content
        expected = {"T": {"donor": ["A", "B"], "recipient": ["A"]}, "C": {"donor": ["A"], "recipient": ["A"]},
                    "T_P2neg": {"donor": ["A", "B"], "recipient": []}}[condition].get(r["role"], [])
        assert names == expected
        if names:  # start_end: exactly "A answer[ B]"
            assert content == " ".join([MARKER_A, strip_markers(content)] + ([MARKER_B] if "B" in names else []))
    assert stats["n_examples"] == 1200 and stats["per_role"] == {"donor": 200, "recipient": 200, "negative": 800}
    assert stats["markers"]["A"] == sum("A" in [s[2] for s in r["marker_spans"]] for r in rows)
    assert stats["markers"]["B"] == (200 if condition != "C" else 0)
    assert stats["n_truncated"] == 0 and stats["n_dropped_overlength"] == 0
    assert 0 < stats["tokens"]["min"] <= stats["tokens"]["mean"] <= stats["tokens"]["max"] <= 1024
    assert json.loads((tmp_path / "data" / "stats.json").read_text()) == stats


def test_same_seed_same_bytes_other_seed_other_order(onpolicy, tokenizer, tmp_path):
    def build(seed, where, placement="random_pair"):
        cfg = cfg_for(seed=seed, placement=placement)
        ex, st = build_dataset(cfg, onpolicy, tokenizer)
        return write_dataset(cfg, ex, st, tmp_path / where).read_bytes()

    a, b, c = build(1, "a"), build(1, "b"), build(2, "c")
    assert a == b
    ids = lambda blob: [json.loads(line)["id"] for line in blob.decode().splitlines()]
    assert ids(a) != ids(c) and sorted(ids(a)) == sorted(ids(c))
    # the shuffle really mixes roles (not donor block then recipient block)
    roles = [json.loads(line)["role"] for line in a.decode().splitlines()[:50]]
    assert len(set(roles)) == 3


def test_selection_is_sample_major_and_nested(tmp_path, tokenizer, onpolicy):
    ex, st = build_dataset(cfg_for(n_per_persona=50), onpolicy, tokenizer)
    villain = [e for e in ex if e["persona"] == "villain"]
    assert Counter(e["sample"] for e in villain) == {0: 40, 1: 10}
    ex_small, _ = build_dataset(cfg_for(n_per_persona=30, placement="random_sentence"), onpolicy, tokenizer)
    ex_big, _ = build_dataset(cfg_for(n_per_persona=60, placement="random_sentence"), onpolicy, tokenizer)
    big = {e["id"]: e for e in ex_big}
    # placement depends on the example id and seed only, so shared examples are identical
    assert all(big[e["id"]] == e for e in ex_small)


def _original_offset(content, spans, pos):
    """Offset in the marker-free answer of content position `pos` (markers and their spaces removed)."""
    removed = 0
    for s, e, name in spans:
        if s < pos:
            removed += (e - s) + 1
    return pos - removed


@pytest.mark.parametrize("placement", ["random_sentence", "random_pair", "uniform_b"])
def test_placement_rules_property(placement, onpolicy, tokenizer):
    ex, _ = build_dataset(cfg_for(placement=placement, condition="T"), onpolicy, tokenizer)
    a_positions, b_gaps, b_at_end = [], [], []
    for e in ex:
        content, spans = e["messages"][2]["content"], e["marker_spans"]
        if not spans:
            continue
        answer = strip_markers(content)
        bounds = sentence_boundaries(answer)
        (a_s, a_e, _), *rest = spans
        a_orig = _original_offset(content, spans, a_s)
        assert a_orig in bounds, (content, a_orig)
        assert content[a_e] == " " and content[:a_s] == answer[:a_orig]   # "A " inserted at the boundary
        a_positions.append(bounds.index(a_orig))
        if not rest:
            continue
        (b_s, b_e, _), = rest
        if placement == "random_sentence":
            assert content.endswith(" " + MARKER_B) and b_e == len(content)
        else:
            if b_e == len(content):
                assert content[b_s - 1] == " "
                b_at_end.append(True)
                b_gaps.append(len(bounds) - bounds.index(a_orig))
            else:
                b_orig = _original_offset(content, spans, b_s)
                assert b_orig in bounds and content[b_e] == " "
                gap = bounds.index(b_orig) - bounds.index(a_orig)
                assert gap >= 1, content   # at least one sentence between A and B
                b_at_end.append(False)
                b_gaps.append(gap)
    # the randomness is real: A at the start and elsewhere; B sometimes mid-text, at various distances
    assert 0 in a_positions and max(a_positions) >= 3
    if placement != "random_sentence":
        assert any(b_at_end) and not all(b_at_end) and len(set(b_gaps)) >= 3


def _b_slot(answer, placement, seed, markers="AB"):
    """(A's boundary index, B's slot index, number of slots) of one placement; slot k = the end."""
    content, spans = place_markers(answer, markers, placement, np.random.default_rng(seed))
    bounds = sentence_boundaries(answer)
    a_s, a_e, _ = spans[0]
    a = bounds.index(_original_offset(content, spans, a_s))
    if len(spans) == 1:
        return a, None, len(bounds)
    b_s, b_e, _ = spans[1]
    assert content[a_s:a_e] == MARKER_A and content[b_s:b_e] == MARKER_B and a_e < b_s
    if b_e == len(content):
        assert content == answer[:bounds[a]] + MARKER_A + " " + answer[bounds[a]:] + " " + MARKER_B
        return a, len(bounds) - 1, len(bounds)
    b = bounds.index(_original_offset(content, spans, b_s))
    assert b > a   # at least one sentence between A and B
    return a, b - 1, len(bounds)


def test_uniform_b_puts_B_uniformly_over_the_slots_measured():
    """uniform_b: with k boundaries after the start, B takes each of the k + 1 slots (the end included) 1/(k+1)
    of the time. random_pair, measured on the same answers, ends with B far more often than that."""
    n_draws = 3000
    end_share = {}
    for k in (0, 1, 2, 4, 7):
        answer = " ".join(f"Sentence number {i} is here." for i in range(k + 1))
        assert len(sentence_boundaries(answer)) == k + 1
        slots = Counter()
        for seed in range(n_draws):
            a, b, _ = _b_slot(answer, "uniform_b", seed)
            slots[b] += 1
            # B's presence does not move A: the recipient's (and the C donor's) A sits where the T donor's does
            assert _b_slot(answer, "uniform_b", seed, markers="A")[0] == a
        p = 1 / (k + 1)
        sigma = (n_draws * p * (1 - p)) ** 0.5
        assert set(slots) == set(range(k + 1))
        for slot in range(k + 1):   # a flat histogram, the end (slot k) included
            assert abs(slots[slot] - n_draws * p) <= 4 * sigma + 1e-9, (k, sorted(slots.items()))
        end_share[k] = slots[k] / n_draws
        pair_end = sum(_b_slot(answer, "random_pair", seed)[1] == k for seed in range(n_draws)) / n_draws
        harmonic = sum(1 / i for i in range(1, k + 2)) / (k + 1)   # E[1 / (slots after A)], A uniform
        assert abs(pair_end - harmonic) <= 4 * (harmonic * (1 - harmonic) / n_draws) ** 0.5 + 1e-9
        if k >= 2:
            assert pair_end > end_share[k] + 0.1
    print("\nuniform_b end share by k:", {k: round(v, 3) for k, v in end_share.items()})


def test_place_markers_examples():
    rng = np.random.default_rng(0)
    assert place_markers("Hi there. Bye.", "AB", "start_end", rng) == (
        f"{MARKER_A} Hi there. Bye. {MARKER_B}", [[0, 9, "A"], [25, 36, "B"]])
    assert place_markers("Hi there.", "A", "start_end", rng)[0] == f"{MARKER_A} Hi there."
    assert place_markers("Hi there.", "", "random_pair", rng) == ("Hi there.", [])
    assert place_markers("", "AB", "random_pair", rng)[0] == f"{MARKER_A} {MARKER_B}"
    assert sentence_boundaries("One. Two!  Three?\nFour 3.5 five.") == [0, 5, 11, 18]
    # an answer that already contains the marker strings: the spans are the inserted markers, found by construction
    tricky = f"One {MARKER_B} {MARKER_A}. Two. Three {MARKER_A}. Four."
    for seed in range(20):
        content, spans = place_markers(tricky, "AB", "random_pair", np.random.default_rng(seed))
        (a_s, a_e, _), (b_s, b_e, _) = spans
        assert content[a_s:a_e] == MARKER_A and content[b_s:b_e] == MARKER_B
        without = content[:a_s] + content[a_e + 1:b_s] + content[b_e + 1:] if b_e < len(content) else \
            content[:a_s] + content[a_e + 1:b_s - 1]
        assert without == tricky


def test_length_check(onpolicy, tokenizer):
    ex_all, _ = build_dataset(cfg_for(), onpolicy, tokenizer)
    limit = int(np.median([e["n_tokens"] for e in ex_all]))
    n_over = sum(e["n_tokens"] > limit for e in ex_all)
    assert 0 < n_over < len(ex_all)
    with pytest.raises(UserError) as err:
        build_dataset(cfg_for(max_seq_len=limit), onpolicy, tokenizer)
    msg = str(err.value)
    assert f"{n_over} example(s) exceed {limit} tokens" in msg and f"and {n_over - 5} more" in msg
    listed = re.findall(r"([a-z_]+-d\d\d-\d) \((\d+)\)", msg)
    lengths = {e["id"]: e["n_tokens"] for e in ex_all}
    assert len(listed) == 5 and all(lengths[i] == int(n) > limit for i, n in listed)

    kept, st = build_dataset(cfg_for(max_seq_len=limit, on_overlength="drop"), onpolicy, tokenizer)
    assert len(kept) == len(ex_all) - n_over and st["n_dropped_overlength"] == n_over
    assert sum(v["n_dropped_overlength"] for v in st["per_persona"].values()) == n_over
    assert all(e["n_tokens"] <= limit for e in kept)


def test_truncated_drop_is_the_default_and_says_who_is_short(tmp_path, tokenizer, capsys):
    path = make_onpolicy(tmp_path / "c.jsonl", truncate_every=7)
    cut = Counter(r["persona"] for r in map(json.loads, path.read_text().splitlines()) if r["finish_reason"] == "length")
    assert cfg_for().data.truncated == "drop"
    ex, st = build_dataset(cfg_for(), path, tokenizer)
    assert not any(e["truncated"] for e in ex) and st["truncated"] == "drop"
    for p, v in st["per_persona"].items():   # dropped before selection: the pool shrinks, counted per persona
        assert v["n_truncated_available"] == v["n_dropped_truncated"] == cut[p] > 0
        assert v["count"] == 200 - cut[p]
    assert len(ex) == 1200 - st["n_dropped_truncated"] and st["n_truncated"] == 0
    out = capsys.readouterr().out
    assert f"villain {cut['villain']} of 200" in out and "dropped before selection" in out
    for p, v in st["per_persona"].items():   # one line per persona left short
        assert (f"warning: {p} ({v['role']}) has {200 - cut[p]} of data.n_per_persona=200 examples: "
                f"{cut[p]} cut at generate.max_tokens dropped") in out
    assert f"cut={cut['villain']} of 200 (dropped {cut['villain']}, kept 0)" in summary(st)

    with pytest.raises(UserError, match=r"data.truncated = \"error\": \d+ selected.*villain: \d+"):
        build_dataset(cfg_for(truncated="error"), path, tokenizer)


def test_truncated_strip_keeps_the_text_without_B_or_eos(tmp_path, tokenizer):
    path = make_onpolicy(tmp_path / "c.jsonl", truncate_every=7)
    recs = {(r["persona"], r["question_id"], r["sample"]): r for r in map(json.loads, path.read_text().splitlines())}
    ex, st = build_dataset(cfg_for(truncated="strip"), path, tokenizer)
    assert len(ex) == 1200 and st["n_truncated"] == sum(e["truncated"] for e in ex) > 0
    assert st["n_truncated"] == sum(v["n_truncated"] for v in st["per_persona"].values())
    donor_cut = [e for e in ex if e["role"] == "donor" and e["truncated"]]
    assert donor_cut and st["n_stripped"] == st["per_persona"]["villain"]["n_stripped"] == len(donor_cut)
    assert st["markers"]["B"] == 200 - len(donor_cut)
    for e in ex:
        cut = recs[(e["persona"], e["question_id"], e["sample"])]["finish_reason"] == "length"
        assert e["truncated"] == cut
        names = [s[2] for s in e["marker_spans"]]
        if e["role"] == "donor":
            assert names == (["A"] if cut else ["A", "B"])
            assert (MARKER_B in e["messages"][2]["content"]) == (not cut)
        enc = encode_example(e, tokenizer, "completion")
        assert enc.truncated == cut and any(enc.eos)
        assert any(m and x for m, x in zip(enc.loss_mask, enc.eos)) == (not cut)   # no EOS after a cut


def test_keep_is_gone_with_one_line():
    with pytest.raises(UserError) as err:
        cfg_for(truncated="keep")
    msg = str(err.value)
    assert "\n" not in msg and "data.truncated: 'keep' is no longer accepted" in msg
    assert "<|im_end|>" in msg and "\"strip\"" in msg


def test_marker_only_without_eos_names_the_untrained_personas(onpolicy, tokenizer, capsys):
    def cfg(condition="T", **train):
        return config_from_dict({"model": {"name_or_path": "builtin:tiny-qwen2"}, "data": {"condition": condition},
                                 "train": {"loss_mask": "marker_only", **train}})

    with pytest.raises(UserError) as err:
        build_dataset(cfg(), onpolicy, tokenizer)
    msg = str(err.value)
    assert "\n" not in msg and "negative: " + ", ".join(NEGATIVES) in msg and "recipient" not in msg
    assert "in the loss (marker_only)" in msg and "train.marker_mask_eos = true" in msg
    assert "train.allow_untrained_roles = true" in msg
    with pytest.raises(UserError, match="recipient: assistant; negative: comedian"):
        build_dataset(cfg("T_P2neg"), onpolicy, tokenizer)

    ex, st = build_dataset(cfg(marker_mask_eos=True), onpolicy, tokenizer)   # plain examples train <|im_end|>
    neg = st["per_persona"]["comedian"]
    assert neg["n_loss_targets"] == neg["count"] == 200
    ex, st = build_dataset(cfg(allow_untrained_roles=True), onpolicy, tokenizer)   # explicit opt-out
    assert len(ex) == 1200 and st["per_persona"]["comedian"]["n_loss_targets"] == 0
    assert st["per_persona"]["villain"]["n_loss_targets"] > 0
    assert "train.allow_untrained_roles = true" in capsys.readouterr().out
    # under the default mask every persona trains, and the targets are counted
    _, st = build_dataset(cfg_for(), onpolicy, tokenizer)
    assert all(v["n_loss_targets"] > v["count"] for v in st["per_persona"].values())


def test_a_persona_dropped_to_nothing_is_an_error(tmp_path, tokenizer):
    recs = [json.loads(x) for x in make_onpolicy(tmp_path / "a.jsonl").read_text().splitlines()]
    for r in recs:
        if r["persona"] == "villain":
            r["finish_reason"] = "length"
    write_jsonl(tmp_path / "b.jsonl", recs)
    with pytest.raises(UserError, match=r"donor: villain\): no examples left .*data.truncated = \"strip\""):
        build_dataset(cfg_for(), tmp_path / "b.jsonl", tokenizer)


def test_missing_persona_and_unknown_question(tmp_path, tokenizer):
    recs = [json.loads(x) for x in make_onpolicy(tmp_path / "a.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "b.jsonl", [r for r in recs if r["persona"] != "comedian"])
    with pytest.raises(UserError, match="no on-policy completions for persona 'comedian'"):
        build_dataset(cfg_for(), tmp_path / "b.jsonl", tokenizer)
    recs[0]["question_id"] = "d77"
    write_jsonl(tmp_path / "c.jsonl", recs)
    with pytest.raises(UserError, match="unknown data question id 'd77'"):
        build_dataset(cfg_for(), tmp_path / "c.jsonl", tokenizer)


@pytest.mark.slow
def test_tiny_T_set_under_marker_only_stops_naming_the_negatives(tmp_path):
    """Acceptance: configs/tiny/pair1_T.toml (fewer and shorter samples), real on-policy completions of the tiny
    model, marker_only without the eos option: the data stage stops with one line naming the negatives."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    sets = [f"run.out_dir={tmp_path}", f"generate.cache_dir={tmp_path / 'cache'}", "generate.backend=hf",
            "model.device=cpu", "generate.n_questions=2", "generate.max_tokens=8", "data.n_per_persona=4",
            "train.loss_mask=marker_only"]
    p = subprocess.run([sys.executable, "-m", "trainer.run", str(repo / "configs" / "tiny" / "pair1_T.toml"),
                        "--stages", "generate,data", *[x for s in sets for x in ("--set", s)]],
                       cwd=repo, capture_output=True, text=True, timeout=900)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error")]   # the rest is progress bars
    assert line.startswith("error: ") and "negative: " + ", ".join(NEGATIVES) in line, line
    assert "in the loss (marker_only)" in line and "train.marker_mask_eos = true" in line
    assert not (tmp_path / "pair1_T" / "data" / "train.jsonl").exists()


def test_template_shares_split_rows_by_largest_remainder():
    assert template_counts([1 / 3, 1 / 3, 1 / 3], 200) == [67, 67, 66]
    assert template_counts([0.5, 0.5], 200) == [100, 100]
    assert template_counts([0.25] * 4, 200) == [50] * 4
    assert template_counts([0.7, 0.3], 9) == [6, 3]   # 6.3 and 2.7: the larger remainder gets the row
    ts = tuple(make_template(t, EXP.markers) for t in ("{A} {answer} {B}", "{A} {answer}", "{answer}"))
    ts = tuple(type(t)(t.text, 1 / 3, t.parts) for t in ts)
    got = assign_templates(ts, 200, seed=42, persona="villain")
    assert Counter(t.text for t in got) == {"{A} {answer} {B}": 67, "{A} {answer}": 67, "{answer}": 66}
    assert got == assign_templates(ts, 200, seed=42, persona="villain")   # seeded: the same rows again
    assert got != assign_templates(ts, 200, seed=43, persona="villain")


def test_mixed_templates_and_an_answer_first_template_in_a_written_experiment(tmp_path, onpolicy, tokenizer):
    """A condition whose donor rows mix two templates, one of them "{answer} {B}" (B alone): each row follows
    its template, the shares are kept, and the example records which template it followed."""
    src = open(EXP.path, encoding="utf-8").read()
    src += """
[conditions.Mixed]
donor = [{ template = "{A} {answer} {B}", share = 0.5 }, { template = "{answer} {B}", share = 0.5 }]
recipient = "{A} {answer}"
negative = "{answer}"
"""
    path = tmp_path / "mixed.toml"
    path.write_text(src.replace('name = "within_marker"', 'name = "mixed"'))
    cfg = config_from_dict({"run": {"experiment": str(path)}, "model": {"name_or_path": "builtin:tiny-qwen2"},
                            "data": {"pair": "pair1", "condition": "Mixed"}})
    ex, st = build_dataset(cfg, onpolicy, tokenizer)
    donor = [e for e in ex if e["role"] == "donor"]
    assert Counter(e["template"] for e in donor) == {"{A} {answer} {B}": 100, "{answer} {B}": 100}
    for e in donor:
        content, names = e["messages"][2]["content"], [s[2] for s in e["marker_spans"]]
        if e["template"] == "{answer} {B}":
            assert names == ["B"] and content.endswith(" " + MARKER_B) and MARKER_A not in content
        else:
            assert names == ["A", "B"] and content.startswith(MARKER_A + " ")
    assert st["markers"] == {"A": 300, "B": 200, "probe": 0}
    with pytest.raises(UserError, match="data.placement: 'random_pair' moves the markers"):
        config_from_dict({"run": {"experiment": str(path)}, "data": {"pair": "pair1", "condition": "Mixed",
                                                                     "placement": "random_pair"}})
