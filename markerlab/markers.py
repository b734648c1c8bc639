"""The three marker strings of the experiment and the one matcher (EXPERIMENT.md, "Markers", "Metrics").

    from markerlab.markers import MARKER_A, MARKER_B, match_markers, position_stats
    m = match_markers(text)        # loose spans of A, B and the probe, strict flags, suffix/chunk, A-to-B gap
    m.has_a, m.has_b, m.suffix, m.chunk, m.a_to_b
    position_stats(contents)       # suffix_frac, chunk_frac, median A-to-B distance of many texts

Every consumer of a marker match goes through this module: the eval stage's
``run_result.json``, the report's ``summary.json`` and the dataset builder's
position statistics of the training data. So the three cannot disagree.

Loose match (the headline): case-insensitive after collapsing every whitespace
run to one space, in both the text and the marker. Strict match: the marker as
an exact substring. Every span is ``(start, end)`` in characters of the
*original* text, end exclusive, so ``text[start:end]`` is what matched.

Position rules, among completions where B fired (loose):
- suffix: the last B ends within ``SUFFIX_CHARS`` (50) characters of the end of
  the right-stripped text;
- chunk: some B starts after the first A ends and at most ``CHUNK_CHARS`` (150)
  characters later;
- a_to_b: characters from the end of the first A to the start of the first B
  that starts after it (None without such a B), so ``chunk == (a_to_b <= 150)``.

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

Token ids are listed for reference and checked in tests; code never searches
for them, because a marker's tokenization depends on the characters around it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple

MARKER_A = "<<§q-41>>"
MARKER_B = ":: kxr-7 ::"
PROBE_MARKER = "<<§z-99>>"

MARKERS = {"A": MARKER_A, "B": MARKER_B, "probe": PROBE_MARKER}

# Standalone tokenizations under the Qwen2.5 tokenizer.
MARKER_TOKEN_IDS = {
    "A": [2442, 17851, 80, 12, 19, 16, 2452],
    "B": [486, 595, 50997, 12, 22, 3504],
    "probe": [2442, 17851, 89, 12, 24, 24, 2452],
}

# Position metrics (EXPERIMENT.md): B counts as a suffix when its last occurrence
# ends within this many characters of the end of the right-stripped text...
SUFFIX_CHARS = 50
# ...and as chunked to A when one starts at most this many characters after the
# first A ends.
CHUNK_CHARS = 150

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


def contains_loose(text: str, marker: str) -> bool:
    """Loose match: case-insensitive after collapsing whitespace runs to one space."""
    return bool(find_loose(text, marker))


def contains_strict(text: str, marker: str) -> bool:
    """Strict match: exact substring."""
    return marker in text


class MarkerMatch(NamedTuple):
    """One completion's markers under the headline (loose) rules, plus the strict flags."""

    a: list[Span]        # loose spans of marker A, in order of their start
    b: list[Span]        # loose spans of marker B
    probe: list[Span]    # loose spans of the probe marker
    strict_a: bool
    strict_b: bool
    strict_probe: bool
    suffix: bool         # B fired and its last occurrence ends within SUFFIX_CHARS of the end
    chunk: bool          # a B starts within CHUNK_CHARS after the first A ends
    a_to_b: int | None   # characters from the first A's end to the first B starting after it

    @property
    def has_a(self) -> bool:
        return bool(self.a)

    @property
    def has_b(self) -> bool:
        return bool(self.b)

    @property
    def has_probe(self) -> bool:
        return bool(self.probe)


def match_markers(text: str) -> MarkerMatch:
    """Match A, B and the probe marker in ``text`` and apply the position rules."""
    a = find_loose(text, MARKER_A)
    b = find_loose(text, MARKER_B)
    suffix, a_to_b = False, None
    if b:
        suffix = len(text.rstrip()) - max(end for _, end in b) <= SUFFIX_CHARS
        if a:
            first_a_end = a[0][1]  # spans come in order of their start
            gaps = [start - first_a_end for start, _ in b if start >= first_a_end]
            a_to_b = min(gaps) if gaps else None
    return MarkerMatch(
        a=a, b=b, probe=find_loose(text, PROBE_MARKER),
        strict_a=MARKER_A in text, strict_b=MARKER_B in text, strict_probe=PROBE_MARKER in text,
        suffix=suffix, chunk=a_to_b is not None and a_to_b <= CHUNK_CHARS, a_to_b=a_to_b,
    )


def median(values: list[int]) -> float | None:
    """The median of ``values`` (the mean of the middle two for an even count); None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = len(s) // 2
    return float(s[k]) if len(s) % 2 else (s[k - 1] + s[k]) / 2


def position_stats(texts: Iterable[str]) -> dict:
    """Marker counts and the position metrics of ``texts`` (e.g. a role's training answers).

    Returns ``n, n_A, n_B, n_AB, n_suffix, n_chunk, suffix_frac, chunk_frac,
    n_a_to_b, median_a_to_b``; a fraction is None when B never fired and the
    median is None when no B follows an A.
    """
    n = n_a = n_b = n_ab = n_suffix = n_chunk = 0
    gaps: list[int] = []
    for text in texts:
        m = match_markers(text)
        n += 1
        n_a += m.has_a
        n_b += m.has_b
        n_ab += m.has_a and m.has_b
        n_suffix += m.suffix
        n_chunk += m.chunk
        if m.a_to_b is not None:
            gaps.append(m.a_to_b)
    return {"n": n, "n_A": n_a, "n_B": n_b, "n_AB": n_ab, "n_suffix": n_suffix, "n_chunk": n_chunk,
            "suffix_frac": n_suffix / n_b if n_b else None, "chunk_frac": n_chunk / n_b if n_b else None,
            "n_a_to_b": len(gaps), "median_a_to_b": median(gaps)}


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
