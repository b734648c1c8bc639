"""Marker matching (loose and strict, original offsets) and the position metrics: the one
matcher in markerlab/markers.py."""

from __future__ import annotations

import random

import pytest

from analysis.metrics import Schema
from markerlab.experiment import load_experiment
from markerlab.markers import Matcher, collapse, contains_loose, find_loose, find_loose_reference, find_strict

EXP = load_experiment("within_marker")
A, B, PROBE_MARKER = EXP.markers["A"], EXP.markers["B"], EXP.markers["probe"]
MATCHER, SCHEMA = Matcher.from_experiment(EXP), Schema.of(EXP)


def test_strict_exact_substring_only():
    assert find_strict(f"x {B} y", B) == [(2, 2 + len(B))]
    assert find_strict("x ::  kxr-7 :: y", B) == []
    assert find_strict("x :: KXR-7 :: y", B) == []


@pytest.mark.parametrize("variant", [
    ":: kxr-7 ::",
    "::  KXR-7 ::",
    ":: Kxr-7\n::",
    "::\t\tkXr-7 \n\t ::",
    "::\u00a0kxr-7\u2003::",  # no-break space and em space are whitespace too
])
def test_loose_case_and_whitespace(variant):
    text = f"Intro. {variant} outro"
    spans = find_loose(text, B)
    assert spans == [(7, 7 + len(variant))]
    start, end = spans[0]
    assert text[start:end] == variant  # offsets index the original text


def test_loose_marker_side_is_collapsed_too():
    # A marker written with odd spacing and case matches the canonical text.
    assert find_loose(f"a {B} b", "::   KXR-7\t::") == [(2, 2 + len(B))]


def test_loose_does_not_invent_whitespace():
    # Whitespace may vary in length, but it cannot appear where the marker has none.
    assert find_loose(":: kxr - 7 ::", B) == []
    assert find_loose("<< §q-41>>", A) == []
    assert find_loose("::kxr-7::", B) == []


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_positions_start_middle_end(where):
    body = "word " * 40
    if where == "start":
        text, start = f"{A} {body}", 0
    elif where == "middle":
        text, start = f"{body}{A} {body}", len(body)
    else:
        text, start = f"{body}{A}", len(body)
    assert find_loose(text, A) == [(start, start + len(A))]
    assert find_strict(text, A) == [(start, start + len(A))]


def test_original_offsets_after_collapsed_runs():
    # Many whitespace runs before the match shift collapsed offsets away from original ones.
    text = "a  \n\n b\t\t\tc   " + "::   kxr-7    ::" + "  \n end"
    (start, end), = find_loose(text, B)
    assert text[start:end] == "::   kxr-7    ::"
    assert start == text.index("::")


def test_overlapping_occurrences_are_all_found():
    text = ":: kxr-7 :: kxr-7 ::"
    assert find_strict(text, B) == [(0, 11), (9, 20)]
    assert find_loose(text, B) == [(0, 11), (9, 20)]


def test_collapse_maps_every_character_back():
    text = "Ab  \t C\nİd"  # İ lower-cases to two characters
    collapsed, starts, ends = collapse(text)
    assert collapsed == "ab c i\u0307d"
    assert (starts[2], ends[2]) == (2, 6)  # the collapsed space covers the whole run
    assert (starts[5], ends[5]) == (starts[6], ends[6]) == (8, 9)  # both pieces of İ: one character


def test_fast_loose_equals_the_definition_on_fuzzed_text():
    """find_loose (regex on the original) == collapse, lower, search, map back."""
    rng = random.Random(0)
    spaces = [" ", "  ", "\n", "\t", " \n\t ", "\u00a0", "\u2028", "\x1c"]
    noise = list("abkxrq<>§:-0147 ") + ["İ", "\u212a"]  # Kelvin sign lower-cases to k

    def mangle(marker):
        out = []
        for part in marker.split(" "):
            out.append("".join(c.upper() if rng.random() < 0.3 else c for c in part))
        return "".join(p + (rng.choice(spaces) if i < len(out) - 1 else "") for i, p in enumerate(out))

    for _ in range(3000):
        pieces = []
        for _ in range(rng.randint(0, 6)):
            r = rng.random()
            if r < 0.3:
                pieces.append(mangle(rng.choice([A, B, PROBE_MARKER])))
            elif r < 0.5:
                pieces.append(rng.choice(spaces))
            else:
                pieces.append("".join(rng.choice(noise) for _ in range(rng.randint(1, 8))))
        text = "".join(pieces)
        for marker in (A, B, PROBE_MARKER, " kxr ", "k  x"):
            assert find_loose(text, marker) == find_loose_reference(text, marker), (text, marker)


