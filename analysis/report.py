"""The cross-run report: metrics, bootstrap CIs, gates, report.md, table and figures.

Run it on run directories (each contributes ``eval/completions.jsonl`` and its
training data's position statistics), on a directory of runs, or on completion
JSONL files; records of all inputs are combined (pair, condition, role and the
adapter's setting travel in each record):

    python -m analysis.report runs/pair1_T runs/pair1_C runs/pair2_T ... --out runs/report
    python -m analysis.report runs/ --out runs/report --bootstrap 2000 --seed 0

Records are grouped into arms by their setting less the seed (analysis.arms);
runs of an arm that differ only in seed are replicates. Writes into ``--out``:
``summary.json`` (docs/contracts.md), ``report.md`` (the page to read), ``table.md``
(every cell) and, for one arm, ``figures/{hero,bystander,position,per_persona}.{png,pdf}``.
With several arms each arm also gets ``arms/<name>/`` with the same files, as if
reported alone, and the top-level page leads with the cross-arm table. Every
file is written atomically; then the terminal gets ``terminal_summary``. A
malformed record or an incompatible mix of inputs is one line on stderr naming
file:line and the field, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from analysis.arms import slug
from analysis.bootstrap import Bootstrap
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


def _write(summary: dict, out: Path, page: str, figures: bool, jobs: int | None) -> dict:
    """Write one directory's summary.json, report.md, table.md and (optionally) figures."""
    summary["outputs"] = {"summary": str(out / "summary.json"), "report": str(out / "report.md"),
                          "table": str(out / "table.md")}
    atomic_write_text(out / "table.md", render(summary))
    atomic_write_text(out / "report.md", page)
    if figures:
        from analysis.figures import draw_all  # matplotlib only when drawing

        summary["outputs"]["figures"] = [str(p) for p in draw_all(summary, out / "figures", jobs)]
    atomic_write_text(out / "summary.json", json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n")
    return summary


def report(inputs: list[str], out: Path, n_resamples: int = 2000, seed: int = 0,
           figures: bool = True, jobs: int | None = None) -> dict:
    """Build the report of ``inputs`` into ``out``; returns the summary dict.

    ``seed`` seeds the bootstrap and the pick of sample completions. ``jobs``:
    processes drawing the figures (default: one per core, at most 4).
    """
    files = resolve_inputs(inputs)
    loaded = load(files, sample_seed=seed)
    boot = Bootstrap(n_resamples, seed)
    arm_summaries = [summarize(arm, boot, loaded.splits, loaded.baselines) for arm in loaded.arms]
    out = Path(out)
    inputs_list = [str(f.path) for f in files]
    if len(arm_summaries) == 1:
        summary = combine(arm_summaries, boot, loaded.arms)
        summary["arms"][0]["dir"] = "."
        summary["inputs"] = inputs_list
        summary["warnings"] = loaded.warnings + summary["warnings"]
        return _write(summary, out, render_page(summary), figures, jobs)

    taken: set[str] = set()
    for s in arm_summaries:
        entry = s["arms"][0]
        entry["dir"] = f"arms/{slug(entry['name'], taken)}"
        s["inputs"] = [str(f.path) for f in files]
        _write(s, out / entry["dir"], render_page(s), figures, jobs)
    summary = combine(arm_summaries, boot, loaded.arms)
    summary["inputs"] = inputs_list
    summary["warnings"] = loaded.warnings + summary["warnings"]
    return _write(summary, out, render_sweep_page(summary), False, jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Marker metrics, question-cluster bootstrap CIs, gates, report.md, table and "
                    "figures from completion records.")
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_JSONL",
                        help="run directories, directories of runs, or completions .jsonl files")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="B",
                        help="bootstrap resamples (default 2000; 0 turns CIs off)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstrap and of the sample completions' pick (default 0)")
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
                         figures=not args.no_figures, jobs=args.jobs)
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
