"""Question-cluster percentile bootstrap, vectorized (EXPERIMENT.md, "Metrics").

Completions of one question are correlated (same prompt, same topic), so the
resampling unit is the question: draw the cell's questions with replacement,
pool the drawn questions' counts, recompute the statistic from the pooled counts.

Vectorized as counts algebra. For ``B`` resamples of ``Q`` questions:

    idx      (B, Q)  question drawn at each slot of each resample
    weights  (B, Q)  how often each question was drawn (one bincount)
    pooled   (B, K)  = weights @ counts, with counts (Q, K) per question and column

and every statistic is ``pooled[:, num] / pooled[:, den]``, so there is no Python
loop over resamples and one code path for every statistic. Statistics are given
as ``{name: (numerator column, denominator column)}``, column indices into the
count matrix: ``analysis.metrics.Schema.index(names)`` makes them from an
experiment's statistic names, so this module knows no marker.

    boot = Bootstrap(2000, seed=0)
    boot.cis(cell.counts, schema.index(["fire_A", "cond_B_given_A"]), cell.groups)
    boot.delta_ci(counts_t, counts_c, schema.index(["cond_B_given_A"])["cond_B_given_A"], groups)

Resamples whose denominator is 0 (e.g. no draw fired A, for cond_B_given_A) have
no value and are dropped; the percentiles come from the remaining ones, which
makes the interval conditional on the statistic being defined. If every
resample is dropped the CI is None.

The draws depend only on ``(seed, B, Q)``: every cell with Q questions uses the
same index matrix. That keeps each cell's CI reproducible whatever else is in
the report, and because cells list their questions in sorted order, resampling
questions for a T cell and its C cell with the same matrix is exactly the paired
resampling the T-minus-C deltas need.

Replicates (runs of one arm that differ only in the seed) add a level: a
resample first draws the seeds with replacement, then, for each drawn seed
independently, that seed's questions with replacement (a hierarchical
bootstrap), so the CI carries the between-seed variance as well. A cell's rows
are grouped by seed (``groups``: rows per seed, in row order); with one group
this is exactly the one-level question bootstrap above, draw for draw. The
two-level draws depend only on ``(seed, B, groups)``, so again T and C cells
with the same structure are resampled together (paired), and a cell's CI is
the same whatever else is in the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

LEVEL = 0.95


def resample_indices(n_clusters: int, n_resamples: int, seed: int) -> np.ndarray:
    """The ``(n_resamples, n_clusters)`` matrix of drawn cluster indices."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_clusters, size=(n_resamples, n_clusters))


def cluster_weights(idx: np.ndarray, n_clusters: int) -> np.ndarray:
    """Times each cluster is drawn in each resample: ``(B, n_clusters)`` int64.

    One bincount over row-offset indices. Kept integer: pooled counts are then
    exact, and numpy's integer matmul stays on one thread, where a threaded BLAS
    spends more time waking threads than multiplying matrices this small.
    """
    n_resamples = idx.shape[0]
    flat = idx + n_clusters * np.arange(n_resamples)[:, None]
    w = np.bincount(flat.ravel(), minlength=n_resamples * n_clusters)
    return w.reshape(n_resamples, n_clusters)


def hierarchical_weights(groups: tuple[int, ...], n_resamples: int, seed: int) -> np.ndarray:
    """``(B, sum(groups))`` draw counts of a seeds-then-questions resample.

    ``groups[s]`` is the number of question rows of seed ``s`` (rows ordered by
    seed). Each resample draws ``len(groups)`` seeds with replacement; each drawn
    seed slot draws that seed's own number of questions, with replacement, from
    that seed's rows.
    """
    sizes = np.asarray(groups, np.int64)
    n_groups, n_rows = len(sizes), int(sizes.sum())
    rng = np.random.default_rng([seed, n_groups, *groups])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    drawn = rng.integers(0, n_groups, size=(n_resamples, n_groups))  # the seeds of each resample
    q_max = int(sizes.max())
    size_of = sizes[drawn][:, :, None]                               # (B, S, 1)
    q = (rng.random((n_resamples, n_groups, q_max)) * size_of).astype(np.int64)
    valid = np.arange(q_max)[None, None, :] < size_of                # slots beyond a seed's size
    flat = offsets[drawn][:, :, None] + q + n_rows * np.arange(n_resamples)[:, None, None]
    w = np.bincount(flat[valid], minlength=n_resamples * n_rows)
    return w.reshape(n_resamples, n_rows)


