"""Reading completion records (docs/contracts.md, "Completion record") and reducing them to cells.

    inputs = resolve_inputs(["runs/sweep_loss_masks"])     # run dirs, dirs of runs, or .jsonl files
    loaded = load(inputs, sample_seed=0)                   # arms with their cells, samples, baselines

Every record is checked by the one validator (``markerlab.records.record_problems``);
every problem a user can cause is a ``ReportError`` whose message is one line
naming the file, the line and the field; ``analysis.report`` prints it and exits 2.
Records written before settings travelled in them (no ``setting``) are such an
error: their arm cannot be known, and pooling them is what the settings prevent.

A run directory's records are verified against its ``manifest.json`` before
they are read: the eval stage must have finished, and ``eval/completions.jsonl``
must be what it recorded (line count, size, sha256), so a cut or edited file is
refused, not reported; a directory without a manifest (or a manifest from before
outputs were recorded) is taken as it is. A record naming a persona, pair or
condition the experiment does not define, or a donor or recipient that is not
its pair's, is refused with its file and line (``unknown_names``).

Records are grouped into arms by their ``setting`` less the seed; within an arm,
runs of one (pair, condition) must differ in their seed (they are replicates);
two runs with the same setting and seed are an error, never silently pooled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.arms import arm_id, arm_names, arm_setting
from analysis.metrics import Cell, build_cells, features, replicate_order
from markerlab.errors import UserError
from markerlab.experiment import PAIRS, PERSONAS, RECORD_CONDITIONS, REPLICATE_KEY
from markerlab.io import record_mismatch
from markerlab.markers import match_markers, position_stats
from markerlab.records import record_problems
from markerlab.rundir import ManifestError, RunDir, read_manifest

# What makes a record unique: the same key twice means a file was passed twice or
# a run's eval was appended to instead of resumed.
KEY_FIELDS = ("run", "pair", "condition", "persona", "question_id", "sample", "variant")

# Sample categories, in display order: (name, has A, has B).
SAMPLE_CATEGORIES = (("A and B", True, True), ("A only", True, False), ("neither", False, False))


class ReportError(UserError):
    """A user-caused problem with the inputs: one line, no traceback."""


@dataclass(frozen=True)
class Input:
    """One completions file, and the run directory it belongs to (None for a bare .jsonl)."""

    path: Path
    run_dir: Path | None = None


@dataclass
class Arm:
    """One setting (less the seed) and its cells; ``seeds`` are its replicates."""

    name: str
    setting: dict
    seeds: list
    runs: list[str]
    cells: list[Cell]
    samples: list[dict] = field(default_factory=list)


@dataclass
class Loaded:
    arms: list[Arm]
    warnings: list[str]
    splits: dict[str, str]                 # question_id -> "id" | "ood"
    baselines: dict[str, dict | None]      # run -> its training data's positions, or None


def resolve_inputs(args: list[str]) -> list[Input]:
    """Map the command-line inputs to completions files.

    A ``.jsonl`` file is taken as is (no run directory: no training-data
    baseline); a run directory contributes ``eval/completions.jsonl``; a
    directory of run directories (``runs/``) contributes each of its runs, in
    name order.
    """
    files: list[Input] = []
    for arg in args:
        path = Path(arg)
        if path.is_file():
            files.append(Input(path))
        elif RunDir(path).completions.is_file():
            files.append(Input(RunDir(path).completions, path))
        elif path.is_dir():
            found = sorted(path.glob("*/eval/completions.jsonl"))
            if not found:
                raise ReportError(
                    f"{arg}: no eval/completions.jsonl here or in its subdirectories "
                    "(expected a run directory, a directory of runs, or a .jsonl file)"
                )
            files.extend(Input(f, f.parent.parent) for f in found)
        else:
            raise ReportError(f"{arg}: no such file or directory")
    return files


def _check(rec: object, where: str) -> dict:
    problems = record_problems(rec)
    if problems:
        raise ReportError(f"{where}: {problems[0]}")
    return rec


def unknown_names(rec: dict, personas, pairs, conditions) -> str | None:
    """What in a (schema-valid) record the experiment does not define, one phrase naming the field; None when all is.

    ``personas`` and ``conditions`` are the names the experiment defines, ``pairs``
    maps each pair to its (donor, recipient): a donor or recipient record must name
    its pair's.
    """
    for field, known in (("pair", pairs), ("persona", personas), ("condition", conditions)):
        if rec[field] not in known:
            return (f"field '{field}' is {rec[field]!r}, which the experiment does not define "
                    f"(expected one of {', '.join(known)})")
    role = rec["role"]
    if role in ("donor", "recipient"):
        expected = pairs[rec["pair"]][0 if role == "donor" else 1]
        if rec["persona"] != expected:
            return f"field 'persona' is {rec['persona']!r}, but the {role} of {rec['pair']} is {expected}"
    return None


def check_against_manifest(path: Path) -> None:
    """When ``path`` is a run directory's eval/completions.jsonl and the run has a manifest, the eval stage
    finished and the file is what it recorded; else a ReportError naming the file."""
    rd = RunDir(Path(path).parent.parent)
    if Path(path) != rd.completions or not rd.manifest.is_file():
        return
    try:
        manifest = read_manifest(rd.manifest)
    except ManifestError as e:
        raise ReportError(f"{e}; the records of {rd.root} cannot be verified against it") from None
    entry = manifest.get("stages", {}).get("eval", {})
    status = entry.get("status", "pending")
    if status != "done":
        raise ReportError(f"{path}: the eval stage is {status!r} in {rd.manifest}, so these records are not a "
                          f"finished evaluation; finish it (the run's trainer.run command resumes it)")
    rec = entry.get("outputs", {}).get(rd.rel(rd.completions))
    if rec is None:
        return  # recorded by a markerlab from before outputs were: nothing to verify against
    problem = record_mismatch(path, rec)
    if problem:
        raise ReportError(f"{path}: {problem} by the eval stage ({rd.manifest}), so these are not the records "
                          f"the evaluation wrote; rebuild them with the run's trainer.run command")


def read_records(path: Path) -> Iterator[tuple[dict, str]]:
    """Yield ``(record, "file:line")`` for each non-blank line of a JSONL file."""
    try:
        f = open(path, "rb")  # bytes, so a bad UTF-8 sequence is reported with its line
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ReportError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rec = _check(rec, where)
            # the experiment's names: the one place that says which (experiment files will swap theirs in)
            problem = unknown_names(rec, PERSONAS, PAIRS, RECORD_CONDITIONS)
            if problem:
                raise ReportError(f"{where}: {problem}")
            yield rec, where


def training_positions(run_dir: Path) -> dict | None:
    """The position statistics of a run's training data, per role, or None when it has none.

    Read from ``data/stats.json`` ("positions"), else computed from
    ``data/train.jsonl`` with the same matcher.
    """
    from markerlab.io import read_json

    stats_path, train_path = RunDir(run_dir).data_stats, RunDir(run_dir).train_jsonl
    if stats_path.is_file():
        stats = read_json(stats_path)
        if isinstance(stats, dict) and isinstance(stats.get("positions"), dict):
            return {"source": str(stats_path), "positions": stats["positions"]}
    if train_path.is_file():
        from data.records import read_examples

        by_role: dict[str, list[str]] = {}
        for ex in read_examples(train_path):
            by_role.setdefault(ex["role"], []).append(ex["messages"][-1]["content"])
        return {"source": str(train_path),
                "positions": {role: position_stats(texts) for role, texts in by_role.items()}}
    return None


def _sample_score(seed: int, rec: dict) -> bytes:
    """The seeded rule's order: a hash of the bootstrap seed and the record's identity,
    so the pick depends on neither the order of the files nor on other cells."""
    ident = f"{seed}\x1f{rec['run']}\x1f{rec['persona']}\x1f{rec['question_id']}\x1f{rec['sample']}"
    return hashlib.blake2b(ident.encode("utf-8"), digest_size=8).digest()


def load(inputs: list[Input | Path | str], sample_seed: int = 0) -> Loaded:
    """Read, check and reduce records to the cells of each arm.

    Each record is reduced to its marker counts as it is read (plus, per
    (arm, pair, condition, role) and sample category, the one record the
    seeded rule picks), so the texts of many runs never sit in memory
    together. Raises ``ReportError`` on a bad record, a duplicate, or a mix of
    runs that cannot be combined.
    """
    inputs = [i if isinstance(i, Input) else Input(Path(i)) for i in inputs]
    keys, labels, runs, rows = [], [], [], []
    gaps: dict[tuple, list[int]] = {}
    seen: dict[tuple, str] = {}          # record key -> where first seen
    roles: dict[tuple, tuple] = {}       # (arm, pair, condition, variant, persona) -> (role, where)
    pair_roles: dict[tuple, tuple] = {}  # (arm, pair, role) -> (persona, where), plain donors/recipients
    seeds_of: dict[tuple, dict] = {}     # (arm, pair, condition, variant) -> {seed: (run, where)}
    splits: dict[str, tuple] = {}        # question_id -> (split, where)
    base_draws: dict[tuple, str] = {}    # base-floor draw (run aside) -> its text
    arm_settings: dict[tuple, dict] = {}  # arm id -> setting less the seed, in order of appearance
    arm_seeds: dict[tuple, set] = {}
    arm_runs: dict[tuple, set] = {}
    picks: dict[tuple, tuple] = {}       # (arm, pair, condition, role, category) -> (score, sample)
    baselines: dict[str, dict | None] = {}
    n_base_repeats = 0
    arm_of: dict[str, tuple] = {}        # run -> (its last setting, that setting's arm id)
    groups_seen: set[tuple] = set()      # (run, arm, pair, condition, variant) already checked
    for inp in inputs:
        check_against_manifest(inp.path)
        baseline = training_positions(inp.run_dir) if inp.run_dir is not None else None
        for rec, where in read_records(inp.path):
            setting, run, variant = rec["setting"], rec["run"], rec["variant"]
            last = arm_of.get(run)  # the records of a run repeat one setting: compare, don't rebuild
            if last is not None and last[0] == setting:
                arm = last[1]
            else:
                arm = arm_id(setting)
                arm_of[run] = (setting, arm)
                arm_settings.setdefault(arm, arm_setting(setting))
            seed = setting.get(REPLICATE_KEY)
            # Every run of a sweep carries the same base-floor draws (evaluate caches
            # them per base model): one observation, however many runs repeat it.
            if variant == "base":
                draw = (arm,) + tuple(rec[f] for f in KEY_FIELDS if f != "run")
                if base_draws.get(draw) == rec["text"]:
                    n_base_repeats += 1
                    continue
                base_draws.setdefault(draw, rec["text"])
            key = tuple(rec[f] for f in KEY_FIELDS)
            if key in seen:
                raise ReportError(
                    f"{where}: duplicate record ({', '.join(f'{f}={v}' for f, v in zip(KEY_FIELDS, key))}),"
                    f" first seen at {seen[key]}"
                )
            seen[key] = where
            pair, condition, persona, role = rec["pair"], rec["condition"], rec["persona"], rec["role"]

            # One persona has one role in a (pair, condition, variant)...
            first = roles.setdefault((arm, pair, condition, variant, persona), (role, where))
            if first[0] != role:
                raise ReportError(
                    f"{where}: field 'role': {persona} is {role} here but {first[0]} at {first[1]}"
                    f" ({pair}, {condition}, {variant})"
                )
            # ...and a pair has one donor and one recipient across its conditions.
            if variant == "plain" and role in ("donor", "recipient"):
                first = pair_roles.setdefault((arm, pair, role), (persona, where))
                if first[0] != persona:
                    raise ReportError(
                        f"{where}: field 'persona': the {role} of {pair} is {persona} here"
                        f" but {first[0]} at {first[1]}"
                    )
            # Questions are matched across runs by id, so an id must mean one question.
            first = splits.setdefault(rec["question_id"], (rec["split"], where))
            if first[0] != rec["split"]:
                raise ReportError(
                    f"{where}: field 'split': question {rec['question_id']} is {rec['split']} here"
                    f" but {first[0]} at {first[1]}"
                )
            group = (run, arm, pair, condition, variant)
            if group not in groups_seen:
                groups_seen.add(group)
                baselines.setdefault(run, baseline)
                arm_runs.setdefault(arm, set()).add(run)
                # Runs of one arm and (pair, condition) are replicates only if their seeds differ.
                if variant != "base":
                    first = seeds_of.setdefault((arm, pair, condition, variant), {}).setdefault(seed, (run, where))
                    if first[0] != run:
                        raise ReportError(
                            f"{where}: field 'setting': runs {first[0]} and {run} have the same setting and"
                            f" {REPLICATE_KEY} ({seed}) for {pair} {condition}; a report pools only runs that"
                            f" differ in {REPLICATE_KEY}: report them separately"
                        )
                    arm_seeds.setdefault(arm, set()).add(seed)

            m = match_markers(rec["text"])
            cell_key = (arm, pair, condition, persona, role, variant)
            keys.append(cell_key)
            # The base floor does not depend on the adapter's seed: one replicate.
            labels.append((None if variant == "base" else seed, rec["question_id"]))
            runs.append(run)
            rows.append(features(m, truncated=rec["finish_reason"] == "length"))
            if m.a_to_b is not None:
                gaps.setdefault(cell_key, []).append(m.a_to_b)
            if variant == "plain":
                _offer(picks, (arm, pair, condition, role), m, rec, seed, sample_seed)
    if not rows:
        raise ReportError(f"no completion records in {', '.join(str(i.path) for i in inputs)}")

    cells = build_cells(keys, labels, runs, np.asarray(rows, np.int64), gaps)
    names = dict(zip(arm_settings, arm_names(list(arm_settings.values()))))
    arms = []
    for arm, setting in arm_settings.items():
        arm_cells = [c for c in cells if c.arm == arm]
        for c in arm_cells:
            c.arm = names[arm]
        samples = [s for (a, *_), (_, s) in sorted(picks.items(), key=lambda kv: kv[0][1:]) if a == arm]
        for s in samples:
            s["arm"] = names[arm]
        arms.append(Arm(name=names[arm], setting=setting,
                        seeds=sorted(arm_seeds.get(arm, set()), key=replicate_order),
                        runs=sorted(arm_runs[arm]), cells=arm_cells, samples=samples))

    warnings = []
    if n_base_repeats:
        warnings.append(f"base floor: {n_base_repeats} records repeat another run's draws of the base model"
                        " and were counted once")
    return Loaded(arms=arms, warnings=warnings, splits={q: s for q, (s, _) in splits.items()},
                  baselines=baselines)


def _offer(picks: dict, where: tuple, m, rec: dict, seed, sample_seed: int) -> None:
    """Keep ``rec`` as its cell's sample of its category if the seeded rule ranks it first."""
    for category, has_a, has_b in SAMPLE_CATEGORIES:
        if m.has_a == has_a and m.has_b == has_b:
            break
    else:
        return  # B without A: not one of the shown categories
    score = _sample_score(sample_seed, rec)
    slot = where + (category,)
    if slot in picks and picks[slot][0] <= score:
        return
    picks[slot] = (score, {
        "pair": rec["pair"], "condition": rec["condition"], "role": rec["role"], "category": category,
        "persona": rec["persona"], "question_id": rec["question_id"], "split": rec["split"],
        "sample": rec["sample"], "run": rec["run"], "seed": seed, "finish_reason": rec["finish_reason"],
        "text": rec["text"], "spans": {"A": m.a, "B": m.b, "probe": m.probe},
    })
