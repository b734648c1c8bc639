"""Every path of a run directory, named once.

    from markerlab.rundir import RunDir
    rd = RunDir(cfg.run_dir)
    rd.train_jsonl, rd.adapter_weights, rd.completions       # Paths inside the run directory
    rd.rel(rd.train_jsonl)                                   # "data/train.jsonl", as the manifest names it
    with rd.locked():                                        # one process per run directory
        ...

The layout (the run directory table of the project's contracts):

    .markerlab                   the marker: this directory is markerlab's (tool, version, kind); written first
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

markerlab writes only into directories it made: a directory that exists, is not
empty and has no marker is refused (`ownership_problem`), --overwrite included,
and --overwrite removes only the paths markerlab makes (`made_here`), never a
file the user put beside them. A run directory of an older markerlab (a
manifest.json of markerlab's shape, no marker) is adopted only when the user
says so:

    python -m markerlab.rundir --adopt runs/pair1_T
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError, cli_main
from .io import exclusive_lock, write_json

# The file that makes a directory markerlab's. Its "kind" says what made it: a run, or a sweep's directory.
MARKER = ".markerlab"
TOOL = "markerlab"
KINDS = ("run", "sweep")


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TOOL)
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown"


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
        """What is in the run directory, less its lock file and its marker."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p not in (self.lock_file, self.marker))

    # ---- ownership
    def marker_kind(self) -> str | None:
        """The kind its marker names ("run" | "sweep"), None without a marker; a damaged marker is one line."""
        if not self.marker.is_file():
            if self.marker.exists() or self.marker.is_symlink():
                raise UserError(f"{self.marker}: expected markerlab's marker file, found something else")
            return None
        try:
            data = json.loads(self.marker.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{self.marker}: unreadable marker ({e}); if markerlab made this directory, move the "
                            f"file away and mark it again with: python -m markerlab.rundir --adopt {_q(self.root)}") \
                from None
        if not (isinstance(data, dict) and data.get("tool") == TOOL and data.get("kind") in KINDS):
            raise UserError(f"{self.marker}: not markerlab's marker (expected {{\"tool\": \"{TOOL}\", \"kind\": "
                            f"\"run\"|\"sweep\", ...}})")
        return data["kind"]

    def ownership_problem(self, kind: str = "run") -> str | None:
        """Why markerlab may not work in this directory (None when it may): read-only, one line.

        It may when the directory does not exist, is empty, or carries a marker of
        the same kind. Anything else is someone else's: never written into,
        adopted or emptied.
        """
        if not self.root.exists():
            return None
        if not self.root.is_dir():
            return f"{self.root}: is a file, expected a run directory"
        found = self.marker_kind()
        if found == kind:
            return None
        if found is not None:
            return (f"{self.root}: a {found} directory of markerlab, not a {kind}'s; set run.name (or run.out_dir) "
                    f"to another directory")
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in self.root.iterdir())
        if not entries:
            return None
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        why = (f"{self.root}: not a {kind} directory markerlab made (no {MARKER}; it holds {shown}); markerlab writes "
               f"only into new or empty directories and its own, --overwrite included")
        if older_kind(self) == kind:
            what = "Its manifest.json is an older markerlab's" if kind == "run" else "It holds only what a sweep makes"
            return (f"{why}. {what}: if this is that {kind}'s directory, mark it as markerlab's with: "
                    f"python -m markerlab.rundir --adopt {_q(self.root)}")
        return f"{why}: set run.name (or run.out_dir) to another directory"

    def claim(self, kind: str = "run") -> None:
        """Make the directory (parents too) and write the marker first, unless it is already there."""
        problem = self.ownership_problem(kind)
        if problem:
            raise UserError(problem)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run.out_dir: cannot create {self.root} ({e.strerror})") from None
        if not self.marker.is_file():
            write_json(self.marker, {"tool": TOOL, "version": tool_version(), "kind": kind,
                                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def made_here(self, paths) -> tuple[list[Path], list[Path]]:
        """(those of `paths` that exist, what else the directory holds): what --overwrite removes, what it keeps."""
        paths = [Path(p) for p in paths]
        ours = [p for p in paths if p.exists() or p.is_symlink()]
        # what a killed write of ours leaves: .config.toml.x1y2.tmp, .merged.tmp-x1y2, .merged.old-x1y2
        names = {p.name for p in paths if p.parent == self.root}
        ours += [p for p in self.contents() if p not in ours and any(p.name.startswith(f".{n}.") for n in names)]
        kept = [p for p in self.contents() if p not in ours and not any(p in q.parents for q in ours)]
        return ours, kept

    # ---- the driver's files
    @property
    def marker(self) -> Path:
        return self.root / MARKER

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


# --------------------------------------------------------------------------- manifest.json's shape

STATUSES = ("pending", "running", "done", "failed")


class ManifestError(UserError):
    """manifest.json is unreadable or not of markerlab's shape; `problem` says how (the caller adds the way forward)."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: not a markerlab manifest ({problem})")


def _record_problem(where: str, rec) -> str | None:
    if not isinstance(rec, dict):
        return f"{where}: expected an object, got {type(rec).__name__}"
    for key, types in (("size", int), ("sha256", str), ("lines", int), ("meta", bool)):
        if key in rec and (not isinstance(rec[key], types) or (types is int and isinstance(rec[key], bool))):
            return f"{where}.{key}: expected {'an integer' if types is int else types.__name__}, got {rec[key]!r}"
    if "size" not in rec:
        return f"{where}: no size"
    return None


def manifest_problem(data) -> str | None:
    """How `data` (a parsed manifest.json) differs from markerlab's shape, one phrase; None when it does not."""
    if not isinstance(data, dict):
        return f"expected an object, got {type(data).__name__}"
    if "config" in data and not (isinstance(data["config"], dict)
                                 and all(isinstance(t, dict) for t in data["config"].values())):
        return "config: expected an object of sections"
    stages = data.get("stages", {})
    if not isinstance(stages, dict):
        return f"stages: expected an object, got {type(stages).__name__}"
    for name, entry in stages.items():
        where = f"stages.{name}"
        if not isinstance(entry, dict):
            return f"{where}: expected an object, got {type(entry).__name__}"
        if entry.get("status", "pending") not in STATUSES:
            return f"{where}.status: expected one of {', '.join(STATUSES)}, got {entry.get('status')!r}"
        for key in ("result", "outputs", "inputs"):
            if key in entry and not isinstance(entry[key], dict):
                return f"{where}.{key}: expected an object, got {type(entry[key]).__name__}"
        if "config" in entry and not isinstance(entry["config"], str):
            return f"{where}.config: expected a digest, got {entry['config']!r}"
        for out, rec in entry.get("outputs", {}).items():
            problem = _record_problem(f"{where}.outputs.{out}", rec)
            if problem:
                return problem
        for up, seen in entry.get("inputs", {}).items():
            if not (isinstance(seen, dict) and all(isinstance(v, (str, int)) for v in seen.values())):
                return f"{where}.inputs.{up}: expected an object of digests"
        if name == "generate" and entry.get("status") == "done" and not isinstance(
                entry.get("result", {}).get("onpolicy", ""), str):
            return f"{where}.result.onpolicy: expected a path"
    return None


def read_manifest(path: str | os.PathLike) -> dict:
    """manifest.json, checked to be of markerlab's shape; anything else is a ManifestError."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ManifestError(path, f"cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(path, f"not UTF-8 text: byte {e.start}") from None
    except ValueError as e:
        raise ManifestError(path, f"invalid JSON: {e}") from None
    problem = manifest_problem(data)
    if problem:
        raise ManifestError(path, problem)
    return data


def _q(path) -> str:
    import shlex

    return shlex.quote(str(path))


def older_run(rd: RunDir) -> bool:
    """Whether the directory holds a manifest.json of markerlab's shape (a run of a markerlab before the marker)."""
    try:
        data = json.loads(rd.manifest.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    stages = data.get("stages") if isinstance(data, dict) else None
    return (isinstance(stages, dict) and {"generate", "data", "train"} <= set(stages)
            and all(isinstance(v, dict) and "status" in v for v in stages.values())
            and {"run", "created", "git_commit", "versions"} <= set(data) and data["run"] == rd.root.name)


# What a sweep's directory holds: its members' resolved configs, its report, its lock.
SWEEP_NAMES = frozenset({"members", "summary.json", "report.md", "table.md", "figures", "arms", ".lock"})


def older_kind(rd: RunDir) -> str | None:
    """"run" or "sweep" when the directory (without a marker) looks like one an older markerlab made, else None."""
    if older_run(rd):
        return "run"
    names = {p.name for p in rd.root.iterdir()} if rd.root.is_dir() else set()
    if names and names <= SWEEP_NAMES and names & {"members", "summary.json"}:
        return "sweep"
    return None


def adopt(path: str | os.PathLike) -> Path:
    """Write the marker into a directory an older markerlab made: a run's (its manifest.json) or a sweep's."""
    rd = RunDir(Path(path))
    if not rd.root.is_dir():
        raise UserError(f"{rd.root}: no such directory")
    if rd.marker_kind() is not None:
        print(f"{rd.root}: already markerlab's")
        return rd.marker
    kind = older_kind(rd)
    if kind is None:
        raise UserError(f"{rd.root}: neither a run directory of an older markerlab (a manifest.json of markerlab's "
                        f"with \"run\": \"{rd.root.name}\") nor a sweep's (only members/ and its report); "
                        f"markerlab adopts only directories it made")
    write_json(rd.marker, {"tool": TOOL, "version": tool_version(), "kind": kind,
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "adopted": True})
    print(f"{rd.root}: adopted as markerlab's {kind} directory ({rd.marker})")
    return rd.marker


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m markerlab.rundir",
                                 description="Mark a run directory of an older markerlab as markerlab's.")
    ap.add_argument("--adopt", metavar="RUN_DIR", required=True, help="the run directory to adopt")
    adopt(ap.parse_args(argv).adopt)
    return 0


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


if __name__ == "__main__":
    cli_main(main)
