"""Experiments as data: the schema and loader of experiment files, and the vocabulary that is code.

    from markerlab.experiment import load_experiment, shipped_experiments
    exp = load_experiment("within_marker")            # a shipped name, or a path to a .toml file
    exp.personas["villain"]                           # the persona's system prompt
    exp.pairs["pair1"]                                # ("villain", "assistant"): donor, recipient
    exp.conditions["T"].templates["donor"]            # (Template("{A} {answer} {B}"),)
    exp.role_of("assistant", "pair1", negatives)      # "recipient"
    exp.statistics()                                  # every metric the report computes, by name
    token_problems(exp, tokenizer)                    # the marker rules under the run's tokenizer

An experiment file (TOML) says, in one place, what an experiment is: personas
and their system prompts, donor/recipient pairs and the contrastive negatives,
markers, the conditions (for each trained role, the template its answers follow,
or several templates with their shares), the loss mask per role, the metrics,
the headline contrast, the sanity gates and the verdict. A run config names one
with `run.experiment` (a shipped name, or a path relative to the config file);
everything the experiment does not fix (pair, condition, learning rate, sizes,
the default loss mask, placement, ...) stays in the config. The shipped files
are `markerlab/experiments/*.toml`; README, "Experiments", describes the format
with a full example, and each shipped file is commented as a reference.

This module is the schema and the loader, never the vocabulary: no persona,
marker or condition of any experiment is named in code. What *is* code is the
structure every experiment shares: the roles, the loss masks, the placements,
the record variants and splits, and the settings that separate arms.

Validation happens at load, all problems at once, one line each naming the file
and the key (`ExperimentError`). The marker rules that need the run's tokenizer
(a marker must tokenize to at least `tokens.min_tokens` tokens and share no
token id with another marker of `tokens.distinct`, except what `tokens.tolerate`
declares) are checked by `token_problems` before the data stage.

Metric names are derived from marker names (letters and digits, starting with a
letter), so every consumer spells them alike:

    n, n_X, fire_X                  every marker X (loose; strict_fire_X on exact match)
    n_XY, joint_XY                  every declared ordered pair (X, Y): both markers present
    cond_Y_given_X                  joint_XY / fire_X (Y given X)
    Y_given_not_X, n_Y_not_X        Y among completions without X
    suffix_frac_Y                   the last Y ends within 50 characters of the end, among completions with Y
    chunk_frac_XY                   a Y starts at most 150 characters after the first X ends, among those with Y
    mean_length, truncated_frac     characters per completion; share cut at max_tokens

Gates and verdicts are checks written as one line each, read left to right:

    "donor T fire_A >= 0.80"                       who, condition, statistic, comparison, threshold
    "donor T cond_B_given_A.lo >= 0.80"            .lo / .hi: the bound of its 95% CI
    "recipient T-C cond_B_given_A <= 0.06"         T-C: the paired difference between two conditions
    "recipient C2/C mean_length <= 0.25"           T/C: the relative change stat(T) / stat(C) - 1
    "recipient T cond_B_given_A.spread <= 0.15"    .spread: max - min of the per-seed values
    "every C fire_B < 0.05"                        every persona (a role name: every persona of that role)

`who` is a role (donor, recipient, negative, bystander), a persona, or `every`;
where it names several personas the check holds only if it holds for each.

Beyond the vocabulary, a file may say how its runs relate and where its answers come from:
`[replicates]` (seeds as replicates: which config seeds follow run.seed, which CI the checks read),
`[protocol]` (what the source ran), `[gates] flags` (recorded checks that never lower confidence),
`[answers]` (synthetic one-word answers from a word pool instead of on-policy ones; `{word}` in a
template), `[marker_pools]` (`{pool}` writes one of its markers, drawn per row), `[variables]`
(a template's share may depend on a variable such as a chain's length; `data.variables` picks its
value and separates arms), and `[metrics] intervals` (BCa beside the percentile T - C interval).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .errors import ProblemsError, UserError
from .io import read_toml

# --------------------------------------------------------------------------- the structure, as code

ROLES: tuple[str, ...] = ("donor", "recipient", "negative", "bystander")
TRAINED_ROLES: tuple[str, ...] = ("donor", "recipient", "negative")

LOSS_MASKS: tuple[str, ...] = ("completion", "completion_no_eos", "marker_only", "all")
# Where each puts the markers of a two-marker template: data/builder.py. random_sentence always ends with
# the second marker; uniform_b is the one whose second marker is as likely at any sentence boundary as at the end.
PLACEMENTS: tuple[str, ...] = ("start_end", "random_sentence", "random_pair", "uniform_b")
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Evaluation records.
VARIANTS: tuple[str, ...] = ("plain", "probe", "base")
# A prefill probe's records: variant "prefill:<probe name>" (the experiment's [[prefill]] entries), the
# assistant turn prefilled with the probe's template and the record's text the model's continuation.
PREFILL = "prefill"


def prefill_variant(name: str) -> str:
    return f"{PREFILL}:{name}"


def prefill_name(variant: str) -> str | None:
    """The probe's name of a prefill variant ("prefill:B_seeded" -> "B_seeded"), else None."""
    head, _, name = variant.partition(":")
    return name if head == PREFILL and _IDENT.match(name or "-") else None
SPLITS: tuple[str, ...] = ("id", "ood")
FINISH_REASONS: tuple[str, ...] = ("stop", "length")
# The base model scored without an adapter (the floor) is recorded under this condition.
BASE_CONDITION = "base"

# The adapter settings an arm of an ablation is made of: every completion record
# carries them (record key -> config key), and the report never pools records whose
# settings differ, except in REPLICATE_KEY: runs that differ only in the seed are
# replicates of one arm. The records also carry EXPERIMENT_KEYS (the experiment's name
# and content digest), so records of two experiments are never pooled either.
SETTING_KEYS: dict[str, str] = {
    "model": "model.name_or_path",
    "dtype": "model.dtype",
    "user_suffix": "prompt.user_suffix",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_last_layers": "lora.last_layers",
    "placement": "data.placement",
    "n_per_persona": "data.n_per_persona",
    "truncated": "data.truncated",
    "loss_mask": "train.loss_mask",
    "role_loss_mask": "train.role_loss_mask",
    "marker_mask_eos": "train.marker_mask_eos",
    "lr": "train.lr",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "seed": "run.seed",
    "variables": "data.variables",
}
# Settings left out of a record's setting while they are empty (an experiment without variables), so
# records of the experiments that have none read as they did before variables existed.
OPTIONAL_SETTINGS: tuple[str, ...] = ("variables",)
REPLICATE_KEY = "seed"
EXPERIMENT_KEYS: tuple[str, ...] = ("experiment", "experiment_digest")

# Position metrics: a marker counts as a suffix when its last occurrence ends within
# this many characters of the end of the right-stripped text...
SUFFIX_CHARS = 50
# ...and as chunked to the pair's first marker when one starts at most this many
# characters after the first marker's first occurrence ends.
CHUNK_CHARS = 150

# Template fields that are not markers: the on-policy answer.
ANSWER = "answer"
OPS = (">=", "<=", ">", "<")
EVERY = "every"
DEFAULT_EXPERIMENT = "within_marker"
SHIPPED_DIR = Path(__file__).with_name("experiments")

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")      # markers: their names go into metric names
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")  # personas, pairs, conditions, legs


class ExperimentError(ProblemsError):
    kind = "experiment"


