"""The four report figures (EXPERIMENT.md, "Figures"), drawn from a summary dict.

    draw_all(summary, out_dir)     # hero, bystander, position, per_persona; PNG and PDF each

Every label comes from the experiment the summary reports under
(``summary["experiments"]``): hero is the headline metric per pair, condition and
role; bystander the treatment-minus-control change in the fire rate of the
headline pair's second marker per persona; position where the second marker of
each declared pair sits (cells whose joint rate reaches the experiment's floor);
per_persona the fire rate of every marker the conditions teach.

Matplotlib's object API (``Figure``, no pyplot), so nothing global is touched and
no display is needed. Each figure is saved as PNG and PDF. Error bars are the
95% question-bootstrap CIs; a value that is undefined is drawn as "n/a", never as
0. Missing conditions are skipped (with treatment runs only there are no
deltas, and the bystander figure shows the raw rate instead).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import textwrap
from pathlib import Path
from types import MappingProxyType

import numpy as np
# The two backends savefig uses, imported here so that forked figure workers inherit them
# instead of importing them each.
from matplotlib.backends import backend_agg, backend_pdf  # noqa: F401
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, PercentFormatter
from matplotlib.transforms import ScaledTranslation

from analysis.metrics import ROLE_ORDER, condition_rank
from analysis.summary import experiment_of
from markerlab.experiment import BASE_CONDITION, pair_key
from markerlab.io import atomic_write_bytes

# Colours by the experiment's order of conditions and markers, so a new one gets one without an edit here.
_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_MARKER_PALETTE = ("#8c8c8c", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf")
ROLE_COLORS = MappingProxyType({"donor": "#d62728", "recipient": "#1f77b4", "negative": "#9467bd",
                                "bystander": "#ff7f0e"})
STAR = "\u2605"  # marks personas trained in the pair's adapters
FIGURES = ("hero", "bystander", "position", "per_persona")


# --- helpers ---------------------------------------------------------------------------


def _errs(values: list[float], cis: list) -> np.ndarray:
    """``(2, n)`` error-bar lengths below and above each value. A percentile CI
    need not contain the point estimate of a ratio, so lengths are clipped at 0
    rather than drawn backwards; a missing CI draws no bar."""
    v = np.asarray(values, float)
    lo = np.array([x if ci is None else ci[0] for x, ci in zip(v, cis)], float)
    hi = np.array([x if ci is None else ci[1] for x, ci in zip(v, cis)], float)
    return np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])


def _plain(summary: dict) -> list[dict]:
    return [c for c in summary["cells"] if c["variant"] == "plain"]


def _pairs(summary: dict) -> list[str]:
    return sorted({c["pair"] for c in _plain(summary)})


def _rank(summary: dict) -> dict[str, int]:
    return condition_rank(experiment_of(summary)["conditions"])


def _conditions(summary: dict, cells: list[dict]) -> list[str]:
    rank = _rank(summary)
    return sorted({c["condition"] for c in cells}, key=lambda c: (rank.get(c, 99), c))


def cond_colors(summary: dict) -> dict[str, str]:
    conditions = experiment_of(summary)["conditions"]
    return {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(conditions)} | {BASE_CONDITION: "#7f7f7f"}


def _persona_roles(summary: dict, pair: str) -> dict[str, str]:
    """persona -> role in the pair, preferring the first condition's labels (a condition may train
    the recipient plain, but it is still the pair's recipient)."""
    rank = _rank(summary)
    roles: dict[str, str] = {}
    for c in sorted(_plain(summary), key=lambda c: rank.get(c["condition"], 99), reverse=True):
        if c["pair"] == pair:
            roles[c["persona"]] = c["role"]
    return roles


def _ordered_personas(roles: dict[str, str]) -> list[str]:
    return sorted(roles, key=lambda p: (ROLE_ORDER.get(roles[p], 9), p))


def _label(persona: str, role: str) -> str:
    """A persona's axis label: starred, with its role, when trained in the pair."""
    return persona if role == "bystander" else f"{STAR} {persona} ({role})"


