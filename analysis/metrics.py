"""Per-completion marker features and per-cell counts (EXPERIMENT.md, "Metrics").

Each completion becomes a row of 0/1 counts (``COLUMNS``); a cell keeps those
counts summed per question, a ``(questions x columns)`` integer matrix. Every
statistic is a ratio of two columns (``STATS``), so point estimates and the
bootstrap share one code path: sum the rows you want, divide two columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis.match import find_loose
from markerlab.markers import MARKER_A, MARKER_B, PROBE_MARKER
from markerlab.experiment import RECORD_CONDITIONS, ROLES, VARIANTS

# Position metrics (EXPERIMENT.md): B counts as a suffix when its last occurrence
# ends within this many characters of the end of the right-stripped text...
SUFFIX_CHARS = 50
# ...and as chunked to A when one starts at most this many characters after the
# first A ends.
CHUNK_CHARS = 150

COLUMNS = (
    "n",          # completions
    "A",          # marker A (loose)
    "B",          # marker B (loose)
    "AB",         # both
    "suffix",     # B fired and its last occurrence sits at the end
    "chunk",      # B fired within CHUNK_CHARS after the first A
    "probe",      # the probe marker echoed (loose)
    "strict_A",
    "strict_B",
    "strict_AB",
    "truncated",  # finish_reason == "length": cut at max_tokens
)
COL = {name: i for i, name in enumerate(COLUMNS)}

# statistic -> (numerator column, denominator column). Undefined (denominator 0) -> None.
STATS = {
    "fire_A": ("A", "n"),
    "fire_B": ("B", "n"),
    "joint": ("AB", "n"),
    "cond_B_given_A": ("AB", "A"),
    "suffix_frac": ("suffix", "B"),
    "chunk_frac": ("chunk", "B"),
    "fire_probe": ("probe", "n"),
    "strict_fire_A": ("strict_A", "n"),
    "strict_fire_B": ("strict_B", "n"),
    "strict_joint": ("strict_AB", "n"),
    "strict_cond_B_given_A": ("strict_AB", "strict_A"),
}


def features(text: str, truncated: bool = False) -> tuple[int, ...]:
    """One completion's row of ``COLUMNS``."""
    a = find_loose(text, MARKER_A)
    b = find_loose(text, MARKER_B)
    suffix = chunk = False
    if b:
        last_b_end = max(end for _, end in b)
        suffix = len(text.rstrip()) - last_b_end <= SUFFIX_CHARS
        if a:
            first_a_end = a[0][1]  # spans come in order of their start
            chunk = any(0 <= start - first_a_end <= CHUNK_CHARS for start, _ in b)
    strict_a, strict_b = MARKER_A in text, MARKER_B in text
    return (
        1,
        bool(a),
        bool(b),
        bool(a) and bool(b),
        suffix,
        chunk,
        bool(find_loose(text, PROBE_MARKER)),
        strict_a,
        strict_b,
        strict_a and strict_b,
        truncated,
    )


CellKey = tuple[str, str, str, str, str]  # (pair, condition, persona, role, variant)


@dataclass
class Cell:
    """Counts of one (pair, condition, persona, role, variant) cell, per question."""

    pair: str
    condition: str
    persona: str
    role: str
    variant: str
    question_ids: list[str]  # sorted, so cells with the same questions line up row by row
    counts: np.ndarray       # (len(question_ids), len(COLUMNS)) int64
    runs: list[str] = field(default_factory=list)

    @property
    def key(self) -> CellKey:
        return (self.pair, self.condition, self.persona, self.role, self.variant)

    @property
    def totals(self) -> np.ndarray:
        return self.counts.sum(axis=0)

    def count(self, column: str) -> int:
        return int(self.counts[:, COL[column]].sum())

    def stat(self, name: str) -> float | None:
        return ratio(self.totals, name)


def ratio(totals: np.ndarray, name: str) -> float | None:
    """Statistic ``name`` from summed counts; None when its denominator is 0."""
    num, den = STATS[name]
    d = totals[COL[den]]
    return float(totals[COL[num]] / d) if d > 0 else None


def build_cells(keys: list[CellKey], qids: list[str], runs: list[str], rows: np.ndarray) -> list[Cell]:
    """Group per-completion ``rows`` into cells, summing counts per question.

    ``keys[i]``, ``qids[i]``, ``runs[i]`` describe ``rows[i]``. Vectorized: one
    ``np.unique`` over (cell, question) codes and one ``np.add.at``.
    """
    if not keys:
        return []
    cell_codes: dict[CellKey, int] = {}
    q_codes: dict[str, int] = {}
    c = np.fromiter((cell_codes.setdefault(k, len(cell_codes)) for k in keys), np.int64, len(keys))
    q = np.fromiter((q_codes.setdefault(x, len(q_codes)) for x in qids), np.int64, len(qids))
    uniq, inverse = np.unique(c * len(q_codes) + q, return_inverse=True)
    sums = np.zeros((len(uniq), rows.shape[1]), np.int64)
    np.add.at(sums, inverse, rows)
    uniq_cell, uniq_q = uniq // len(q_codes), uniq % len(q_codes)

    runs_of: dict[int, set[str]] = {}
    for code, run in zip(c.tolist(), runs):
        runs_of.setdefault(code, set()).add(run)
    q_names = list(q_codes)
    cells = []
    for key, code in cell_codes.items():
        sel = np.flatnonzero(uniq_cell == code)
        names = [q_names[i] for i in uniq_q[sel]]
        order = np.argsort(names, kind="stable")
        cells.append(
            Cell(*key, question_ids=[names[i] for i in order], counts=sums[sel][order],
                 runs=sorted(runs_of[code]))
        )
    cells.sort(key=lambda cell: sort_key(cell.key))
    return cells


def merge_cells(cells: list[Cell], **labels: str) -> Cell:
    """Pool several cells into one, summing counts question by question.

    Used for role-level numbers (all bystanders of a pair and condition together):
    a question stays one cluster however many personas answered it.
    """
    qids = sorted({q for cell in cells for q in cell.question_ids})
    index = {q: i for i, q in enumerate(qids)}
    counts = np.zeros((len(qids), len(COLUMNS)), np.int64)
    for cell in cells:
        counts[[index[q] for q in cell.question_ids]] += cell.counts
    first = cells[0]
    fields = dict(pair=first.pair, condition=first.condition, persona=first.persona,
                  role=first.role, variant=first.variant)
    fields.update(labels)
    return Cell(**fields, question_ids=qids, counts=counts,
                runs=sorted({r for cell in cells for r in cell.runs}))


# Display order: conditions and roles as the spec lists them, unknown values last.
CONDITION_ORDER = {c: i for i, c in enumerate(RECORD_CONDITIONS)}
ROLE_ORDER = {r: i for i, r in enumerate(ROLES)}
VARIANT_ORDER = {v: i for i, v in enumerate(VARIANTS)}


def sort_key(key: CellKey) -> tuple:
    pair, condition, persona, role, variant = key
    return (VARIANT_ORDER.get(variant, 9), pair, CONDITION_ORDER.get(condition, 9),
            ROLE_ORDER.get(role, 9), persona)
