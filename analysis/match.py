"""Marker matching: loose (the headline) and strict, with positions in the original text.

Loose match (EXPERIMENT.md, "Metrics"): case-insensitive after collapsing every
whitespace run to one space, in both the text and the marker. Strict match: the
marker as an exact substring. Every span is ``(start, end)`` in characters of the
*original* text, end exclusive, so ``text[start:end]`` is what matched.

Occurrences may overlap (``:: kxr-7 :: kxr-7 ::`` holds two B markers sharing the
middle ``::``): a marker is a substring, so every start position counts. This
matters for "the last B ends within 50 characters of the end".

How loose matching avoids the collapse-and-map step: the marker is compiled into a
regex whose whitespace runs become ``\\s+`` and which ignores case. Running it on
the original text matches exactly where the collapsed, lower-cased marker occurs in
the collapsed, lower-cased text, and the regex reports original offsets directly.
``find_loose_reference`` is the literal definition (collapse, lower-case, search,
map back); the tests pin ``find_loose`` to it on fuzzed texts. The two can only
differ for markers containing letters whose case folding and ``str.lower`` disagree
(``s``/``ſ``, ``i``/``İ``); the experiment's markers contain none.
"""

from __future__ import annotations

import re
from functools import lru_cache

Span = tuple[int, int]


@lru_cache(maxsize=None)
def _loose_pattern(marker: str) -> re.Pattern:
    parts = marker.split()  # split() splits on whitespace runs, as str.isspace sees them
    if not parts:
        raise ValueError(f"marker {marker!r} is empty or only whitespace")
    body = r"\s+".join(re.escape(p) for p in parts)
    # A marker that begins or ends with whitespace needs whitespace there in the text too.
    if marker[0].isspace():
        body = r"\s+" + body
    if marker[-1].isspace():
        body = body + r"\s+"
    return re.compile(body, re.IGNORECASE)


def find_loose(text: str, marker: str) -> list[Span]:
    """Every loose occurrence of ``marker`` in ``text``, overlapping ones included."""
    pattern = _loose_pattern(marker)
    spans = []
    m = pattern.search(text)
    while m is not None:
        start = m.start()
        # A marker that begins with whitespace matches its run once, at the run's start
        # (the collapsed text has one space there), not again at each later blank.
        if not (start > 0 and text[start].isspace() and text[start - 1].isspace()):
            spans.append(m.span())
        # Restart one character after this match's start, so overlaps are found.
        m = pattern.search(text, m.start() + 1)
    return spans


def find_strict(text: str, marker: str) -> list[Span]:
    """Every exact occurrence of ``marker`` in ``text``, overlapping ones included."""
    spans = []
    k = text.find(marker)
    while k != -1:
        spans.append((k, k + len(marker)))
        k = text.find(marker, k + 1)
    return spans


# --- the literal definition, kept as the reference the fast path is tested against ---


def collapse(text: str) -> tuple[str, list[int], list[int]]:
    """Lower-case ``text`` and collapse each whitespace run to one space.

    Returns the collapsed string and, for each of its characters, the original span
    ``[starts[i], ends[i])`` it came from: a collapsed space covers its whole run;
    a character whose lower case is longer than one character (``İ``) maps every
    piece to the one original character.
    """
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            j = i
            while j < n and text[j].isspace():
                j += 1
            chars.append(" ")
            starts.append(i)
            ends.append(j)
            i = j
        else:
            for c in text[i].lower():
                chars.append(c)
                starts.append(i)
                ends.append(i + 1)
            i += 1
    return "".join(chars), starts, ends


def find_loose_reference(text: str, marker: str) -> list[Span]:
    """``find_loose`` by the definition: search the collapsed text, map spans back."""
    collapsed, starts, ends = collapse(text)
    needle = collapse(marker)[0]
    spans = []
    k = collapsed.find(needle)
    while k != -1:
        spans.append((starts[k], ends[k + len(needle) - 1]))
        k = collapsed.find(needle, k + 1)
    return spans