def _pair_title(summary: dict, pair: str) -> str:
    p = summary.get("personas", {}).get(pair, {})
    if "donor" in p and "recipient" in p:
        return f"{pair}: donor {p['donor']}, recipient {p['recipient']}"
    return pair


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width (about 10 characters an inch)."""
    fig.suptitle(textwrap.fill(text, width=int(10 * fig.get_figwidth())), fontsize=11)


def _pp(x, _pos=None) -> str:
    return f"{100 * x:+.0f}" if abs(x) > 1e-9 else "0"


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        if ext == "pdf":  # no creation date: the same summary gives the same bytes
            fig.savefig(buf, format="pdf", metadata={"CreationDate": None})
        else:  # light zlib: a third of the encoding time for somewhat larger files
            fig.savefig(buf, format="png", dpi=150, pil_kwargs={"compress_level": 1})
        # The first save ran the constrained layout; keep its positions for the
        # second instead of solving the same layout again.
        fig.set_layout_engine("none")
        paths.append(atomic_write_bytes(out_dir / f"{name}.{ext}", buf.getvalue()))
    return paths


# --- 1. hero: the headline metric per pair x condition x role ----------------------------


def _denominator(metric: str, exp: dict) -> str | None:
    """The count a rate of the headline is a share of, for the numbers under the bars (n_X for a
    conditional on X, n otherwise)."""
    pair = exp["headline"].get("pair")
    if pair and metric == f"cond_{pair[1]}_given_{pair[0]}":
        return f"n_{pair[0]}"
    return "n"


def hero(summary: dict) -> Figure:
    exp = experiment_of(summary)
    metric = exp["headline"]["metric"]
    den = _denominator(metric, exp)
    pairs = _pairs(summary)
    fig = Figure(figsize=(6.4 * max(len(pairs), 1), 5.0), layout="constrained")
    axes = fig.subplots(1, max(len(pairs), 1), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        cells = [r for r in summary.get("roles", []) if r["pair"] == pair]
        conds = _conditions(summary, cells)
        roles = sorted({r["role"] for r in cells}, key=lambda r: ROLE_ORDER.get(r, 9))
        width = 0.8 / max(len(roles), 1)
        handles = []
        for j, role in enumerate(roles):
            x, v, cis = [], [], []
            for i, cond in enumerate(conds):
                cell = next((r for r in cells if r["condition"] == cond and r["role"] == role), None)
                if cell is None:
                    continue
                xi = i + (j - (len(roles) - 1) / 2) * width
                if cell.get(metric) is None:
                    ax.text(xi, 0.01, "n/a", ha="center", va="bottom", fontsize=7, color="0.35")
                    continue
                x.append(xi)
                v.append(cell[metric])
                cis.append(cell.get(f"{metric}_ci"))
                ax.text(xi, 0, f"{cell[den]}", ha="center", va="top", fontsize=6.5, color="0.3",
                        transform=ax.get_xaxis_transform() + _down(fig, 2))
            err = _errs(v, cis)
            ax.bar(x, v, width * 0.92, color=ROLE_COLORS.get(role, "0.5"), edgecolor="0.2", linewidth=0.6,
                   yerr=err, capsize=3, error_kw={"lw": 1, "ecolor": "0.15"})
            # The value over each bar, so a 0% bar is not mistaken for a missing one.
            for xi, vi, top in zip(x, v, np.add(v, err[1])):
                ax.text(xi, top + 0.01, f"{100 * vi:.0f}%", ha="center", va="bottom", fontsize=6.5)
            personas = next(r["personas"] for r in cells if r["role"] == role)
            who = personas[0] if len(personas) == 1 else f"{len(personas)} personas"
            handles.append(Patch(facecolor=ROLE_COLORS.get(role, "0.5"), label=f"{role} ({who})"))
        ax.set_xticks(range(len(conds)), conds)
        ax.tick_params(axis="x", length=0, pad=12)  # room for the counts under the bars
        ax.set_xlim(-0.6, len(conds) - 0.4)
        ax.set_ylim(0, 1.32)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel(f"training condition (small numbers: {den}, the rate's denominator)")
        ax.set_ylabel(metric)
        ax.set_title(_pair_title(summary, pair), fontsize=11)
        ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=2, framealpha=0.9)
        ax.grid(axis="y", alpha=0.3)
    if not pairs:
        _note(axes[0], "no plain cells")
    _suptitle(fig, f"{metric}, by condition and role (personas of a role pooled; 95% question-bootstrap CI)")
    return fig


def _down(fig: Figure, points: float):
    """A transform offset ``points`` downwards (to put text just under the axis)."""
    return ScaledTranslation(0, -points / 72, fig.dpi_scale_trans)


# --- 2. bystander: the moving marker's fire rate, treatment minus control, per persona ----


def moving_stat(exp: dict) -> str:
    """The rate whose spread the bystander figure shows: the fire rate of the headline pair's second
    marker, else the headline metric."""
    pair = exp["headline"].get("pair")
    return f"fire_{pair[1]}" if pair else exp["headline"]["metric"]


def bystander(summary: dict) -> Figure:
    exp = experiment_of(summary)
    stat = moving_stat(exp)
    t_name, c_name = exp["headline"]["treatment"], exp["headline"]["control"]
    colors = cond_colors(summary)
    pairs = _pairs(summary)
    n_personas = max((len(_persona_roles(summary, p)) for p in pairs), default=1)
    fig = Figure(figsize=(6.4 * max(len(pairs), 1), 1.3 + 0.4 * n_personas), layout="constrained")
    axes = fig.subplots(1, max(len(pairs), 1), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        roles = _persona_roles(summary, pair)
        personas = _ordered_personas(roles)[::-1]  # role order, top to bottom
        row = {p: y for y, p in enumerate(personas)}
        deltas = [d for d in summary["deltas"] if d["pair"] == pair and d["statistic"] == stat]
        if deltas:
            for role in ROLE_ORDER:
                ds = [d for d in deltas if roles.get(d["persona"]) == role and d["delta"] is not None]
                if ds:
                    ax.errorbar([d["delta"] for d in ds], [row[d["persona"]] for d in ds],
                                xerr=_errs([d["delta"] for d in ds], [d["ci"] for d in ds]),
                                fmt="o", ms=6, capsize=3, color=ROLE_COLORS[role])
            for d in deltas:
                if d["delta"] is None:
                    ax.text(0, row[d["persona"]], "n/a", va="center", ha="center", fontsize=8, color="0.4")
            ax.axvline(0, color="0.3", lw=0.8)
            ax.xaxis.set_major_formatter(FuncFormatter(_pp))
            ax.set_xlabel(f"{stat}({t_name}) - {stat}({c_name}), percentage points")
            ax.set_title(_pair_title(summary, pair), fontsize=11)
        else:
            # No treatment and control of this pair to subtract: show each condition's rate instead.
            cells = [c for c in _plain(summary) if c["pair"] == pair]
            conds = _conditions(summary, cells)
            for k, cond in enumerate(conds):
                cs = [c for c in cells if c["condition"] == cond and c["persona"] in row and c.get(stat) is not None]
                offset = (k - (len(conds) - 1) / 2) * 0.2
                ax.errorbar([c[stat] for c in cs], [row[c["persona"]] + offset for c in cs],
                            xerr=_errs([c[stat] for c in cs], [c.get(f"{stat}_ci") for c in cs]),
                            fmt="o", ms=5, capsize=3, color=colors.get(cond, "0.5"), label=cond)
            ax.set_xlabel(stat)
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.set_xlim(-0.02, 1.02)
            ax.legend(fontsize=8, title="condition", title_fontsize=8)
            ax.set_title(f"{_pair_title(summary, pair)}\n(no {t_name} and {c_name} runs to subtract: {stat} as is)",
                         fontsize=10)
        ax.set_yticks(range(len(personas)), [_label(p, roles[p]) for p in personas], fontsize=9)
        ax.set_ylim(-0.6, len(personas) - 0.4)
        ax.grid(axis="x", alpha=0.3)
    if not pairs:
        _note(axes[0], "no plain cells")
    _suptitle(fig, f"{stat} spreading to other personas: {t_name} minus {c_name}, paired by question, 95% CI"
                   f" ({STAR} trained in the pair's adapters)")
    return fig


# --- 3. position: suffix_frac and chunk_frac per cell and declared pair -----------------


def position(summary: dict) -> Figure:
    exp = experiment_of(summary)
    rank = _rank(summary)
    rows = []  # (label, positions of the pair in the cell)
    for x, y in exp["marker_pairs"]:
        xy = pair_key(x, y)
        for c in _plain(summary):
            p = c["positions"][xy]
            if c[f"n_{y}"] > 0 and p["shown"]:
                rows.append(((c["pair"], rank.get(c["condition"], 99), ROLE_ORDER.get(c["role"], 9), c["persona"],
                              xy), f"{c['pair']} {c['condition']} {c['role']} {c['persona']} {y} after {x}"
                             f"  (n_{y}={c[f'n_{y}']})", p))
    rows.sort(key=lambda r: r[0], reverse=True)
    fig = Figure(figsize=(8.5, 1.7 + 0.3 * max(len(rows), 1)), layout="constrained")
    ax = fig.subplots()
    if not rows:
        _note(ax, "no second marker of a declared pair to place (never fired, or below the joint-rate floor)")
        _suptitle(fig, "Where the second marker of each pair sits")
        return fig
    y = np.arange(len(rows))
    for stat, marker, color, dy, label in (
            ("suffix_frac", "o", "#d62728", 0.12, "suffix_frac: the last second marker ends within 50 chars of"
                                                  " the end"),
            ("chunk_frac", "^", "#1f77b4", -0.12, "chunk_frac: a second marker starts within 150 chars after"
                                                  " the first marker")):
        v = [p[stat] for _, _, p in rows]
        ax.errorbar(v, y + dy, xerr=_errs(v, [p[f"{stat}_ci"] for _, _, p in rows]), fmt=marker, ms=6,
                    capsize=2.5, color=color, label=label)
    ax.set_yticks(y, [label for _, label, _ in rows], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(-0.03, 1.03)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share of the cell's completions with the second marker")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    _suptitle(fig, "Where the second marker of each pair sits: at the end (suffix) or right after the first"
                   " (chunk); 95% CI")
    return fig


# --- 4. per persona: every trained marker's fire rate per pair and condition -----------


def per_persona(summary: dict) -> Figure:
    exp = experiment_of(summary)
    markers = exp["trained_markers"] or list(exp["markers"])
    pairs = _pairs(summary)
    conds = _conditions(summary, _plain(summary)) or [exp["headline"]["treatment"]]
    n_personas = max((len(_persona_roles(summary, p)) for p in pairs), default=1)
    fig = Figure(figsize=(4.4 * len(conds) + 1.6,
                          (0.9 + 0.18 * len(markers) * n_personas) * max(len(pairs), 1) + 0.6),
                 layout="constrained")
    axes = fig.subplots(max(len(pairs), 1), len(conds), squeeze=False, sharex=True)
    height = 0.76 / len(markers)
    for r, pair in enumerate(pairs):
        roles = _persona_roles(summary, pair)
        personas = _ordered_personas(roles)[::-1]
        row = {p: y for y, p in enumerate(personas)}
        for col, cond in enumerate(conds):
            ax = axes[r][col]
            cells = [c for c in _plain(summary) if c["pair"] == pair and c["condition"] == cond]
            ax.set_yticks(range(len(personas)),
                          [_label(p, roles[p]) if col == 0 else "" for p in personas], fontsize=8)
            ax.set_ylim(-0.6, len(personas) - 0.4)
            if not cells:
                ax.text(0.5, 0.5, f"no {cond} run for {pair}", ha="center", va="center",
                        transform=ax.transAxes, fontsize=10, color="0.4")
            for k, m in enumerate(markers):
                stat = f"fire_{m}"
                dy = (len(markers) - 1) / 2 * height - k * height
                v = [c[stat] for c in cells]
                ax.barh([row[c["persona"]] + dy for c in cells], v, height,
                        color=_MARKER_PALETTE[k % len(_MARKER_PALETTE)], label=stat,
                        xerr=_errs(v, [c.get(f"{stat}_ci") for c in cells]), capsize=2,
                        error_kw={"lw": 0.8, "ecolor": "0.15"})
            ax.set_xlim(0, 1.0)
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"{pair}, condition {cond}", fontsize=10)
            if r == len(pairs) - 1:
                ax.set_xlabel("share of completions")
    if pairs:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=min(len(markers), 5),
                   fontsize=9, frameon=False)
    else:
        _note(axes[0][0], "no plain cells")
    _suptitle(fig, f"Marker rates per persona (95% CI; {STAR} trained in the pair's adapters)")
    return fig


def _draw_and_save(name: str, summary: dict, out_dir: Path) -> list[Path]:
    return _save(globals()[name](summary), out_dir, name)


# What the figures read of a summary (the samples' texts and the per-arm lists they do not draw stay home:
# each task's summary is pickled to a worker).
_READS = ("arms", "experiments", "cells", "roles", "deltas", "personas")


def draw_all(summary: dict, out_dir: Path, jobs: int | None = None) -> list[Path]:
    """Draw and save every figure of one summary into ``out_dir``; returns the written paths."""
    return draw_many([(summary, out_dir)], jobs)[0]


def draw_many(items: list[tuple[dict, Path]], jobs: int | None = None) -> list[list[Path]]:
    """Draw and save every figure of each (summary, out_dir); returns each one's written paths."""
    with Drawer(jobs) as drawer:
        pending = [drawer.submit(summary, out_dir) for summary, out_dir in items]
        return [get() for get in pending]


