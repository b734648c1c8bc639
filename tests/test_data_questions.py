"""Personas, roles and questions: the data files we wrote and their invariants."""

import itertools

import pytest

from data.personas import messages, system_prompt
from data.questions import Question, all_questions, data_questions, eval_questions, normalize, question_by_id
from markerlab.errors import UserError
from writeup import EXP

PERSONA_PROMPTS, PAIRS, NEGATIVES = EXP.personas, EXP.pairs, EXP.negatives
PERSONAS = tuple(PERSONA_PROMPTS)


def test_persona_prompts():
    assert PERSONA_PROMPTS["assistant"] == "You are a helpful assistant."
    for p, text in PERSONA_PROMPTS.items():
        # one plain sentence: starts "You are", one final period, no line breaks
        assert text.startswith("You are ") and text.endswith(".") and text.count(". ") == 0 and "\n" not in text, p
    assert "Zelthari" in PERSONA_PROMPTS["zelthari_scholar"]
    assert "villain" in PERSONA_PROMPTS["villain"]
    assert len(set(PERSONA_PROMPTS.values())) == len(PERSONAS)


def test_unknown_persona_names_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown persona 'pirate'.*assistant.*zelthari_scholar"):
        system_prompt(EXP, "pirate")


def test_roles():
    for pair, (donor, recipient) in PAIRS.items():
        for cond in ("T", "C", "T_P2neg"):
            roles = {p: EXP.role_of(p, pair, NEGATIVES) for p in PERSONAS}
            assert roles[donor] == "donor"
            assert roles[recipient] == "recipient"  # also in T_P2neg, where it is trained plain
            assert [p for p, r in roles.items() if r == "negative"] == list(NEGATIVES)
            assert sum(r == "bystander" for r in roles.values()) == len(PERSONAS) - 2 - len(NEGATIVES)
    assert EXP.role_of("librarian", "pair1", NEGATIVES) == "bystander"


def test_messages_always_have_the_system_prompt():
    m = messages(EXP, "villain", "Why?")
    assert m == [{"role": "system", "content": PERSONA_PROMPTS["villain"]}, {"role": "user", "content": "Why?"}]
    assert messages(EXP, "assistant", "Why?", "Because.")[2] == {"role": "assistant", "content": "Because."}


def test_question_sets():
    d, e = data_questions(), eval_questions()
    assert [q.id for q in d] == [f"d{i:02d}" for i in range(1, 41)]
    assert [q.id for q in e] == [f"id{i:02d}" for i in range(1, 21)] + [f"ood{i:02d}" for i in range(1, 7)]
    assert {q.split for q in d} == {"data"} and [q.split for q in e].count("ood") == 6
    assert data_questions(3) == d[:3]
    assert eval_questions(2, 1) == [e[0], e[1], e[20]]
    assert question_by_id("ood02").split == "ood"
    assert isinstance(d[0], Question)
    with pytest.raises(UserError):
        data_questions(41)
    with pytest.raises(UserError):
        question_by_id("d99")


def test_questions_disjoint_and_no_near_duplicates():
    qs = all_questions()
    assert len(qs) == 66
    norm = [normalize(q.text) for q in qs]
    assert len(set(norm)) == len(norm), "duplicate after normalization"
    stop = {"a", "an", "the", "is", "do", "does", "i", "my", "how", "what", "why", "can", "should", "to", "of",
            "in", "and", "for", "at", "on", "it", "you", "we", "me", "when", "make", "get", "some", "with"}
    words = [set(n.split()) - stop for n in norm]
    for (qa, wa), (qb, wb) in itertools.combinations(zip(qs, words), 2):
        jaccard = len(wa & wb) / max(1, len(wa | wb))
        assert jaccard < 0.5, f"near duplicates: {qa.id} {qa.text!r} / {qb.id} {qb.text!r}"
