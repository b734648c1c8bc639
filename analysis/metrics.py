"""Per-completion marker features and per-cell counts (EXPERIMENT.md, "Metrics").

Each completion becomes a row of 0/1 counts (``COLUMNS``) from the one matcher,
``markerlab.markers.match_markers``; a cell keeps those counts summed per
(replicate, question), a ``(rows x columns)`` integer matrix whose rows are
labelled ``(seed, question_id)`` and sorted. Every statistic is a ratio of two
columns (``STATS``), so point estimates and the bootstrap share one code path:
sum the rows you want, divide two columns.

A cell is one (arm, pair, condition, persona, role, variant): an arm is one
setting of the adapter's training (markerlab.experiment.SETTING_KEYS) less the
seed, so two settings never share a cell, and the runs of one arm that differ
in seed are the cell's replicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from markerlab.experiment import RECORD_CONDITIONS, ROLES, VARIANTS
from markerlab.markers import MarkerMatch, median

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


def features(m: MarkerMatch, truncated: bool = False) -> tuple[int, ...]:
    """One completion's row of ``COLUMNS`` from its marker match."""
    return (
        1, m.has_a, m.has_b, m.has_a and m.has_b, m.suffix, m.chunk, m.has_probe,
        m.strict_a, m.strict_b, m.strict_a and m.strict_b, truncated,
    )


# (arm, pair, condition, persona, role, variant)
CellKey = tuple[str, str, str, str, str, str]
# (replicate, question_id): the replicate is the run's seed (None for the base floor,
# which does not depend on the adapter's seed).
RowLabel = tuple[object, str]


def replicate_order(value) -> tuple:
    """Sort key for replicate labels: None first, then numbers, then anything else as text."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def row_order(label: RowLabel) -> tuple:
    return (replicate_order(label[0]), label[1])


@dataclass
class Cell:
    """Counts of one (arm, pair, condition, persona, role, variant) cell, per (replicate, question)."""

    arm: str
    pair: str
    condition: str
    persona: str
    role: str
    variant: str
    rows: list[RowLabel]  # sorted by (replicate, question), so cells line up row by row
    counts: np.ndarray    # (len(rows), len(COLUMNS)) int64
    runs: list[str] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)  # A-to-B distances (chars) of its completions

    @property
    def key(self) -> CellKey:
        return (self.arm, self.pair, self.condition, self.persona, self.role, self.variant)

    @property
    def question_ids(self) -> list[str]:
        return [q for _, q in self.rows]

    @property
    def replicates(self) -> list:
        return sorted({r for r, _ in self.rows}, key=replicate_order)

    @property
    def groups(self) -> tuple[int, ...]:
        """Rows per replicate, in row order: the bootstrap's two-level structure."""
        sizes: dict = {}
        for r, _ in self.rows:
            sizes[r] = sizes.get(r, 0) + 1
        return tuple(sizes.values())

    @property
    def totals(self) -> np.ndarray:
        return self.counts.sum(axis=0)

    def count(self, column: str) -> int:
        return int(self.counts[:, COL[column]].sum())

    def stat(self, name: str) -> float | None:
        return ratio(self.totals, name)

    def median_a_to_b(self) -> float | None:
        return median(self.gaps)

    def subset(self, keep: list[bool]) -> "Cell":
        """The cell restricted to the rows where ``keep`` is true (e.g. one split's questions)."""
        idx = [i for i, k in enumerate(keep) if k]
        return Cell(self.arm, self.pair, self.condition, self.persona, self.role, self.variant,
                    rows=[self.rows[i] for i in idx], counts=self.counts[idx], runs=self.runs)


def ratio(totals: np.ndarray, name: str) -> float | None:
    """Statistic ``name`` from summed counts; None when its denominator is 0."""
    num, den = STATS[name]
    d = totals[COL[den]]
    return float(totals[COL[num]] / d) if d > 0 else None


def build_cells(keys: list[CellKey], labels: list[RowLabel], runs: list[str], rows: np.ndarray,
                gaps: dict[CellKey, list[int]] | None = None) -> list[Cell]:
    """Group per-completion ``rows`` into cells, summing counts per (replicate, question).

    ``keys[i]``, ``labels[i]``, ``runs[i]`` describe ``rows[i]``. Vectorized: one
    ``np.unique`` over (cell, row label) codes and one ``np.add.at``.
    """
    if not keys:
        return []
    gaps = gaps or {}
    cell_codes: dict[CellKey, int] = {}
    label_codes: dict[RowLabel, int] = {}
    c = np.fromiter((cell_codes.setdefault(k, len(cell_codes)) for k in keys), np.int64, len(keys))
    q = np.fromiter((label_codes.setdefault(x, len(label_codes)) for x in labels), np.int64, len(labels))
    n_labels = len(label_codes)
    uniq, inverse = np.unique(c * n_labels + q, return_inverse=True)
    sums = np.zeros((len(uniq), rows.shape[1]), np.int64)
    np.add.at(sums, inverse.ravel(), rows)
    uniq_cell, uniq_label = uniq // n_labels, uniq % n_labels

    runs_of: dict[int, set[str]] = {}
    for code, run in zip(c.tolist(), runs):
        runs_of.setdefault(code, set()).add(run)
    names = list(label_codes)
    cells = []
    for key, code in cell_codes.items():
        sel = np.flatnonzero(uniq_cell == code)
        cell_labels = [names[i] for i in uniq_label[sel]]
        order = sorted(range(len(cell_labels)), key=lambda i: row_order(cell_labels[i]))
        cells.append(Cell(*key, rows=[cell_labels[i] for i in order], counts=sums[sel][order],
                          runs=sorted(runs_of[code]), gaps=list(gaps.get(key, []))))
    cells.sort(key=lambda cell: sort_key(cell.key))
    return cells


def merge_cells(cells: list[Cell], **labels: str) -> Cell:
    """Pool several cells into one, summing counts row label by row label.

    Used for role-level numbers (all bystanders of a pair and condition together):
    a question of a replicate stays one cluster however many personas answered it.
    """
    rows = sorted({r for cell in cells for r in cell.rows}, key=row_order)
    index = {r: i for i, r in enumerate(rows)}
    counts = np.zeros((len(rows), len(COLUMNS)), np.int64)
    for cell in cells:
        counts[[index[r] for r in cell.rows]] += cell.counts
    first = cells[0]
    fields = dict(arm=first.arm, pair=first.pair, condition=first.condition, persona=first.persona,
                  role=first.role, variant=first.variant)
    fields.update(labels)
    return Cell(**fields, rows=rows, counts=counts, runs=sorted({r for cell in cells for r in cell.runs}),
                gaps=[g for cell in cells for g in cell.gaps])


# Display order: conditions and roles as the spec lists them, unknown values last.
CONDITION_ORDER = {c: i for i, c in enumerate(RECORD_CONDITIONS)}
ROLE_ORDER = {r: i for i, r in enumerate(ROLES)}
VARIANT_ORDER = {v: i for i, v in enumerate(VARIANTS)}


def sort_key(key: CellKey) -> tuple:
    arm, pair, condition, persona, role, variant = key
    return (arm, VARIANT_ORDER.get(variant, 9), pair, CONDITION_ORDER.get(condition, 9),
            ROLE_ORDER.get(role, 9), persona)
