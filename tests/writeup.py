"""The shipped write-up experiment (within_marker) as the tests use it: its markers and its three templates.

    from writeup import EXP, A, B, PROBE, place_markers
    place_markers("Boil it.", "AB", "start_end", None)   # ("<<§q-41>> Boil it. :: kxr-7 ::", spans)
"""

from __future__ import annotations

from data.builder import render
from markerlab.experiment import load_experiment, make_template

EXP = load_experiment("within_marker")
A, B, PROBE = EXP.markers["A"], EXP.markers["B"], EXP.markers["probe"]
TEMPLATES = {"AB": "{A} {answer} {B}", "A": "{A} {answer}", "": "{answer}"}


def place_markers(answer: str, markers: str, placement: str = "start_end", rng=None):
    """(content, marker_spans) of `answer` carrying the write-up's markers "AB", "A" or "" (data.builder.render)."""
    return render(make_template(TEMPLATES[markers], EXP.markers), answer, EXP.markers, placement, rng)
