"""Per-completion marker counts and per-cell counts, for whatever markers an experiment names.

    schema = Schema.of(exp)                        # the experiment's columns and statistics
    row = schema.row(matcher.match(text), truncated=False, length=len(text))
    cells = build_cells(keys, labels, runs, np.asarray(rows), schema, gaps)
    cell.count("A"), cell.stat("cond_B_given_A")   # column names and statistic names of the experiment

Each completion becomes a row of integer counts (``schema.columns``, from
``markerlab.experiment.columns``: n, truncated, length, then per marker its loose
and strict presence and whether it ends the text, per declared pair the joint,
strict joint, second-without-first and chunk columns); a cell keeps those counts
summed per (replicate, question), a ``(rows x columns)`` integer matrix whose rows
are labelled ``(seed, question_id)`` and sorted. Every statistic is a ratio of two
columns (``schema.stats``, from ``markerlab.experiment.statistics``), so point
estimates and the bootstrap share one code path: sum the rows you want, divide
two columns.

A cell is one (arm, pair, condition, persona, role, variant): an arm is one
setting of the adapter's training (markerlab.experiment.SETTING_KEYS, plus the
experiment's name and digest) less the seed, so two settings never share a cell,
and the runs of one arm that differ in seed are the cell's replicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from markerlab.experiment import BASE_CONDITION, ROLES, VARIANTS, columns, count_names, statistics
from markerlab.markers import MarkerMatch, median


class Schema:
    """The count columns and the statistics of one experiment's markers and declared pairs."""

    def __init__(self, markers, pairs=()):
        self.markers: tuple[str, ...] = tuple(markers)
        self.pairs: tuple[tuple[str, str], ...] = tuple(tuple(p) for p in pairs)
        self.columns: tuple[str, ...] = columns(self.markers, self.pairs)
        self.col = MappingProxyType({name: i for i, name in enumerate(self.columns)})
        self.stats = MappingProxyType(statistics(self.markers, self.pairs))
        self.counts = MappingProxyType({"n": "n", **count_names(self.markers, self.pairs)})  # count -> column
        # The first marker of each pair, once: its "not X" column.
        self._firsts = tuple(dict.fromkeys(x for x, _ in self.pairs))

    @classmethod
    def of(cls, exp) -> "Schema":
        return cls(exp.marker_names, exp.marker_pairs)

    def index(self, names) -> dict[str, tuple[int, int]]:
        """statistic -> (numerator column index, denominator column index): what the bootstrap reads."""
        return {s: (self.col[self.stats[s][0]], self.col[self.stats[s][1]]) for s in names}

    def count_column(self, name: str) -> str:
        """The column a count field (n, n_A, n_AB, n_B_not_A) sums."""
        return self.counts[name]

    def row(self, m: MarkerMatch, truncated: bool = False, length: int = 0) -> list[int]:
        """One completion's counts, in ``columns`` order (markerlab.experiment.columns)."""
        spans, strict, suffix = m.spans, m.strict, m.suffix
        out = [1, truncated, length]
        for name in self.markers:
            out += (bool(spans[name]), strict[name], suffix[name])
        for x in self._firsts:
            out.append(not spans[x])
        for p in self.pairs:
            x, y = p
            hx, hy = bool(spans[x]), bool(spans[y])
            out += (hx and hy, strict[x] and strict[y], hy and not hx, m.gap[p] is not None and m.chunk(p))
        return out


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
    counts: np.ndarray    # (len(rows), len(schema.columns)) int64
    schema: Schema
    runs: list[str] = field(default_factory=list)
    gaps: dict = field(default_factory=dict)  # declared pair -> first-X-to-Y distances (chars) of its completions

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
        return int(self.counts[:, self.schema.col[column]].sum())

    def stat(self, name: str) -> float | None:
        return ratio(self.totals, self.schema, name)

    def median_gap(self, pair: tuple[str, str]) -> float | None:
        return median(self.gaps.get(tuple(pair), []))

    def subset(self, keep: list[bool]) -> "Cell":
        """The cell restricted to the rows where ``keep`` is true (e.g. one split's questions)."""
        idx = [i for i, k in enumerate(keep) if k]
        return Cell(self.arm, self.pair, self.condition, self.persona, self.role, self.variant,
                    rows=[self.rows[i] for i in idx], counts=self.counts[idx], schema=self.schema, runs=self.runs)


def ratio(totals: np.ndarray, schema: Schema, name: str) -> float | None:
    """Statistic ``name`` from summed counts; None when its denominator is 0."""
    num, den = schema.stats[name]
    d = totals[schema.col[den]]
    return float(totals[schema.col[num]] / d) if d > 0 else None