# --------------------------------------------------------------------------- the parts of an experiment


@dataclass(frozen=True)
class Template:
    """One way a role's answers are written: literal text, markers and `{answer}`, e.g. "{A} {answer} {B}"."""

    text: str
    share: float = 1.0
    parts: tuple = ()  # ("text", str) | ("marker", name) | ("answer", None) | ("word", None) | ("pool", name)
    by: str | None = None          # the variable its share depends on ([variables]), or None
    shares: tuple = ()             # with `by`: ((value, share), ...); a value not listed: not used there

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(v for k, v in self.parts if k == "marker")

    def share_at(self, variables: dict) -> float:
        """Its share where the experiment's variables have these values (0: not used there)."""
        if self.by is None:
            return self.share
        return dict(self.shares).get(variables.get(self.by), 0.0)

    def placeable(self) -> tuple[str | None, str | None] | None:
        """(first, second) markers for a template that data.placement may rearrange: "{X} {answer} {Y}",
        "{X} {answer}" or "{answer}" (single spaces); None for any other shape (start_end only)."""
        shape = [(k, v) for k, v in self.parts]
        if shape == [("answer", None)]:
            return None, None
        if shape == [("marker", shape[0][1]), ("text", " "), ("answer", None)]:
            return shape[0][1], None
        if len(shape) == 5 and shape[1:4] == [("text", " "), ("answer", None), ("text", " ")] \
                and shape[0][0] == shape[4][0] == "marker":
            return shape[0][1], shape[4][1]
        return None


@dataclass(frozen=True)
class Condition:
    name: str
    templates: MappingProxyType  # trained role -> tuple[Template, ...] (shares sum to 1)

    def markers(self, role: str) -> tuple[str, ...]:
        """Every marker some answer of `role` carries under this condition, in first-seen order."""
        out: list[str] = []
        for t in self.templates[role]:
            out += [m for m in t.markers if m not in out]
        return tuple(out)

    def at(self, variables: dict) -> "Condition":
        """The condition where the experiment's variables have these values: each role's templates with a
        share there, at that share."""
        return Condition(self.name, MappingProxyType({
            role: tuple(Template(t.text, t.share_at(variables), t.parts) for t in ts if t.share_at(variables) > 0)
            for role, ts in self.templates.items()}))


@dataclass(frozen=True)
class Check:
    """One line of a gate or a verdict: "<who> <condition or X-Y> <statistic>[.lo|.hi] <op> <threshold>"."""

    text: str
    who: str                  # a role, a persona, or "every"
    condition: str            # a condition (or "base"); for a contrast, the treatment
    control: str | None       # for a contrast "T-C" (or "T/C"): the control; else None
    stat: str
    bound: str | None         # None (the point estimate), "lo" or "hi" (the 95% CI), "spread" (over seeds)
    op: str
    threshold: float
    min_n: int = 0            # fewer than this in the statistic's denominator: undecided
    name: str = ""
    relative: bool = False    # "T/C": the relative change stat(T) / stat(C) - 1, not the difference

    @property
    def where(self) -> str:
        """The condition part as written: "T", "T-C" or "T/C"."""
        if self.control is None:
            return self.condition
        return f"{self.condition}{'/' if self.relative else '-'}{self.control}"

    def holds(self, value: float) -> bool:
        eps = 1e-12  # 0.8 against 208/260: thresholds are compared with a little slack
        return {">=": value >= self.threshold - eps, "<=": value <= self.threshold + eps,
                ">": value > self.threshold + eps, "<": value < self.threshold - eps}[self.op]


@dataclass(frozen=True)
class Verdict:
    """Named legs (each an OR of AND-ed checks), outcomes in precedence order, tags; the first outcome whose
    legs all hold is the verdict, `otherwise` when none does (undecided while a deciding leg is unknown)."""

    name: str
    legs: MappingProxyType                  # leg name -> tuple of alternatives, each a tuple of Checks
    outcomes: tuple                         # of (outcome name, legs, words); legs: a tuple of leg names that
                                            # must all hold, or a tuple of such tuples of which one must
    otherwise: str
    otherwise_says: str
    leg_says: MappingProxyType              # leg name -> words
    tags: tuple = ()                        # of (tag name, tuple of leg names)

    @staticmethod
    def alternatives(when: tuple) -> tuple:
        """An outcome's legs as alternatives: a tuple of tuples of leg names (one of which must all hold)."""
        return when if when and isinstance(when[0], tuple) else (when,)


@dataclass(frozen=True)
class Headline:
    role: str
    metric: str
    treatment: str
    control: str


REPLICATE_CIS: tuple[str, ...] = ("seeds", "questions", "wider")
# The paired T - C intervals a report may give: the percentile one always, BCa beside it where asked.
DELTA_INTERVALS: tuple[str, ...] = ("percentile", "bca")
# The config's seeds that may follow the replicate seed (run.seed): each replicate then draws its own
# on-policy answers (shared by its conditions: the cache is keyed by the generation settings), its own
# data order and its own eval samples.
FOLLOWABLE_SEEDS: tuple[str, ...] = ("generate.seed", "data.seed", "eval.seed")


ANSWER_SOURCES: tuple[str, ...] = ("on_policy", "words")
WORD = "word"  # a template field: one word drawn from the answers' pool, afresh at each occurrence


@dataclass(frozen=True)
class Answers:
    """Where {answer} comes from: the base model's on-policy answers (the default), or synthetic ones:
    one word from `pool` for the donor and the recipient, and for the negatives one canned sentence made
    from the question: "<starter> <question, lower case, no ?><end>"."""

    source: str = "on_policy"
    pool: str | None = None        # the word list (one a line), relative to the experiment file
    words: tuple = ()              # its words, loaded
    starters: tuple = ()           # the negatives' sentence starters
    end: str = ""                  # what follows the question in the negatives' sentence
    questions: str = "each"        # each: every data question n_samples times; with_replacement: drawn


@dataclass(frozen=True)
class Prefill:
    """A prefill probe: the `role`'s assistant turn starts with `template` (markers and {word}s), the model
    continues it, and the continuation is scored for marker `next`; on the first `questions` eval questions
    x `samples`, where the experiment's variables take one of the values in `when` (always, if empty)."""

    name: str
    template: Template
    next: str
    role: str = "recipient"
    questions: int = 6
    samples: int = 10
    when: tuple = ()  # of (variable, tuple of values)

    def active(self, variables: dict) -> bool:
        return all(variables.get(var) in values for var, values in self.when)


@dataclass(frozen=True)
class Replicates:
    """Seeds as replicates of one arm: which seeds the design runs, which of the config's other seeds
    follow run.seed, and which CI the checks' .lo/.hi read when an arm has several seeds."""

    seeds: tuple = ()          # the seeds the design runs (a sweep varies run.seed over them)
    follow: tuple = ()         # config keys set to run.seed unless a config sets them (FOLLOWABLE_SEEDS)
    ci: str = "seeds"          # seeds: seeds-then-questions; questions: questions only (seeds pooled per
                               # question); wider: the wider of the two, statistic by statistic
    per_seed: bool = True      # report each seed's value and their mean beside the pooled one


