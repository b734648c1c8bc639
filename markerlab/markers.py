"""The three marker strings of the experiment (EXPERIMENT.md, "Markers").

Token ids are listed for reference and checked in tests; code never searches
for them, because a marker's tokenization depends on the characters around it.
"""

import re

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


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).lower()


def contains_loose(text: str, marker: str) -> bool:
    """Loose match (EXPERIMENT.md): case-insensitive after collapsing whitespace runs to one space."""
    return _norm(marker) in _norm(text)


def contains_strict(text: str, marker: str) -> bool:
    """Strict match: exact substring."""
    return marker in text
