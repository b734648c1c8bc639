"""The completion record of docs/contracts.md, shared by the writer (evaluate) and the reader (analysis).

    from markerlab.records import COMPLETION_SCHEMA, record_problems, setting_of
    rec["setting"] = setting_of(cfg)          # the adapter's settings (SETTING_KEYS) and its experiment
    record_problems(rec)                      # [] when valid, else one-line messages
    record_problems(rec, exact=True)          # the writer's check: no field beyond the schema either

One schema and one validator, so the two sides of the contract cannot drift apart.
"""

from __future__ import annotations

from functools import lru_cache

from .experiment import EXPERIMENT_KEYS, FINISH_REASONS, ROLES, SETTING_KEYS, SPLITS, VARIANTS

# field -> allowed values (a tuple) or the Python type it must have. Pair, condition and persona are
# the experiment's names: the reader checks them against the experiment the records name.
COMPLETION_SCHEMA: dict[str, tuple | type] = {
    "run": str, "pair": str, "condition": str, "persona": str, "role": ROLES,
    "question_id": str, "split": SPLITS, "sample": int, "variant": VARIANTS,
    "text": str, "finish_reason": FINISH_REASONS, "n_tokens": int,
    "setting": dict,
}

# What a record without a setting means: it predates settings-as-data, and its
# arm (loss mask, lr, ...) cannot be known, so pooling it with anything is unsafe.
OLD_RECORD = "missing field 'setting': written by an older markerlab; re-run eval"


def setting_of(cfg) -> dict:
    """The adapter's settings a sweep can vary, as the completion record's ``setting`` object.

    Keys are those of ``SETTING_KEYS`` (record key -> dotted config key), each value
    read off the config by its dotted key (a table, such as train.role_loss_mask, as
    one "key=value,..." string), then EXPERIMENT_KEYS: the experiment's name and digest.
    """
    out = {}
    for key, dotted in SETTING_KEYS.items():
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
        out[key] = value
    out["experiment"] = cfg.experiment.name
    out["experiment_digest"] = cfg.experiment.digest
    return out


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def record_problems(rec: object, exact: bool = False) -> list[str]:
    """Problems of one completion record, each a one-line message naming the field.

    ``exact``: fields beyond the schema are problems too (the writer knows the
    schema exactly; a reader accepts fields a newer writer added).
    """
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    problems = []
    for field, rule in COMPLETION_SCHEMA.items():
        if field not in rec:
            problems.append(OLD_RECORD if field == "setting" else f"missing field '{field}'")
            continue
        value = rec[field]
        if isinstance(rule, tuple):
            if value not in rule:
                problems.append(f"field '{field}' is {value!r}, expected one of {'|'.join(rule)}")
        elif rule is int:
            # bool is an int subclass in Python; true/false is not a sample index.
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"field '{field}' is {value!r}, expected an integer")
            elif value < 0:
                problems.append(f"field '{field}' is {value}, expected >= 0")
        elif rule is dict:
            problems += _setting_problems(value)
        elif not isinstance(value, str):
            problems.append(f"field '{field}' is {value!r}, expected a string")
        elif field != "text" and not value:
            problems.append(f"field '{field}' is empty")
    if exact:
        extra = sorted(set(rec) - set(COMPLETION_SCHEMA))
        if extra:
            problems.append(f"unexpected field(s) {', '.join(extra)}")
    return problems


_SCALAR_TYPES = (str, int, float, bool, type(None))
_SETTING_KEYS = frozenset(SETTING_KEYS) | frozenset(EXPERIMENT_KEYS)


def _setting_problems(setting: object) -> list[str]:
    if not isinstance(setting, dict):
        return [f"field 'setting' is {setting!r}, expected an object of the adapter's settings"]
    try:
        # Every record of a run repeats one setting: check each distinct one once.
        return list(_items_problems(tuple(setting.items())))
    except TypeError:  # an unhashable value (a list): not a valid setting either
        return _setting_details(setting)


@lru_cache(maxsize=1024)
def _items_problems(items: tuple) -> tuple[str, ...]:
    setting = dict(items)
    if _SETTING_KEYS <= setting.keys() and all(type(v) in _SCALAR_TYPES for v in setting.values()):
        return ()
    return tuple(_setting_details(setting))


def _setting_details(setting: dict) -> list[str]:
    keys = [*SETTING_KEYS, *EXPERIMENT_KEYS]
    problems = [f"field 'setting' has no '{key}' (expected the keys {', '.join(keys)})"
                + ("; written by an older markerlab: re-run eval" if key in EXPERIMENT_KEYS else "")
                for key in keys if key not in setting]
    problems += [f"field 'setting.{key}' is {value!r}, expected a string, number, boolean or null"
                 for key, value in setting.items() if not _scalar(value)]
    return problems
