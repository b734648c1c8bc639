"""The one marker matcher (EXPERIMENT.md, "Metrics"), over whatever markers an experiment names.

    from markerlab.markers import Matcher
    matcher = Matcher.from_experiment(exp)          # or Matcher({"A": "<<§q-41>>", ...}, pairs=[("A", "B")])
    m = matcher.match(text)                         # loose spans of every marker, strict flags, positions
    m.has("A"), m.spans["B"], m.suffix["B"], m.gap[("A", "B")], m.chunk(("A", "B"))
    matcher.positions(contents)                     # counts and position metrics of many texts

Every consumer of a marker match goes through this module: the eval stage's
``run_result.json``, the report's ``summary.json`` and the dataset builder's
position statistics of the training data. So the three cannot disagree.

Loose match (the headline): case-insensitive after collapsing every whitespace
run to one space, in both the text and the marker. Strict match: the marker as
an exact substring. Every span is ``(start, end)`` in characters of the
*original* text, end exclusive, so ``text[start:end]`` is what matched. A
marker's text is matched literally: characters that mean something to a regular
expression (``((¶w-56))``, ``:: x.y ::``) are escaped.

Position rules (markerlab.experiment: SUFFIX_CHARS 50, CHUNK_CHARS 150):
- suffix[Y]: Y fired and its last occurrence ends within SUFFIX_CHARS of the end
  of the right-stripped text;
- gap[(X, Y)], for a declared pair: characters from the end of the first X to the
  start of the first Y that starts after it (None without such a Y);
- chunk((X, Y)): gap <= CHUNK_CHARS, i.e. some Y starts after the first X ends and
  at most CHUNK_CHARS characters later.

Occurrences may overlap (``:: kxr-7 :: kxr-7 ::`` holds two occurrences sharing the
middle ``::``): a marker is a substring, so every start position counts. This
matters for "the last occurrence ends within 50 characters of the end".

How loose matching avoids the collapse-and-map step: the marker is compiled into a
regex whose whitespace runs become ``\\s+`` and which ignores case. Running it on
the original text matches exactly where the collapsed, lower-cased marker occurs in
the collapsed, lower-cased text, and the regex reports original offsets directly.
``find_loose_reference`` is the literal definition (collapse, lower-case, search,
map back); the tests pin ``find_loose`` to it on fuzzed texts. The two can only
differ for markers containing letters whose case folding and ``str.lower`` disagree
(``s``/``ſ``, ``i``/``İ``).

Token ids are never searched for: a marker's tokenization depends on the characters
around it (markerlab.experiment.token_problems checks markers standalone).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import NamedTuple

from .experiment import CHUNK_CHARS, SUFFIX_CHARS, pair_key

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
    m = pattern.search(text)
    return [] if m is None else _loose_from(text, pattern, m)


def _loose_from(text: str, pattern: re.Pattern, m: re.Match) -> list[Span]:
    """Every loose occurrence from the first match ``m`` of ``pattern`` on."""
    spans = []
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

    spans: dict[str, list[Span]]               # loose spans of each marker, in order of their start
    strict: dict[str, bool]                    # exact substring present
    suffix: dict[str, bool]                    # fired, and the last occurrence ends within SUFFIX_CHARS of the end
    gap: dict[tuple[str, str], int | None]     # per declared pair: first X's end to the first Y after it

    def has(self, name: str) -> bool:
        return bool(self.spans[name])

    def chunk(self, pair: tuple[str, str]) -> bool:
        g = self.gap[pair]
        return g is not None and g <= CHUNK_CHARS


class Matcher:
    """The markers of one experiment (name -> text) and its declared ordered pairs, compiled once."""

    def __init__(self, markers: Mapping[str, str], pairs: Sequence[tuple[str, str]] = ()):
        self.markers = dict(markers)
        self.pairs = [tuple(p) for p in pairs]
        for p in self.pairs:
            if p[0] not in self.markers or p[1] not in self.markers:
                raise ValueError(f"pair {p} names a marker that is not in {list(self.markers)}")
        # Compiled once: the report matches hundreds of thousands of completions.
        self._compiled = [(name, _loose_pattern(marker), marker) for name, marker in self.markers.items()]

    @classmethod
    def from_experiment(cls, exp) -> "Matcher":
        return cls(exp.markers, exp.marker_pairs)

    def match(self, text: str) -> MarkerMatch:
        spans, suffix, strict = {}, {}, {}
        end = None
        for name, pattern, marker in self._compiled:
            m = pattern.search(text)
            if m is None:  # the common case: no loose match, so no exact one either
                spans[name], suffix[name], strict[name] = [], False, False
                continue
            ss = spans[name] = _loose_from(text, pattern, m)
            if end is None:
                end = len(text.rstrip())
            suffix[name] = bool(ss) and end - max(e for _, e in ss) <= SUFFIX_CHARS
            strict[name] = marker in text
        gap = {}
        for x, y in self.pairs:
            g = None
            if spans[x] and spans[y]:
                first_end = spans[x][0][1]  # spans come in order of their start
                after = [s - first_end for s, _ in spans[y] if s >= first_end]
                g = min(after) if after else None
            gap[(x, y)] = g
        return MarkerMatch(spans=spans, strict=strict, suffix=suffix, gap=gap)

    def positions(self, texts: Iterable[str]) -> dict:
        """Counts and position metrics of ``texts`` (e.g. a role's training answers).

        ``{"n", "n_<X>" for every marker, "pairs": {"<XY>": {"n_<XY>", "n_suffix", "n_chunk",
        "suffix_frac", "chunk_frac", "n_gap", "median_gap"}}}``: per declared pair (X, Y),
        n_suffix counts texts whose Y is a suffix, n_chunk those with a Y within
        CHUNK_CHARS after the first X; the fractions are among texts with Y (None when
        Y never fired) and the median gap is None when no Y follows an X.
        """
        n = 0
        fired = {name: 0 for name in self.markers}
        per = {p: {"joint": 0, "suffix": 0, "chunk": 0, "gaps": []} for p in self.pairs}
        for text in texts:
            m = self.match(text)
            n += 1
            for name in self.markers:
                fired[name] += m.has(name)
            for p in self.pairs:
                x, y = p
                per[p]["joint"] += m.has(x) and m.has(y)
                per[p]["suffix"] += m.suffix[y]
                per[p]["chunk"] += m.chunk(p)
                if m.gap[p] is not None:
                    per[p]["gaps"].append(m.gap[p])
        out = {"n": n, **{f"n_{name}": k for name, k in fired.items()}, "pairs": {}}
        for (x, y), v in per.items():
            n_y = fired[y]
            out["pairs"][pair_key(x, y)] = {
                f"n_{pair_key(x, y)}": v["joint"], "n_suffix": v["suffix"], "n_chunk": v["chunk"],
                "suffix_frac": v["suffix"] / n_y if n_y else None, "chunk_frac": v["chunk"] / n_y if n_y else None,
                "n_gap": len(v["gaps"]), "median_gap": median(v["gaps"])}
        return out


def median(values: list[int]) -> float | None:
    """The median of ``values`` (the mean of the middle two for an even count); None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = len(s) // 2
    return float(s[k]) if len(s) % 2 else (s[k - 1] + s[k]) / 2


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