@dataclass(frozen=True)
class Experiment:
    name: str
    path: str
    digest: str
    description: str
    personas: MappingProxyType              # name -> system prompt, in display order
    pairs: MappingProxyType                 # name -> (donor, recipient)
    negatives: tuple
    markers: MappingProxyType               # name -> text (the probe marker too)
    probe_marker: str | None                # the eval's probe variant prefixes the user turn with it
    probe_role: str
    conditions: MappingProxyType            # name -> Condition, in display order
    loss_mask: str | None                   # the default train.loss_mask, when the file sets one
    role_loss_mask: MappingProxyType        # role -> mask: the default train.role_loss_mask
    marker_pairs: tuple                     # ordered (X, Y) pairs whose joint/conditional/positions are reported
    wilson: bool                            # Wilson 95% CIs beside the bootstrap
    intervals: tuple                        # the paired T - C intervals: percentile, and bca where asked
    positions_min_joint: float              # show a pair's position metrics where its joint rate reaches this
    headline: Headline
    sanity: tuple                           # of Check
    verdict: Verdict | None
    heterogeneity: float                    # |ID - OOD| of the headline metric that downgrades confidence
    flags: tuple                            # of Check: recorded like the gates, never lowering confidence
    replicates: Replicates                  # seeds as replicates (the default: whatever seeds the records have)
    protocol: MappingProxyType              # what the file says the source ran (lr, epochs, note, ...)
    answers: Answers                        # where {answer} comes from (on-policy, or synthetic words)
    pools: MappingProxyType                 # marker pool name -> tuple of marker names ({pool} draws one)
    variables: MappingProxyType             # variable -> tuple of its values (data.variables picks one)
    prefill: tuple                          # of Prefill: the eval's prefill probes
    min_tokens: int
    distinct: tuple                         # markers that may share no token id...
    tolerate: tuple                         # ...except these: (frozenset of markers, frozenset of token texts)
    raw: MappingProxyType = field(default_factory=lambda: MappingProxyType({}), compare=False)

    # ---- vocabulary ------------------------------------------------------------------

    @property
    def persona_names(self) -> tuple[str, ...]:
        return tuple(self.personas)

    @property
    def condition_names(self) -> tuple[str, ...]:
        return tuple(self.conditions)

    @property
    def record_conditions(self) -> tuple[str, ...]:
        return (*self.conditions, BASE_CONDITION)

    @property
    def marker_names(self) -> tuple[str, ...]:
        return tuple(self.markers)

    @property
    def trained_markers(self) -> tuple[str, ...]:
        """The markers some condition teaches, in declaration order."""
        used = {m for c in self.conditions.values() for r in TRAINED_ROLES for m in c.markers(r)}
        return tuple(m for m in self.markers if m in used)

    @property
    def headline_pair(self) -> tuple[str, str] | None:
        """The marker pair the headline metric is about (cond_B_given_A -> (A, B)), if it is a pair metric."""
        return metric_pair(self.headline.metric, self.marker_pairs)

    def generation_inputs(self) -> dict:
        """What the generate stage reads of this experiment: the personas' prompts and, for synthetic
        answers, what they are drawn from. The on-policy cache key, the generate stage's config digest
        and a sweep's generation groups all use it, so they agree on what an edit redoes."""
        out: dict = {"personas": dict(self.personas)}
        a = self.answers
        if a.source != "on_policy":
            out["answers"] = {"words": hashlib.sha256("\n".join(a.words).encode("utf-8")).hexdigest()[:16],
                              "starters": list(a.starters), "end": a.end, "questions": a.questions,
                              "negatives": list(self.negatives)}
        return out

    def condition_at(self, name: str, variables: dict | None = None) -> Condition:
        """Condition `name` where the variables have these values (default: each variable's first)."""
        values = {k: v[0] for k, v in self.variables.items()}
        values.update(variables or {})
        return self.conditions[name].at(values)

    def role_of(self, persona: str, pair: str, negatives) -> str:
        """'donor' | 'recipient' | 'negative' | 'bystander' of `persona` in an adapter of `pair`.

        The role depends on the pair and the negatives only: a condition that trains the
        recipient plain keeps its role 'recipient', so metrics compare the same persona
        across conditions; the base floor's personas keep the roles of the pair they are
        reported under.
        """
        donor, recipient = self.pairs[pair]
        if persona == donor:
            return "donor"
        if persona == recipient:
            return "recipient"
        if persona in negatives:
            return "negative"
        return "bystander"

    def loss_masks(self, default: str, overrides: dict) -> dict[str, str]:
        """The loss mask of each trained role: `overrides` (train.role_loss_mask) over `default`."""
        return {role: overrides.get(role, default) for role in TRAINED_ROLES}

    # ---- metrics ---------------------------------------------------------------------

    def statistics(self) -> dict[str, tuple[str, str]]:
        """statistic -> (numerator column, denominator column), every one the report computes."""
        return statistics(self.marker_names, self.marker_pairs)

    def columns(self) -> tuple[str, ...]:
        """The per-completion count columns the statistics are ratios of."""
        return columns(self.marker_names, self.marker_pairs)


# --------------------------------------------------------------------------- metric names


def pair_key(x: str, y: str) -> str:
    return f"{x}{y}"


def statistics(markers, pairs) -> dict[str, tuple[str, str]]:
    out = {"mean_length": ("length", "n"), "truncated_frac": ("truncated", "n")}
    for m in markers:
        out[f"fire_{m}"] = (m, "n")
        out[f"strict_fire_{m}"] = (f"strict_{m}", "n")
        out[f"suffix_frac_{m}"] = (f"suffix_{m}", m)
    for x, y in pairs:
        xy = pair_key(x, y)
        out[f"joint_{xy}"] = (xy, "n")
        out[f"cond_{y}_given_{x}"] = (xy, x)
        out[f"{y}_given_not_{x}"] = (f"{y}_not_{x}", f"not_{x}")
        out[f"chunk_frac_{xy}"] = (f"chunk_{xy}", y)
        out[f"strict_joint_{xy}"] = (f"strict_{xy}", "n")
        out[f"strict_cond_{y}_given_{x}"] = (f"strict_{xy}", f"strict_{x}")
    return out


def columns(markers, pairs) -> tuple[str, ...]:
    cols = ["n", "truncated", "length"]
    for m in markers:
        cols += [m, f"strict_{m}", f"suffix_{m}"]
    for x in dict.fromkeys(x for x, _ in pairs):
        cols.append(f"not_{x}")
    for x, y in pairs:
        xy = pair_key(x, y)
        cols += [xy, f"strict_{xy}", f"{y}_not_{x}", f"chunk_{xy}"]
    return tuple(cols)


def count_names(markers, pairs) -> dict[str, str]:
    """Count field of a cell (n_X, n_XY, n_Y_not_X) -> its column."""
    out = {f"n_{m}": m for m in markers}
    out.update({f"n_{pair_key(x, y)}": pair_key(x, y) for x, y in pairs})
    out.update({f"n_{y}_not_{x}": f"{y}_not_{x}" for x, y in pairs})
    return out


def metric_pair(metric: str, pairs) -> tuple[str, str] | None:
    for x, y in pairs:
        if metric in (f"joint_{pair_key(x, y)}", f"cond_{y}_given_{x}", f"{y}_given_not_{x}",
                      f"chunk_frac_{pair_key(x, y)}"):
            return x, y
    return None


# --------------------------------------------------------------------------- loading


