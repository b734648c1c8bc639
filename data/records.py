"""Reading and validating the JSONL files of the data stage.

    from data.records import read_examples, validate_example, read_onpolicy
    examples = read_examples("runs/pair1_T/data/train.jsonl", exp)   # validated against the experiment, ids unique
    completions = read_onpolicy(path, exp)                           # validated on-policy records

Every problem is a one-line `UserError` naming the place: for a file
``path:line: field 'x': expected ...``. A training example is the format in
docs/contracts.md ("Training example"); the extra fields "truncated" (bool: the
completion was cut at generate.max_tokens, so data/tokenize.py keeps its
<|im_end|> out of the loss) and "n_tokens" (int) are allowed and checked when
present. Personas and markers are the experiment's (markerlab.experiment):
`marker_spans` entries must be [start, end, name] character offsets inside the
assistant content that cover exactly that marker's text.
"""

from __future__ import annotations

import json

from markerlab.errors import UserError
from markerlab.experiment import TRAINED_ROLES
from markerlab.io import iter_jsonl  # noqa: F401  (re-exported: data.records.iter_jsonl)

MESSAGE_ROLES = ("system", "user", "assistant")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(obj: dict, key: str, ok, expected: str, where: str):
    if key not in obj:
        raise UserError(f"{where}field '{key}': missing (expected {expected})")
    v = obj[key]
    if not ok(v):
        raise UserError(f"{where}field '{key}': expected {expected}, got {json.dumps(v, ensure_ascii=False)[:80]}")
    return v


def validate_example(ex: dict, exp, where: str = "") -> None:
    """Check one training example against experiment `exp`; `where` prefixes the message (e.g. 'train.jsonl:12: ')."""
    personas, markers = exp.personas, exp.markers
    _need(ex, "id", lambda v: isinstance(v, str) and v != "", "a non-empty string", where)
    _need(ex, "persona", lambda v: v in personas, f"a persona of experiment {exp.name} ({', '.join(personas)})",
          where)
    _need(ex, "role", lambda v: v in TRAINED_ROLES, f"one of {', '.join(TRAINED_ROLES)}", where)
    _need(ex, "question_id", lambda v: isinstance(v, str) and v != "", "a non-empty string", where)
    _need(ex, "sample", lambda v: _is_int(v) and v >= 0, "an integer >= 0", where)
    msgs = _need(ex, "messages", lambda v: isinstance(v, list) and len(v) == 3,
                 "a list of 3 messages (system, user, assistant)", where)
    for i, (m, role) in enumerate(zip(msgs, MESSAGE_ROLES)):
        if not (isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str)):
            raise UserError(f"{where}field 'messages[{i}]': expected {{\"role\": \"{role}\", \"content\": str}}, "
                            f"got {json.dumps(m, ensure_ascii=False)[:80]}")
    content = msgs[2]["content"]
    names = "|".join(f'"{m}"' for m in markers)
    spans = _need(ex, "marker_spans", lambda v: isinstance(v, list), f"a list of [start, end, {names}]", where)
    for i, s in enumerate(spans):
        if not (isinstance(s, list) and len(s) == 3 and _is_int(s[0]) and _is_int(s[1]) and s[2] in markers):
            raise UserError(f"{where}field 'marker_spans[{i}]': expected [start, end, {names}] (the markers of "
                            f"experiment {exp.name}), got {s!r}")
        start, end, name = s
        if not 0 <= start < end <= len(content):
            raise UserError(f"{where}field 'marker_spans[{i}]': expected offsets inside the assistant content "
                            f"(0..{len(content)}), got [{start}, {end}]")
        if content[start:end] != markers[name]:
            raise UserError(f"{where}field 'marker_spans[{i}]': expected the text of marker {name} "
                            f"({markers[name]!r}) at [{start}, {end}], found {content[start:end]!r}")
    if "truncated" in ex:
        _need(ex, "truncated", lambda v: isinstance(v, bool), "true or false", where)
    if "n_tokens" in ex:
        _need(ex, "n_tokens", lambda v: _is_int(v) and v > 0, "an integer > 0", where)


def read_examples(path, exp) -> list[dict]:
    """A training set (train.jsonl), every line validated against experiment `exp`, ids unique."""
    out, seen = [], {}
    for lineno, ex in iter_jsonl(path):
        where = f"{path}:{lineno}: "
        validate_example(ex, exp, where)
        if ex["id"] in seen:
            raise UserError(f"{where}field 'id': duplicate id '{ex['id']}' (first on line {seen[ex['id']]})")
        seen[ex["id"]] = lineno
        out.append(ex)
    return out


# --------------------------------------------------------------------------- on-policy completions

def validate_onpolicy(rec: dict, personas, where: str = "") -> None:
    """One on-policy completion: persona (one of `personas`), question_id, sample, text, finish_reason, n_tokens."""
    _need(rec, "persona", lambda v: v in personas, f"one of {', '.join(personas)}", where)
    _need(rec, "question_id", lambda v: isinstance(v, str) and v != "", "a non-empty string", where)
    _need(rec, "sample", lambda v: _is_int(v) and v >= 0, "an integer >= 0", where)
    _need(rec, "text", lambda v: isinstance(v, str), "a string", where)
    _need(rec, "finish_reason", lambda v: v in ("stop", "length"), "\"stop\" or \"length\"", where)
    _need(rec, "n_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0", where)


def read_onpolicy(path, exp) -> list[dict]:
    """On-policy completions, every line validated (personas of experiment `exp`), no duplicates."""
    out, seen = [], {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}: "
        validate_onpolicy(rec, exp.personas, where)
        key = (rec["persona"], rec["question_id"], rec["sample"])
        if key in seen:
            raise UserError(f"{where}duplicate completion {key} (first on line {seen[key]})")
        seen[key] = lineno
        out.append(rec)
    return out