def build_cells(keys: list[CellKey], labels: list[RowLabel], runs: list[str], rows: np.ndarray, schema: Schema,
                gaps: dict[CellKey, dict] | None = None, condition_order=()) -> list[Cell]:
    """Group per-completion ``rows`` (all of one experiment) into cells, summing counts per (replicate, question).

    ``keys[i]``, ``labels[i]``, ``runs[i]`` describe ``rows[i]``.
    """
    if not keys:
        return []
    cell_codes: dict[CellKey, int] = {}
    label_codes: dict[RowLabel, int] = {}
    c = np.fromiter((cell_codes.setdefault(k, len(cell_codes)) for k in keys), np.int64, len(keys))
    q = np.fromiter((label_codes.setdefault(x, len(label_codes)) for x in labels), np.int64, len(labels))
    runs_of: dict[int, set[str]] = {}
    for code, run in zip(c.tolist(), runs):
        runs_of.setdefault(code, set()).add(run)
    return build_coded_cells(cell_codes, label_codes, c, q, rows, runs_of, schema, gaps, condition_order)


def build_coded_cells(cell_codes: dict[CellKey, int], label_codes: dict[RowLabel, int], c: np.ndarray,
                      q: np.ndarray, rows: np.ndarray, runs_of: dict[int, set], schema: Schema,
                      gaps: dict[CellKey, dict] | None = None, condition_order=()) -> list[Cell]:
    """``build_cells`` for completions already coded: ``c[i]`` and ``q[i]`` are the codes (values of
    ``cell_codes`` and ``label_codes``) of ``rows[i]``'s cell and (replicate, question); ``runs_of``
    maps a cell code to its runs. Vectorized: one ``np.unique`` over (cell, row label) codes and one
    ``np.add.at``."""
    if not len(c):
        return []
    gaps = gaps or {}
    n_labels = len(label_codes)
    uniq, inverse = np.unique(c * n_labels + q, return_inverse=True)
    sums = np.zeros((len(uniq), rows.shape[1]), np.int64)
    np.add.at(sums, inverse.ravel(), rows)
    uniq_cell, uniq_label = uniq // n_labels, uniq % n_labels
    names = list(label_codes)
    # uniq is sorted, so each cell's (cell, label) codes are one contiguous run of it.
    bounds = np.searchsorted(uniq_cell, np.arange(len(cell_codes) + 1))
    cells = []
    for key, code in cell_codes.items():
        sel = np.arange(bounds[code], bounds[code + 1])
        cell_labels = [names[i] for i in uniq_label[sel]]
        order = sorted(range(len(cell_labels)), key=lambda i: row_order(cell_labels[i]))
        cells.append(Cell(*key, rows=[cell_labels[i] for i in order], counts=sums[sel][order], schema=schema,
                          runs=sorted(runs_of[code]), gaps={p: list(g) for p, g in gaps.get(key, {}).items()}))
    order = condition_rank(condition_order)
    cells.sort(key=lambda cell: sort_key(cell.key, order))
    return cells


def merge_cells(cells: list[Cell], **labels: str) -> Cell:
    """Pool several cells into one, summing counts row label by row label.

    Used for role-level numbers (all bystanders of a pair and condition together):
    a question of a replicate stays one cluster however many personas answered it.
    """
    rows = sorted({r for cell in cells for r in cell.rows}, key=row_order)
    index = {r: i for i, r in enumerate(rows)}
    first = cells[0]
    counts = np.zeros((len(rows), len(first.schema.columns)), np.int64)
    for cell in cells:
        counts[[index[r] for r in cell.rows]] += cell.counts
    fields = dict(arm=first.arm, pair=first.pair, condition=first.condition, persona=first.persona,
                  role=first.role, variant=first.variant)
    fields.update(labels)
    gaps: dict = {}
    for cell in cells:
        for p, g in cell.gaps.items():
            gaps.setdefault(p, []).extend(g)
    return Cell(**fields, rows=rows, counts=counts, schema=first.schema,
                runs=sorted({r for cell in cells for r in cell.runs}), gaps=gaps)


# Display order: conditions as the experiment lists them (the base floor last), roles and
# variants as markerlab.experiment lists them, unknown values last.
ROLE_ORDER = MappingProxyType({r: i for i, r in enumerate(ROLES)})
# The record variants by their part: the adapter's plain answers, the probe, the base model's floor.
PLAIN, PROBE, BASE = VARIANTS
VARIANT_ORDER = MappingProxyType({v: i for i, v in enumerate(VARIANTS)})


def condition_rank(conditions) -> dict[str, int]:
    """condition -> its display rank: the experiment's order, then the base floor."""
    out = {c: i for i, c in enumerate(conditions)}
    out.setdefault(BASE_CONDITION, len(out))
    return out


def sort_key(key: CellKey, condition_order: dict[str, int]) -> tuple:
    arm, pair, condition, persona, role, variant = key
    return (arm, VARIANT_ORDER.get(variant, 9), pair, condition_order.get(condition, 99), condition,
            ROLE_ORDER.get(role, 9), persona)