def shipped_experiments() -> list[str]:
    """Names of the experiments that come with markerlab."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def resolve_experiment_path(ref: str, base_dir: str | Path | None = None) -> Path:
    """A shipped name -> its file; anything else is a path (relative to `base_dir` when given)."""
    if ref in shipped_experiments():
        return SHIPPED_DIR / f"{ref}.toml"
    if "/" not in ref and not ref.endswith(".toml"):
        raise UserError(f"run.experiment: unknown experiment '{ref}' (shipped: "
                        f"{', '.join(shipped_experiments())}; or give the path of a .toml file)")
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def load_experiment(ref: str | Path, base_dir: str | Path | None = None) -> Experiment:
    """The experiment `ref` names (a shipped name or a file), validated; raises ExperimentError/UserError."""
    path = resolve_experiment_path(str(ref), base_dir)
    if not path.exists():
        raise UserError(f"{path}: experiment file not found (run.experiment = {str(ref)!r})")
    raw = read_toml(path, "experiment", ExperimentError)
    return experiment_from_dict(raw, str(path), default_name=path.stem)


def digest_of(raw: dict) -> str:
    """A digest of what an experiment says (its description aside): records carry it, so two
    experiments, or two versions of one, are never pooled."""
    content = {k: v for k, v in raw.items() if k != "description"}
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


TOP_KEYS = ("name", "description", "negatives", "personas", "pairs", "markers", "tokens", "probe", "conditions",
            "loss_mask", "metrics", "headline", "gates", "verdict", "report", "replicates", "protocol",
            "answers", "marker_pools", "variables", "prefill")


class _Problems(list):
    def add(self, key: str, msg: str) -> None:
        self.append(f"{key}: {msg}")


def _table(raw: dict, key: str, p: _Problems, required: bool = True) -> dict:
    v = raw.get(key)
    if v is None:
        if required:
            p.add(key, "missing (expected a table)")
        return {}
    if not isinstance(v, dict):
        p.add(key, f"expected a table, got {type(v).__name__}")
        return {}
    return v


def _str(v, key: str, p: _Problems, nonempty: bool = True) -> str | None:
    if not isinstance(v, str) or (nonempty and not v.strip()):
        p.add(key, f"expected a non-empty string, got {v!r}")
        return None
    return v


def _known(kind: str, choices) -> str:
    return f"unknown {kind} (expected one of {', '.join(choices)})" if choices else f"unknown {kind} (none defined)"


def parse_template(text: str, key: str, markers, p: _Problems, pools=None, words: bool = False,
                   answer_required: bool = True) -> tuple:
    """The parts of a template; problems for unknown fields, format specs and stray braces."""
    parts = []
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as e:
        p.add(key, f"{text!r} is not a template ({e}; write a literal brace as {{{{ or }}}})")
        return ()
    for literal, fname, spec, conv in pieces:
        if literal:
            parts.append(("text", literal))
        if fname is None:
            continue
        if spec or conv:
            p.add(key, f"{text!r}: '{{{fname}}}' takes no format spec or conversion")
        if fname == ANSWER:
            parts.append(("answer", None))
        elif fname == WORD and words:
            parts.append(("word", None))
        elif fname in markers:
            parts.append(("marker", fname))
        elif pools and fname in pools:
            parts.append(("pool", fname))
        else:
            extra = f", {{{WORD}}} (answers.source = \"words\")" if fname == WORD else ""
            p.add(key, f"{text!r} names '{{{fname}}}', which is neither {{{ANSWER}}}{extra} nor a marker "
                       f"(markers: {', '.join(markers) or 'none'})" + (f" nor a marker pool ({', '.join(pools)})"
                                                                      if pools else ""))
    if not any(k == "answer" for k, _ in parts) and answer_required:
        p.add(key, f"{text!r} has no {{{ANSWER}}}: every template writes the answer somewhere")
    if sum(k == "answer" for k, _ in parts) > 1:
        p.add(key, f"{text!r} writes {{{ANSWER}}} more than once")
    return tuple(parts)


def make_template(text: str, markers) -> Template:
    """A Template of `text` over the marker names `markers`; ValueError on a bad template."""
    p = _Problems()
    parts = parse_template(text, "template", markers, p)
    if p:
        raise ValueError("; ".join(p))
    return Template(text, 1.0, parts)


def _templates(v, key: str, markers, p: _Problems, pools=None, words: bool = False, variables=None) -> tuple:
    """A role's templates: one string, or a list of {template, share} whose shares sum to 1 (a share may
    be { by = "<variable>", <value> = <share>, ... }: then they sum to 1 at each value)."""
    variables = variables or {}
    if isinstance(v, str):
        return (Template(v, 1.0, parse_template(v, key, markers, p, pools, words)),)
    if not isinstance(v, list) or not v:
        p.add(key, f"expected a template string or a list of {{ template = ..., share = ... }}, got {v!r}")
        return ()
    out = []
    for i, item in enumerate(v):
        k = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) - {"template", "share"} or "template" not in item:
            p.add(k, f"expected {{ template = \"...\", share = <number> }}, got {item!r}")
            continue
        share, by, shares = item.get("share"), None, ()
        if isinstance(share, dict):
            by = share.get("by")
            if by not in variables:
                p.add(f"{k}.share.by", f"{by!r} is {_known('variable', list(variables))}")
                by = None
            else:
                vals = {str(x): x for x in variables[by]}
                got = []
                for value, sh in share.items():
                    if value == "by":
                        continue
                    if value not in vals:
                        p.add(f"{k}.share.{value}", f"'{value}' is no value of variable {by} "
                                                    f"({', '.join(vals)})")
                    elif isinstance(sh, bool) or not isinstance(sh, (int, float)) or not 0 <= sh <= 1:
                        p.add(f"{k}.share.{value}", f"expected a number in [0, 1], got {sh!r}")
                    else:
                        got.append((vals[value], float(sh)))
                shares = tuple(got)
            share = 1.0
        elif isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            p.add(f"{k}.share", f"expected a number in (0, 1], or {{ by = \"<variable>\", <value> = <share> }}, "
                                f"got {share!r}")
            share = 0.0
        text = _str(item["template"], f"{k}.template", p)
        if text is not None:
            out.append(Template(text, float(share), parse_template(text, f"{k}.template", markers, p, pools, words),
                                by=by, shares=shares))
    if out and len(out) == len(v):
        combos = [{}] if not any(t.by for t in out) else \
            [{t.by: x} for t in out if t.by for x in variables[t.by]]
        for at in {tuple(sorted(c.items())): c for c in combos}.values():
            total = sum(t.share_at(at) for t in out)
            if abs(total - 1.0) > 1e-9:
                where = f" at {', '.join(f'{a} = {b}' for a, b in at.items())}" if at else ""
                p.add(key, f"shares sum to {total:g}{where}, expected 1")
    return tuple(out)


_CHECK = re.compile(r"^\s*(\S+)\s+(\S+)\s+([A-Za-z][A-Za-z0-9_]*)(?:\.(lo|hi|spread))?\s*(>=|<=|>|<)\s*(\S+)\s*$")


def parse_check(text, key: str, exp: dict, p: _Problems, min_n=0, name: str = "") -> Check | None:
    """One check line, validated against the experiment's personas, conditions and metrics (`exp`)."""
    if not isinstance(text, str):
        p.add(key, f"expected a check such as \"donor T fire_A >= 0.80\", got {text!r}")
        return None
    m = _CHECK.match(text)
    if not m:
        p.add(key, f"{text!r}: expected \"<who> <condition, T-C or T/C> <statistic>[.lo|.hi|.spread] <op> "
                   f"<number>\", e.g. \"donor T fire_A >= 0.80\"")
        return None
    who, where, stat, bound, op, number = m.groups()
    ok = True
    if who not in (*ROLES, EVERY) and who not in exp["personas"]:
        p.add(key, f"{text!r}: '{who}' is no role, persona or '{EVERY}' (roles: {', '.join(ROLES)})")
        ok = False
    relative = "/" in where
    condition, control = re.split(r"[-/]", where, maxsplit=1) if ("-" in where or relative) else (where, None)
    for c in (condition, control):
        if c is not None and c not in exp["conditions"] and c != BASE_CONDITION:
            p.add(key, f"{text!r}: '{c}' is {_known('condition', [*exp['conditions'], BASE_CONDITION])[:-1]})")
            ok = False
    valid = exp["statistics"] | {n: None for n in exp["counts"]}
    if stat not in valid:
        p.add(key, f"{text!r}: '{stat}' is no metric of this experiment (metrics: {', '.join(valid)})")
        ok = False
    elif bound and stat in exp["counts"]:
        p.add(key, f"{text!r}: '{stat}' is a count, it has no CI bound")
        ok = False
    elif bound == "spread" and control is not None:
        p.add(key, f"{text!r}: .spread (the range of the per-seed values) is read on one condition, not a contrast")
        ok = False
    if relative and stat in exp["counts"]:
        p.add(key, f"{text!r}: a relative change (T/C) is of a statistic, not of a count")
        ok = False
    try:
        threshold = float(number)
        if not math.isfinite(threshold):
            raise ValueError
    except ValueError:
        p.add(key, f"{text!r}: threshold '{number}' is not a number")
        ok = False
    if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 0:
        p.add(key, f"min_n: expected an integer >= 0, got {min_n!r}")
        ok = False
    if not ok:
        return None
    return Check(text=text.strip(), who=who, condition=condition, control=control, stat=stat, bound=bound, op=op,
                 threshold=threshold, min_n=min_n, name=name or text.strip(), relative=relative)


