"""How numbers read on the page, the table and the terminal: one place, so they agree.

    pct(0.5) -> "50.0%"        pct_ci(0.5, [0.4, 0.6]) -> "50.0% [40.0, 60.0]"
    pp_ci(0.02, [-0.01, 0.05]) -> "+2.0 pp [-1.0, +5.0]"
    stat_value("n_A", 81) -> "81"      stat_value("mean_length", 512.3) -> "512 chars"
"""

from __future__ import annotations

NA = "n/a"


def pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.1f}%"


def pct_ci(x: float | None, ci: list[float] | None, wilson: list[float] | None = None) -> str:
    """A rate with its bootstrap CI in brackets, and its Wilson interval after a W where given."""
    if x is None:
        return NA
    out = pct(x) if ci is None else f"{pct(x)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    if wilson is not None:
        out += f" W[{100 * wilson[0]:.1f}, {100 * wilson[1]:.1f}]"
    return out


def pp(x: float | None) -> str:
    return NA if x is None else f"{100 * x:+.1f} pp"


def pp_ci(x: float | None, ci: list[float] | None) -> str:
    """A difference of rates in percentage points, with its CI."""
    if x is None:
        return NA
    s = pp(x)
    return s if ci is None else f"{s} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def yes_no(b: bool | None) -> str:
    return NA if b is None else ("yes" if b else "no")


def chars(x: float | None) -> str:
    return NA if x is None else f"{x:.0f} chars"


def is_count(stat: str) -> bool:
    """Counts (n, n_X, n_XY, n_Y_not_X) against rates: markerlab.experiment names every count n or n_*."""
    return stat == "n" or stat.startswith("n_")


def stat_value(stat: str, value: float | None, contrast: bool = False) -> str:
    """A statistic's value as the page shows it: a count as is, a length in characters, a rate in
    percent, a difference of rates in percentage points."""
    if value is None:
        return NA
    if is_count(stat):
        return f"{value:+d}" if contrast else f"{value:d}"
    if stat == "mean_length":
        return f"{value:+.0f} chars" if contrast else chars(value)
    return pp(value) if contrast else pct(value)


def margin(stat: str, value: float, threshold: float) -> str:
    """How far a value is from its threshold, in the statistic's unit."""
    gap = abs(value - threshold)
    if is_count(stat):
        return f"{gap:g}"
    if stat == "mean_length":
        return f"{gap:.0f} chars"
    return f"{100 * gap:.1f} pp"


def bootstrap_words(b: dict) -> str:
    """The bootstrap's settings (summary.json's "bootstrap") as the pages state them: "B=2000, seed=0"."""
    return _resamples_and_seed(**b)


def _resamples_and_seed(B: int, seed: int, **_) -> str:  # noqa: N803 (the contract's name for the count)
    return f"B={B}, seed={seed}"


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
