"""Benchmark `python -m analysis.report`: end to end as a user runs it, wall time and peak memory.

    PYTHONPATH=. python bench/bench_report.py [--repeats 5] [--jobs N]        # 6 runs x 2,860 synthetic records
    PYTHONPATH=. python bench/bench_report.py --arms 18 --repeats 3            # 18 arms x the write-up's 17,160
    PYTHONPATH=. python bench/bench_report.py --arms 18 --repeats 3 --before /tmp/before   # against another tree

Generates the records once (not timed), then times the whole command (interpreter
start, imports, reading, matching, metrics, bootstrap, gates, tables, report.md,
the figure files) a few times as a subprocess, and reads each run's peak resident
memory (its own and its figure workers', from wait4). With ``--arms N`` the
records are N arms (N settings: train.lr differs) of the write-up's six adapters
(analysis.synthetic.write_up_records: 17,160 records each), one .jsonl per arm;
otherwise six synthetic runs of 2,860 records (make_run's texts, ~0.5-2 kB).

``--before DIR``: also time the same command with ``PYTHONPATH=DIR`` (e.g. a
``git worktree add /tmp/before <commit>`` of an earlier commit), alternating
before and after run by run on the same records, so both see the same machine
load; the records are written by this tree and must be readable by both. Wall
time depends on what else the machine is doing, so the load average and the CPU
time are printed beside it, and the ratio is taken within the session.

Without ``--before`` a per-stage breakdown of one in-process run follows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.synthetic import write_records, write_runs, write_up_records  # noqa: E402


def run_timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, float]:
    """(wall s, CPU s of the process and its children, peak RSS MB of the largest of them) of one command.

    Run in the tree under test: ``python -m`` puts the working directory first on sys.path, before
    PYTHONPATH, so a command run from another tree would import that tree's modules."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: ru_maxrss is in KiB


def make_inputs(tmp: Path, arms: int) -> list[Path]:
    if arms:
        paths = []
        for k in range(arms):
            lr = round(1e-5 * (k + 1), 8)
            paths.append(write_records(tmp / f"arm{k:02d}.jsonl", write_up_records(setting={"lr": lr},
                                                                                run_suffix=f"_lr{k}")))
        return paths
    # 2,860 plain records per run (11 personas x 26 questions x 10 samples), no probe or base records.
    return write_runs(tmp / "runs", seed=0, probe=False, base_floor=False)


def completions(p: Path) -> Path:
    return p if p.suffix == ".jsonl" else p / "eval" / "completions.jsonl"


def summary_line(label: str, rows: list[tuple[float, float, float]]) -> str:
    walls, cpus, rss = zip(*rows)
    return (f"{label}: wall min {min(walls):.2f} s, median {statistics.median(walls):.2f} s;"
            f" CPU (user+sys) median {statistics.median(cpus):.2f} s; peak RSS max {max(rss):.0f} MB"
            f" (of {len(rows)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=None, help="passed to analysis.report --jobs")
    ap.add_argument("--arms", type=int, default=0, help="N arms of the write-up's records instead of 6 runs")
    ap.add_argument("--before", type=Path, default=None, help="another tree to time alternately (PYTHONPATH)")
    ap.add_argument("--no-figures", action="store_true", help="passed to analysis.report")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        inputs = make_inputs(tmp, args.arms)
        n_records = sum(1 for p in inputs for _ in open(completions(p), "rb"))
        size = sum(completions(p).stat().st_size for p in inputs)
        print(f"{len(inputs)} inputs, {n_records:,} records, {size / 1e6:.1f} MB of JSONL (written in"
              f" {time.perf_counter() - t0:.0f} s); B={args.bootstrap}; {os.cpu_count()} CPUs;"
              f" load average {os.getloadavg()[0]:.2f}", flush=True)

        def command(out: str) -> list[str]:
            cmd = [sys.executable, "-m", "analysis.report", *map(str, inputs), "--out", str(tmp / out),
                   "--bootstrap", str(args.bootstrap)]
            cmd += ["--jobs", str(args.jobs)] if args.jobs else []
            cmd += ["--no-figures"] if args.no_figures else []
            return cmd

        trees = {"after": REPO}
        if args.before is not None:
            trees = {"before": args.before.resolve(), "after": REPO}
        rows: dict[str, list] = {k: [] for k in trees}
        for i in range(args.repeats):
            for label, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=str(tree), MPLBACKEND="Agg")
                row = run_timed(command(f"out_{label}"), env, tree)
                rows[label].append(row)
                print(f"  {label} #{i + 1}: wall {row[0]:.2f} s, CPU {row[1]:.2f} s, peak RSS {row[2]:.0f} MB,"
                      f" load average {os.getloadavg()[0]:.2f}", flush=True)
        for label, tree in trees.items():
            print(summary_line(f"{label} ({tree})", rows[label]))
        if "before" in rows:
            ratios = [a[0] / b[0] for a, b in zip(rows["after"], rows["before"])]
            print(f"after / before wall, run by run: {', '.join(f'{r:.2f}' for r in ratios)};"
                  f" median {statistics.median(ratios):.2f}; peak RSS after / before"
                  f" {max(r[2] for r in rows['after']) / max(r[2] for r in rows['before']):.2f}")
            return

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
        loaded = timed("read + check + match + count", lambda: load([completions(p) for p in inputs]))
        boot = Bootstrap(args.bootstrap, 0)
        summaries = timed("metrics + bootstrap + deltas + gates + ID/OOD",
                          lambda: [summarize(a, boot, loaded.splits, loaded.baselines) for a in loaded.arms])
        summary = summaries[0]
        print(f"    ({len(summaries)} arm(s); the first: {len(summary['cells'])} cells, {len(summary['deltas'])}"
              f" deltas, {len(summary['roles'])} role cells)")
        timed("table + report.md, first arm", lambda: (render(summary), render_page(summary)))
        timed("figures, 8 files, one process, first arm", lambda: draw_all(summary, tmp / "figs", 1))


if __name__ == "__main__":
    main()
