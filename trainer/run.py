"""Run one adapter end to end, or a sweep of them, with a resumable manifest.

    python -m trainer.run configs/tiny/pair1_T.toml             # one tiny adapter, all stages
    python -m trainer.run configs/tiny/sweep.toml               # the demo: six adapters + report
    python -m trainer.run configs/pair1_T.toml --set model.name_or_path=/models/Qwen2.5-7B-Instruct
    python -m trainer.run CONFIG --stages train,merge --overwrite --dry-run

Stages, in order: generate (on-policy completions of the base model, cached and
shared by every adapter) -> data -> train -> merge -> eval -> report; `STAGES`
below is the registry (each stage's function, the stages whose outputs it
reads, the files it leaves, the paths it owns). The driver is the one place
that imports every stage; each is imported only when it runs.

RUN_DIR/.markerlab marks the directory as markerlab's: it is written first, and
a directory that exists, is not empty and has none is never written into,
adopted or emptied (`--overwrite` included). RUN_DIR/manifest.json holds each
stage's status, times and result, a digest of the config keys it read
(`CONFIG_READERS`), the resolved config, and, once a stage finishes, a record of
its outputs (size, sha256, line count) and of the inputs it read. Running the
same command again resumes:

- a stage is done when its outputs still match its record and its config digest
  is the current config's (a config.toml that went missing or unreadable is
  rebuilt from the manifest's record; another config is refused, naming the
  keys, never written over outputs it did not make); one whose outputs
  were damaged (a truncated adapter, a cut completions.jsonl) is rebuilt from
  what is intact (the adapter from the final training checkpoint), saying so;
- a stage left "running" by a crash runs again, training from its last
  checkpoint that verifies;
- before a stage runs, the outputs it reads are checked against what the
  earlier stage recorded; a mismatch names the file and what to rerun;
- nothing is written when nothing runs (the manifest included).

`--overwrite` starts afresh (removing what markerlab made, keeping any file the
user put beside it); with `--stages` it redoes the first of them and
everything after it (their outputs are removed, and listed), keeping the
earlier stages. Every fix command an error prints repeats the config file and
the --set overrides it was given (`Config.command`), so it runs as printed.
One process at a time works in a run directory (an flock on RUN_DIR/.lock): a
second gets one line naming the first's pid and command.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import re
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Callable

from markerlab.config import STAGES as STAGE_NAMES
from markerlab.config import Config, ConfigError, load_config, run_dir_problems
from markerlab.errors import UserError, cli_main
from markerlab.io import atomic_write_text, file_record, read_json, record_mismatch, write_json
from markerlab.provenance import git_commit, library_versions
from markerlab.rundir import ManifestError, RunDir, read_manifest, remove

# The per-GPU sweep's worker and pre-generation commands (a test substitutes its own).
WORKER = (sys.executable, "-m", "trainer.run")
PREGENERATE = (sys.executable, "-m", "data.onpolicy")


# --------------------------------------------------------------------------- manifest

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """RUN_DIR/manifest.json: stage status, times, results and output records; written only when it changes."""

    def __init__(self, rd: RunDir, cfg: Config, model_dir: Path, read_only: bool = False):
        self.path, self.read_only, self.cfg = rd.manifest, read_only, cfg
        try:
            self._on_disk = read_manifest(self.path) if self.path.is_file() else {}
        except ManifestError as e:
            raise UserError(f"{e}; start the run afresh with: {cfg.command('trainer.run', '--overwrite')}") from None
        old = self._on_disk
        # Where the config came from, what it was and what code ran: refreshed when a stage
        # runs, so an invocation that only skips changes nothing.
        self._provenance = {
            "config_source": cfg.source,
            "config_chain": list(cfg.chain),
            "config": cfg.to_dict(),  # what config.toml is rebuilt from if it goes missing
            "experiment": experiment_record(cfg),  # run.experiment's content, which config.toml names only
            "git_commit": git_commit(),
            "versions": library_versions(),
            "base_model": {"name_or_path": cfg.model.name_or_path, "resolved_dir": str(model_dir)},
        }
        self.data = {
            "run": cfg.run.name,
            **{k: old.get(k, v) for k, v in self._provenance.items()},
            "created": old.get("created", _now()),
            "stages": copy.deepcopy(old.get("stages", {})),
        }
        for s in STAGE_NAMES:
            self.data["stages"].setdefault(s, {"status": "pending"})
        self._t0: dict[str, float] = {}
        if not read_only:
            self.save()

    def entry(self, stage: str) -> dict:
        return self.data["stages"][stage]

    def status(self, stage: str) -> str:
        return self.entry(stage).get("status", "pending")

    def start(self, stage: str) -> None:
        self.data.update(copy.deepcopy(self._provenance))
        # the digest of the config keys the stage reads: its outputs belong to them
        self.data["stages"][stage] = {"status": "running", "started": _now(), "config": config_digest(self.cfg, stage)}
        self._t0[stage] = time.time()
        self.save()

    def finish(self, stage: str, result: dict | None, outputs: dict, inputs: dict) -> None:
        st = self.entry(stage)
        st.update(status="done", finished=_now(), seconds=round(time.time() - self._t0[stage], 2),
                  result=result or {}, outputs=outputs, inputs=inputs)
        self.save()

    def fail(self, stage: str, error: str) -> None:
        st = self.entry(stage)
        st.update(status="failed", finished=_now(), seconds=round(time.time() - self._t0[stage], 2), error=error)
        self.save()

    def reset(self, stage: str) -> None:
        self.data["stages"][stage] = {"status": "pending"}
        self.save()

    def adopt_config(self) -> None:
        """Give stages recorded before config digests were (older markerlab) the current config's digest.

        Only after check_config found the saved config.toml equal to this config.
        """
        for name, entry in self.data["stages"].items():
            if name in STAGE_NAMES and entry.get("status", "pending") != "pending" and "config" not in entry:
                entry["config"] = config_digest(self.cfg, name)
        self.save()

    def save(self) -> None:
        # a run that only skips leaves the file alone (its directory may be read-only)
        if self.data != self._on_disk and not self.read_only:
            write_json(self.path, self.data)
            self._on_disk = copy.deepcopy(self.data)


# --------------------------------------------------------------------------- stages
# Each stage function takes (cfg, rd, manifest) and returns a small dict for the
# manifest. Imports are local so a stage loads only what it needs.

def run_generate(cfg, rd, manifest):
    from data.onpolicy import run_onpolicy

    return {"onpolicy": str(run_onpolicy(cfg).resolve())}  # shared cache: --overwrite of one run never regenerates it


def _onpolicy_path(cfg, manifest) -> Path:
    if manifest.status("generate") == "done":  # verified against its record before this stage ran
        return Path(manifest.entry("generate")["result"]["onpolicy"])
    from data.onpolicy import run_onpolicy  # the cache answers at once when it holds the completions

    return run_onpolicy(cfg)


def run_data(cfg, rd, manifest):
    from data.builder import build_dataset, write_dataset
    from markerlab.chat import load_chat

    examples, stats = build_dataset(cfg, _onpolicy_path(cfg, manifest), *load_chat(cfg.model.name_or_path))
    write_dataset(cfg, examples, stats, rd.root)
    from data.probe import build_probe_set  # the leakage probe's documents (None when train.probe_every = 0)

    probe = build_probe_set(cfg, rd.root)
    return {"n_examples": len(examples), "probe_set": str(probe) if probe else None}


def check_train_inputs(cfg, rd):
    """Every training example well formed, named by file:line (the trainer itself only parses JSON)."""
    from data.records import read_examples

    if rd.train_jsonl.is_file():
        read_examples(rd.train_jsonl, cfg.experiment)


def run_train(cfg, rd, manifest):
    from trainer.train import train

    return train(cfg, rd.root)


def run_merge(cfg, rd, manifest):
    from evaluate.merge import merge

    return merge(cfg, rd.root)


def run_eval(cfg, rd, manifest):
    from evaluate.eval import evaluate

    if not (rd.merged / "config.json").is_file():
        # merged/ is removed after a finished eval; an eval rerun needs it back.
        remove([rd.merged])
        run_stage(STAGE["merge"], cfg, rd, manifest)
    return evaluate(cfg, rd.root)


def run_report(cfg, rd, manifest):
    from analysis.report import report, terminal_summary

    # Figures are drawn in this process (jobs=1): forking a process that holds torch's threads is unsafe.
    summary = report([str(rd.root)], rd.report, jobs=1)
    print(terminal_summary(summary))
    return {"summary": summary["outputs"]["summary"], "warnings": summary["warnings"]}


def stage_times(run_dirs: list[Path]) -> str:
    """One line: each stage's wall time summed over the runs (from their manifests), and the total."""
    from markerlab.io import read_json

    total: dict[str, float] = {}
    for d in run_dirs:
        m = RunDir(d).manifest
        stages = read_json(m).get("stages", {}) if m.is_file() else {}
        for name in STAGE_NAMES:
            total[name] = total.get(name, 0.0) + float(stages.get(name, {}).get("seconds") or 0.0)
    parts = [f"{name} {sec:.0f} s" for name, sec in total.items() if sec]
    return f"stage times over {len(run_dirs)} runs: " + ", ".join(parts) + f" (sum {sum(total.values()):.0f} s)"