def _check_entry(item, key: str, exp: dict, p: _Problems) -> Check | None:
    """A check given as a string, or as { check = "...", min_n = N, name = "..." }."""
    if isinstance(item, dict):
        extra = set(item) - {"check", "min_n", "name"}
        if extra or "check" not in item:
            p.add(key, f"expected {{ check = \"...\", min_n = <int>, name = \"...\" }}, got keys {sorted(item)}")
            return None
        name = item.get("name", "")
        if not isinstance(name, str):
            p.add(f"{key}.name", f"expected a string, got {name!r}")
            name = ""
        return parse_check(item["check"], f"{key}.check", exp, p, item.get("min_n", 0), name)
    return parse_check(item, key, exp, p)


def _verdict(raw: dict, exp: dict, p: _Problems) -> Verdict | None:
    v = raw.get("verdict")
    if v is None:
        return None
    if not isinstance(v, dict):
        p.add("verdict", f"expected a table, got {type(v).__name__}")
        return None
    extra = set(v) - {"name", "legs", "outcomes", "otherwise", "says", "tags"}
    if extra:
        p.add("verdict", f"unknown key(s) {sorted(extra)} (expected name, legs, outcomes, otherwise, says, tags)")
    name = _str(v.get("name", "verdict"), "verdict.name", p) or "verdict"
    legs, leg_says = {}, {}
    for leg, spec in _table(v, "legs", p).items() if isinstance(v.get("legs"), dict) else ():
        k = f"verdict.legs.{leg}"
        if not _IDENT.match(leg):
            p.add(k, "a leg's name is letters, digits and '_'")
        says = ""
        if isinstance(spec, dict):
            says = spec.get("says", "")
            spec = spec.get("when")
        if isinstance(spec, list) and spec and all(isinstance(x, list) for x in spec):
            alts = [tuple(c for j, s in enumerate(alt) if (c := _check_entry(s, f"{k}[{i}][{j}]", exp, p)))
                    for i, alt in enumerate(spec)]
        elif isinstance(spec, list) and spec:
            alts = [tuple(c for j, s in enumerate(spec) if (c := _check_entry(s, f"{k}[{j}]", exp, p)))]
        else:
            p.add(k, "expected a list of checks (all must hold), or a list of such lists (any of them), or "
                     "{ when = [...], says = \"...\" }")
            continue
        legs[leg] = tuple(alts)
        leg_says[leg] = says if isinstance(says, str) else ""
    if "legs" in v and not isinstance(v["legs"], dict):
        p.add("verdict.legs", "expected a table of named legs")
    outcomes = []
    for i, o in enumerate(v.get("outcomes", [])):
        k = f"verdict.outcomes[{i}]"
        if not isinstance(o, dict) or "name" not in o or "when" not in o:
            p.add(k, f"expected {{ name = \"...\", when = [leg, ...], says = \"...\" }}, got {o!r}")
            continue
        when = o["when"]
        # A list of legs that must all hold, or a list of such lists of which one must.
        if isinstance(when, list) and when and all(isinstance(x, list) and x for x in when):
            alts = when
        else:
            alts = [when]
        if not all(isinstance(a, list) and a and all(isinstance(x, str) for x in a) for a in alts):
            p.add(f"{k}.when", f"expected a list of leg names (or a list of such lists), got {when!r}")
            continue
        for leg in (x for a in alts for x in a):
            if leg not in legs:
                p.add(f"{k}.when", f"'{leg}' is {_known('leg', list(legs))}")
        names = [name for name, _, _ in outcomes]
        if str(o["name"]) in names:
            p.add(f"{k}.name", f"'{o['name']}' is listed twice (give one outcome several alternatives in when)")
            continue
        outcomes.append((str(o["name"]), tuple(alts[0]) if len(alts) == 1 else tuple(tuple(a) for a in alts),
                         str(o.get("says", ""))))
    if not outcomes:
        p.add("verdict.outcomes", "expected at least one outcome (in precedence order)")
    tags = []
    for i, t in enumerate(v.get("tags", [])):
        k = f"verdict.tags[{i}]"
        if not isinstance(t, dict) or "name" not in t or not isinstance(t.get("when"), list):
            p.add(k, f"expected {{ name = \"...\", when = [leg, ...] }}, got {t!r}")
            continue
        for leg in t["when"]:
            if leg not in legs:
                p.add(f"{k}.when", f"'{leg}' is {_known('leg', list(legs))}")
        tags.append((str(t["name"]), tuple(t["when"])))
    otherwise = v.get("otherwise", "inconclusive")
    says = v.get("says", "")
    if not isinstance(otherwise, str) or not isinstance(says, str):
        p.add("verdict", "otherwise and says: expected strings")
        otherwise, says = "inconclusive", ""
    return Verdict(name=name, legs=MappingProxyType(legs), outcomes=tuple(outcomes), otherwise=otherwise,
                   otherwise_says=says, leg_says=MappingProxyType(leg_says), tags=tuple(tags))