def ratios(pooled: np.ndarray, index: Sequence[tuple[int, int]]) -> np.ndarray:
    """``(B, len(index))`` statistic values from pooled counts, one column per (numerator, denominator)
    column pair; NaN where undefined."""
    num = pooled[:, [n for n, _ in index]]
    den = pooled[:, [d for _, d in index]]
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def percentile_ci(values: np.ndarray, level: float = LEVEL) -> list[list[float] | None]:
    """Percentile interval of each column of ``values`` (B, S), NaNs dropped."""
    alpha = 100 * (1 - level) / 2
    cis: list[list[float] | None] = []
    for col in values.T:
        col = col[~np.isnan(col)]
        if col.size == 0:
            cis.append(None)
        else:
            lo, hi = np.percentile(col, [alpha, 100 - alpha])
            cis.append([float(lo), float(hi)])
    return cis


def _columns(index: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The count columns ``index`` reads, and ``index`` renumbered into them: pooling only those
    columns gives the same integers as pooling all of them, for a fraction of the work."""
    cols = sorted({c for pair in index for c in pair})
    at = {c: i for i, c in enumerate(cols)}
    return cols, [(at[n], at[d]) for n, d in index]


class Bootstrap:
    """Cluster-bootstrap CIs for cells and paired deltas, with cached draws per structure.

    ``groups`` (rows per seed, in row order) selects the two-level bootstrap when
    a cell has more than one seed; None or a single group is the question bootstrap.
    """

    def __init__(self, n_resamples: int = 2000, seed: int = 0, level: float = LEVEL):
        self.n_resamples = n_resamples
        self.seed = seed
        self.level = level
        self._weights: dict[tuple[int, ...], np.ndarray] = {}

    def weights(self, n_clusters: int, groups: tuple[int, ...] | None = None) -> np.ndarray:
        groups = tuple(groups) if groups and len(groups) > 1 else (n_clusters,)
        if sum(groups) != n_clusters:
            raise ValueError(f"groups {groups} do not add up to {n_clusters} rows")
        if groups not in self._weights:
            if len(groups) == 1:
                idx = resample_indices(n_clusters, self.n_resamples, self.seed)
                self._weights[groups] = cluster_weights(idx, n_clusters)
            else:
                self._weights[groups] = hierarchical_weights(groups, self.n_resamples, self.seed)
        return self._weights[groups]

    def cis(self, counts: np.ndarray, stats: Mapping[str, tuple[int, int]],
            groups: tuple[int, ...] | None = None) -> dict[str, list[float] | None]:
        """CI of each statistic (name -> (numerator, denominator) column) for one cell's ``(rows, K)``
        per-question counts."""
        if self.n_resamples == 0 or counts.shape[0] == 0 or not stats:
            return {s: None for s in stats}
        cols, index = _columns(list(stats.values()))
        pooled = self.weights(counts.shape[0], groups) @ counts[:, cols]
        return dict(zip(stats, percentile_ci(ratios(pooled, index), self.level)))

    def delta_ci(self, counts_t: np.ndarray, counts_c: np.ndarray, stat: tuple[int, int],
                 groups: tuple[int, ...] | None = None) -> list[float] | None:
        """Paired CI of ``stat(T) - stat(C)``; rows of both are the same (seed, question)s.

        Both conditions are pooled with the same weights, i.e. the same resampled
        seeds and questions; a resample counts only if the statistic is defined in both.
        """
        if self.n_resamples == 0 or counts_t.shape[0] == 0:
            return None
        w = self.weights(counts_t.shape[0], groups)
        cols, index = _columns([stat])
        diff = ratios(w @ counts_t[:, cols], index) - ratios(w @ counts_c[:, cols], index)
        return percentile_ci(diff, self.level)[0]


def wilson_ci(k: int, n: int, level: float = LEVEL) -> list[float] | None:
    """The Wilson score interval of ``k`` successes in ``n`` trials (None when n is 0).

    It treats the completions as independent, so beside the question-cluster
    bootstrap it shows how much of the width is the questions' doing:

        p = k / n,  z = the normal quantile of (1 + level) / 2
        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    """
    if n <= 0:
        return None
    z = _normal_quantile((1 + level) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _normal_quantile(q: float) -> float:
    """The standard normal quantile (``statistics.NormalDist``: exact enough, no scipy at import)."""
    return NormalDist().inv_cdf(q)
