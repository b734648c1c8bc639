"""Benchmark `python -m analysis.report` on 6 synthetic runs x 2,860 records, B=2000.

    PYTHONPATH=. python bench/bench_report.py [--repeats 5] [--jobs N]

Generates the records once (not timed), then times the whole command as a user
runs it (interpreter start, imports, reading, metrics, bootstrap, gates, table,
report.md, 8 figure files) a few times, and prints a per-stage breakdown of one in-process
run. Target: under 3 s on 2 cores. Wall time depends on what else the machine
is doing, so the load average and the CPU time are printed beside it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.synthetic import write_runs  # noqa: E402


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=None, help="passed to analysis.report --jobs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # 2,860 plain records per run (11 personas x 26 questions x 10 samples), no
        # probe or base records: the brief's 6 x 2,860.
        runs = write_runs(Path(tmp) / "runs", seed=0, probe=False, base_floor=False)
        n_records = sum(1 for d in runs for _ in open(d / "eval" / "completions.jsonl"))
        size = sum((d / "eval" / "completions.jsonl").stat().st_size for d in runs)
        print(f"{len(runs)} runs, {n_records} records, {size / 1e6:.1f} MB of JSONL;"
              f" B={args.bootstrap}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")

        cmd = [sys.executable, "-m", "analysis.report", *map(str, runs), "--out", f"{tmp}/out",
               "--bootstrap", str(args.bootstrap)]
        if args.jobs:
            cmd += ["--jobs", str(args.jobs)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        walls, cpus = [], []
        for _ in range(args.repeats):
            cpu0, t0 = children_cpu(), time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t0)
            cpus.append(children_cpu() - cpu0)
        print(f"end to end (python -m analysis.report <6 runs> --bootstrap {args.bootstrap}):"
              f" wall min {min(walls):.2f} s, median {statistics.median(walls):.2f} s;"
              f" CPU (user+sys, all processes) median {statistics.median(cpus):.2f} s;"
              f" load average after {os.getloadavg()[0]:.2f}")

        # One in-process run, stage by stage, wall and CPU time (imports already paid
        # here). Figures with jobs=1, so their CPU time is this process's own.
        from analysis.bootstrap import Bootstrap
        from analysis.figures import draw_all
        from analysis.page import render_page
        from analysis.records import load
        from analysis.summary import summarize
        from analysis.table import render

        def timed(label, fn):
            w, c = time.perf_counter(), time.process_time()
            out = fn()
            print(f"  {label}: wall {time.perf_counter() - w:.3f} s, CPU {time.process_time() - c:.3f} s")
            return out

        print("stages, in process:")
        loaded = timed("read + check + match + count", lambda: load(
            [d / "eval" / "completions.jsonl" for d in runs]))
        boot = Bootstrap(args.bootstrap, 0)
        (summary,) = timed("metrics + bootstrap + deltas + gates + ID/OOD",
                           lambda: [summarize(a, boot, loaded.splits, loaded.baselines) for a in loaded.arms])
        print(f"    ({len(summary['cells'])} cells, {len(summary['deltas'])} deltas,"
              f" {len(summary['roles'])} role cells)")
        timed("table + report.md", lambda: (render(summary), render_page(summary)))
        timed("figures, 8 files, one process", lambda: draw_all(summary, Path(tmp) / "figs", 1))


if __name__ == "__main__":
    main()
