"""Run one adapter end to end, or a sweep of them, with a resumable manifest.

    python -m trainer.run configs/tiny/pair1_T.toml             # one tiny adapter, all stages
    python -m trainer.run configs/tiny/sweep.toml               # the demo: six adapters + report
    python -m trainer.run configs/pair1_T.toml --set model.name_or_path=/models/Qwen2.5-7B-Instruct
    python -m trainer.run CONFIG --stages train,merge --overwrite --dry-run

Stages, in order: generate (on-policy completions of the base model, cached and
shared by every adapter) -> data -> train -> merge -> eval -> report. Each
stage's status and times go to RUN_DIR/manifest.json. Running the same command
again resumes: finished stages are skipped, a stage left "running" by a crash
runs again, and training continues from its last checkpoint. `--overwrite`
starts the run afresh. This module is the pipeline driver, the one place that
imports every stage; each stage is imported only when it runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from markerlab.config import STAGES, Config, ConfigError, load_config
from markerlab.experiment import PAIRS, role_of
from markerlab.errors import UserError, cli_main
from markerlab.io import read_json, write_json
from markerlab.provenance import git_commit, library_versions



# --------------------------------------------------------------------------- manifest

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """RUN_DIR/manifest.json: stage status and times, written atomically on every change."""

    def __init__(self, run_dir: Path, cfg: Config, model_dir: Path):
        self.path = run_dir / "manifest.json"
        old = read_json(self.path) if self.path.is_file() else {}
        self.data = {
            "run": cfg.run.name,
            "config_source": cfg.source,
            "created": old.get("created", _now()),
            "git_commit": git_commit(),
            "versions": library_versions(),
            "base_model": {"name_or_path": cfg.model.name_or_path, "resolved_dir": str(model_dir)},
            "stages": old.get("stages", {s: {"status": "pending"} for s in STAGES}),
        }
        self.save()

    def status(self, stage: str) -> str:
        return self.data["stages"].get(stage, {}).get("status", "pending")

    def start(self, stage: str) -> None:
        self.data["stages"][stage] = {"status": "running", "started": _now()}
        self.save()
        self._t0 = time.time()

    def finish(self, stage: str, result: dict | None) -> None:
        st = self.data["stages"][stage]
        st.update(status="done", finished=_now(), seconds=round(time.time() - self._t0, 2), result=result or {})
        self.save()

    def fail(self, stage: str, error: str) -> None:
        st = self.data["stages"][stage]
        st.update(status="failed", finished=_now(), seconds=round(time.time() - self._t0, 2), error=error)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


# --------------------------------------------------------------------------- stages
# Each stage takes (cfg, run_dir, overwrite, manifest) and returns a small dict
# for the manifest. Imports are local so a stage loads only what it needs.

def stage_generate(cfg, run_dir, overwrite, manifest):
    from data.onpolicy import run_onpolicy

    path = run_onpolicy(cfg)  # shared cache: --overwrite of one run never regenerates it
    return {"onpolicy": str(path)}


def _onpolicy_path(cfg, manifest) -> Path:
    path = manifest.data["stages"].get("generate", {}).get("result", {}).get("onpolicy")
    if path and Path(path).is_file():
        return Path(path)
    from data.onpolicy import run_onpolicy  # the cache answers at once when it holds the completions

    return run_onpolicy(cfg)


def stage_data(cfg, run_dir, overwrite, manifest):
    from data.builder import build_dataset, write_dataset
    from markerlab.models import load_tokenizer

    examples, stats = build_dataset(cfg, _onpolicy_path(cfg, manifest), load_tokenizer(cfg.model.name_or_path))
    write_dataset(cfg, examples, stats, run_dir)
    from data.probe import build_probe_set  # the leakage probe's documents (None when train.probe_every = 0)

    probe = build_probe_set(cfg, run_dir)
    return {"n_examples": len(examples), "probe_set": str(probe) if probe else None}


def stage_train(cfg, run_dir, overwrite, manifest):
    from trainer.train import train

    return train(cfg, run_dir, overwrite=overwrite)


def stage_merge(cfg, run_dir, overwrite, manifest):
    from evaluate.merge import merge

    return merge(cfg, run_dir, overwrite=overwrite)


def stage_eval(cfg, run_dir, overwrite, manifest):
    from evaluate.eval import evaluate

    if not (run_dir / "merged" / "config.json").is_file():
        # merged/ is removed after a finished eval; an eval rerun needs it back.
        run_stage("merge", cfg, run_dir, True, manifest)
    return evaluate(cfg, run_dir, overwrite=overwrite)


def stage_report(cfg, run_dir, overwrite, manifest):
    from analysis.report import report
    from analysis.table import headline

    # Figures are drawn in this process (jobs=1): forking a process that holds torch's threads is unsafe.
    summary = report([str(run_dir)], run_dir / "report", jobs=1)
    print(headline(summary))
    return {"summary": summary["outputs"]["summary"], "warnings": summary["warnings"]}


STAGE_FNS = {"generate": stage_generate, "data": stage_data, "train": stage_train,
             "merge": stage_merge, "eval": stage_eval, "report": stage_report}

# What a finished stage leaves behind; a "done" stage whose output is gone runs again.
STAGE_OUTPUTS = {
    "data": ["data/train.jsonl", "data/stats.json"],
    "train": ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"],
    "merge": [],  # merged/ is deleted after eval by design
    "eval": ["eval/completions.jsonl", "eval/run_result.json"],
    "report": ["report/summary.json"],
}


def stage_is_done(stage: str, run_dir: Path, manifest: Manifest) -> bool:
    if manifest.status(stage) != "done":
        return False
    if stage == "generate":
        p = manifest.data["stages"]["generate"].get("result", {}).get("onpolicy")
        return bool(p) and Path(p).is_file()
    return all((run_dir / p).exists() for p in STAGE_OUTPUTS[stage])


def run_stage(stage: str, cfg: Config, run_dir: Path, overwrite: bool, manifest: Manifest) -> None:
    print(f"[{cfg.run.name}] stage {stage} ...", flush=True)
    manifest.start(stage)
    try:
        result = STAGE_FNS[stage](cfg, run_dir, overwrite, manifest)
    except UserError as e:
        manifest.fail(stage, str(e))
        raise
    except BaseException as e:  # a crash is recorded, then re-raised with its traceback
        manifest.fail(stage, f"{type(e).__name__}: {e}")
        raise
    manifest.finish(stage, result if isinstance(result, dict) else None)
    print(f"[{cfg.run.name}] stage {stage} done ({manifest.data['stages'][stage]['seconds']:.1f} s)", flush=True)


# --------------------------------------------------------------------------- one run

def _config_diff(a: str, b: str) -> list[str]:
    import tomllib

    da, db = tomllib.loads(a), tomllib.loads(b)
    keys = []
    for sec in sorted(set(da) | set(db)):
        sa, sb = da.get(sec, {}), db.get(sec, {})
        keys += [f"{sec}.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return keys


def prepare_run_dir(cfg: Config, overwrite: bool) -> Path:
    """Create (or, with --overwrite, clear) the run directory and save the resolved config.

    Without --overwrite an existing run must have been made with the same
    resolved config: resuming under different settings would silently mix two
    experiments in one directory.
    """
    run_dir = cfg.run_dir
    text = cfg.to_toml()
    saved = run_dir / "config.toml"
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    elif saved.is_file():
        diff = _config_diff(saved.read_text(encoding="utf-8"), text)
        if diff:
            raise UserError(
                f"{saved}: this run was started with a different config ({', '.join(diff)}); "
                f"pass --overwrite to start afresh, or set run.name to a new name")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.is_file() or saved.read_text(encoding="utf-8") != text:
        from markerlab.io import atomic_write_text

        atomic_write_text(saved, text)
    return run_dir


def run_one(cfg: Config, stages: list[str], overwrite: bool) -> Path:
    from markerlab.models import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.name_or_path)  # fail before touching the run dir
    run_dir = prepare_run_dir(cfg, overwrite)
    manifest = Manifest(run_dir, cfg, model_dir)
    t0 = time.time()
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage_is_done(stage, run_dir, manifest):
            print(f"[{cfg.run.name}] stage {stage}: already done, skipped", flush=True)
            continue
        run_stage(stage, cfg, run_dir, overwrite=False, manifest=manifest)
    print(f"[{cfg.run.name}] finished in {time.time() - t0:.0f} s: {run_dir}", flush=True)
    return run_dir


def dry_run(cfg: Config) -> None:
    """Print the resolved config and what the data stage will build, touching nothing."""
    print(f"# resolved config of {cfg.source} -> {cfg.run_dir}")
    print(cfg.to_toml())
    if cfg.sweep is not None:
        for member in sweep_members(cfg, []):
            print(f"# sweep member {member.run.name}: {member.source} -> {member.run_dir}")
        return
    d, t = cfg.data, cfg.train
    donor, recipient = PAIRS[d.pair]
    personas = [donor, recipient, *d.negatives]
    n = d.n_per_persona * len(personas)
    per_step = t.micro_batch_size * t.grad_accum
    steps = t.epochs * -(-n // per_step)
    if t.max_steps:
        steps = min(steps, t.max_steps)
    print("# dataset statistics (planned)")
    print(f"pair {d.pair}: donor {donor}, recipient {recipient}; condition {d.condition}; placement {d.placement}")
    for p in personas:
        role = role_of(p, d.pair, d.negatives)
        print(f"  {p:22s} {role:10s} {d.n_per_persona} examples")
    print(f"  total {n} examples; {per_step} per optimizer step; {steps} optimizer steps")
    stats = cfg.run_dir / "data" / "stats.json"
    if stats.is_file():
        import json

        print(f"# dataset statistics ({stats})")
        print(json.dumps(read_json(stats), indent=2))


# --------------------------------------------------------------------------- sweeps

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
            if combo:
                suffix = "__".join(f"{k.split('.')[-1]}-{v}" for k, v in zip(keys, combo))
                m = m.replace(run__name=f"{m.run.name}__{suffix}")
            if m.sweep is not None:
                problems.append(f"{path}: a sweep member cannot itself be a sweep")
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


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def run_sweep(cfg: Config, overrides: list[str], stages: list[str], overwrite: bool) -> Path:
    members = sweep_members(cfg, overrides)
    n_gpu = visible_gpus()
    mode = cfg.sweep.parallel
    if mode == "auto":
        mode = "per_gpu" if n_gpu > 1 else "sequential"
    if mode == "per_gpu" and n_gpu < 1:
        raise UserError("sweep.parallel: per_gpu needs CUDA GPUs and none is visible (use sequential or auto)")
    print(f"sweep {cfg.run.name}: {len(members)} runs, {mode}" + (f" on {n_gpu} GPUs" if mode == "per_gpu" else ""))
    t0 = time.time()
    if mode == "sequential":
        run_dirs = [run_one(m, stages, overwrite) for m in members]
    else:
        run_dirs = _run_per_gpu(cfg, members, stages, overwrite, n_gpu)

    out = Path(cfg.sweep.report_dir) if cfg.sweep.report_dir else cfg.run_dir
    if "report" in stages:
        from analysis.report import report
        from analysis.table import gates, headline

        summary = report([str(r) for r in run_dirs], out, jobs=1)
        print()
        print(headline(summary))
        print()
        print(gates(summary))
        print(f"\nsweep finished in {time.time() - t0:.0f} s")
        print(f"  report:      {out / 'table.md'}, {out / 'summary.json'}")
        print(f"  figures:     {out / 'figures'}/")
        print(f"  runs:        {', '.join(str(r) for r in run_dirs)}")
        print(f"  TensorBoard: tensorboard --logdir {Path(cfg.run.out_dir)}")
    return out


def _run_per_gpu(cfg, members, stages, overwrite, n_gpu) -> list[Path]:
    """One worker process per GPU, each with its own CUDA_VISIBLE_DEVICES, taking members in order.

    Each worker runs `python -m trainer.run` on the member's resolved config,
    written beside the sweep's report, so a worker sees exactly what a
    sequential sweep would have run.
    """
    from markerlab.io import atomic_write_text

    resolved = cfg.run_dir / "members"
    for m in members:
        atomic_write_text(resolved / f"{m.run.name}.toml", m.to_toml())
    if "generate" in stages:
        # Generate once per distinct base model and sampling settings before
        # fanning out, so workers share the cache instead of racing to fill it.
        seen = set()
        for m in members:
            key = (m.model, m.generate)
            if key not in seen:
                seen.add(key)
                cmd = [sys.executable, "-m", "trainer.run", str(resolved / f"{m.run.name}.toml"), "--stages", "generate"]
                if subprocess.run(cmd, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0")).returncode != 0:
                    raise UserError(f"sweep: on-policy generation failed for {m.run.name}")
    queue = list(members)
    running: dict[int, tuple[subprocess.Popen, Config]] = {}
    failed = []
    while queue or running:
        for gpu in range(n_gpu):
            if gpu not in running and queue:
                m = queue.pop(0)
                path = resolved / f"{m.run.name}.toml"
                cmd = [sys.executable, "-m", "trainer.run", str(path),
                       "--stages", ",".join(s for s in stages if s != "report") or "generate"]
                if overwrite:
                    cmd.append("--overwrite")
                print(f"  gpu {gpu}: {m.run.name}", flush=True)
                running[gpu] = (subprocess.Popen(cmd, env=dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))), m)
        time.sleep(2)
        for gpu, (proc, m) in list(running.items()):
            if proc.poll() is not None:
                del running[gpu]
                if proc.returncode != 0:
                    failed.append(f"{m.run.name} (exit {proc.returncode})")
    if failed:
        raise UserError(f"sweep members failed: {', '.join(failed)}; rerun the same command to resume them")
    return [m.run_dir for m in members]


# --------------------------------------------------------------------------- CLI

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="TOML config of one adapter, or of a sweep")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--overwrite", action="store_true", help="start afresh: delete the run directory first")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and dataset plan, then exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise UserError(f"--stages: unknown stage(s) {bad}; expected a comma-separated subset of {','.join(STAGES)}")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        dry_run(cfg)
        return 0
    if cfg.sweep is not None:
        run_sweep(cfg, args.overrides, stages, args.overwrite)
    else:
        run_one(cfg, stages, args.overwrite)
    return 0


if __name__ == "__main__":
    cli_main(main)
