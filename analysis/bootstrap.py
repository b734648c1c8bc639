"""Question-cluster percentile bootstrap, vectorized (EXPERIMENT.md, "Metrics").

Completions of one question are correlated (same prompt, same topic), so the
resampling unit is the question: draw the cell's questions with replacement,
pool the drawn questions' counts, recompute the statistic from the pooled counts.

Vectorized as counts algebra. For ``B`` resamples of ``Q`` questions:

    idx      (B, Q)  question drawn at each slot of each resample
    weights  (B, Q)  how often each question was drawn (one bincount)
    pooled   (B, K)  = weights @ counts, with counts (Q, K) per question and column

and every statistic is ``pooled[:, num] / pooled[:, den]`` (metrics.STATS), so
there is no Python loop over resamples and one code path for every statistic.

Resamples whose denominator is 0 (e.g. no draw fired A, for cond_B_given_A) have
no value and are dropped; the percentiles come from the remaining ones, which
makes the interval conditional on the statistic being defined. If every
resample is dropped the CI is None.

The draws depend only on ``(seed, B, Q)``: every cell with Q questions uses the
same index matrix. That keeps each cell's CI reproducible whatever else is in
the report, and because cells list their questions in sorted order, resampling
questions for a T cell and its C cell with the same matrix is exactly the paired
resampling the T-minus-C deltas need.
"""

from __future__ import annotations

import numpy as np

from analysis.metrics import COL, STATS

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


def ratios(pooled: np.ndarray, stats: list[str]) -> np.ndarray:
    """``(B, len(stats))`` statistic values from pooled counts; NaN where undefined."""
    num = pooled[:, [COL[STATS[s][0]] for s in stats]]
    den = pooled[:, [COL[STATS[s][1]] for s in stats]]
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


class Bootstrap:
    """Cluster-bootstrap CIs for cells and paired deltas, with cached draws per Q."""

    def __init__(self, n_resamples: int = 2000, seed: int = 0, level: float = LEVEL):
        self.n_resamples = n_resamples
        self.seed = seed
        self.level = level
        self._weights: dict[int, np.ndarray] = {}

    def weights(self, n_clusters: int) -> np.ndarray:
        if n_clusters not in self._weights:
            idx = resample_indices(n_clusters, self.n_resamples, self.seed)
            self._weights[n_clusters] = cluster_weights(idx, n_clusters)
        return self._weights[n_clusters]

    def cis(self, counts: np.ndarray, stats: list[str]) -> dict[str, list[float] | None]:
        """CI of each statistic for one cell's ``(Q, K)`` per-question counts."""
        if self.n_resamples == 0 or counts.shape[0] == 0:
            return {s: None for s in stats}
        pooled = self.weights(counts.shape[0]) @ counts
        return dict(zip(stats, percentile_ci(ratios(pooled, stats), self.level)))

    def delta_ci(self, counts_t: np.ndarray, counts_c: np.ndarray, stat: str) -> list[float] | None:
        """Paired CI of ``stat(T) - stat(C)``; rows of both are the same questions.

        Both conditions are pooled with the same weights, i.e. the same resampled
        questions; a resample counts only if the statistic is defined in both.
        """
        if self.n_resamples == 0 or counts_t.shape[0] == 0:
            return None
        w = self.weights(counts_t.shape[0])
        diff = ratios(w @ counts_t, [stat]) - ratios(w @ counts_c, [stat])
        return percentile_ci(diff, self.level)[0]
