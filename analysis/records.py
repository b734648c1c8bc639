"""Reading completion records (CONTRACTS.md, "Completion record") and checking them.

Every problem a user can cause is a ``ReportError`` whose message is one line
naming the file, the line and the field; ``analysis.report`` prints it and exits 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from analysis.metrics import Cell, build_cells, features
from markerlab.errors import UserError
from markerlab.records import COMPLETION_SCHEMA

# field -> allowed values (a tuple) or the Python type it must have (CONTRACTS.md).
SCHEMA = COMPLETION_SCHEMA

# What makes a record unique: the same key twice means a file was passed twice or
# a run's eval was appended to instead of resumed.
KEY_FIELDS = ("run", "pair", "condition", "persona", "question_id", "sample", "variant")


class ReportError(UserError):
    """A user-caused problem with the inputs: one line, no traceback."""


def resolve_inputs(args: list[str]) -> list[Path]:
    """Map the command-line inputs to JSONL files.

    A ``.jsonl`` file is taken as is; a run directory contributes
    ``eval/completions.jsonl``; a directory of run directories (``runs/``)
    contributes each of its runs, in name order.
    """
    files: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_file():
            files.append(path)
        elif (path / "eval" / "completions.jsonl").is_file():
            files.append(path / "eval" / "completions.jsonl")
        elif path.is_dir():
            found = sorted(path.glob("*/eval/completions.jsonl"))
            if not found:
                raise ReportError(
                    f"{arg}: no eval/completions.jsonl here or in its subdirectories "
                    "(expected a run directory, a directory of runs, or a .jsonl file)"
                )
            files.extend(found)
        else:
            raise ReportError(f"{arg}: no such file or directory")
    return files


def _check(rec: object, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for field, rule in SCHEMA.items():
        if field not in rec:
            raise ReportError(f"{where}: missing field '{field}'")
        value = rec[field]
        if isinstance(rule, tuple):
            if value not in rule:
                raise ReportError(
                    f"{where}: field '{field}' is {value!r}, expected one of {'|'.join(rule)}"
                )
        elif rule is int:
            # bool is an int subclass in Python; true/false is not a sample index.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ReportError(f"{where}: field '{field}' is {value!r}, expected an integer")
            if value < 0:
                raise ReportError(f"{where}: field '{field}' is {value}, expected >= 0")
        elif not isinstance(value, str):
            raise ReportError(f"{where}: field '{field}' is {value!r}, expected a string")
        elif field != "text" and not value:
            raise ReportError(f"{where}: field '{field}' is empty")
    return rec


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
            yield _check(rec, where), where


def load(paths: list[Path]) -> tuple[list[Cell], list[str]]:
    """Read, check and reduce records to cells; returns ``(cells, warnings)``.

    Each record is reduced to its marker counts as it is read, so the texts of
    many runs never sit in memory together. Raises ``ReportError`` on a bad
    record, a duplicate, or a mix of runs that cannot be combined.
    """
    keys, qids, runs, rows = [], [], [], []
    seen: dict[tuple, str] = {}         # record key -> where first seen
    roles: dict[tuple, tuple] = {}      # (pair, condition, variant, persona) -> (role, where)
    pair_roles: dict[tuple, tuple] = {}  # (pair, role) -> (persona, where), plain donors/recipients
    runs_of: dict[tuple, set] = {}      # (pair, condition, variant) -> runs
    splits: dict[str, tuple] = {}       # question_id -> (split, where)
    base_draws: dict[tuple, str] = {}   # base-floor draw (run aside) -> its text
    n_base_repeats = 0
    for path in paths:
        for rec, where in read_records(path):
            # Every run of a sweep carries the same base-floor draws (evaluate caches
            # them per base model): one observation, however many runs repeat it.
            if rec["variant"] == "base":
                draw = tuple(rec[f] for f in KEY_FIELDS if f != "run")
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
            pair, condition, persona, role, variant = (
                rec["pair"], rec["condition"], rec["persona"], rec["role"], rec["variant"])

            # One persona has one role in a (pair, condition, variant)...
            role_key = (pair, condition, variant, persona)
            first = roles.setdefault(role_key, (role, where))
            if first[0] != role:
                raise ReportError(
                    f"{where}: field 'role': {persona} is {role} here but {first[0]} at {first[1]}"
                    f" ({pair}, {condition}, {variant})"
                )
            # ...and a pair has one donor and one recipient across its conditions.
            if variant == "plain" and role in ("donor", "recipient"):
                first = pair_roles.setdefault((pair, role), (persona, where))
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
            runs_of.setdefault((pair, condition, variant), set()).add(rec["run"])

            keys.append((pair, condition, persona, role, variant))
            qids.append(rec["question_id"])
            runs.append(rec["run"])
            rows.append(features(rec["text"], truncated=rec["finish_reason"] == "length"))
    if not rows:
        raise ReportError(f"no completion records in {', '.join(map(str, paths))}")

    warnings = [
        f"{pair} {condition} {variant}: pooling {len(r)} runs ({', '.join(sorted(r))}) as"
        " replicates; pass them to separate reports to keep them apart"
        for (pair, condition, variant), r in sorted(runs_of.items()) if len(r) > 1
    ]
    if n_base_repeats:
        warnings.append(f"base floor: {n_base_repeats} records repeat another run's draws of the base model"
                        " and were counted once")
    return build_cells(keys, qids, runs, np.asarray(rows, np.int64)), warnings
