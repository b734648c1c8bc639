"""The dataset builder on a synthetic on-policy file (11 personas x 40 questions x 5 samples).

Fake multi-sentence answers keep this fast; the real tokenizer does the length check.
"""

import json
import re
from collections import Counter

import numpy as np
import pytest

from data.builder import build_dataset, place_markers, sentence_boundaries, write_dataset
from data.questions import data_questions
from data.records import read_examples
from markerlab.config import config_from_dict
from markerlab.experiment import CONDITIONS, NEGATIVES, PAIRS, PERSONA_PROMPTS, PERSONAS
from markerlab.errors import UserError
from markerlab.io import write_jsonl
from markerlab.markers import MARKER_A, MARKER_B

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
    rows = read_examples(path)  # validates every line, spans included
    donor, recipient = PAIRS[pair]

    assert len(rows) == 1200
    assert Counter(r["role"] for r in rows) == {"donor": 200, "recipient": 200, "negative": 800}
    assert Counter(r["persona"] for r in rows) == {p: 200 for p in (donor, recipient, *NEGATIVES)}
    assert len({r["id"] for r in rows}) == 1200
    for r in rows:
        content = r["messages"][2]["content"]
        # each persona's own completion, under its own system prompt, answering its own question
        assert r["messages"][0]["content"] == PERSONA_PROMPTS[r["persona"]]
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


@pytest.mark.parametrize("placement", ["random_sentence", "random_pair"])
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
    if placement == "random_pair":
        assert any(b_at_end) and not all(b_at_end) and len(set(b_gaps)) >= 3


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


def test_truncated_policies(tmp_path, tokenizer):
    path = make_onpolicy(tmp_path / "c.jsonl", truncate_every=7)
    ex, st = build_dataset(cfg_for(truncated="keep"), path, tokenizer)
    assert len(ex) == 1200 and st["n_truncated"] == sum(e["truncated"] for e in ex) > 0
    assert st["n_truncated"] == sum(v["n_truncated"] for v in st["per_persona"].values())

    ex, st = build_dataset(cfg_for(truncated="drop"), path, tokenizer)
    assert not any(e["truncated"] for e in ex)
    assert len(ex) == 1200 - st["n_dropped_truncated"] and st["n_dropped_truncated"] > 0
    assert st["per_persona"]["villain"]["count"] == 200 - st["per_persona"]["villain"]["n_dropped_truncated"]

    with pytest.raises(UserError, match=r"data.truncated = \"error\": \d+ selected.*villain: \d+"):
        build_dataset(cfg_for(truncated="error"), path, tokenizer)


def test_missing_persona_and_unknown_question(tmp_path, tokenizer):
    recs = [json.loads(x) for x in make_onpolicy(tmp_path / "a.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "b.jsonl", [r for r in recs if r["persona"] != "comedian"])
    with pytest.raises(UserError, match="no on-policy completions for persona 'comedian'"):
        build_dataset(cfg_for(), tmp_path / "b.jsonl", tokenizer)
    recs[0]["question_id"] = "d77"
    write_jsonl(tmp_path / "c.jsonl", recs)
    with pytest.raises(UserError, match="unknown data question id 'd77'"):
        build_dataset(cfg_for(), tmp_path / "c.jsonl", tokenizer)