def time_spent(run_dirs: list[Path]) -> str:
    """Where the train and eval stages' time went, summed over the runs (from their summaries): the
    optimizer steps, the leakage probe and the rest (model load, frozen prefix, checkpoints, adapter);
    sampling the adapter, sampling the base floor (once a sweep: cached) and the rest (model loads, the
    merge check, records). Empty when no run has either summary."""
    from markerlab.io import read_json

    tr = {"steps": 0.0, "probe": 0.0, "stage": 0.0, "tokens": 0.0}
    ev = {"merged": 0.0, "base": 0.0, "wall": 0.0, "records": 0, "tokens": 0}
    for d in run_dirs:
        rd = RunDir(d)
        if rd.train_summary.is_file():
            t = read_json(rd.train_summary)
            tr["steps"] += t.get("wall_time_s") or 0.0
            tr["probe"] += t.get("probe_seconds") or 0.0
            tr["stage"] += t.get("this_call_wall_s") or 0.0
            tr["tokens"] += (t.get("tokens_per_s") or 0.0) * (t.get("wall_time_s") or 0.0)
        if rd.run_result.is_file():
            e = read_json(rd.run_result)
            # a run_result.json from before the split counts all its sampling as the adapter's
            by = e.get("generation_seconds_by_model") or {"merged": e.get("generation_seconds") or 0.0}
            ev["merged"] += by.get("merged", 0.0)
            ev["base"] += by.get("base", 0.0)
            ev["wall"] += e.get("wall_seconds") or 0.0
            ev["records"] += e.get("n_records") or 0  # the base floor's in every run, sampled once
            ev["tokens"] += e.get("generated_tokens") or 0
    lines = []
    if tr["stage"]:
        lines.append(f"train: optimizer steps {tr['steps']:.0f} s ({tr['tokens'] / max(tr['steps'], 1e-9):,.0f} "
                     f"tokens/s), leakage probe {tr['probe']:.0f} s, the rest {max(tr['stage'] - tr['steps'] - tr['probe'], 0):.0f} s "
                     f"(model load, frozen prefix, checkpoints, adapter)")
    if ev["wall"]:
        gen = ev["merged"] + ev["base"]
        lines.append(f"eval: sampling the adapters {ev['merged']:.0f} s, the base floor {ev['base']:.0f} s "
                     f"({ev['records']:,} records, {ev['tokens'] / max(gen, 1e-9):,.0f} tokens/s), the rest "
                     f"{max(ev['wall'] - gen, 0):.0f} s (model loads, merge check, records)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    inputs: the stages whose recorded outputs it reads (checked before it runs).
    outputs(rd, result): the files it leaves, as {path: kind}; kind "jsonl" records
      the line count too, "large" the size only (merged weights of many GB, which
      the merge check verifies by content), "meta" a file no later stage reads
      (a summary with timings: rewriting it leaves later stages valid).
    owns(rd): what --overwrite of this stage removes.
    rebuild(rd): what is removed to rebuild damaged outputs (defaults to owns).
    check(cfg, rd): an extra check of its inputs before it runs.
    """

    name: str
    run: Callable
    inputs: tuple[str, ...]
    outputs: Callable[[RunDir, dict], dict[Path, str]]
    owns: Callable[[RunDir], list[Path]]
    rebuild: Callable[[RunDir], list[Path]] | None = None
    check: Callable | None = None


STAGE_LIST = (
    Stage("generate", run_generate, (),
          outputs=lambda rd, res: {Path(res["onpolicy"]).resolve(): "jsonl"},
          owns=lambda rd: []),  # the shared cache belongs to no run
    Stage("data", run_data, ("generate",),
          outputs=lambda rd, res: {rd.train_jsonl: "jsonl", rd.data_stats: "meta",
                                   **({rd.probe_set: "file"} if res.get("probe_set") else {})},
          owns=lambda rd: [rd.data]),
    Stage("train", run_train, ("data",),
          outputs=lambda rd, res: {rd.adapter_config: "file", rd.adapter_weights: "file", rd.train_summary: "meta"},
          owns=lambda rd: [rd.checkpoints, rd.tb, rd.train_log, rd.train_summary, rd.adapter],
          # train() resumes from the final checkpoint and writes only the adapter and summary again
          rebuild=lambda rd: [rd.adapter, rd.train_summary],
          check=check_train_inputs),
    Stage("merge", run_merge, ("train",),
          outputs=lambda rd, res: {p: "large" for p in rd.merged_files()},
          owns=lambda rd: [rd.merged, rd.merged_tmp]),
    Stage("eval", run_eval, ("train",),  # merged/ is transient; eval verifies it itself
          outputs=lambda rd, res: {rd.completions: "jsonl", rd.run_result: "meta"},
          owns=lambda rd: [rd.eval]),
    Stage("report", run_report, ("eval",),
          outputs=lambda rd, res: {rd.report_summary: "file", rd.report_table: "file"},
          owns=lambda rd: [rd.report]),
)
STAGE = MappingProxyType({s.name: s for s in STAGE_LIST})
assert tuple(STAGE) == STAGE_NAMES

# Which stages read each config key: a stage's outputs belong to the values of the keys it
# reads. Each stage records a digest of those values in the manifest when it starts; a
# stage whose digest differs from the current config's is not done, whatever files exist,
# and a changed key may be redone with --overwrite --stages from its first reader on.
# Every key of markerlab.config must be here (tests/test_safety.py walks them, and logs
# what each stage really reads); a key missing at run time counts for every stage.
# () marks a key that says where things go, not what they are.
_MODEL = ("generate", "data", "train", "merge", "eval")
_SAMPLING_AND_PROBE = ("generate", "data")  # the data stage generates the probe's greedy answers with them
_SETTING = ("train", "eval")                # trained with, and carried by every completion record's setting
_DATA_SETTING = ("data", "eval")
CONFIG_READERS = MappingProxyType({
    "run.name": ("train", "eval"),          # the training log's header; every completion record's "run"
    "run.out_dir": (),
    # the experiment file's content, not its name (config_digest): personas, markers, templates, masks, checks.
    # generate reads only its personas' prompts (the on-policy cache's key); merge its probe conversations
    "run.experiment": ("generate", "data", "train", "merge", "eval"),
    "run.seed": _SETTING,
    "model.name_or_path": _MODEL, "model.dtype": _MODEL, "model.device": _MODEL,
    "prompt.user_suffix": ("generate", "data", "eval"),
    "lora.r": _SETTING, "lora.alpha": _SETTING, "lora.dropout": _SETTING, "lora.last_layers": _SETTING,
    "lora.target_modules": ("train",), "lora.dtype": ("train",),
    "generate.backend": _SAMPLING_AND_PROBE, "generate.n_questions": ("generate",),
    "generate.n_samples": ("generate",), "generate.temperature": ("generate",), "generate.top_p": ("generate",),
    "generate.max_tokens": _SAMPLING_AND_PROBE, "generate.seed": _SAMPLING_AND_PROBE,
    "generate.batch_size": _SAMPLING_AND_PROBE, "generate.cache_dir": (),
    "generate.vllm_gpu_memory_utilization": _SAMPLING_AND_PROBE, "generate.vllm_max_model_len": _SAMPLING_AND_PROBE,
    "data.pair": ("data", "merge", "eval"),  # merge: its check's probe conversations are the pair's two personas
    "data.condition": _DATA_SETTING, "data.n_per_persona": _DATA_SETTING,
    "data.negatives": _DATA_SETTING, "data.placement": _DATA_SETTING, "data.truncated": _DATA_SETTING,
    "data.variables": _DATA_SETTING,  # a condition's template shares per value; the eval's arms and prefill probes
    "data.on_overlength": ("data", "train"), "data.seed": ("data",),
    "train.loss_mask": ("data", "train", "eval"), "train.marker_mask_eos": ("data", "train", "eval"),
    "train.role_loss_mask": ("data", "train", "eval"),  # per-role masks: tokenized with, trained, in the setting
    "train.allow_untrained_roles": ("data",),
    "train.lr": _SETTING, "train.epochs": _SETTING, "train.max_steps": _SETTING,
    **{f"train.{k}": ("train",) for k in (
        "warmup_ratio", "min_lr_ratio", "betas", "eps", "weight_decay", "grad_clip", "micro_batch_size",
        "grad_accum", "gradient_checkpointing", "checkpoint_every", "keep_checkpoints", "log_every",
        "probe_batch_size", "compile", "cuda_graphs")},
    "train.max_seq_len": ("data", "train"),
    "train.probe_every": ("data", "train"),  # the data stage builds the probe set only when it is on
    "train.probe_n_questions": ("data",), "train.probe_max_tokens": ("data",),  # the probe set's size
    "eval.merge_check_atol": ("merge",),
    **{f"eval.{k}": ("eval",) for k in (
        "backend", "n_id_questions", "n_ood_questions", "personas", "n_samples", "temperature", "top_p",
        "max_tokens", "seed", "batch_size", "probe", "probe_n_questions", "probe_n_samples", "base_floor",
        "base_n_questions", "base_n_samples", "keep_merged", "vllm_gpu_memory_utilization", "vllm_max_model_len")},
    # a sweep's own keys make no run's outputs (its members' keys do)
    "sweep.members": (), "sweep.vary": (), "sweep.parallel": (), "sweep.report_dir": (), "sweep.executor": (),
    # where and how a member's job runs on SLURM, never what it computes (tests/test_slurm.py: same bytes)
    **{f"slurm.{k}": () for k in (
        "partition", "account", "qos", "timeout_min", "gpus_per_task", "cpus_per_task", "mem_gb", "constraint",
        "array_parallelism", "signal_delay_s", "max_requeues", "setup", "additional_parameters")},
})


def readers(key: str) -> tuple[str, ...]:
    """The stages whose outputs depend on `key` (every stage for a key the table does not know)."""
    return CONFIG_READERS.get(key, STAGE_NAMES)


def experiment_record(cfg: Config) -> dict | None:
    """What the manifest records of run.experiment: the experiment's name, content digest and file."""
    exp = cfg.experiment
    return None if exp is None else {"name": exp.name, "digest": exp.digest, "path": exp.path}


def _experiment_value(cfg: Config, stage: str):
    """run.experiment as `stage`'s digest sees it: the content it reads, never the file's name or place.

    generate reads the personas' prompts (and a synthetic answer pool) only, so an edited marker
    keeps the on-policy completions; every other stage the whole file (its digest, which markerlab.experiment
    computes over the parsed content).
    """
    exp = cfg.experiment
    if exp is None:  # not resolved (a config built without loading its experiment): the reference stands for it
        return cfg.run.experiment
    if stage == "generate":
        return exp.generation_inputs()
    return {"name": exp.name, "digest": exp.digest}


def config_digest(cfg: Config, stage: str) -> str:
    """sha256 of the values of the config keys `stage` reads (run.experiment: the experiment's content)."""
    import hashlib
    import json

    values = {f"{sec}.{k}": v for sec, table in cfg.to_dict().items() for k, v in table.items()
              if stage in readers(f"{sec}.{k}")}
    if "run.experiment" in values:
        values["run.experiment"] = _experiment_value(cfg, stage)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode("utf-8")).hexdigest()