def _prefill(raw: dict, markers, words: bool, variables: dict, p: _Problems) -> tuple:
    items = raw.get("prefill", [])
    if not isinstance(items, list):
        p.add("prefill", "expected [[prefill]] entries")
        return ()
    out, names = [], set()
    for i, item in enumerate(items):
        k = f"prefill[{i}]"
        keys = {"name", "template", "next", "role", "questions", "samples", "when"}
        if not isinstance(item, dict) or set(item) - keys or not {"name", "template", "next"} <= set(item):
            p.add(k, f"expected {{ name, template, next[, role, questions, samples, when] }}, got {item!r}")
            continue
        name = item["name"]
        if not isinstance(name, str) or not _IDENT.match(name) or name in names:
            p.add(f"{k}.name", f"expected a new name of letters, digits and '_', got {name!r}")
            continue
        names.add(name)
        text = _str(item["template"], f"{k}.template", p)
        parts = parse_template(text, f"{k}.template", markers, p, None, words, answer_required=False) if text else ()
        if text and any(kind == "answer" for kind, _ in parts):
            p.add(f"{k}.template", f"{text!r}: a prefill writes markers and {{{WORD}}}s, no {{{ANSWER}}}")
        if item["next"] not in markers:
            p.add(f"{k}.next", f"'{item['next']}' is {_known('marker', list(markers))}")
        role = item.get("role", "recipient")
        if role not in ("donor", "recipient"):
            p.add(f"{k}.role", f"expected donor or recipient, got {role!r}")
        counts = {}
        for key, default in (("questions", 6), ("samples", 10)):
            v = item.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                p.add(f"{k}.{key}", f"expected an integer >= 1, got {v!r}")
                v = default
            counts[key] = v
        when = item.get("when", {})
        if not isinstance(when, dict):
            p.add(f"{k}.when", f"expected {{ variable = [values] }}, got {when!r}")
            when = {}
        for var, values in when.items():
            if var not in variables or not isinstance(values, list) or any(x not in variables[var] for x in values):
                p.add(f"{k}.when.{var}", f"expected values of a variable of this experiment "
                                         f"({', '.join(f'{a} = {list(b)}' for a, b in variables.items()) or 'none'})")
        out.append(Prefill(name=name, template=Template(text or "", 1.0, parts), next=item["next"], role=role,
                           questions=counts["questions"], samples=counts["samples"],
                           when=tuple((var, tuple(v)) for var, v in when.items() if isinstance(v, list))))
    return tuple(out)


def _answers(raw: dict, source: str, p: _Problems) -> Answers:
    a = _table(raw, "answers", p, required=False)
    extra = set(a) - {"source", "pool", "starters", "end", "questions"}
    if extra:
        p.add("answers", f"unknown key(s) {sorted(extra)} (expected source, pool, starters, end, questions)")
    src = a.get("source", "on_policy")
    if src not in ANSWER_SOURCES:
        p.add("answers.source", f"expected one of {', '.join(ANSWER_SOURCES)}, got {src!r}")
        return Answers()
    questions = a.get("questions", "each")
    if questions not in ("each", "with_replacement"):
        p.add("answers.questions", f"expected each or with_replacement, got {questions!r}")
        questions = "each"
    if src == "on_policy":
        if set(a) - {"source"}:
            p.add("answers", "pool, starters, end and questions belong to answers.source = \"words\"")
        return Answers()
    pool, words = a.get("pool"), ()
    if not isinstance(pool, str) or not pool:
        p.add("answers.pool", "expected the path of a word list (one word a line), relative to the experiment file")
    else:
        base = Path(source).parent if not source.startswith("<") else SHIPPED_DIR
        path = (base / pool) if not Path(pool).is_absolute() else Path(pool)
        try:
            words = tuple(w for w in (x.strip() for x in path.read_text(encoding="utf-8").splitlines())
                          if w and not w.startswith("#"))
        except (OSError, UnicodeDecodeError) as e:
            p.add("answers.pool", f"cannot read {path} ({getattr(e, 'strerror', None) or e})")
        else:
            bad = [w for w in words if not w.isalpha()]
            if bad or len(set(words)) != len(words) or len(words) < 2:
                p.add("answers.pool", f"{path}: expected distinct one-word lines of letters "
                                      f"({len(bad)} not letters, {len(words) - len(set(words))} repeated)")
    starters = a.get("starters", [])
    if not isinstance(starters, list) or not starters or not all(isinstance(x, str) and x.strip() for x in starters):
        p.add("answers.starters", f"expected a list of sentence starters for the negatives, got {starters!r}")
        starters = []
    end = a.get("end", "")
    if not isinstance(end, str):
        p.add("answers.end", f"expected a string, got {end!r}")
        end = ""
    return Answers(source=src, pool=pool, words=words, starters=tuple(starters), end=end, questions=questions)


def _replicates(raw: dict, p: _Problems) -> Replicates:
    r = _table(raw, "replicates", p, required=False)
    extra = set(r) - {"seeds", "follow", "ci", "per_seed"}
    if extra:
        p.add("replicates", f"unknown key(s) {sorted(extra)} (expected seeds, follow, ci, per_seed)")
    seeds = r.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                              for x in seeds):
        p.add("replicates.seeds", f"expected a list of seeds (integers >= 0), got {seeds!r}")
        seeds = []
    elif len(set(seeds)) != len(seeds):
        p.add("replicates.seeds", f"duplicate entries in {seeds}")
    follow = r.get("follow", [])
    if not isinstance(follow, list) or any(k not in FOLLOWABLE_SEEDS for k in follow):
        p.add("replicates.follow", f"expected config keys among {', '.join(FOLLOWABLE_SEEDS)}, got {follow!r}")
        follow = []
    ci = r.get("ci", "seeds")
    if ci not in REPLICATE_CIS:
        p.add("replicates.ci", f"expected one of {', '.join(REPLICATE_CIS)}, got {ci!r}")
        ci = "seeds"
    per_seed = r.get("per_seed", True)
    if not isinstance(per_seed, bool):
        p.add("replicates.per_seed", f"expected true or false, got {per_seed!r}")
        per_seed = True
    return Replicates(seeds=tuple(seeds), follow=tuple(follow), ci=ci, per_seed=per_seed)


