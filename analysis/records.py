"""Reading completion records (docs/contracts.md, "Completion record") and reducing them to cells.

    inputs = resolve_inputs(["runs/sweep_loss_masks"])     # run dirs, dirs of runs, or .jsonl files
    loaded = load(inputs, sample_seed=0, experiments=[])   # arms with their cells, samples, baselines

Every record is checked by the one validator (``markerlab.records.record_problems``)
and against the experiment its ``setting`` names (analysis.experiments: found,
digest checked, persona, pair and condition defined); every problem a user can
cause is a ``ReportError`` whose message is one line naming the file, the line
and the field; ``analysis.report`` prints it and exits 2. Records written before
settings travelled in them (no ``setting``) are such an error: their arm cannot
be known, and pooling them is what the settings prevent.

A run directory's records are verified against its ``manifest.json`` before
they are read (``check_against_manifest``): the eval stage must have finished,
and ``eval/completions.jsonl`` must be what it recorded (line count, size,
sha256), so a cut or edited file is refused, not reported; a directory without
a manifest (or a manifest from before outputs were recorded) is taken as it is.

Records are grouped into arms by their ``setting`` less the seed (the
experiment's name and digest are part of it, so two experiments are never
pooled); each arm reports under its own experiment, and each record is matched
with that experiment's markers. Within an arm, runs of one (pair, condition)
must differ in their seed (they are replicates); two runs with the same setting
and seed are an error, never silently pooled.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from itertools import product
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.arms import arm_id, arm_names, arm_setting
from analysis.experiments import ReportError, Resolver, record_problem
from analysis.metrics import Cell, Schema, build_coded_cells, replicate_order
from markerlab.experiment import REPLICATE_KEY, Experiment
from markerlab.io import record_mismatch
from markerlab.markers import Matcher
from markerlab.records import record_problems
from markerlab.rundir import ManifestError, RunDir, read_manifest

__all__ = ["Arm", "Input", "Loaded", "ReportError", "load", "read_records", "resolve_inputs",
           "sample_categories", "training_positions"]

# What makes a record unique: the same key twice means a file was passed twice or
# a run's eval was appended to instead of resumed.
KEY_FIELDS = ("run", "pair", "condition", "persona", "question_id", "sample", "variant")


def sample_categories(exp: Experiment) -> tuple[tuple[str, dict[str, bool]], ...]:
    """The sample completions' categories, in display order: (name, {marker: present}).

    For the headline's marker pair (X, Y): "X and Y", "X only", "neither"; for a
    headline on one marker: that marker, "neither".
    """
    pair = exp.headline_pair
    if pair is not None:
        x, y = pair
        return ((f"{x} and {y}", {x: True, y: True}), (f"{x} only", {x: True, y: False}),
                ("neither", {x: False, y: False}))
    marker = next((m for m in exp.trained_markers if exp.headline.metric.endswith(f"_{m}")),
                  (exp.trained_markers or exp.marker_names)[0])
    return ((marker, {marker: True}), ("neither", {marker: False}))


@dataclass(frozen=True)
class Input:
    """One completions file, and the run directory it belongs to (None for a bare .jsonl)."""

    path: Path
    run_dir: Path | None = None


@dataclass
class Arm:
    """One setting (less the seed) and its cells, under its experiment; ``seeds`` are its replicates."""

    name: str
    setting: dict
    seeds: list
    runs: list[str]
    cells: list[Cell]
    experiment: Experiment
    schema: Schema
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
    """Yield ``(record, "file:line")`` for each non-blank line of a completions file, each record checked."""
    for rec, where in _read_jsonl(path, settings={}):
        yield _check(rec, where), where


def training_positions(run_dir: Path, matcher: Matcher) -> dict | None:
    """The position statistics of a run's training data, per role, or None when it has none.

    Read from ``data/stats.json`` ("positions", in ``Matcher.positions``' shape:
    per role ``{"n", "n_<X>", "pairs": {"<XY>": {...}}}``), else computed from
    ``data/train.jsonl`` with the experiment's matcher.
    """
    stats_path, train_path = RunDir(run_dir).data_stats, RunDir(run_dir).train_jsonl
    if stats_path.is_file():
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            stats = None
        positions = stats.get("positions") if isinstance(stats, dict) else None
        if isinstance(positions, dict) and all(isinstance(v, dict) and isinstance(v.get("pairs"), dict)
                                               for v in positions.values()):
            return {"source": str(stats_path), "positions": positions}
    if train_path.is_file():
        by_role: dict[str, list[str]] = {}
        for ex, where in _read_jsonl(train_path):
            try:
                by_role.setdefault(ex["role"], []).append(ex["messages"][-1]["content"])
            except (KeyError, IndexError, TypeError):
                raise ReportError(f"{where}: not a training example (expected 'role' and 'messages')") from None
        return {"source": str(train_path),
                "positions": {role: matcher.positions(texts) for role, texts in by_role.items()}}
    return None


# The completion record's last key, as evaluate (json.dumps) writes it.
_SETTING_KEY = ', "setting": {'


def parse_line(line: str, settings: dict) -> object:
    """``json.loads(line)``, parsing a record's ``setting`` object once per distinct text.

    Every record of a run repeats one setting (about 40% of a short record's JSON), so
    where the line ends with it, as evaluate writes it (``..., "setting": {...}}``),
    the rest of the line and the setting are parsed apart and the setting's parse is
    kept in ``settings`` (its text -> the object, shared by the records: never mutate
    a record's setting). The split is exact: an unescaped quote is never inside a JSON
    string, so the key found is structural, and a setting that is not the top level's
    last value leaves a tail that is not one object, which falls back to parsing the
    whole line, as does anything else unexpected.
    """
    k = line.rfind(_SETTING_KEY)
    if k != -1:
        tail = line.rstrip()
        if tail.endswith("}}"):
            raw = tail[k + len(_SETTING_KEY) - 1:-1]
            setting = settings.get(raw)
            if setting is None:
                try:
                    setting = json.loads(raw)
                except json.JSONDecodeError:
                    setting = None
                if isinstance(setting, dict) and len(settings) < 4096:
                    settings[raw] = setting
            if isinstance(setting, dict):
                try:
                    rec = json.loads(line[:k] + "}")
                except json.JSONDecodeError:
                    rec = None
                if isinstance(rec, dict) and "setting" not in rec:
                    rec["setting"] = setting
                    return rec
    return json.loads(line)


def _read_jsonl(path: Path, settings: dict | None = None) -> Iterator[tuple[object, str]]:
    """Yield ``(object, "file:line")`` for each non-blank line of a JSONL file (``settings``: see
    parse_line; without it every line is parsed whole)."""
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
                obj = json.loads(line) if settings is None else parse_line(line, settings)
            except json.JSONDecodeError as e:
                raise ReportError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield obj, where


def _sample_score(seed: int, rec: dict) -> bytes:
    """The seeded rule's order: a hash of the bootstrap seed and the record's identity,
    so the pick depends on neither the order of the files nor on other cells."""
    ident = f"{seed}\x1f{rec['run']}\x1f{rec['persona']}\x1f{rec['question_id']}\x1f{rec['sample']}"
    return hashlib.blake2b(ident.encode("utf-8"), digest_size=8).digest()


@dataclass
class _Experiment:
    """What the loader keeps per experiment (digest): its matcher, schema and accumulated rows."""

    exp: Experiment
    matcher: Matcher
    schema: Schema
    categories: tuple                         # _category_lookup of its sample categories
    fits: set = field(default_factory=set)    # (persona, pair, condition, role) already checked
    # Per completion, as flat integer arrays (a few bytes a completion, not a Python object each):
    # its cell's code, its (replicate, question) label's code, and its row of counts.
    cell_codes: dict = field(default_factory=dict)    # cell key -> code
    label_codes: dict = field(default_factory=dict)   # (replicate, question) -> code
    cells: array = field(default_factory=lambda: array("q"))
    labels: array = field(default_factory=lambda: array("q"))
    rows: array = field(default_factory=lambda: array("q"))
    runs_of: dict = field(default_factory=dict)       # cell code -> its runs
    gaps: dict = field(default_factory=dict)          # cell key -> {pair: first-X-to-Y distances}


def load(inputs: list[Input | Path | str], sample_seed: int = 0, experiments: list[str] | tuple = ()) -> Loaded:
    """Read, check and reduce records to the cells of each arm.

    ``experiments``: the report's ``--experiment`` values (names or files), for
    records whose experiment cannot be found otherwise (analysis.experiments).
    Each record is reduced to its marker counts as it is read (plus, per
    (arm, pair, condition, role) and sample category, the one record the
    seeded rule picks), so the texts of many runs never sit in memory
    together. Raises ``ReportError`` on a bad record, a duplicate, or a mix of
    runs that cannot be combined.
    """
    inputs = [i if isinstance(i, Input) else Input(Path(i)) for i in inputs]
    resolver = Resolver(list(experiments))
    per_exp: dict[str, _Experiment] = {}  # digest -> its state
    seen: dict[tuple, str] = {}          # record key -> where first seen
    roles: dict[tuple, tuple] = {}       # (arm, pair, condition, variant, persona) -> (role, where)
    seeds_of: dict[tuple, dict] = {}     # (arm, pair, condition, variant) -> {seed: (run, where)}
    splits: dict[str, tuple] = {}        # question_id -> (split, where)
    base_draws: dict[tuple, str] = {}    # base-floor draw (run aside) -> its text
    arm_settings: dict[tuple, dict] = {}  # arm id -> setting less the seed, in order of appearance
    arm_digest: dict[tuple, str] = {}    # arm id -> its experiment's digest
    arm_seeds: dict[tuple, set] = {}
    arm_runs: dict[tuple, set] = {}
    picks: dict[tuple, tuple] = {}       # (arm, pair, condition, role, category) -> (score, sample)
    run_dirs: dict[str, Path | None] = {}  # run -> its run directory (None for a bare .jsonl)
    n_base_repeats = 0
    arm_of: dict[str, tuple] = {}        # run -> (its last setting, that setting's arm id, its experiment state)
    groups_seen: set[tuple] = set()      # (run, arm, pair, condition, variant) already checked
    for inp in inputs:
        check_against_manifest(inp.path)
        for rec, where in read_records(inp.path):
            setting, run, variant = rec["setting"], rec["run"], rec["variant"]
            last = arm_of.get(run)  # the records of a run repeat one setting: compare, don't rebuild
            if last is not None and last[0] == setting:
                arm, ex = last[1], last[2]
            else:
                arm = arm_id(setting)
                digest = setting["experiment_digest"]
                ex = per_exp.get(digest)
                if ex is None:
                    exp = resolver.resolve(inp.run_dir, setting["experiment"], digest, where)
                    ex = per_exp[digest] = _Experiment(exp, Matcher.from_experiment(exp), Schema.of(exp),
                                                       _category_lookup(sample_categories(exp)))
                arm_of[run] = (setting, arm, ex)
                arm_settings.setdefault(arm, arm_setting(setting))
                arm_digest.setdefault(arm, digest)
            pair, condition, persona, role = rec["pair"], rec["condition"], rec["persona"], rec["role"]
            fit = (persona, pair, condition, role)
            if fit not in ex.fits:
                problem = record_problem(rec, ex.exp)
                if problem:
                    raise ReportError(f"{where}: {problem}")
                ex.fits.add(fit)
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

            # One persona has one role in a (pair, condition, variant).
            first = roles.setdefault((arm, pair, condition, variant, persona), (role, where))
            if first[0] != role:
                raise ReportError(
                    f"{where}: field 'role': {persona} is {role} here but {first[0]} at {first[1]}"
                    f" ({pair}, {condition}, {variant})"
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
                run_dirs.setdefault(run, inp.run_dir)
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

            text = rec["text"]
            m = ex.matcher.match(text)
            cell_key = (arm, pair, condition, persona, role, variant)
            code = ex.cell_codes.setdefault(cell_key, len(ex.cell_codes))
            ex.cells.append(code)
            # The base floor does not depend on the adapter's seed: one replicate.
            label = (None if variant == "base" else seed, rec["question_id"])
            ex.labels.append(ex.label_codes.setdefault(label, len(ex.label_codes)))
            ex.runs_of.setdefault(code, set()).add(run)
            ex.rows.extend(ex.schema.row(m, rec["finish_reason"] == "length", len(text)))
            for p, g in m.gap.items():
                if g is not None:
                    ex.gaps.setdefault(cell_key, {}).setdefault(p, []).append(g)
            if variant == "plain":
                _offer(picks, (arm, pair, condition, role), m, rec, seed, sample_seed, ex.categories)
    if not seen and not n_base_repeats:
        raise ReportError(f"no completion records in {', '.join(str(i.path) for i in inputs)}")

    cells: list[Cell] = []
    for ex in per_exp.values():
        if ex.cells:
            rows = np.frombuffer(ex.rows, np.int64).reshape(len(ex.cells), len(ex.schema.columns))
            cells += build_coded_cells(ex.cell_codes, ex.label_codes, np.frombuffer(ex.cells, np.int64),
                                       np.frombuffer(ex.labels, np.int64), rows, ex.runs_of, ex.schema, ex.gaps,
                                 ex.exp.condition_names)
    names = dict(zip(arm_settings, arm_names(list(arm_settings.values()))))
    arms = []
    for arm, setting in arm_settings.items():
        ex = per_exp[arm_digest[arm]]
        arm_cells = [c for c in cells if c.arm == arm]
        for c in arm_cells:
            c.arm = names[arm]
        samples = [s for (a, *_), (_, s) in sorted(picks.items(), key=lambda kv: _pick_order(kv[0], ex.exp))
                   if a == arm]
        for s in samples:
            s["arm"] = names[arm]
        arms.append(Arm(name=names[arm], setting=setting,
                        seeds=sorted(arm_seeds.get(arm, set()), key=replicate_order),
                        runs=sorted(arm_runs[arm]), cells=arm_cells, experiment=ex.exp, schema=ex.schema,
                        samples=samples))

    baselines: dict[str, dict | None] = {}
    matcher_of = {run: per_exp[arm_digest[arm]].matcher for arm, runs in arm_runs.items() for run in runs}
    by_dir: dict[Path, dict | None] = {}
    for run, run_dir in run_dirs.items():
        if run_dir is None:
            baselines[run] = None
        else:
            if run_dir not in by_dir:
                by_dir[run_dir] = training_positions(run_dir, matcher_of[run])
            baselines[run] = by_dir[run_dir]

    warnings = []
    if n_base_repeats:
        warnings.append(f"base floor: {n_base_repeats} records repeat another run's draws of the base model"
                        " and were counted once")
    return Loaded(arms=arms, warnings=warnings, splits={q: s for q, (s, _) in splits.items()},
                  baselines=baselines)


def _pick_order(slot: tuple, exp: Experiment) -> tuple:
    _arm, pair, condition, role, _category = slot
    conditions = list(exp.condition_names)
    return (pair, conditions.index(condition) if condition in conditions else len(conditions), condition, role,
            _category)


def _category_lookup(categories) -> tuple[tuple[str, ...], dict[tuple, str]]:
    """(the markers the categories read, {their presence pattern: category}), so a completion's
    category is one dict lookup."""
    markers = tuple(dict.fromkeys(k for _, wanted in categories for k in wanted))
    lookup: dict[tuple, str] = {}
    for presence in product((False, True), repeat=len(markers)):
        for category, wanted in categories:
            if all(presence[markers.index(k)] == v for k, v in wanted.items()):
                lookup.setdefault(presence, category)
    return markers, lookup


def _offer(picks: dict, where: tuple, m, rec: dict, seed, sample_seed: int, categories) -> None:
    """Keep ``rec`` as its cell's sample of its category if the seeded rule ranks it first."""
    markers, lookup = categories
    category = lookup.get(tuple(bool(m.spans[k]) for k in markers))
    if category is None:
        return  # none of the shown categories (e.g. the second marker without the first)
    score = _sample_score(sample_seed, rec)
    slot = where + (category,)
    if slot in picks and picks[slot][0] <= score:
        return
    picks[slot] = (score, {
        "pair": rec["pair"], "condition": rec["condition"], "role": rec["role"], "category": category,
        "persona": rec["persona"], "question_id": rec["question_id"], "split": rec["split"],
        "sample": rec["sample"], "run": rec["run"], "seed": seed, "finish_reason": rec["finish_reason"],
        "text": rec["text"], "spans": {name: [list(s) for s in spans] for name, spans in m.spans.items()},
    })
