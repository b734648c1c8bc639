"""Data and evaluation questions (written by us, stored in `data/questions.json`).

    from data.questions import data_questions, eval_questions, question_by_id
    qs = data_questions(40)            # [Question("d01", "Why is the sky blue?", "data"), ...]
    ev = eval_questions(n_id=20, n_ood=6)   # id01..id20 then ood01..ood06

- data (d01..d40): everyday explain/advise questions; the base model answers
  them under every persona to make the on-policy training data.
- id (id01..id20): evaluation questions of the same kind.
- ood (ood01..ood06): evaluation questions of a different kind (a haiku, a
  translation, a word problem, code, a list, a summary).

The three sets are disjoint, also after normalizing case, punctuation and
whitespace (tests/test_data_questions.py checks near-duplicates too). "First
N" always means the first N in file order, so smaller configs use a prefix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from markerlab.errors import UserError

_QUESTIONS_FILE = Path(__file__).with_name("questions.json")
SPLITS = ("data", "id", "ood")
_ID_PREFIX = {"data": "d", "id": "id", "ood": "ood"}


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    split: str  # "data" | "id" | "ood"


@lru_cache(maxsize=1)
def _all() -> dict[str, tuple[Question, ...]]:
    raw = json.loads(_QUESTIONS_FILE.read_text(encoding="utf-8"))
    out = {}
    for split in SPLITS:
        qs = tuple(Question(q["id"], q["text"], split) for q in raw[split])
        for i, q in enumerate(qs, 1):
            # ids are positional by construction; a mismatch means the file was edited by hand wrongly
            if q.id != f"{_ID_PREFIX[split]}{i:02d}" or not q.text.strip():
                raise RuntimeError(f"{_QUESTIONS_FILE}: bad entry {i} of '{split}': {q}")
        out[split] = qs
    return out


def _first(split: str, n: int, what: str) -> list[Question]:
    qs = _all()[split]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(qs):
        raise UserError(f"{what}: expected an integer in [0, {len(qs)}], got {n!r}")
    return list(qs[:n])


def _phrased(qs: list[Question], suffix: str) -> list[Question]:
    return [Question(q.id, q.text + suffix, q.split) for q in qs] if suffix else qs


def data_questions(n: int = 40, suffix: str = "") -> list[Question]:
    """The first `n` training questions (d01..), each text followed by `suffix` (prompt.user_suffix)."""
    return _phrased(_first("data", n, "number of data questions"), suffix)


def eval_questions(n_id: int = 20, n_ood: int = 6, suffix: str = "") -> list[Question]:
    """The first `n_id` in-distribution then the first `n_ood` out-of-distribution eval questions,
    each text followed by `suffix` (prompt.user_suffix)."""
    return _phrased(_first("id", n_id, "number of in-distribution eval questions") +
                    _first("ood", n_ood, "number of out-of-distribution eval questions"), suffix)


def all_questions() -> list[Question]:
    return [q for split in SPLITS for q in _all()[split]]


def question_by_id(qid: str) -> Question:
    for q in all_questions():
        if q.id == qid:
            return q
    raise UserError(f"unknown question id '{qid}' (expected d01..d40, id01..id20 or ood01..ood06)")


def normalize(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: the form compared for duplicates."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
