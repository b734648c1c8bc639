"""The cross-run report: metrics, bootstrap CIs, gates, report.md, table and figures.

Run it on run directories (each contributes ``eval/completions.jsonl`` and its
training data's position statistics), on a directory of runs, or on completion
JSONL files; records of all inputs are combined (pair, condition, role and the
adapter's setting travel in each record):

    python -m analysis.report runs/pair1_T runs/pair1_C runs/pair2_T ... --out runs/report
    python -m analysis.report runs/ --out runs/report --bootstrap 2000 --seed 0
    python -m analysis.report completions.jsonl --out report --experiment my_experiment.toml

Records are grouped into arms by their setting less the seed (analysis.arms);
runs of an arm that differ only in seed are replicates. Each arm reports under
the experiment its records name (their ``setting.experiment`` and its digest):
found in the run directory (``experiment.toml``, else ``config.toml``'s
``run.experiment``), among the ``--experiment`` files or names, or shipped with
markerlab; a file whose digest differs from the records' is refused
(analysis.experiments). Writes into ``--out``:
``summary.json`` (docs/contracts.md), ``report.md`` (the page to read), ``report.html`` (the same in one
self-contained page, with every completion browsable: analysis.html), ``table.md``
(every cell) and, for one arm, ``figures/{hero,bystander,position,per_persona}.{png,pdf}``.
With several arms each arm also gets ``arms/<name>/`` with the same files, as if
reported alone, and the top-level page leads with the cross-arm table. Every
file is written atomically; then the terminal gets ``terminal_summary``. A
malformed record or an incompatible mix of inputs is one line on stderr naming
file:line and the field, and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

from analysis.arms import slug
from analysis.bootstrap import Bootstrap
from analysis.html import write_html
from analysis.page import render_page, render_sweep_page, terminal_summary
from analysis.records import load, resolve_inputs
from analysis.summary import combine, summarize
from analysis.table import render
from markerlab.errors import UserError
from markerlab.io import atomic_write_text

__all__ = ["main", "report", "terminal_summary"]


def _finite(obj):
    """JSON has no NaN: make sure none slipped in (undefined must be null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number {obj} in the summary")
    if isinstance(obj, dict):
        for v in obj.values():
            _finite(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite(v)
    return obj


def _write(summary: dict, out: Path, page: str, figures: list[Path] | None = None) -> dict:
    """Write one directory's summary.json, report.md and table.md (the figures are drawn already)."""
    summary["outputs"] = {"summary": str(out / "summary.json"), "report": str(out / "report.md"),
                          "table": str(out / "table.md")}
    if figures is not None:
        summary["outputs"]["figures"] = [str(p) for p in figures]
    atomic_write_text(out / "table.md", render(summary))
    atomic_write_text(out / "report.md", page)
    atomic_write_text(out / "summary.json", json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n")
    return summary


def report(inputs: list[str], out: Path, n_resamples: int = 2000, seed: int = 0,
           figures: bool = True, jobs: int | None = None, experiments: list[str] | tuple = ()) -> dict:
    """Build the report of ``inputs`` into ``out``; returns the summary dict.

    ``seed`` seeds the bootstrap and the pick of sample completions. ``jobs``:
    processes drawing the figures (default: one per core, at most 4).
    ``experiments``: experiment files or shipped names for records whose
    experiment is not found otherwise.
    """
    files = resolve_inputs(inputs)
    inputs_list = [str(f.path) for f in files]
    out = Path(out)
    # The figure workers fork before the records are read (so they stay small), and draw each arm's
    # figures while the next arm is summarized and the pages are written.
    with (_drawer(jobs) if figures else contextlib.nullcontext()) as drawer:
        loaded = load(files, sample_seed=seed, experiments=experiments)
        boot = Bootstrap(n_resamples, seed)
        if len(loaded.arms) == 1:
            summary = combine([summarize(loaded.arms[0], boot, loaded.splits, loaded.baselines)], boot, loaded.arms)
            summary["arms"][0]["dir"] = "."
            summary["inputs"] = inputs_list
            summary["warnings"] = loaded.warnings + summary["warnings"]
            drawn = drawer.submit(summary, out / "figures") if drawer else None
            page = render_page(summary)
            return _with_html(_write(summary, out, page, drawn() if drawn else None), files, out)

        taken: set[str] = set()
        arm_summaries, pending = [], []
        for arm in loaded.arms:
            s = summarize(arm, boot, loaded.splits, loaded.baselines)
            entry = s["arms"][0]
            entry["dir"] = f"arms/{slug(entry['name'], taken)}"
            s["inputs"] = inputs_list
            arm_summaries.append(s)
            pending.append(drawer.submit(s, out / entry["dir"] / "figures") if drawer else None)
        for s, drawn in zip(arm_summaries, pending):
            page = render_page(s)
            _write(s, out / s["arms"][0]["dir"], page, drawn() if drawn else None)
    summary = combine(arm_summaries, boot, loaded.arms)
    summary["inputs"] = inputs_list
    summary["warnings"] = loaded.warnings + summary["warnings"]
    return _with_html(_write(summary, out, render_sweep_page(summary)), files, out)


def _with_html(summary: dict, files, out: Path) -> dict:
    """Write report.html beside report.md (analysis.html), once the figures it embeds are drawn."""
    summary["outputs"]["html"] = str(write_html(summary, files, out))
    return summary


def _drawer(jobs: int | None):
    from analysis.figures import Drawer  # matplotlib only when drawing

    return Drawer(jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Marker metrics, question-cluster bootstrap CIs (and Wilson intervals where the experiment "
                    "asks), the experiment's gates and verdict, report.md, table and figures from completion "
                    "records, each arm under the experiment its records name.")
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_JSONL",
                        help="run directories, directories of runs, or completions .jsonl files")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="bootstrap resamples (default 2000; 0 turns CIs off)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstrap and of the sample completions' pick (default 0)")
    parser.add_argument("--experiment", action="append", default=[], metavar="NAME_OR_FILE",
                        help="the experiment the records were made under, where neither their run directory"
                             " nor markerlab's shipped experiments have it (repeatable)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes drawing the figures (default: one per core, at most 4)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")

    for p in (args.out, *args.out.parents):  # the first that exists must be a directory
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                print(f"analysis.report: error: --out: {p} is a file, expected a directory", file=sys.stderr)
                return 2
            break
    try:
        summary = report(args.inputs, args.out, args.bootstrap, args.seed,
                         figures=not args.no_figures, jobs=args.jobs, experiments=args.experiment)
    except UserError as e:
        print(f"analysis.report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out not writable
        print(f"analysis.report: error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2

    for w in summary["warnings"]:
        print(f"analysis.report: warning: {w}", file=sys.stderr)
    print(terminal_summary(summary))
    outputs = summary["outputs"]
    n_fig = len(outputs.get("figures", []))
    print(f"also: {outputs['summary']}, {outputs['table']}"
          + (f", {n_fig} figure files in {Path(outputs['figures'][0]).parent}" if n_fig else "")
          + (f"; one directory per arm under {Path(outputs['report']).parent / 'arms'}"
             if len(summary["arms"]) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
