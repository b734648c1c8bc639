"""The cross-run report: metrics, bootstrap CIs, gates, headline table and figures.

Run it on run directories (each contributes ``eval/completions.jsonl``), on a
directory of runs, or on completion JSONL files; records of all inputs are
combined (pair, condition and role travel in each record):

    python -m analysis.report runs/pair1_T runs/pair1_C runs/pair2_T ... --out runs/report
    python -m analysis.report runs/ --out runs/report --bootstrap 2000 --seed 0

Writes into ``--out``: ``summary.json`` (CONTRACTS.md), ``table.md`` and
``figures/{hero,bystander,position,per_persona}.{png,pdf}``, each atomically,
then prints the headline table, the gates and the paths. A malformed record or
an incompatible mix of inputs is one line on stderr naming file:line and the
field, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from analysis.bootstrap import Bootstrap
from analysis.records import ReportError, load, resolve_inputs
from analysis.summary import summarize
from analysis.table import gates, headline, render
from markerlab.io import atomic_write_text


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


def report(inputs: list[str], out: Path, n_resamples: int = 2000, seed: int = 0,
           figures: bool = True, jobs: int | None = None) -> dict:
    """Build the report of ``inputs`` into ``out``; returns the summary dict.

    ``jobs``: processes drawing the figures (default: one per core, at most 4).
    """
    files = resolve_inputs(inputs)
    cells, warnings = load(files)
    summary = summarize(cells, Bootstrap(n_resamples, seed))
    summary["inputs"] = [str(f) for f in files]
    summary["warnings"] = warnings + summary["warnings"]

    out = Path(out)
    summary["outputs"] = {"summary": str(out / "summary.json"), "table": str(out / "table.md")}
    atomic_write_text(out / "table.md", render(summary))
    if figures:
        from analysis.figures import draw_all  # matplotlib only when drawing

        summary["outputs"]["figures"] = [str(p) for p in draw_all(summary, out / "figures", jobs)]
    atomic_write_text(out / "summary.json", json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Marker metrics, question-cluster bootstrap CIs, gates, table and figures "
                    "from completion records.")
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_JSONL",
                        help="run directories, directories of runs, or completions .jsonl files")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="B",
                        help="bootstrap resamples (default 2000; 0 turns CIs off)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes drawing the figures (default: one per core, at most 4)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")

    try:
        summary = report(args.inputs, args.out, args.bootstrap, args.seed,
                         figures=not args.no_figures, jobs=args.jobs)
    except ReportError as e:
        print(f"analysis.report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out not writable
        print(f"analysis.report: error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2

    for w in summary["warnings"]:
        print(f"analysis.report: warning: {w}", file=sys.stderr)
    print(headline(summary))
    print()
    print(gates(summary))
    print()
    outputs = summary["outputs"]
    print("wrote", outputs["summary"])
    print("wrote", outputs["table"])
    for p in outputs.get("figures", []):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