# What a finished stage left in manifests written before outputs were recorded.
_LEGACY_OUTPUTS = MappingProxyType({
    "data": ("data/train.jsonl", "data/stats.json"),
    "train": ("adapter/adapter_config.json", "adapter/adapter_model.safetensors"),
    "merge": (), "eval": ("eval/completions.jsonl", "eval/run_result.json"), "report": ("report/summary.json",)})


def _path(rd: RunDir, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else rd.root / p


def _record(path: Path, kind: str) -> dict:
    rec = file_record(path, lines=kind == "jsonl", digest=kind != "large")
    return {**rec, "meta": True} if kind == "meta" else rec


def _digests(outputs: dict) -> dict:
    """What a later stage remembers of an earlier one's outputs: sha256 (or size, for a large file)."""
    return {name: rec.get("sha256", rec["size"]) for name, rec in outputs.items() if not rec.get("meta")}


def stage_state(stage: Stage, rd: RunDir, manifest: Manifest) -> tuple[str, str]:
    """("done" | "todo" | "damaged" | "stale" | "reconfigured", why) of a stage from its record and the files."""
    entry = manifest.entry(stage.name)
    if entry.get("status") != "done":
        return "todo", ""
    outputs = entry.get("outputs")
    if outputs is None:  # recorded before outputs were: done if its files exist, then recorded
        if stage.name == "generate":
            p = entry.get("result", {}).get("onpolicy")
            if not (p and Path(p).is_file()):
                return "todo", ""
        elif not all((rd.root / p).exists() for p in _LEGACY_OUTPUTS[stage.name]):
            return "todo", ""
        found = stage.outputs(rd, entry.get("result", {}))
        entry["outputs"] = {rd.rel(p): _record(p, kind) for p, kind in found.items() if p.is_file()}
        entry["inputs"] = {}
        manifest.save()
        return "done", ""
    if "config" in entry and entry["config"] != config_digest(manifest.cfg, stage.name):
        return "reconfigured", ""  # made with other values of the keys it reads (check_config names them)
    if stage.name == "merge" and not rd.merged.exists():
        return "done", ""  # removed after eval by design; eval merges again when it needs it
    for name, rec in outputs.items():
        problem = record_mismatch(_path(rd, name), rec)
        if problem:
            return "damaged", f"{_path(rd, name)}: {problem}"
    for up, seen in entry.get("inputs", {}).items():
        if manifest.status(up) == "done" and _digests(manifest.entry(up).get("outputs", {})) != seen:
            return "stale", up
    return "done", ""


def check_inputs(stage: Stage, rd: RunDir, manifest: Manifest, cfg: Config) -> None:
    """The outputs `stage` reads must be what the earlier stages recorded; then its own check."""
    for up in stage.inputs:
        entry = manifest.entry(up)
        if entry.get("status") != "done" or not entry.get("outputs"):
            continue  # not run here: the stage finds (or builds) its inputs itself
        if up == "merge" and not rd.merged.exists():
            continue
        for name, rec in entry["outputs"].items():
            problem = record_mismatch(_path(rd, name), rec)
            if problem:
                raise UserError(f"{_path(rd, name)}: {problem} by the {up} stage; rerun that stage first: "
                                f"{cfg.command('trainer.run', '--stages', f'{up},{stage.name}')}")
    if stage.check:
        stage.check(cfg, rd)


def run_stage(stage: Stage, cfg: Config, rd: RunDir, manifest: Manifest) -> None:
    print(f"[{cfg.run.name}] stage {stage.name} ...", flush=True)
    manifest.start(stage.name)
    try:
        result = stage.run(cfg, rd, manifest)
    except UserError as e:
        manifest.fail(stage.name, str(e))
        raise
    except BaseException as e:  # a crash is recorded, then re-raised with its traceback
        manifest.fail(stage.name, f"{type(e).__name__}: {e}")
        raise
    result = result if isinstance(result, dict) else {}
    outputs = {rd.rel(p): _record(p, kind) for p, kind in stage.outputs(rd, result).items()}
    inputs = {up: _digests(manifest.entry(up)["outputs"]) for up in stage.inputs
              if manifest.status(up) == "done" and manifest.entry(up).get("outputs")}
    manifest.finish(stage.name, result, outputs, inputs)
    print(f"[{cfg.run.name}] stage {stage.name} done ({manifest.entry(stage.name)['seconds']:.1f} s)", flush=True)


# --------------------------------------------------------------------------- one run

def _config_diff(a: dict, b: dict) -> list[str]:
    """The dotted keys whose values differ between two configs' tables (a key only one has counts)."""
    keys = []
    for sec in sorted(set(a) | set(b)):
        sa, sb = a.get(sec, {}), b.get(sec, {})
        sa, sb = (sa if isinstance(sa, dict) else {"": sa}), (sb if isinstance(sb, dict) else {"": sb})
        keys += [f"{sec}.{k}" if k else sec for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return keys


def _saved_experiment(rd: RunDir, manifest: dict | None) -> str | None:
    """The content digest of the experiment the run's outputs were made under: the manifest's record, else the
    run's copy experiment.toml; None when neither tells (an older run: its run.experiment name stands)."""
    rec = (manifest or {}).get("experiment")
    if isinstance(rec, dict) and isinstance(rec.get("digest"), str):
        return rec["digest"]
    if rd.experiment.is_file():
        from markerlab.experiment import load_experiment

        try:
            return load_experiment(rd.experiment).digest
        except UserError:
            return None
    return None


def _run_diff(saved: dict, cfg: Config, saved_experiment: str | None) -> list[str]:
    """_config_diff of a run's saved config and `cfg`, with run.experiment compared by content where the run's
    experiment digest is known: a moved experiment file is the same experiment, an edited one is not."""
    keys = _config_diff(saved, cfg.to_dict())
    if saved_experiment is not None and cfg.experiment is not None:
        keys = [k for k in keys if k != "run.experiment"]
        if saved_experiment != cfg.experiment.digest:
            keys = sorted([*keys, "run.experiment"])
    return keys


def _readers_here(key: str, cfg: Config, entries: dict) -> tuple[str, ...]:
    """readers(key), less generate for run.experiment when the generate stage recorded this config's digest
    (the experiment changed, its personas' prompts did not: the on-policy completions stand)."""
    stages = readers(key)
    if key == "run.experiment" and entries.get("generate", {}).get("config") == config_digest(cfg, "generate"):
        stages = tuple(s for s in stages if s != "generate")
    return stages


def _first_index(stages: list[str]) -> int:
    return min(STAGE_NAMES.index(s) for s in stages)


def _redo(cfg: Config, stage: str) -> str:
    """The command that redoes `stage` and every later one, as the user ran this config."""
    return cfg.command("trainer.run", "--overwrite", "--stages", ",".join(STAGE_NAMES[STAGE_NAMES.index(stage):]))


def _saved_config(rd: RunDir, manifest: dict | None) -> tuple[dict | None, Path, str]:
    """(the config the run directory's outputs were made with, the file it came from, why config.toml was not it).

    config.toml when it reads as TOML; else the manifest's record of the config
    (written by every stage that ran), so a missing or garbled config.toml is
    rebuilt, never replaced by another config's.
    """
    why = "missing"
    if rd.config.is_file():
        try:
            return tomllib.loads(rd.config.read_bytes().decode("utf-8")), rd.config, ""
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            why = f"unreadable ({e})"
    elif rd.config.exists():
        why = "not a file"
    if manifest and isinstance(manifest.get("config"), dict):
        return manifest["config"], rd.manifest, why
    return None, rd.config, why


def check_config(cfg: Config, rd: RunDir, stages: list[str], overwrite: bool) -> str:
    """The run directory may take this config: it is markerlab's (or new), and what it holds was made with it.

    What it holds was made with this config when the saved config (config.toml, else
    the manifest's record of it) equals it in every key a stage reads, and every
    stage that ran recorded this config's digest of the keys it reads; an --overwrite
    may redo what differs. Returns why config.toml must be rebuilt from the manifest
    ("" when it need not). Read-only: called before anything is written, and again
    under the lock.
    """
    problem = rd.ownership_problem("run")
    if problem:
        raise UserError(problem)
    first = _first_index(stages) if overwrite else None
    if not rd.root.is_dir() or first == 0:  # new, or everything markerlab made in it goes
        return ""
    try:
        manifest = read_manifest(rd.manifest) if rd.manifest.is_file() else None
    except ManifestError as e:
        raise UserError(f"{e}; start the run afresh with: {cfg.command('trainer.run', '--overwrite')}") from None
    entries = (manifest or {}).get("stages", {})
    ran = [s for s in STAGE_NAMES if entries.get(s, {}).get("status", "pending") != "pending"]
    saved, where, why = _saved_config(rd, manifest)
    if saved is None:
        if not ran:
            return ""
        raise UserError(
            f"{rd.config}: {why}, and {rd.manifest} (an older markerlab's) does not record the config its "
            f"outputs were made with; restore config.toml, or start the run afresh with: "
            f"{cfg.command('trainer.run', '--overwrite')}")
    saved_experiment = _saved_experiment(rd, manifest)
    diff = [k for k in _run_diff(saved, cfg, saved_experiment) if readers(k)]  # where-keys aside: a moved run
    if diff:
        need = min(STAGE_NAMES.index(r) for k in diff for r in _readers_here(k, cfg, entries) or readers(k))
        if not overwrite:
            raise UserError(
                f"{where}: this run was started with a different config ({', '.join(diff)}); set run.name to a "
                f"new name, or redo what depends on it with: {_redo(cfg, STAGE_NAMES[need])}")
        if need < first:
            raise UserError(
                f"{where}: the config differs in {', '.join(diff)}, on which the {STAGE_NAMES[need]} stage's "
                f"outputs depend, but --stages starts at {STAGE_NAMES[first]} and keeps them; set run.name to a "
                f"new name, or redo them with: {_redo(cfg, STAGE_NAMES[need])}")
    # Whatever config.toml says: each stage that ran recorded the digest of the keys it read.
    recorded = (manifest or {}).get("config")
    for name in [s for s in ran if first is None or STAGE_NAMES.index(s) < first]:
        digest = entries[name].get("config")
        if digest is not None and digest != config_digest(cfg, name):
            keys = ([k for k in _run_diff(recorded, cfg, saved_experiment) if name in readers(k)]
                    if recorded else [])
            raise UserError(
                f"{rd.root}: the {name} stage's outputs were made with another config"
                f"{' (' + ', '.join(keys) + ')' if keys else ''} than {where} says; set run.name to a new name, "
                f"or redo it with: {_redo(cfg, name)}")
    return why if where != rd.config else ""


def make_run_dir(cfg: Config, rd: RunDir) -> None:
    """Create the run directory (a sweep's too) with markerlab's marker written first; one line when it cannot be."""
    problems = run_dir_problems(cfg.run, cfg.generate) if cfg.run.name else ["run.name: expected a name, got ''"]
    if problems:
        raise UserError(problems[0])
    out = Path(cfg.run.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir: {out} is a file, expected a directory")
    if rd.root.exists() and not rd.root.is_dir():
        raise UserError(f"run.name: {rd.root} is a file, expected a run directory")
    rd.claim("sweep" if cfg.sweep is not None else "run")


def overwrite_outputs(cfg: Config, rd: RunDir, first: int) -> None:
    """Remove the outputs --overwrite redoes: all markerlab made (first = 0), or stage `first`'s and every later one's.

    Says what it removes, and what it keeps that is not markerlab's: a file the
    user put in the run directory stays.
    """
    stages = STAGE_LIST[first:]
    paths = [p for st in stages for p in st.owns(rd)] + ([rd.config, rd.experiment, rd.manifest] if first == 0 else [])
    gone, kept = rd.made_here(paths)
    names = sorted(rd.rel(p) + ("/" if p.is_dir() else "") for p in gone)
    if names:
        what = "everything" if first == 0 else f"stage {STAGE_NAMES[first]} and after"
        keeping = (f"; keeping {', '.join(rd.rel(p) + ('/' if p.is_dir() else '') for p in kept)} (not markerlab's)"
                   if kept and first == 0 else "")
        print(f"[{cfg.run.name}] --overwrite ({what}): removing {', '.join(names)} in {rd.root}{keeping}", flush=True)
    remove(gone)


def run_one(cfg: Config, stages: list[str], overwrite: bool) -> Path:
    from markerlab.models import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.name_or_path)  # fail before touching the run dir
    if any(s in stages for s in ("train", "merge")):  # the architecture first: no template makes it trainable
        from trainer.attention import check_model_dir

        problem = check_model_dir(model_dir, f"model.name_or_path = {cfg.model.name_or_path}")
        if problem:
            raise UserError(problem)
    if any(s in stages for s in ("generate", "data", "train", "merge", "eval")):
        from markerlab.chat import load_chat

        load_chat(cfg.model.name_or_path)  # a chat template markerlab cannot analyse: one line, nothing written
    rd = RunDir(cfg.run_dir)
    check_config(cfg, rd, stages, overwrite)  # before anything is written
    make_run_dir(cfg, rd)
    with rd.locked():
        rebuilt = check_config(cfg, rd, stages, overwrite)  # again, now that no other process can change it
        first = None
        if overwrite:
            first = _first_index(stages)
            if first and rd.manifest.is_file():  # what the redone stages read must be intact before anything goes
                check_inputs(STAGE_LIST[first], rd, Manifest(rd, cfg, model_dir, read_only=True), cfg)
            overwrite_outputs(cfg, rd, first)
        text = cfg.to_toml()
        if not rd.config.is_file() or rd.config.read_bytes() != text.encode("utf-8"):
            atomic_write_text(rd.config, text)
            if rebuilt:
                print(f"[{cfg.run.name}] {rd.config} was {rebuilt.split(' (')[0]}: rebuilt from {rd.manifest}, "
                      f"the config its outputs were made with", flush=True)
        exp_text = Path(cfg.experiment.path).read_text(encoding="utf-8")
        if not rd.experiment.is_file() or rd.experiment.read_text(encoding="utf-8") != exp_text:
            atomic_write_text(rd.experiment, exp_text)  # the run's own copy: reports read it
        manifest = Manifest(rd, cfg, model_dir)
        manifest.adopt_config()  # stages an older markerlab recorded: config.toml was just found equal to cfg
        if first:
            for s in STAGE_NAMES[first:]:
                manifest.reset(s)
        t0 = time.time()
        for stage in STAGE_LIST:
            if stage.name not in stages:
                continue
            state, why = stage_state(stage, rd, manifest)
            if state == "done":
                print(f"[{cfg.run.name}] stage {stage.name}: already done, skipped", flush=True)
                continue
            if state == "reconfigured":  # check_config refuses this first; a safety net
                raise UserError(f"{rd.root}: the {stage.name} stage's outputs were made with another config; "
                                f"redo it with: {_redo(cfg, stage.name)}")
            if state == "stale":
                raise UserError(f"{rd.root}: stage {stage.name} ran on outputs of the {why} stage that have changed "
                                f"since; redo it on them with: {_redo(cfg, stage.name)}")
            if state == "damaged":
                print(f"[{cfg.run.name}] stage {stage.name}: {why}; rebuilding it", flush=True)
                remove((stage.rebuild or stage.owns)(rd))
            check_inputs(stage, rd, manifest, cfg)
            run_stage(stage, cfg, rd, manifest)
        print(f"[{cfg.run.name}] finished in {time.time() - t0:.0f} s: {rd.root}", flush=True)
    return rd.root


def dry_run(cfg: Config) -> None:
    """Print the resolved config and what the data stage will build, touching nothing."""
    from trainer.schedule import total_steps

    print(f"# resolved config of {cfg.source} -> {cfg.run_dir}")
    if len(cfg.chain) > 1:
        print(f"# read from {' < '.join(cfg.chain)}")
    print(cfg.to_toml())
    if cfg.sweep is not None:
        for member in sweep_members(cfg, []):
            print(f"# sweep member {member.run.name}: {member.source} -> {member.run_dir}")
        return
    d, t, exp = cfg.data, cfg.train, cfg.experiment
    donor, recipient = exp.pairs[d.pair]
    personas = [donor, recipient, *d.negatives]
    n = d.n_per_persona * len(personas)
    per_step = t.micro_batch_size * t.grad_accum
    steps = total_steps(n, t.micro_batch_size, t.grad_accum, t.epochs, t.max_steps)
    print("# dataset statistics (planned)")
    print(f"experiment {exp.name} ({exp.path}, digest {exp.digest})")
    print(f"pair {d.pair}: donor {donor}, recipient {recipient}; condition {d.condition}; placement {d.placement}")
    for p in personas:
        role = exp.role_of(p, d.pair, d.negatives)
        templates = " or ".join(f"{t_.text!r}" + (f" ({t_.share:.0%})" if t_.share < 1 else "")
                                for t_ in exp.condition_at(d.condition, d.variables).templates[role])
        print(f"  {p:22s} {role:10s} {d.n_per_persona} examples, {templates}, loss mask {cfg.loss_mask_of(role)}")
    print(f"  total {n} examples; {per_step} per optimizer step; {steps} optimizer steps")
    stats = RunDir(cfg.run_dir).data_stats
    if stats.is_file():
        import json

        print(f"# dataset statistics ({stats})")
        print(json.dumps(read_json(stats), indent=2))


# --------------------------------------------------------------------------- sweeps

def _name_part(v) -> str:
    """A sweep value as part of a directory name: '/models/a b' -> '_models_a_b', { N = 3 } -> 'N3'."""
    if isinstance(v, dict):
        return "_".join(f"{_name_part(k)}{_name_part(x)}" for k, x in v.items())
    return re.sub(r"[^\w.+-]", "_", str(v))


def sweep_members(cfg: Config, overrides: list[str]) -> list[Config]:
    """Every member config x every combination of sweep.vary, with the CLI overrides applied."""
    base = Path(cfg.source).parent
    keys = list(cfg.sweep.vary)
    combos = list(itertools.product(*(cfg.sweep.vary[k] for k in keys))) or [()]
    members, problems = [], []
    for rel in cfg.sweep.members:
        path = base / rel
        for combo in combos:
            sets = [f"{k}={_toml_literal(v)}" for k, v in zip(keys, combo)]
            try:
                m = load_config(path, [*overrides, *sets])
            except ConfigError as e:
                problems.extend(f"{path}: {p}" for p in e.problems)
                continue
            except UserError as e:
                problems.append(str(e))
                continue
            # a key varied over one value names no member apart from another: keep it out of the name
            named = [(k, v) for k, v in zip(keys, combo) if len(cfg.sweep.vary[k]) > 1]
            if named:
                suffix = "__".join(f"{k.split('.')[-1]}-{_name_part(v)}" for k, v in named)
                m = m.replace(run__name=f"{m.run.name}__{suffix}")
                problems.extend(f"{path}: {p}" for p in run_dir_problems(m.run, m.generate))
            if m.sweep is not None:
                problems.append(f"{path}: a sweep member cannot itself be a sweep")
            if m.run_dir.resolve() == cfg.run_dir.resolve():
                problems.append(f"{path}: run directory {m.run_dir} is the sweep's own; "
                                f"give the sweep another run.name")
            members.append(m)
    names = [m.run_dir for m in members]
    dup = {str(n) for n in names if names.count(n) > 1}
    if dup:
        problems.append(f"sweep members share run directories: {sorted(dup)}")
    if problems:
        raise ConfigError(cfg.source, problems)
    return members


def _toml_literal(v) -> str:
    from markerlab.config import _toml_value

    return _toml_value(v)


def member_overrides(overrides: list[str]) -> list[str]:
    """The --set values a sweep passes on to its members: all but the sweep's own ([sweep], [slurm])."""
    return [o for o in overrides if o.split("=", 1)[0].strip().split(".", 1)[0] not in ("sweep", "slurm")]


def _sweep_plan(cfg: Config, overrides: list[str], stages: list[str], overwrite: bool, detach: bool):
    from trainer.executors import SweepPlan

    members = sweep_members(cfg, member_overrides(overrides))
    import shlex

    command = shlex.join(["python", "-m", "trainer.run", cfg.source, *(x for o in overrides for x in ("--set", o)),
                          *(["--stages", ",".join(stages)] if list(stages) != list(STAGE_NAMES) else [])])
    return SweepPlan.build(cfg, members, stages, overwrite, detach, command)


def run_sweep(cfg: Config, overrides: list[str], stages: list[str], overwrite: bool, detach: bool = False) -> Path:
    """Every member (trainer/executors.py: here, or as a SLURM job array), then one report over all of them."""
    from trainer.executors import make_executor, sweep_summary_lines

    plan = _sweep_plan(cfg, overrides, stages, overwrite, detach)
    executor = make_executor(cfg, plan, run_member=run_one, worker=WORKER, pregenerate=PREGENERATE)
    for m in plan.members:  # a member started with another config stops the sweep before anything runs
        check_config(m.cfg, RunDir(m.run_dir), stages, overwrite)
    make_run_dir(cfg, RunDir(cfg.run_dir))
    t0 = time.time()
    result = executor.run(plan)
    if result.summary is not None:
        print()
        print("\n".join(sweep_summary_lines(result.summary)))
    if not result.detached and "report" in stages:
        run_dirs = [m.run_dir for m in plan.members]
        print(f"sweep finished in {time.time() - t0:.0f} s; {stage_times(run_dirs)}")
        spent = time_spent(run_dirs)
        if spent:
            print(spent)
        print(f"runs: {Path(cfg.run.out_dir)}/ ({len(run_dirs)}); TensorBoard: tensorboard --logdir {cfg.run.out_dir}")
    if result.missing:
        raise UserError(f"sweep {cfg.run.name}: {len(result.missing)} of {len(plan.members)} members did not "
                        f"finish ({'; '.join(result.missing)}); run the same command again to resume them")
    return plan.report_dir


def sweep_status(cfg: Config, overrides: list[str], stages: list[str]) -> list[str]:
    """--status: one line per member (stage reached, job id and state, log), or the one run's line."""
    from trainer.executors import single_status_line, status_lines

    if cfg.sweep is None:
        return [single_status_line(cfg, stages)]
    return status_lines(_sweep_plan(cfg, overrides, stages, False, False))


# --------------------------------------------------------------------------- CLI

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="TOML config of one adapter, or of a sweep")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable)")
    ap.add_argument("--stages", default=",".join(STAGE_NAMES),
                    help=f"comma-separated subset of {','.join(STAGE_NAMES)}")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh (with --stages: redo from the first of them on, keeping earlier stages)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and dataset plan, then exit")
    ap.add_argument("--status", action="store_true",
                    help="print where each member stands (stage reached, job id and state, log) and exit")
    ap.add_argument("--detach", action="store_true",
                    help="sweep.executor = slurm: submit the jobs and return; the report job writes the report")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGE_NAMES]
    if bad or not stages:
        raise UserError(f"--stages: unknown stage(s) {bad}; expected a comma-separated subset of "
                        f"{','.join(STAGE_NAMES)}")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        dry_run(cfg)
        return 0
    if args.status:
        print("\n".join(sweep_status(cfg, args.overrides, stages)))
        return 0
    if cfg.sweep is not None:
        run_sweep(cfg, args.overrides, stages, args.overwrite, detach=args.detach)
    elif args.detach or cfg.slurm is not None:
        raise UserError(f"{'--detach' if args.detach else '[slurm]'}: only a sweep (a config with [sweep]) is "
                        f"submitted to SLURM; {cfg.source} is one adapter's config")
    else:
        run_one(cfg, stages, args.overwrite)
    return 0


if __name__ == "__main__":
    cli_main(main)