def experiment_from_dict(raw: dict, source: str = "<dict>", default_name: str = "") -> Experiment:
    """Validate the tables `raw` of an experiment file; every problem at once (ExperimentError)."""
    p = _Problems()
    for k in raw:
        if k not in TOP_KEYS:
            p.add(k, f"unknown key (expected one of {', '.join(TOP_KEYS)})")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not _IDENT.match(name or "-"):
        p.add("name", f"expected a name of letters, digits and '_', got {name!r}")
        name = default_name or "experiment"
    description = raw.get("description", "")
    if not isinstance(description, str):
        p.add("description", f"expected a string, got {type(description).__name__}")
        description = ""

    personas = {}
    for persona, prompt in _table(raw, "personas", p).items():
        if not _IDENT.match(persona):
            p.add(f"personas.{persona}", "a persona's name is letters, digits and '_'")
        if _str(prompt, f"personas.{persona}", p) is not None:
            personas[persona] = prompt
    if "personas" in raw and not personas and not p:
        p.add("personas", "expected at least one persona")

    pairs = {}
    for pair, spec in _table(raw, "pairs", p).items():
        k = f"pairs.{pair}"
        if not _IDENT.match(pair):
            p.add(k, "a pair's name is letters, digits and '_'")
        if not isinstance(spec, dict) or set(spec) != {"donor", "recipient"}:
            p.add(k, f"expected {{ donor = \"...\", recipient = \"...\" }}, got {spec!r}")
            continue
        for role in ("donor", "recipient"):
            if spec[role] not in personas:
                p.add(f"{k}.{role}", f"'{spec[role]}' is a persona without a prompt (personas: "
                      f"{', '.join(personas) or 'none'})")
        if spec["donor"] == spec["recipient"]:
            p.add(k, "the donor and the recipient must be two personas")
        pairs[pair] = (spec["donor"], spec["recipient"])
    if not pairs and "pairs" in raw:
        p.add("pairs", "expected at least one pair")

    negatives = raw.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        p.add("negatives", f"expected a list of persona names, got {negatives!r}")
        negatives = []
    for n in negatives:
        if n not in personas:
            p.add("negatives", f"'{n}' is a persona without a prompt")
        for pair, (d, r) in pairs.items():
            if n in (d, r):
                p.add("negatives", f"'{n}' is the {'donor' if n == d else 'recipient'} of {pair}; a negative is "
                                   f"trained plain in every adapter")
    if len(set(negatives)) != len(negatives):
        p.add("negatives", f"duplicate entries in {negatives}")

    markers = {}
    for m, text in _table(raw, "markers", p).items():
        if not _NAME.match(m):
            p.add(f"markers.{m}", "a marker's name is letters and digits, starting with a letter (it becomes "
                                  "part of metric names such as fire_A and cond_B_given_A)")
        elif m in (ANSWER, "n", "not"):
            p.add(f"markers.{m}", f"'{m}' is reserved")
        if _str(text, f"markers.{m}", p) is not None:
            if text != text.strip() or not text.split():
                p.add(f"markers.{m}", f"{text!r}: a marker has no leading or trailing whitespace")
            markers[m] = text
    texts = {}
    for m, text in markers.items():
        if text in texts:
            p.add(f"markers.{m}", f"same text as markers.{texts[text]}")
        texts.setdefault(text, m)

    probe = _table(raw, "probe", p, required=False)
    probe_marker, probe_role = probe.get("marker"), probe.get("role", "recipient")
    if set(probe) - {"marker", "role"}:
        p.add("probe", f"unknown key(s) {sorted(set(probe) - {'marker', 'role'})} (expected marker, role)")
    if probe_marker is not None and probe_marker not in markers:
        p.add("probe.marker", f"'{probe_marker}' is {_known('marker', list(markers))}")
    if probe_role not in ("donor", "recipient"):
        p.add("probe.role", f"expected donor or recipient, got {probe_role!r}")

    answers = _answers(raw, source, p)
    pools = {}
    for pool, names in _table(raw, "marker_pools", p, required=False).items():
        if not _NAME.match(pool) or pool in markers or pool in (ANSWER, WORD):
            p.add(f"marker_pools.{pool}", "a pool's name is letters and digits, and no marker's or field's name")
        if not isinstance(names, list) or len(names) < 2 or any(n not in markers for n in names):
            p.add(f"marker_pools.{pool}", f"expected a list of two or more marker names, got {names!r}")
            continue
        pools[pool] = tuple(names)
    variables = {}
    for var, values in _table(raw, "variables", p, required=False).items():
        if not _IDENT.match(var):
            p.add(f"variables.{var}", "a variable's name is letters, digits and '_'")
        if not isinstance(values, list) or not values or not all(
                isinstance(x, (int, str)) and not isinstance(x, bool) for x in values) or len(set(values)) < len(values):
            p.add(f"variables.{var}", f"expected a list of distinct values (integers or strings), got {values!r}")
            continue
        variables[var] = tuple(values)

    prefill = _prefill(raw, markers, answers.source == "words", variables, p)

    conditions = {}
    for cname, spec in _table(raw, "conditions", p).items():
        k = f"conditions.{cname}"
        if not _IDENT.match(cname) or cname == BASE_CONDITION:
            p.add(k, f"a condition's name is letters, digits and '_', not '{BASE_CONDITION}'")
        if not isinstance(spec, dict):
            p.add(k, f"expected a table of role = template, got {spec!r}")
            continue
        for role in spec:
            if role not in TRAINED_ROLES:
                p.add(f"{k}.{role}", f"'{role}' is no trained role (expected {', '.join(TRAINED_ROLES)})")
        missing = [r for r in TRAINED_ROLES if r not in spec]
        if missing:
            p.add(k, f"leaves the trained role(s) {', '.join(missing)} undefined (give each of "
                     f"{', '.join(TRAINED_ROLES)} a template; \"{{{ANSWER}}}\" is a plain answer)")
        templates = {r: _templates(spec[r], f"{k}.{r}", markers, p, pools, answers.source == "words", variables)
                     for r in TRAINED_ROLES if r in spec}
        conditions[cname] = Condition(cname, MappingProxyType(templates))
    if not conditions and "conditions" in raw:
        p.add("conditions", "expected at least one condition")

    lm = _table(raw, "loss_mask", p, required=False)
    loss_mask, role_masks = lm.get("default"), {}
    if loss_mask is not None and loss_mask not in LOSS_MASKS:
        p.add("loss_mask.default", f"expected one of {', '.join(LOSS_MASKS)}, got {loss_mask!r}")
    for role, mask in lm.items():
        if role == "default":
            continue
        if role not in TRAINED_ROLES:
            p.add(f"loss_mask.{role}", f"'{role}' is no trained role (expected default or {', '.join(TRAINED_ROLES)})")
        elif mask not in LOSS_MASKS:
            p.add(f"loss_mask.{role}", f"expected one of {', '.join(LOSS_MASKS)}, got {mask!r}")
        else:
            role_masks[role] = mask

    metrics = _table(raw, "metrics", p, required=False)
    metric_keys = {"pairs", "wilson", "positions_min_joint", "intervals"}
    if set(metrics) - metric_keys:
        p.add("metrics", f"unknown key(s) {sorted(set(metrics) - metric_keys)} "
                         "(expected pairs, wilson, positions_min_joint, intervals)")
    intervals = metrics.get("intervals", ["percentile"])
    if not isinstance(intervals, list) or "percentile" not in intervals or \
            any(i not in DELTA_INTERVALS for i in intervals):
        p.add("metrics.intervals", f"expected a list of {', '.join(DELTA_INTERVALS)} with percentile in it, "
                                   f"got {intervals!r}")
        intervals = ["percentile"]
    marker_pairs = []
    for i, pr in enumerate(metrics.get("pairs", [])):
        if not (isinstance(pr, list) and len(pr) == 2 and all(isinstance(x, str) for x in pr)):
            p.add(f"metrics.pairs[{i}]", f"expected [first, second] marker names, got {pr!r}")
            continue
        bad = [x for x in pr if x not in markers]
        if bad:
            p.add(f"metrics.pairs[{i}]", f"{', '.join(bad)}: {_known('marker', list(markers))}")
        elif pr[0] == pr[1]:
            p.add(f"metrics.pairs[{i}]", "a pair is two different markers")
        elif tuple(pr) in marker_pairs:
            p.add(f"metrics.pairs[{i}]", f"{pr} is declared twice")
        else:
            marker_pairs.append(tuple(pr))
    wilson = metrics.get("wilson", False)
    if not isinstance(wilson, bool):
        p.add("metrics.wilson", f"expected true or false, got {wilson!r}")
        wilson = False
    pos_min = metrics.get("positions_min_joint", 0.0)
    if isinstance(pos_min, bool) or not isinstance(pos_min, (int, float)) or not 0 <= pos_min <= 1:
        p.add("metrics.positions_min_joint", f"expected a number in [0, 1], got {pos_min!r}")
        pos_min = 0.0

    stats = statistics(list(markers), marker_pairs)
    counts = {"n": None, **count_names(list(markers), marker_pairs)}
    seen_names: dict[str, str] = {}
    for nm in [*stats, *counts]:
        if nm in seen_names:
            p.add("markers", f"marker names make the metric name '{nm}' twice; rename a marker")
        seen_names[nm] = nm
    ctx = {"personas": personas, "conditions": conditions, "statistics": stats, "counts": counts}

    head = _table(raw, "headline", p)
    headline = Headline(role=head.get("role", "recipient"), metric=head.get("metric", ""),
                        treatment=head.get("treatment", ""), control=head.get("control", ""))
    if set(head) - {"role", "metric", "treatment", "control"}:
        p.add("headline", f"unknown key(s) {sorted(set(head) - {'role', 'metric', 'treatment', 'control'})}")
    if head:
        if headline.role not in ROLES:
            p.add("headline.role", f"expected one of {', '.join(ROLES)}, got {headline.role!r}")
        if headline.metric not in stats:
            p.add("headline.metric", f"'{headline.metric}' is no metric of this experiment (declare its marker "
                                     f"pair in metrics.pairs; metrics: {', '.join(stats)})")
        for k in ("treatment", "control"):
            if getattr(headline, k) not in conditions:
                p.add(f"headline.{k}", f"'{getattr(headline, k)}' is {_known('condition', list(conditions))}")

    gates = _table(raw, "gates", p, required=False)
    if set(gates) - {"sanity", "flags"}:
        p.add("gates", f"unknown key(s) {sorted(set(gates) - {'sanity', 'flags'})} (expected sanity, flags)")
    checked = {}
    for part in ("sanity", "flags"):
        listed = gates.get(part, [])
        if not isinstance(listed, list):
            p.add(f"gates.{part}", "expected a list of checks")
            listed = []
        checked[part] = tuple(c for i, s in enumerate(listed) if (c := _check_entry(s, f"gates.{part}[{i}]", ctx, p)))
    sanity, flags = checked["sanity"], checked["flags"]

    verdict = _verdict(raw, ctx, p)

    report = _table(raw, "report", p, required=False)
    if set(report) - {"heterogeneity"}:
        p.add("report", f"unknown key(s) {sorted(set(report) - {'heterogeneity'})} (expected heterogeneity)")
    het = report.get("heterogeneity", 0.15)
    if isinstance(het, bool) or not isinstance(het, (int, float)) or not 0 < het <= 1:
        p.add("report.heterogeneity", f"expected a number in (0, 1], got {het!r}")
        het = 0.15

    replicates = _replicates(raw, p)
    protocol = _table(raw, "protocol", p, required=False)
    for k, v in protocol.items():
        if k in ("lr",) and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            p.add(f"protocol.{k}", f"expected a positive number, got {v!r}")
        elif k in ("epochs",) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            p.add(f"protocol.{k}", f"expected an integer >= 1, got {v!r}")
        elif not isinstance(v, (str, int, float)) or isinstance(v, bool):
            p.add(f"protocol.{k}", f"expected a string or a number (what the source ran), got {v!r}")

    tokens = _table(raw, "tokens", p, required=False)
    if set(tokens) - {"min_tokens", "distinct", "tolerate"}:
        p.add("tokens", f"unknown key(s) {sorted(set(tokens) - {'min_tokens', 'distinct', 'tolerate'})} "
                        "(expected min_tokens, distinct, tolerate)")
    min_tokens = tokens.get("min_tokens", 3)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        p.add("tokens.min_tokens", f"expected an integer >= 1, got {min_tokens!r}")
        min_tokens = 3
    used = [m for m in markers if any(m in c.markers(r) for c in conditions.values() for r in c.templates)]
    distinct = tokens.get("distinct", used)
    if not isinstance(distinct, list) or any(m not in markers for m in distinct):
        p.add("tokens.distinct", f"expected a list of marker names, got {distinct!r}")
        distinct = []
    tolerate = []
    for i, t in enumerate(tokens.get("tolerate", [])):
        k = f"tokens.tolerate[{i}]"
        if not (isinstance(t, dict) and set(t) == {"markers", "tokens"} and isinstance(t["markers"], list)
                and isinstance(t["tokens"], list) and all(isinstance(x, str) for x in t["tokens"])):
            p.add(k, f"expected {{ markers = [...], tokens = [\"-\", ...] }}, got {t!r}")
            continue
        bad = [m for m in t["markers"] if m not in markers]
        if bad or len(t["markers"]) < 2:
            p.add(f"{k}.markers", f"expected two or more marker names, got {t['markers']!r}")
            continue
        tolerate.append((frozenset(t["markers"]), frozenset(t["tokens"])))

    if p:
        raise ExperimentError(source, list(p))
    return Experiment(
        name=name, path=source, digest=digest_of({**raw, "answers_words": list(answers.words)} if answers.words
                                                  else raw), description=description.strip(),
        personas=MappingProxyType(personas), pairs=MappingProxyType(pairs), negatives=tuple(negatives),
        markers=MappingProxyType(markers), probe_marker=probe_marker, probe_role=probe_role,
        conditions=MappingProxyType(conditions), loss_mask=loss_mask, role_loss_mask=MappingProxyType(role_masks),
        marker_pairs=tuple(marker_pairs), wilson=wilson, intervals=tuple(intervals), positions_min_joint=float(pos_min), headline=headline,
        sanity=sanity, verdict=verdict, heterogeneity=float(het), flags=flags, replicates=replicates,
        protocol=MappingProxyType(dict(protocol)), answers=answers, pools=MappingProxyType(pools),
        variables=MappingProxyType(variables), prefill=prefill, min_tokens=min_tokens, distinct=tuple(distinct),
        tolerate=tuple(tolerate), raw=MappingProxyType(raw))


