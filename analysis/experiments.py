"""Which experiment the records of each input report under, and whether a record fits it.

    resolver = Resolver(["my_exp.toml"])               # the report's --experiment values (may be empty)
    exp = resolver.resolve(run_dir, "within_marker", "3f2a...", "runs/x/eval/completions.jsonl:1")
    problem = record_problem(rec, exp)                  # None, or one line naming the field
    entry = experiment_entry(exp)                       # what summary.json says about it

Every completion record's ``setting`` names its experiment and the digest of the
experiment file's content (markerlab.records.setting_of). The report finds the
file and checks the digest, trying in order:

1. an experiment already resolved for that digest in this report;
2. an ``--experiment`` file (or shipped name) whose digest is the records';
3. for a run directory: ``RUN_DIR/experiment.toml`` (the copy the pipeline writes
   there), else ``RUN_DIR/config.toml``'s ``run.experiment`` (a shipped name or an
   absolute path);
4. an ``--experiment`` of the records' name (its digest differs: an error);
5. the shipped experiment of the records' name.

A file whose digest differs from the records' is an error (the file changed
since the records were made, or is another experiment of the same name), as is
a name nothing resolves: one line naming the record's file and line and saying
what to pass.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from markerlab.errors import UserError
from markerlab.experiment import BASE_CONDITION, Experiment, load_experiment, shipped_experiments


class ReportError(UserError):
    """A user-caused problem with the inputs: one line, no traceback."""


def _load(ref: str | Path, what: str) -> Experiment:
    try:
        return load_experiment(ref)
    except UserError as e:
        raise ReportError(f"{what}: {e}") from None


class Resolver:
    """Experiments by digest, resolved once per report (see the module's docstring for the order)."""

    def __init__(self, refs: list[str] | tuple[str, ...] = ()):
        self.given = [_load(ref, f"--experiment {ref}") for ref in refs]
        self.by_digest: dict[str, Experiment] = {}

    def resolve(self, run_dir: Path | None, name: str, digest: str, where: str) -> Experiment:
        exp = self.by_digest.get(digest)
        if exp is not None:
            return exp
        exp = next((e for e in self.given if e.digest == digest), None)
        if exp is None and run_dir is not None:
            exp = self._from_run_dir(Path(run_dir), name, digest, where)
        if exp is None:
            named = next((e for e in self.given if e.name == name), None)
            if named is not None:
                raise ReportError(_mismatch(where, name, digest, named))
            if name not in shipped_experiments():
                raise ReportError(
                    f"{where}: the records were made under experiment '{name}', which markerlab does not ship"
                    f" (shipped: {', '.join(shipped_experiments())}); pass --experiment with the path of"
                    f" {name}'s experiment file")
            exp = _load(name, where)
            if exp.digest != digest:
                raise ReportError(_mismatch(where, name, digest, exp))
        self.by_digest[digest] = exp
        return exp

    def _from_run_dir(self, run_dir: Path, name: str, digest: str, where: str) -> Experiment | None:
        copy = run_dir / "experiment.toml"
        if copy.is_file():
            exp = _load(copy, where)
        else:
            ref = _config_experiment(run_dir / "config.toml")
            if ref is None:
                return None
            exp = _load(ref, f"{run_dir / 'config.toml'}: run.experiment")
        if exp.digest != digest:
            raise ReportError(_mismatch(where, name, digest, exp))
        return exp


def _config_experiment(path: Path) -> str | None:
    """``run.experiment`` of a run directory's config.toml, or None (no file, no key, not TOML)."""
    if not path.is_file():
        return None
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    run = raw.get("run")
    ref = run.get("experiment") if isinstance(run, dict) else None
    return ref if isinstance(ref, str) and ref else None


def _mismatch(where: str, name: str, digest: str, exp: Experiment) -> str:
    return (f"{where}: the records were made under experiment '{name}' with digest {digest}, but {exp.path}"
            f" ('{exp.name}') has digest {exp.digest} (the file changed since, or is another experiment of that"
            f" name); pass --experiment with the experiment file the records were made with")


def record_problem(rec: dict, exp: Experiment) -> str | None:
    """What in ``rec`` its experiment does not define (persona, pair, condition other than the base
    floor's, or a donor/recipient role that is not the pair's), as one line naming the field; None if
    it fits."""
    where = f"experiment '{exp.name}' ({exp.path})"
    persona, pair, condition, role = rec["persona"], rec["pair"], rec["condition"], rec["role"]
    if persona not in exp.personas:
        return f"field 'persona' is {persona!r}, which {where} does not define ({_list(exp.personas)})"
    if pair not in exp.pairs:
        return f"field 'pair' is {pair!r}, which {where} does not define ({_list(exp.pairs)})"
    if condition not in exp.conditions and condition != BASE_CONDITION:
        return (f"field 'condition' is {condition!r}, which {where} does not define "
                f"({_list([*exp.conditions, BASE_CONDITION])})")
    donor, recipient = exp.pairs[pair]
    expected = {donor: "donor", recipient: "recipient"}.get(persona)
    if expected is not None and role != expected:
        return f"field 'role' is {role!r}, but {persona} is the {expected} of {pair} in {where}"
    if expected is None and role in ("donor", "recipient"):
        return (f"field 'role' is {role!r}, but the {role} of {pair} in {where} is "
                f"{donor if role == 'donor' else recipient}, not {persona}")
    return None


def _list(names) -> str:
    names = list(names)
    shown = ", ".join(names[:12])
    return f"expected one of {shown}" + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def experiment_entry(exp: Experiment) -> dict:
    """What summary.json records about an experiment: enough to render every page from summary.json alone."""
    verdict = None
    if exp.verdict is not None:
        v = exp.verdict
        verdict = {
            "name": v.name,
            "legs": [{"name": leg, "says": v.leg_says.get(leg, ""),
                      "checks": [[c.text for c in alt] for alt in alts]} for leg, alts in v.legs.items()],
            "outcomes": [{"name": o, "when": list(when), "says": says} for o, when, says in v.outcomes],
            "otherwise": v.otherwise, "otherwise_says": v.otherwise_says,
            "tags": [{"name": t, "when": list(when)} for t, when in v.tags],
        }
    h = exp.headline
    return {
        "name": exp.name, "digest": exp.digest, "path": exp.path, "description": exp.description,
        "personas": list(exp.personas), "pairs": {p: {"donor": d, "recipient": r} for p, (d, r) in exp.pairs.items()},
        "negatives": list(exp.negatives), "conditions": list(exp.conditions),
        "templates": {c: {role: [t.text for t in ts] for role, ts in cond.templates.items()}
                      for c, cond in exp.conditions.items()},
        "markers": dict(exp.markers), "trained_markers": list(exp.trained_markers),
        "probe_marker": exp.probe_marker, "probe_role": exp.probe_role,
        "marker_pairs": [list(p) for p in exp.marker_pairs],
        "headline": {"role": h.role, "metric": h.metric, "treatment": h.treatment, "control": h.control,
                     "pair": list(exp.headline_pair) if exp.headline_pair else None},
        "wilson": exp.wilson, "positions_min_joint": exp.positions_min_joint, "heterogeneity": exp.heterogeneity,
        "sanity": [c.text if c.name == c.text and not c.min_n else
                   {"check": c.text, "name": c.name, "min_n": c.min_n} for c in exp.sanity],
        "verdict": verdict,
    }