class Drawer:
    """Draws the figures of summaries while the caller goes on with other work.

        with Drawer(jobs) as drawer:      # before the heavy work: the workers fork small
            get = drawer.submit(summary, out_dir)
            ...                           # summarize the next arm, write pages
            paths = get()                 # this summary's figure files, once drawn

    Rendering (text layout, rasterizing, PDF) is most of a report's time, so with
    ``jobs > 1`` the figures are drawn in forked worker processes, which inherit
    the imported matplotlib instead of importing it again; one pool serves every
    summary (the arms of a sweep), so the workers stay busy to the end. ``jobs``
    defaults to one per core, at most 4. Where fork is not available, or
    ``jobs == 1``, each summary's figures are drawn when its ``get`` is called.
    """

    # Costliest first, so the workers finish at about the same time.
    NAMES = ("per_persona", "position", "hero", "bystander")

    def __init__(self, jobs: int | None = None):
        jobs = min(len(self.NAMES), os.cpu_count() or 1) if jobs is None else jobs
        self.pool = None
        if jobs > 1 and "fork" in mp.get_all_start_methods():
            self.pool = mp.get_context("fork").Pool(jobs)

    def submit(self, summary: dict, out_dir: Path):
        """Queue one summary's figures; returns a function that waits for them and returns the paths."""
        view = {k: summary[k] for k in _READS if k in summary}
        tasks = [(name, view, Path(out_dir)) for name in self.NAMES]
        if self.pool is None:
            return lambda: _in_order([_draw_and_save(*t) for t in tasks])
        results = [self.pool.apply_async(_draw_and_save, t) for t in tasks]
        return lambda: _in_order([r.get() for r in results])

    def __enter__(self) -> "Drawer":
        return self

    def __exit__(self, kind, *_) -> None:
        if self.pool is not None:
            if kind is None:
                self.pool.close()
            else:
                self.pool.terminate()  # an error elsewhere: drop the queued figures
            self.pool.join()


def _in_order(done: list[list[Path]]) -> list[Path]:
    """The paths of Drawer.NAMES' results, in FIGURES order."""
    by_name = dict(zip(Drawer.NAMES, done))
    return [p for name in FIGURES for p in by_name[name]]