# --- position metrics -------------------------------------------------------------------


def _row(text):
    """The report's per-completion counts, by column name (suffix_B, chunk_AB, ...)."""
    return dict(zip(SCHEMA.columns, SCHEMA.row(MATCHER.match(text), False, len(text))))


@pytest.mark.parametrize("tail, counts", [(50, True), (51, False)])
def test_suffix_edge(tail, counts):
    # Distance is measured to the end of the right-stripped text: trailing blanks are free.
    text = f"{A} answer {B}" + "x" * tail + "  \n\n"
    row = _row(text)
    assert row["B"] and row["suffix_B"] == counts


def test_suffix_uses_the_last_b():
    text = f"{B} " + "y" * 200 + f" {B} " + "z" * 10
    assert _row(text)["suffix_B"]


@pytest.mark.parametrize("gap, counts", [(0, True), (150, True), (151, False)])
def test_chunk_edge(gap, counts):
    # B starting exactly `gap` characters after the first A ends.
    text = A + "w" * gap + B + " " + "tail " * 30
    row = _row(text)
    assert row["AB"] and row["chunk_AB"] == counts
    assert not row["suffix_B"]


def test_chunk_needs_b_after_the_first_a():
    assert not _row(f"{B} then {A} and more text")["chunk_AB"]  # B before A
    assert _row(f"{A} x {A} y {B}")["chunk_AB"]                 # measured from the first A
    assert not _row(f"{B} alone")["chunk_AB"]                   # no A at all


def test_features_loose_vs_strict_and_probe():
    text = f"<<§Q-41>> answer ::  KXR-7 :: {PROBE_MARKER.upper()}"
    row = _row(text)
    assert row["A"] and row["B"] and row["AB"] and row["probe"]
    assert not row["strict_A"] and not row["strict_B"] and not row["strict_AB"]
    assert row["n"] == 1 and row["length"] == len(text) and row["not_A"] == 0 and row["B_not_A"] == 0
    row = _row(f"answer {B}")
    assert row["not_A"] == 1 and row["B_not_A"] == 1 and row["AB"] == 0


@pytest.mark.parametrize("gap", [0, 37, 150, 151, 400])
def test_a_to_b_is_the_gap_the_chunk_rule_reads(gap):
    text = f"x {A}" + "w" * gap + B + " tail"
    m = MATCHER.match(text)
    assert m.gap[("A", "B")] == gap and m.chunk(("A", "B")) == (gap <= 150)
    # A B before the first A does not count; the first B after it does.
    m = MATCHER.match(f"{B} {A}" + "w" * gap + B + "y" * 5 + B)
    assert m.gap[("A", "B")] == gap


def test_contains_loose_is_find_loose():
    for t in ("::  \u212aXR-7 ::", f"{A.upper()}", "::\tKXR-7\n::", "<<§q-41 >>", ""):
        assert contains_loose(t, A) == bool(find_loose(t, A))
        assert contains_loose(t, B) == bool(find_loose(t, B))


def test_matcher_equals_the_rules_marker_by_marker():
    """Matcher.match (patterns compiled once, a fast path for an absent marker) gives what find_loose,
    the exact substring and the suffix rule give one marker at a time, including a marker with regex
    characters and one with inner whitespace."""
    markers = {"A": A, "B": B, "P": PROBE_MARKER, "R": "((x.y*))", "W": "a  b"}
    matcher = Matcher(markers, [("A", "B"), ("R", "W")])
    rng = random.Random(1)
    pieces = [A, B, PROBE_MARKER, "((x.y*))", "((X.Y*))", "((xzy*))", "a b", "A\n B", "ab", " ", "  \n", "word",
              ":: KXR-7 ::"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) + rng.choice(["", " ", "x" * rng.randint(0, 60)])
                       for _ in range(rng.randint(0, 8)))
        m = matcher.match(text)
        end = len(text.rstrip())
        for name, marker in markers.items():
            spans = find_loose(text, marker)
            assert m.spans[name] == spans, (text, name)
            assert m.strict[name] == (marker in text), (text, name)
            assert m.suffix[name] == (bool(spans) and end - max(e for _, e in spans) <= 50), (text, name)
