"""Every path of a run directory, named once.

    from markerlab.rundir import RunDir
    rd = RunDir(cfg.run_dir)
    rd.train_jsonl, rd.adapter_weights, rd.completions       # Paths inside the run directory
    rd.rel(rd.train_jsonl)                                   # "data/train.jsonl", as the manifest names it
    with rd.locked():                                        # one process per run directory
        ...

The layout (the run directory table of the project's contracts):

    config.toml                  the resolved config
    experiment.toml              a copy of the experiment file (run.experiment) it was made under
    manifest.json                stage status, times, and each stage's recorded outputs
    .lock                        held (flock) by the process working in the directory
    data/train.jsonl, data/stats.json, data/probe.json (the leakage probe's documents)
    tb/                          TensorBoard event files
    train_log.txt, train_summary.json
    checkpoints/                 resumable training state
    adapter/                     adapter_config.json, adapter_model.safetensors (PEFT format)
    merged/                      the merged checkpoint (removed after eval by default)
    eval/parts/, eval/completions.jsonl, eval/run_result.json
    report/                      summary.json, table.md, figures/
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .io import exclusive_lock


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def rel(self, path: Path) -> str:
        """`path` relative to the run directory where it lies inside it, else as given."""
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def locked(self):
        """Hold the run directory's lock (markerlab.io.exclusive_lock) for a `with` block."""
        return exclusive_lock(self.lock_file, f"run directory {self.root}")

    def contents(self) -> list[Path]:
        """What is in the run directory, less its lock file (what a fresh start removes)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p != self.lock_file)

    # ---- the driver's files
    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def experiment(self) -> Path:
        """A copy of the experiment file the run was made under (run.experiment)."""
        return self.root / "experiment.toml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    # ---- data
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train_jsonl(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def probe_set(self) -> Path:
        return self.data / "probe.json"

    @property
    def data_stats(self) -> Path:
        return self.data / "stats.json"

    # ---- train
    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.txt"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_config(self) -> Path:
        return self.adapter / "adapter_config.json"

    @property
    def adapter_weights(self) -> Path:
        return self.adapter / "adapter_model.safetensors"

    # ---- merge
    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def merged_tmp(self) -> Path:
        return self.root / ".merged.tmp"

    def merged_files(self) -> list[Path]:
        if not self.merged.is_dir():
            return []
        return sorted(p for p in self.merged.rglob("*") if p.is_file())

    # ---- eval
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_parts(self) -> Path:
        return self.eval / "parts"

    @property
    def completions(self) -> Path:
        return self.eval / "completions.jsonl"

    @property
    def run_result(self) -> Path:
        return self.eval / "run_result.json"

    # ---- report
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_summary(self) -> Path:
        return self.report / "summary.json"

    @property
    def report_table(self) -> Path:
        return self.report / "table.md"


def remove(paths) -> list[Path]:
    """Delete the files and directories of `paths` that exist; returns those it removed."""
    import shutil

    gone = []
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            os.unlink(p)
        else:
            continue
        gone.append(p)
    return gone
