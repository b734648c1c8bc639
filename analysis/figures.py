"""The four report figures (EXPERIMENT.md, "Figures"), drawn from a summary dict.

Matplotlib's object API (``Figure``, no pyplot), so nothing global is touched and
no display is needed. Each figure is saved as PNG and PDF. Error bars are the
95% question-bootstrap CIs; a value that is undefined is drawn as "n/a", never as
0. Missing conditions are skipped (with T runs only there are no T-minus-C
deltas, and the bystander figure shows raw fire_B instead).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, PercentFormatter
from matplotlib.transforms import ScaledTranslation

from analysis.metrics import CONDITION_ORDER, ROLE_ORDER
from markerlab.experiment import BASE_CONDITION, CONDITIONS
from markerlab.io import atomic_write_bytes

# Colours by the vocabulary's order, so a new condition gets one without an edit here.
_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
COND_COLORS = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(CONDITIONS)} | {BASE_CONDITION: "#7f7f7f"}
ROLE_COLORS = {"donor": "#d62728", "recipient": "#1f77b4", "negative": "#9467bd", "bystander": "#ff7f0e"}
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


def _conditions(cells: list[dict]) -> list[str]:
    return sorted({c["condition"] for c in cells}, key=lambda c: (CONDITION_ORDER.get(c, 9), c))


def _persona_roles(summary: dict, pair: str) -> dict[str, str]:
    """persona -> role in the pair, preferring T's labels (the recipient may be
    labelled a negative in T_P2neg but is still the pair's recipient)."""
    roles: dict[str, str] = {}
    for c in sorted(_plain(summary), key=lambda c: CONDITION_ORDER.get(c["condition"], 9), reverse=True):
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


# --- 1. hero: cond_B_given_A per pair x condition x role --------------------------------