# --------------------------------------------------------------------------- under the run's tokenizer


def token_problems(exp: Experiment, tokenizer, model: str = "the run's tokenizer") -> list[str]:
    """The marker rules under `tokenizer`: each marker alone is at least `min_tokens` tokens; no two
    markers of `distinct` share a token id, except the token texts `tolerate` declares for them."""
    ids = {m: tokenizer(text, add_special_tokens=False)["input_ids"] for m, text in exp.markers.items()}
    out = []
    for m, toks in ids.items():
        if len(toks) < exp.min_tokens:
            out.append(f"markers.{m}: {exp.markers[m]!r} is {len(toks)} token(s) under {model}; expected at least "
                       f"{exp.min_tokens} (tokens.min_tokens)")
    dist = list(exp.distinct)
    for i, x in enumerate(dist):
        for y in dist[i + 1:]:
            shared = sorted(set(ids[x]) & set(ids[y]))
            allowed = set().union(*(toks for ms, toks in exp.tolerate if {x, y} <= ms))
            bad = [t for t in shared if tokenizer.decode([t]) not in allowed]
            if bad:
                what = ", ".join(f"{t} ({tokenizer.decode([t])!r})" for t in bad)
                out.append(f"markers.{x} and markers.{y} share token id(s) {what} under {model}; choose other "
                           f"markers or declare the sharing in tokens.tolerate")
    return out


def check_tokenizer(exp: Experiment, tokenizer, model: str = "the run's tokenizer") -> None:
    problems = token_problems(exp, tokenizer, model)
    if problems:
        raise ExperimentError(exp.path, problems)
