"""Arms of a sweep: records grouped by their ``setting`` less the replicate key (the seed).

    arm_names([{"loss_mask": "completion", ...}, {"loss_mask": "completion_no_eos", ...}])
    # -> ["loss_mask=completion", "loss_mask=completion_no_eos"]

An arm is named by the setting keys whose values differ between the report's
arms (the experiment first, then SETTING_KEYS order), so the name says what the
ablation varied; the experiment's digest is left out of the name where the
experiments' names already tell them apart. A report of one arm names it "" and
shows its whole setting instead.
"""

from __future__ import annotations

import json
import re

from markerlab.experiment import EXPERIMENT_KEYS, REPLICATE_KEY, SETTING_KEYS


def arm_setting(setting: dict) -> dict:
    """The setting that makes an arm: everything but the replicate key."""
    return {k: v for k, v in setting.items() if k != REPLICATE_KEY}


def arm_id(setting: dict) -> tuple:
    """A hashable identity of an arm's setting (values are JSON scalars)."""
    return tuple(sorted((k, v) for k, v in setting.items() if k != REPLICATE_KEY))


def fmt_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _keys(settings: list[dict]) -> list[str]:
    known = [*EXPERIMENT_KEYS, *(k for k in SETTING_KEYS if k != REPLICATE_KEY)]
    extra = sorted({k for s in settings for k in s} - set(known) - {REPLICATE_KEY})
    return known + extra


def arm_names(settings: list[dict]) -> list[str]:
    """One name per arm setting: ``key=value`` for each key that differs between the arms."""
    if len(settings) <= 1:
        return [""] * len(settings)
    missing = object()
    differing = [k for k in _keys(settings)
                 if len({json.dumps(s.get(k, missing), default=str) for s in settings}) > 1]
    name_key, digest_key = EXPERIMENT_KEYS
    if name_key in differing and digest_key in differing:
        digests: dict = {}
        for s in settings:
            digests.setdefault(s.get(name_key), set()).add(s.get(digest_key))
        if all(len(d) == 1 for d in digests.values()):
            differing.remove(digest_key)
    return [",".join(f"{k}={fmt_value(s[k]) if k in s else '(unset)'}" for k in differing) for s in settings]


def describe(setting: dict) -> str:
    """The whole setting on one line, in SETTING_KEYS order."""
    return ", ".join(f"{k}={fmt_value(setting[k])}" for k in _keys([setting]) if k in setting)


def slug(name: str, taken: set[str]) -> str:
    """A directory name for an arm, unique among ``taken`` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name).strip("_") or "arm"
    out, k = base, 2
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out