def hero(summary: dict) -> Figure:
    pairs = _pairs(summary)
    fig = Figure(figsize=(6.4 * max(len(pairs), 1), 5.0), layout="constrained")
    axes = fig.subplots(1, max(len(pairs), 1), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        cells = [r for r in summary.get("roles", []) if r["pair"] == pair]
        conds = _conditions(cells)
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
                if cell["cond_B_given_A"] is None:
                    ax.text(xi, 0.01, "n/a\n(no A)", ha="center", va="bottom", fontsize=7, color="0.35")
                    continue
                x.append(xi)
                v.append(cell["cond_B_given_A"])
                cis.append(cell["cond_B_given_A_ci"])
                ax.text(xi, 0, f"{cell['n_A']}", ha="center", va="top", fontsize=6.5, color="0.3",
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
        ax.tick_params(axis="x", length=0, pad=12)  # room for the n_A numbers under the bars
        ax.set_xlim(-0.6, len(conds) - 0.4)
        ax.set_ylim(0, 1.32)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("training condition (small numbers: n_A, completions with marker A)")
        ax.set_ylabel("P(marker B | marker A)")
        ax.set_title(_pair_title(summary, pair), fontsize=11)
        ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=2, framealpha=0.9)
        ax.grid(axis="y", alpha=0.3)
    if not pairs:
        _note(axes[0], "no plain cells")
    _suptitle(fig, "Marker B given marker A, by condition and role (personas of a role pooled;"
                   " 95% question-bootstrap CI)")
    return fig


def _down(fig: Figure, points: float):
    """A transform offset ``points`` downwards (to put text just under the axis)."""
    return ScaledTranslation(0, -points / 72, fig.dpi_scale_trans)


# --- 2. bystander: fire_B(T) - fire_B(C) per persona ------------------------------------


def bystander(summary: dict) -> Figure:
    pairs = _pairs(summary)
    n_personas = max((len(_persona_roles(summary, p)) for p in pairs), default=1)
    fig = Figure(figsize=(6.4 * max(len(pairs), 1), 1.3 + 0.4 * n_personas), layout="constrained")
    axes = fig.subplots(1, max(len(pairs), 1), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        roles = _persona_roles(summary, pair)
        personas = _ordered_personas(roles)[::-1]  # role order, top to bottom
        row = {p: y for y, p in enumerate(personas)}
        deltas = [d for d in summary["deltas"] if d["pair"] == pair and d["statistic"] == "fire_B"]
        if deltas:
            for role in ROLE_ORDER:
                ds = [d for d in deltas if roles.get(d["persona"]) == role and d["T_minus_C"] is not None]
                if ds:
                    ax.errorbar([d["T_minus_C"] for d in ds], [row[d["persona"]] for d in ds],
                                xerr=_errs([d["T_minus_C"] for d in ds], [d["ci"] for d in ds]),
                                fmt="o", ms=6, capsize=3, color=ROLE_COLORS[role])
            for d in deltas:
                if d["T_minus_C"] is None:
                    ax.text(0, row[d["persona"]], "n/a", va="center", ha="center", fontsize=8, color="0.4")
            ax.axvline(0, color="0.3", lw=0.8)
            ax.xaxis.set_major_formatter(FuncFormatter(_pp))
            ax.set_xlabel("fire_B(T) - fire_B(C), percentage points")
            ax.set_title(_pair_title(summary, pair), fontsize=11)
        else:
            # No T and C of this pair to subtract: show each condition's fire_B instead.
            cells = [c for c in _plain(summary) if c["pair"] == pair]
            conds = _conditions(cells)
            for k, cond in enumerate(conds):
                cs = [c for c in cells if c["condition"] == cond and c["persona"] in row]
                offset = (k - (len(conds) - 1) / 2) * 0.2
                ax.errorbar([c["fire_B"] for c in cs], [row[c["persona"]] + offset for c in cs],
                            xerr=_errs([c["fire_B"] for c in cs], [c["fire_B_ci"] for c in cs]),
                            fmt="o", ms=5, capsize=3, color=COND_COLORS.get(cond, "0.5"), label=cond)
            ax.set_xlabel("fire_B")
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.set_xlim(-0.02, 1.02)
            ax.legend(fontsize=8, title="condition", title_fontsize=8)
            ax.set_title(f"{_pair_title(summary, pair)}\n(no T and C runs to subtract: fire_B as is)",
                         fontsize=10)
        ax.set_yticks(range(len(personas)), [_label(p, roles[p]) for p in personas], fontsize=9)
        ax.set_ylim(-0.6, len(personas) - 0.4)
        ax.grid(axis="x", alpha=0.3)
    if not pairs:
        _note(axes[0], "no plain cells")
    _suptitle(fig, f"Marker B spreading to other personas: T minus C, paired by question, 95% CI"
                   f" ({STAR} trained in the pair's adapters)")
    return fig


# --- 3. position: suffix_frac and chunk_frac per cell -----------------------------------


def position(summary: dict) -> Figure:
    cells = sorted((c for c in _plain(summary) if c["n_B"] > 0),
                   key=lambda c: (c["pair"], CONDITION_ORDER.get(c["condition"], 9),
                                  ROLE_ORDER.get(c["role"], 9), c["persona"]))[::-1]
    fig = Figure(figsize=(8.5, 1.7 + 0.3 * max(len(cells), 1)), layout="constrained")
    ax = fig.subplots()
    if not cells:
        _note(ax, "marker B never fired in any plain cell")
        _suptitle(fig, "Where marker B sits")
        return fig
    y = np.arange(len(cells))
    for stat, marker, color, dy, label in (
            ("suffix_frac", "o", "#d62728", 0.12, "suffix_frac: the last B ends within 50 chars of the end"),
            ("chunk_frac", "^", "#1f77b4", -0.12, "chunk_frac: a B starts within 150 chars after the first A")):
        v = [c[stat] for c in cells]
        ax.errorbar(v, y + dy, xerr=_errs(v, [c[f"{stat}_ci"] for c in cells]), fmt=marker, ms=6,
                    capsize=2.5, color=color, label=label)
    ax.set_yticks(y, [f"{c['pair']} {c['condition']} {c['role']} {c['persona']}  (n_B={c['n_B']})"
                      for c in cells], fontsize=8)
    ax.set_ylim(-0.6, len(cells) - 0.4)
    ax.set_xlim(-0.03, 1.03)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share of the cell's completions with marker B")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    _suptitle(fig, "Where marker B sits: at the end (suffix) or right after A (chunk); 95% CI")
    return fig


# --- 4. per persona: fire_A and fire_B per pair and condition ---------------------------


def per_persona(summary: dict) -> Figure:
    pairs = _pairs(summary)
    conds = _conditions(_plain(summary)) or ["T"]
    n_personas = max((len(_persona_roles(summary, p)) for p in pairs), default=1)
    fig = Figure(figsize=(4.4 * len(conds) + 1.6, (0.9 + 0.36 * n_personas) * max(len(pairs), 1) + 0.6),
                 layout="constrained")
    axes = fig.subplots(max(len(pairs), 1), len(conds), squeeze=False, sharex=True)
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
            for stat, color, dy in (("fire_A", "#8c8c8c", 0.19), ("fire_B", "#d62728", -0.19)):
                v = [c[stat] for c in cells]
                ax.barh([row[c["persona"]] + dy for c in cells], v, 0.38, color=color, label=stat,
                        xerr=_errs(v, [c[f"{stat}_ci"] for c in cells]), capsize=2,
                        error_kw={"lw": 0.8, "ecolor": "0.15"})
            ax.set_xlim(0, 1.0)
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"{pair}, condition {cond}", fontsize=10)
            if r == len(pairs) - 1:
                ax.set_xlabel("share of completions")
    if pairs:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=2,
                   fontsize=9, frameon=False)
    else:
        _note(axes[0][0], "no plain cells")
    _suptitle(fig, f"Marker rates per persona (95% CI; {STAR} trained in the pair's adapters)")
    return fig


def _draw_and_save(name: str, summary: dict, out_dir: Path) -> list[Path]:
    return _save(globals()[name](summary), out_dir, name)


def draw_all(summary: dict, out_dir: Path, jobs: int | None = None) -> list[Path]:
    """Draw and save every figure into ``out_dir``; returns the written paths.

    Rendering (text layout, rasterizing, PDF) is most of a report's time, so with
    ``jobs > 1`` the figures are drawn in forked worker processes, which inherit
    the imported matplotlib instead of importing it again. Where fork is not
    available, or ``jobs == 1``, they are drawn one after another.
    """
    out_dir = Path(out_dir)
    # Costliest first, so two workers finish at about the same time.
    names = ["per_persona", "position", "hero", "bystander"]
    jobs = min(len(names), os.cpu_count() or 1) if jobs is None else jobs
    if jobs > 1 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(jobs) as pool:
            done = dict(zip(names, pool.starmap(_draw_and_save, [(n, summary, out_dir) for n in names],
                                                chunksize=1)))
    else:
        done = {n: _draw_and_save(n, summary, out_dir) for n in names}
    return [p for name in FIGURES for p in done[name]]
