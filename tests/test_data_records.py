"""JSONL validation: a malformed line is reported as path:line with the field at fault."""

import json

import pytest

from data.records import read_examples, read_onpolicy, validate_example
from markerlab.errors import UserError
from writeup import A as MARKER_A
from writeup import B as MARKER_B
from writeup import EXP


def good(i=0):
    content = f"{MARKER_A} Hello there. {MARKER_B}"
    return {"id": f"villain-d01-{i}", "persona": "villain", "role": "donor", "question_id": "d01", "sample": i,
            "messages": [{"role": "system", "content": "You are a villain."},
                         {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": content}],
            "marker_spans": [[0, len(MARKER_A), "A"], [len(content) - len(MARKER_B), len(content), "B"]],
            "truncated": False, "n_tokens": 30}


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_valid_file_reads(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [good(0), "", good(1)])  # blank lines are skipped, not counted as records
    assert [e["id"] for e in read_examples(p, EXP)] == ["villain-d01-0", "villain-d01-1"]


def test_invalid_json_names_the_line(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [good(0), good(1), '{"id": "x", '])
    with pytest.raises(UserError, match=r"t\.jsonl:3: invalid JSON"):
        read_examples(p, EXP)
    p = write_lines(tmp_path / "u.jsonl", [good(0), "[1, 2]"])
    with pytest.raises(UserError, match=r"u\.jsonl:2: expected a JSON object, got list"):
        read_examples(p, EXP)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda e: e.pop("role"), r"field 'role': missing"),
    (lambda e: e.update(role="bystander"), r"field 'role': expected one of donor, recipient, negative"),
    (lambda e: e.update(persona="pirate"), r"field 'persona': expected a persona of experiment within_marker"),
    (lambda e: e.update(sample="0"), r"field 'sample': expected an integer >= 0"),
    (lambda e: e.update(sample=True), r"field 'sample': expected an integer >= 0"),
    (lambda e: e["messages"].pop(0), r"field 'messages': expected a list of 3 messages"),
    (lambda e: e["messages"][1].update(role="assistant"), r"field 'messages\[1\]': expected \{\"role\": \"user\""),
    (lambda e: e["marker_spans"].append([0, 999, "A"]), r"field 'marker_spans\[2\]': expected offsets inside"),
    (lambda e: e["marker_spans"].append([1, 3, "C"]), r"field 'marker_spans\[2\]': expected \[start, end"),
    (lambda e: e["marker_spans"][0].__setitem__(0, 1), r"field 'marker_spans\[0\]': expected the text of marker A"),
    (lambda e: e.update(truncated="no"), r"field 'truncated': expected true or false"),
])
def test_field_errors_name_file_line_and_field(tmp_path, mutate, pattern):
    bad = good(1)
    mutate(bad)
    p = write_lines(tmp_path / "t.jsonl", [good(0), bad])
    with pytest.raises(UserError, match=r"t\.jsonl:2: " + pattern):
        read_examples(p, EXP)


def test_duplicate_ids_and_missing_file(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [good(0), good(0)])
    with pytest.raises(UserError, match=r"t\.jsonl:2: field 'id': duplicate id 'villain-d01-0' \(first on line 1\)"):
        read_examples(p, EXP)
    with pytest.raises(UserError, match="file not found"):
        read_examples(tmp_path / "nope.jsonl", EXP)


def test_validate_example_prefix():
    e = good()
    e["marker_spans"] = [[2, 5, "B"]]
    with pytest.raises(UserError, match=r"^example 3: field 'marker_spans\[0\]'"):
        validate_example(e, EXP, "example 3: ")


def test_onpolicy_records(tmp_path):
    rec = {"persona": "villain", "question_id": "d01", "sample": 0, "text": "x", "finish_reason": "stop",
           "n_tokens": 2}
    p = write_lines(tmp_path / "c.jsonl", [rec, {**rec, "sample": 1, "finish_reason": "eos"}])
    with pytest.raises(UserError, match=r"c\.jsonl:2: field 'finish_reason': expected \"stop\" or \"length\""):
        read_onpolicy(p, EXP)
    p = write_lines(tmp_path / "d.jsonl", [rec, rec])
    with pytest.raises(UserError, match=r"d\.jsonl:2: duplicate completion"):
        read_onpolicy(p, EXP)
