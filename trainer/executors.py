"""Where a sweep's members run: here, or on a SLURM cluster through submitit. One interface, two backends.

    from trainer.executors import SweepPlan, make_executor, status_lines
    plan = SweepPlan.build(cfg, members, stages, overwrite, detach, command)
    result = make_executor(cfg, plan, run_member=run_one).run(plan)    # SweepResult
    print("\\n".join(status_lines(plan)))                                # --status

`sweep.executor = "local"` (LocalExecutor): the members run on this machine, one after another in
this process or one worker process per visible GPU (`sweep.parallel`), then the cross-run report.

`sweep.executor = "slurm"` (SlurmExecutor, `[slurm]` in markerlab.config): submitit submits, with
sbatch,
  1. one job per distinct on-policy generation (base model, prompt and sampling settings, the
     experiment's persona prompts) that an unfinished member still needs (GenerateTask);
  2. the unfinished members as one job array that starts once generation succeeded (afterok; a failed
     generation cancels it), each task running the member's stage pipeline in its own process, exactly
     `python -m trainer.run MEMBER.toml --stages ...` with every requested stage but the adapter's own
     report, as the per-GPU path does (MemberTask);
  3. the cross-run report as one job after the array, however it ended (afterany; ReportTask).
Then it waits and prints members done / running / pending / failed as they change, or, under
`--detach`, returns at once: the report job writes the report either way.

Preemption and time limits. Every job is submitted with --requeue. A member's process starts with
SIGUSR2 and SIGTERM ignored (inherited by vLLM's engine and any worker it starts) and
MARKERLAB_STOP_SIGNALS=USR2,TERM, so only the training loop listens: it finishes its step, saves a
checkpoint and exits 75 (trainer/preempt.py). SLURM's warning before the time limit (USR2, slurm.
signal_delay_s) reaches submitit's handler in the task, which calls MemberTask.checkpoint: that waits
for the member's process to save and stop, then submitit requeues the task (scontrol requeue), at most
slurm.max_requeues times for time-outs. A preemption or a `scontrol requeue` from outside sends
SIGTERM: training saves the same way and SLURM requeues the job itself. A requeued task runs the same
command again, and the stage driver resumes from the run's manifest and checkpoints, so the adapter
and records come out bit for bit as an uninterrupted run's.

Bookkeeping, in the sweep's directory (RUN_DIR of the sweep config):
  members/<name>.toml       each member's resolved config, what its task runs
  slurm/jobs.json           every submission: job ids and log files per member, generation, report
  slurm/logs/               submitit's folder: one log per job (<job>_0_log.out), pickles, results
  slurm/tasks/<name>.jsonl  each attempt of a member's task: job id, restart count, host,
                            CUDA_VISIBLE_DEVICES, start and end, exit status
Running the same command again submits only the members that are neither finished nor still queued
or running; `--status` reads these files, the runs' manifests and squeue (sacct where the cluster keeps
accounting), and prints one line per member.

submitit is imported only by the SLURM backend, inside its functions: `pip install -e ".[slurm]"`.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from markerlab.config import Config, SlurmConfig
from markerlab.errors import UserError
from markerlab.io import atomic_write_text, read_json
from markerlab.rundir import RunDir
from trainer.preempt import STOP_SIGNALS_ENV, STOPPED_EXIT

# SLURM job states in which a job still holds or waits for resources (squeue's long names).
ALIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                   "RESIZING", "SUSPENDED", "STOPPED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})
RUNNING = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"})
INSTALL_HINT = 'pip install -e ".[slurm]"'


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class MemberSpec:
    """One member of a sweep: its name, resolved config file, run directory and generation group."""

    name: str
    config: Path          # <sweep dir>/members/<name>.toml, written before anything runs
    run_dir: Path
    gen_group: str        # members with equal groups share one on-policy generation
    cfg: Config = field(compare=False, repr=False)


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep command asks for: its members, stages, where its files go, how to run it again."""

    name: str
    sweep_dir: Path
    report_dir: Path
    members: tuple[MemberSpec, ...]
    stages: tuple[str, ...]
    overwrite: bool
    detach: bool
    command: str          # the command line that runs (or resumes) this sweep
    cwd: Path             # where it was run: relative paths in the configs are relative to it

    @classmethod
    def build(cls, cfg: Config, members: list[Config], stages, overwrite: bool, detach: bool,
              command: str) -> "SweepPlan":
        sweep_dir = Path(cfg.run_dir)
        specs = tuple(MemberSpec(m.run.name, sweep_dir / "members" / f"{m.run.name}.toml", Path(m.run_dir),
                                 _gen_group(m), m) for m in members)
        return cls(cfg.run.name, sweep_dir, Path(cfg.sweep.report_dir) if cfg.sweep.report_dir else sweep_dir,
                   specs, tuple(stages), overwrite, detach, command, Path.cwd())

    @property
    def slurm_dir(self) -> Path:
        return self.sweep_dir / "slurm"

    @property
    def jobs_file(self) -> Path:
        return self.slurm_dir / "jobs.json"

    @property
    def logs_dir(self) -> Path:
        return (self.slurm_dir / "logs").absolute()

    @property
    def member_stages(self) -> tuple[str, ...]:
        """What a member runs in a worker or job, and must have done to count as finished: the requested
        stages less `report` (one adapter's own report; the sweep's report is built over all of them)."""
        return tuple(s for s in self.stages if s != "report")

    def attempts_file(self, member: str) -> Path:
        return (self.slurm_dir / "tasks" / f"{member}.jsonl").absolute()

    def write_member_configs(self) -> None:
        """Each member's resolved config, the file its worker or job runs: exactly what a sequential sweep runs."""
        for m in self.members:
            text = m.cfg.to_toml()
            if not m.config.is_file() or m.config.read_text(encoding="utf-8") != text:
                atomic_write_text(m.config, text)


def _gen_group(m: Config) -> str:
    """What one on-policy generation serves (data/onpolicy.py's cache key): the base model, the prompt and
    sampling settings, and what generation reads of the experiment (Experiment.generation_inputs)."""
    read = m.experiment.generation_inputs() if m.experiment is not None else None
    return json.dumps([*(m.to_dict()[k] for k in ("model", "prompt", "generate")), read], sort_keys=True)


@dataclass(frozen=True)
class SweepResult:
    """How a sweep command ended: the report's summary (None when none was written here) and what is missing."""

    summary: dict | None
    finished: tuple[str, ...]
    missing: tuple[str, ...]             # one line per member that did not finish: name and why
    detached: bool = False


# --------------------------------------------------------------------------- where a member stands

@dataclass(frozen=True)
class Progress:
    """A member's run directory as its manifest tells it (read-only)."""

    finished: bool        # every requested stage done
    reached: str          # "done", "train running", "eval failed", "data stopped", "not started"
    detail: str = ""      # the recorded error of a failed stage


def _lock_held(rd: RunDir) -> bool:
    """Whether a process holds the run directory's lock now (a shared flock attempt, released at once)."""
    import fcntl

    try:
        fd = os.open(rd.lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def member_progress(run_dir: Path, stages) -> Progress:
    rd = RunDir(run_dir)
    try:
        manifest = read_json(rd.manifest) if rd.manifest.is_file() else None
    except (OSError, ValueError):
        manifest = None
    if not manifest:
        return Progress(False, "not started")
    entries = manifest.get("stages", {})
    for stage in stages:
        entry = entries.get(stage, {})
        status = entry.get("status", "pending")
        if status == "done":
            continue
        if status == "running":
            return Progress(False, f"{stage} running" if _lock_held(rd) else f"{stage} interrupted")
        if status == "failed":
            error = str(entry.get("error", "")).strip().splitlines()
            stopped = error and "training stopped by" in error[0]
            return Progress(False, f"{stage} {'stopped' if stopped else 'failed'}", error[0] if error else "")
        done = [s for s in stages if entries.get(s, {}).get("status") == "done"]
        return Progress(False, f"{done[-1]} done" if done else "not started")
    return Progress(True, "done")


# --------------------------------------------------------------------------- the cross-run report

def _with_lock(rd: RunDir, fn: Callable, wait_s: float = 0.0):
    """fn() under the sweep directory's lock, waiting up to wait_s for another holder to let go."""
    deadline = time.time() + wait_s
    while True:
        try:
            with rd.locked():
                return fn()
        except UserError:
            if time.time() >= deadline:
                raise
            time.sleep(2)


def write_sweep_report(plan: SweepPlan, judge: Callable[[MemberSpec], Progress] | None = None,
                       why_missing: Callable[[MemberSpec, Progress], str] | None = None) -> dict | None:
    """analysis.report over the finished members into plan.report_dir; the missing ones are listed in it.

    `judge(member)` says where a member stands (default: its manifest; on SLURM also its last job).

    summary.json gets "sweep": {"members", "finished", "missing": [{"member", "reached", "why"}],
    "complete"}; when a member is missing, every report.md under the report directory opens with a
    banner naming them, so a partial sweep never reads as a complete one. Returns the summary, or
    None when no member has finished (then nothing is written).
    """
    from analysis.report import report

    finished, missing = [], []
    for m in plan.members:
        p = judge(m) if judge else member_progress(m.run_dir, plan.member_stages)
        if p.finished:
            finished.append(m)
        else:
            why = why_missing(m, p) if why_missing else (p.detail or p.reached)
            missing.append({"member": m.name, "reached": p.reached, "why": why})
    if not finished:
        return None
    out = plan.report_dir
    summary = report([str(m.run_dir) for m in finished], out, jobs=1)
    summary["sweep"] = {"name": plan.name, "members": [m.name for m in plan.members],
                        "finished": [m.name for m in finished], "missing": missing, "complete": not missing,
                        "command": plan.command}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False) + "\n")
    for page in sorted(out.rglob("report.md")) if missing else ():
        atomic_write_text(page, incomplete_banner(summary["sweep"]) + "\n\n" + page.read_text(encoding="utf-8"))
    return summary


def incomplete_banner(sweep: dict) -> str:
    n, k = len(sweep["members"]), len(sweep["finished"])
    names = "; ".join(f"`{m['member']}` ({m['why']})" for m in sweep["missing"])
    return (f"> **Incomplete sweep: {k} of {n} members finished.** Missing: {names}. Every number on this page "
            f"is over the finished members only. `{sweep['command']}` finishes the sweep and rewrites this report.")


def sweep_summary_lines(summary: dict) -> list[str]:
    """The terminal's closing lines for a sweep's report (analysis.report's summary), missing members first."""
    from analysis.report import terminal_summary

    lines = []
    sweep = summary.get("sweep", {})
    if sweep and not sweep.get("complete", True):
        lines.append(f"INCOMPLETE SWEEP: {len(sweep['finished'])} of {len(sweep['members'])} members finished; "
                     f"the report covers those only. Missing:")
        lines += [f"  {m['member']}: {m['why']}" for m in sweep["missing"]]
    lines.append(terminal_summary(summary))
    return lines


# --------------------------------------------------------------------------- local

class LocalExecutor:
    """The members on this machine: one after another in this process, or one worker process per visible GPU."""

    name = "local"

    def __init__(self, mode: str, devices: list[str], run_member: Callable, worker: tuple, pregenerate: tuple):
        self.mode, self.devices = mode, devices
        self.run_member, self.worker, self.pregenerate = run_member, worker, pregenerate

    def describe(self) -> str:
        return self.mode + (f" on GPUs {','.join(self.devices)}" if self.mode == "per_gpu" else "")

    def run(self, plan: SweepPlan) -> SweepResult:
        rd = RunDir(plan.sweep_dir)
        with rd.locked():
            print(f"sweep {plan.name}: {len(plan.members)} runs, {self.describe()}", flush=True)
            if self.mode == "sequential":
                for m in plan.members:
                    self.run_member(m.cfg, list(plan.stages), plan.overwrite)
            else:
                self._run_per_gpu(plan)
            summary = write_sweep_report(plan) if "report" in plan.stages else None
        return SweepResult(summary, tuple(m.name for m in plan.members), ())

    def _run_per_gpu(self, plan: SweepPlan) -> None:
        """One worker process per visible GPU, each given that GPU alone, taking members in order.

        `devices` are the parent's visible devices as CUDA_VISIBLE_DEVICES entries
        (indices or UUIDs, markerlab.devices.visible_cuda_devices), so under a
        scheduler's CUDA_VISIBLE_DEVICES=4,5 the workers land on GPUs 4 and 5. Each
        worker runs `python -m trainer.run` on the member's resolved config, written
        beside the sweep's report, so it sees exactly what a sequential sweep would
        have run.
        """
        plan.write_member_configs()
        devices, stages = self.devices, plan.stages
        if "generate" in stages:
            # Generate once per distinct base model and sampling settings before
            # fanning out, so workers share the cache instead of racing to fill it.
            seen = set()
            for m in plan.members:
                if m.gen_group not in seen:
                    seen.add(m.gen_group)
                    cmd = [*self.pregenerate, str(m.config)]
                    if subprocess.run(cmd, env=dict(os.environ, CUDA_VISIBLE_DEVICES=devices[0])).returncode != 0:
                        raise UserError(f"sweep: on-policy generation failed for {m.name}")
        queue = list(plan.members)
        running: dict[str, tuple[subprocess.Popen, MemberSpec]] = {}
        failed = []
        while queue or running:
            for dev in devices:
                if dev not in running and queue:
                    m = queue.pop(0)
                    cmd = [*self.worker, str(m.config), "--stages", ",".join(plan.member_stages) or "generate"]
                    if plan.overwrite:
                        cmd.append("--overwrite")
                    print(f"  gpu {dev}: {m.name}", flush=True)
                    running[dev] = (subprocess.Popen(cmd, env=dict(os.environ, CUDA_VISIBLE_DEVICES=dev)), m)
            time.sleep(0.5)
            for dev, (proc, m) in list(running.items()):
                if proc.poll() is not None:
                    del running[dev]
                    if proc.returncode != 0:
                        failed.append(f"{m.name} (exit {proc.returncode})")
        if failed:
            raise UserError(f"sweep members failed: {', '.join(failed)}; rerun the same command to resume them")


# --------------------------------------------------------------------------- SLURM: what runs in a job

def _attempt(kind: str, **extra) -> dict:
    env = os.environ
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID")
           else env.get("SLURM_JOB_ID"))
    return {"event": kind, "at": _now(), "time": time.time(), "job": job,
            "restart": int(env.get("SLURM_RESTART_COUNT") or 0), "host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"), "slurm_job_gpus": env.get("SLURM_JOB_GPUS"),
            "slurm_step_gpus": env.get("SLURM_STEP_GPUS"), **extra}


def _append_jsonl(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def warning_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    return getattr(signal.Signals, name if name.startswith("SIG") else "SIG" + name, signal.SIGUSR2)


def _ignore_stop_signals() -> None:  # in the child, between fork and exec: inherited by all it starts
    signal.signal(warning_signal(), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _ChildTask:
    """A job that runs one command in a child process; submitit's warning handler lets it save first."""

    grace_s: float = 60.0

    def __init__(self):
        self._proc = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)

    def _run(self, cmd: list[str], cwd: str, record: Path | None, what: str) -> int:
        env = dict(os.environ, **{STOP_SIGNALS_ENV: f"{warning_signal().name},SIGTERM"})
        if "SLURM_CPUS_PER_TASK" in env:  # torch's threads: what the job was given, unless the user said
            env.setdefault("OMP_NUM_THREADS", env["SLURM_CPUS_PER_TASK"])
        if record:
            _append_jsonl(record, _attempt("start", command=cmd))
        print(f"[{what}] {' '.join(cmd)}  (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')})", flush=True)
        self._proc = subprocess.Popen(cmd, cwd=cwd, env=env, preexec_fn=_ignore_stop_signals)
        self._checkpointed = False
        rc = None
        try:
            rc = self._proc.wait()
            return rc
        finally:  # also when submitit's warning handler requeued the job and exits this process (SystemExit)
            if rc is None:
                rc = self._proc.poll()
            if record:
                _append_jsonl(record, _attempt("end", exit=rc, checkpointed=self._checkpointed))

    def _let_it_save(self) -> None:
        """Pass SLURM's warning on to the child (it may have had it already) and give it time to save.

        This runs inside submitit's signal handler, which interrupted Popen.wait() in _run while it held
        the Popen's wait lock: so the child's exit is watched with waitid(WNOWAIT), which leaves it to
        that wait to reap.
        """
        proc = self._proc
        self._checkpointed = True
        if proc is None or proc.returncode is not None:
            return
        print(f"[slurm] warning signal: waiting up to {self.grace_s:.0f} s for pid {proc.pid} to save and stop",
              flush=True)
        try:
            os.kill(proc.pid, warning_signal())
        except ProcessLookupError:
            return
        deadline = time.time() + self.grace_s
        while time.time() < deadline:
            try:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    print(f"[slurm] pid {proc.pid} has stopped; requeueing", flush=True)
                    return
            except ChildProcessError:
                return
            time.sleep(0.2)
        print(f"[slurm] pid {proc.pid} still runs after {self.grace_s:.0f} s; requeueing anyway", flush=True)


class MemberTask(_ChildTask):
    """One array task: `python -m trainer.run MEMBER.toml --stages ...` in its own process."""

    def __init__(self, name: str, config: str, stages: tuple[str, ...], overwrite: bool, cwd: str, record: str,
                 grace_s: float):
        super().__init__()
        self.name, self.config, self.stages, self.overwrite = name, config, stages, overwrite
        self.cwd, self.record, self.grace_s = cwd, record, grace_s

    def __call__(self) -> dict:
        # --overwrite belongs to the first attempt only: a requeued task resumes what it started
        overwrite = self.overwrite and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0
        cmd = [sys.executable, "-m", "trainer.run", self.config, "--stages", ",".join(self.stages)]
        rc = self._run(cmd + (["--overwrite"] if overwrite else []), self.cwd, Path(self.record), self.name)
        if rc == STOPPED_EXIT:
            raise RuntimeError(f"{self.name}: stopped by a signal after saving its state (exit 75); "
                               f"it resumes when the job is requeued or the sweep command is run again")
        if rc != 0:
            raise RuntimeError(f"{self.name}: python -m trainer.run exited with status {rc}")
        return {"member": self.name, "exit": rc}

    def checkpoint(self):
        """submitit calls this on SLURM's warning signal: let training save, then requeue this task as is."""
        from submitit.helpers import DelayedSubmission

        self._let_it_save()
        again = MemberTask(self.name, self.config, self.stages, False, self.cwd, self.record, self.grace_s)
        return DelayedSubmission(again)


class GenerateTask(_ChildTask):
    """One generation job: `python -m data.onpolicy MEMBER.toml` (the shared cache, filled once)."""

    def __init__(self, config: str, cwd: str, record: str):
        super().__init__()
        self.config, self.cwd, self.record = config, cwd, record

    def __call__(self) -> dict:
        rc = self._run([sys.executable, "-m", "data.onpolicy", self.config], self.cwd, Path(self.record), "generate")
        if rc != 0:
            raise RuntimeError(f"on-policy generation for {self.config} exited with status {rc}")
        return {"generated": self.config}

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        self._let_it_save()
        return DelayedSubmission(GenerateTask(self.config, self.cwd, self.record))


class ReportTask:
    """The report job: the cross-run report over the finished members, the missing ones listed."""

    def __init__(self, plan: SweepPlan):
        self.plan = plan

    def __call__(self) -> dict | None:
        plan = self.plan
        os.chdir(plan.cwd)
        jobs = read_jobs(plan)
        states = query_states(_job_ids(jobs))

        def judge(m):
            return judge_member(plan, m, jobs, states)

        def why(m, p):
            return missing_reason(m, p, plan, jobs, states)

        summary = _with_lock(RunDir(plan.sweep_dir), lambda: write_sweep_report(plan, judge, why), wait_s=300)
        if summary is None:
            print(f"[report] no member of sweep {plan.name} finished: no report written", flush=True)
            return None
        print("\n".join(sweep_summary_lines(summary)), flush=True)
        return {"report": summary["outputs"]["report"], "complete": summary["sweep"]["complete"]}


# --------------------------------------------------------------------------- SLURM: the submitter's side

def read_jobs(plan: SweepPlan) -> dict:
    try:
        return read_json(plan.jobs_file) if plan.jobs_file.is_file() else {"submissions": []}
    except (OSError, ValueError):
        return {"submissions": []}


def latest_jobs(jobs: dict) -> dict[str, dict]:
    """member name -> {"job", "log"} of the last submission that included it."""
    out = {}
    for sub in jobs.get("submissions", []):
        out.update(sub.get("members", {}))
    return out


def _job_ids(jobs: dict) -> set[str]:
    ids = set()
    for sub in jobs.get("submissions", []):
        ids |= {j["job"] for j in sub.get("members", {}).values()}
        ids |= {j["job"] for j in sub.get("generate", [])}
        if sub.get("report"):
            ids.add(sub["report"]["job"])
    return ids


def query_states(ids: set[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) from squeue (and sacct for jobs squeue no longer shows, where it answers).

    Array tasks are named "<array>_<index>"; a job neither knows is absent. Without squeue, {}.
    """
    if not ids or shutil.which("squeue") is None:
        return {}
    found: dict[str, tuple[str, str]] = {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines() if out.returncode == 0 else ():
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            if jid in ids:
                found[jid] = (state, "" if reason in ("None", "(null)") else reason)
    except (OSError, subprocess.TimeoutExpired):
        pass
    rest = sorted(ids - set(found))
    if rest and shutil.which("sacct"):
        try:
            out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(rest)],
                                 capture_output=True, text=True, timeout=60)
            for line in out.stdout.splitlines() if out.returncode == 0 else ():
                jid, state = (line.split("|") + [""])[:2]
                if jid in ids and jid not in found:
                    found[jid] = (state.split()[0] if state else "UNKNOWN", "")
        except (OSError, subprocess.TimeoutExpired):
            pass
    return found


def _log_error(log: Path) -> str:
    """The last one-line error (`error: ...`, what a user's mistake prints) in the end of a task's log."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    errors = [x.strip() for x in tail if x.startswith("error: ")]
    return errors[-1] if errors else ""


def _task_error(log_dir: Path, job: str) -> str:
    """The last line of the error a task's submitit result holds, if it ended in one."""
    result = log_dir / f"{job}_0_result.pkl"
    if not result.is_file():
        return ""
    try:
        import pickle

        with open(result, "rb") as f:
            outcome, value = pickle.load(f)
    except Exception:  # a result written by another submitit or python: no reason to give, not an error
        return ""
    if outcome != "error":
        return ""
    lines = [x for x in str(value).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else ""


def job_state(plan: SweepPlan, member: str, job: str, states: dict) -> tuple[str, str]:
    """(state, reason) of a member's job: SLURM's while it knows the job, else what the task's attempts say.

    SLURM forgets a finished job after MinJobAge without accounting, and an array task cancelled
    before it started leaves no record at all; the attempts file tells those apart.
    """
    if job in states:
        return states[job]
    attempts = [a for a in read_attempts(plan.attempts_file(member)) if a.get("job") == job]
    if not attempts:
        return "GONE", "left the queue without running: cancelled while pending"
    last = attempts[-1]
    if last.get("event") == "end":
        return "ENDED", f"exit {last.get('exit')}"
    return "ENDED", "killed while running"


def read_attempts(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    except OSError:
        lines = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def judge_member(plan: SweepPlan, m: MemberSpec, jobs: dict, states: dict) -> Progress:
    """Where a member of a SLURM sweep stands: its manifest, unless its last job says otherwise.

    A member whose job is queued or running is not finished yet, whatever its manifest says (an
    --overwrite has not reset it yet); one whose last job ended without a successful last attempt
    is not finished either, even if its manifest says done from an earlier run (a failed --overwrite).
    """
    p = member_progress(m.run_dir, plan.member_stages)
    job = latest_jobs(jobs).get(m.name)
    if job is None:
        return p
    state, _ = job_state(plan, m.name, job["job"], states)
    if state in ALIVE:
        return Progress(False, p.reached if not p.finished else f"{state.lower()} again", p.detail)
    attempts = [a for a in read_attempts(plan.attempts_file(m.name)) if a.get("job") == job["job"]]
    if attempts and attempts[-1].get("event") == "end" and attempts[-1].get("exit") == 0:
        return p
    if p.finished:
        return Progress(False, f"last job {state}", _log_error(Path(job["log"])))
    return p


def missing_reason(m: MemberSpec, p: Progress, plan: SweepPlan, jobs: dict, states: dict) -> str:
    """Why a member is not finished, in a few words: where it stopped, its job's state, its log."""
    parts = [p.reached + (f": {p.detail}" if p.detail else "")]
    job = latest_jobs(jobs).get(m.name)
    if job:
        state, reason = job_state(plan, m.name, job["job"], states)
        parts.append(f"job {job['job']} {state}" + (f" ({reason})" if reason and state in ("GONE", "ENDED") else ""))
        if not p.detail:  # the run stopped before a stage could record why: the log's last error line
            err = _log_error(Path(job["log"])) or _task_error(plan.logs_dir, job["job"])
            if err:
                parts.append(err)
        parts.append(f"log {job['log']}")
    else:
        parts.append("never submitted")
    return ", ".join(parts)


class SlurmExecutor:
    """The members as a SLURM job array through submitit (module docstring)."""

    name = "slurm"

    def __init__(self, slurm: SlurmConfig, poll_s: float = 3.0):
        self.slurm, self.poll_s = slurm, poll_s
        try:
            import submitit  # noqa: F401  (the optional extra)
        except ImportError:
            raise UserError(f'sweep.executor = "slurm" needs submitit, which is not installed: {INSTALL_HINT}') \
                from None
        missing = [c for c in ("sbatch", "srun", "squeue") if shutil.which(c) is None]
        if missing:
            raise UserError(f'sweep.executor = "slurm": {", ".join(missing)} not found on PATH; run the sweep on a '
                            f'SLURM login node (or set sweep.executor = "local")')

    def describe(self) -> str:
        s = self.slurm
        where = f"partition {s.partition}" if s.partition else "the default partition"
        return (f"a SLURM job array on {where} ({s.gpus_per_task} GPU, {s.cpus_per_task} CPUs, "
                f"{s.timeout_min} min per member)")

    # ---- submitit
    def _executor(self, plan: SweepPlan, name: str, gpus: int, cpus: int, array: int = 0):
        import submitit

        s = self.slurm
        ex = submitit.AutoExecutor(folder=plan.logs_dir, cluster="slurm", slurm_max_num_timeout=s.max_requeues)
        extra = {"requeue": True, **s.additional_parameters}
        params = dict(name=name, timeout_min=s.timeout_min, cpus_per_task=cpus, stderr_to_stdout=True,
                      slurm_signal_delay_s=s.signal_delay_s, slurm_additional_parameters=extra)
        if gpus:
            params["gpus_per_node"] = gpus
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(s, key):
                params[f"slurm_{key}"] = getattr(s, key)
        if s.setup:
            params["slurm_setup"] = list(s.setup)
        if array:
            params["slurm_array_parallelism"] = s.array_parallelism or array
        ex.update_parameters(**params)
        return ex

    def _submit(self, ex, tasks: list, dependency: str = ""):
        """Submit `tasks` (one job, or an array of them); a refusal by sbatch is one line."""
        if dependency:
            ex.update_parameters(slurm_dependency=dependency)
        try:
            if len(tasks) == 1:
                return [ex.submit(tasks[0])]
            with ex.batch():
                jobs = [ex.submit(t) for t in tasks]
            return jobs
        except Exception as e:  # submitit wraps sbatch's refusal (bad partition, account, ...) in its own errors
            msg = " ".join(str(e).split())
            raise UserError(f"[slurm]: sbatch refused the job: {msg[-600:]}") from None

    # ---- the run
    def run(self, plan: SweepPlan) -> SweepResult:
        rd = RunDir(plan.sweep_dir)
        with rd.locked():
            submission = self._submit_all(plan)
        if submission is None:  # nothing to run: every member finished; the report, here
            print(f"sweep {plan.name}: every member has finished; nothing to submit", flush=True)
            jobs = read_jobs(plan)
            states = query_states(_job_ids(jobs))
            summary = (_with_lock(rd, lambda: write_sweep_report(
                plan, lambda m: judge_member(plan, m, jobs, states),
                lambda m, p: missing_reason(m, p, plan, jobs, states))) if "report" in plan.stages else None)
            return SweepResult(summary, tuple(m.name for m in plan.members), ())
        if plan.detach:
            print(f"detached: the jobs run on; `{plan.command} --status` shows where they stand"
                  + (f", and the report job ({submission['report']['job']}) writes {plan.report_dir / 'report.md'}"
                     if submission.get("report") else ""), flush=True)
            return SweepResult(None, (), (), detached=True)
        self._wait(plan, submission)
        jobs = read_jobs(plan)
        states = query_states(_job_ids(jobs))
        finished, missing = [], []
        for m in plan.members:
            p = judge_member(plan, m, jobs, states)
            (finished.append(m.name) if p.finished
             else missing.append(f"{m.name}: {missing_reason(m, p, plan, jobs, states)}"))
        summary = None
        summary_file = plan.report_dir / "summary.json"
        if "report" in plan.stages and summary_file.is_file() and summary_file.stat().st_mtime >= submission["t"]:
            summary = read_json(summary_file)
        for gen in submission.get("generate", []):
            attempts = read_attempts(plan.attempts_file(f"_generate-{gen['for']}"))
            ended = [a for a in attempts if a.get("event") == "end" and a.get("job") == gen["job"]]
            if not (ended and ended[-1].get("exit") == 0):
                state = states.get(gen["job"], ("ENDED", ""))[0]
                missing.append(f"the on-policy generation job {gen['job']} ({state}) did not finish; see {gen['log']}")
        if "report" in plan.stages and summary is None and submission.get("report"):
            rep = submission["report"]
            state = states.get(rep["job"], ("ENDED", ""))[0]
            missing.append(f"the report job {rep['job']} ({state}) wrote no report; see {rep['log']}")
        return SweepResult(summary, tuple(finished), tuple(missing))

    def _submit_all(self, plan: SweepPlan) -> dict | None:
        jobs = read_jobs(plan)
        states = query_states(_job_ids(jobs))
        last = latest_jobs(jobs)
        todo, live = [], []
        for m in plan.members if plan.member_stages else ():
            p = judge_member(plan, m, jobs, states)
            job = last.get(m.name)
            alive = job and states.get(job["job"], ("", ""))[0] in ALIVE
            if alive:
                if plan.overwrite:
                    raise UserError(f"{m.name}: its job {job['job']} is still {states[job['job']][0]}; --overwrite "
                                    f"would race it: scancel {job['job']} first, or wait for it")
                live.append((m, job))
            elif plan.overwrite or not p.finished:
                todo.append(m)
        if not todo and not live:
            return None
        print(f"sweep {plan.name}: {len(plan.members)} runs, {self.describe()}", flush=True)
        for m, job in live:
            print(f"  {m.name}: job {job['job']} {states[job['job']][0]}, left to run", flush=True)
        # an older report job still waiting would report before the new members end: this one replaces it
        stale = [s["report"]["job"] for s in jobs.get("submissions", [])
                 if s.get("report") and states.get(s["report"]["job"], ("", ""))[0] in ALIVE]
        if stale:
            subprocess.run(["scancel", *stale], capture_output=True, timeout=60)
        plan.write_member_configs()
        plan.logs_dir.mkdir(parents=True, exist_ok=True)
        t_submit = time.time()
        s = self.slurm
        record = {"submitted": _now(), "t": t_submit, "command": plan.command, "stages": list(plan.stages),
                  "overwrite": plan.overwrite, "generate": [], "members": {}, "report": None,
                  "replaced_report_jobs": stale}

        gen_ids = []
        # generation first whenever a member will read completions: array tasks filling the shared cache
        # at once would find its entry locked
        if "generate" in plan.stages or "data" in plan.stages:
            groups: dict[str, MemberSpec] = {}
            for m in todo:
                if plan.overwrite or member_progress(m.run_dir, ("generate",)).reached != "done":
                    groups.setdefault(m.gen_group, m)
            if groups:
                ex = self._executor(plan, f"{plan.name}-generate", s.gpus_per_task, s.cpus_per_task,
                                    array=len(groups))
                tasks = [GenerateTask(str(m.config.absolute()), str(plan.cwd),
                                      str(plan.attempts_file(f"_generate-{m.name}")))
                         for m in groups.values()]
                for m, job in zip(groups.values(), self._submit(ex, tasks)):
                    record["generate"].append({"job": job.job_id, "log": str(job.paths.stdout), "for": m.name})
                    gen_ids.append(job.job_id)
                print(f"  generation: {len(groups)} job(s) {', '.join(gen_ids)}", flush=True)

        member_ids = [job["job"] for _, job in live]
        if todo:
            ex = self._executor(plan, plan.name, s.gpus_per_task, s.cpus_per_task, array=len(todo))
            if gen_ids:  # a failed generation cancels the members waiting for it
                ex.update_parameters(slurm_additional_parameters={"requeue": True, "kill-on-invalid-dep": "yes",
                                                                  **s.additional_parameters})
            grace = max(10.0, s.signal_delay_s - 20.0)
            tasks = [MemberTask(m.name, str(m.config.absolute()), plan.member_stages, plan.overwrite, str(plan.cwd),
                                str(plan.attempts_file(m.name)), grace) for m in todo]
            submitted = self._submit(ex, tasks, dependency="afterok:" + ":".join(gen_ids) if gen_ids else "")
            for m, job in zip(todo, submitted):
                record["members"][m.name] = {"job": job.job_id, "log": str(job.paths.stdout)}
                member_ids.append(job.job_id)
                print(f"  {m.name}: job {job.job_id}", flush=True)
        if "report" in plan.stages:
            ex = self._executor(plan, f"{plan.name}-report", 0, 1)
            dep = "afterany:" + ":".join(sorted({j.split("_")[0] for j in member_ids}))
            job = self._submit(ex, [ReportTask(plan)], dependency=dep)[0]
            record["report"] = {"job": job.job_id, "log": str(job.paths.stdout)}
            print(f"  report: job {job.job_id} (after the members, however they end)", flush=True)
        jobs.setdefault("submissions", []).append(record)
        atomic_write_text(plan.jobs_file, json.dumps(jobs, indent=1) + "\n")
        return record

    def _wait(self, plan: SweepPlan, submission: dict) -> None:
        """Poll squeue until this submission's jobs have ended; print the members' counts as they change."""
        jobs = read_jobs(plan)
        last = latest_jobs(jobs)
        watched = {last[m.name]["job"] for m in plan.members if m.name in last}
        report = submission.get("report")
        if report:
            watched.add(report["job"])
        watched |= {g["job"] for g in submission.get("generate", [])}
        shown = None
        gone_since: dict[str, float] = {}
        try:
            while True:
                states = query_states(watched)
                counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
                for m in plan.members:
                    state = states.get(last.get(m.name, {}).get("job", ""), ("", ""))[0]
                    if state in RUNNING:
                        counts["running"] += 1
                    elif state in ALIVE:
                        counts["pending"] += 1
                    elif judge_member(plan, m, jobs, states).finished:
                        counts["done"] += 1
                    else:
                        counts["failed"] += 1
                rep = f"; report job {states.get(report['job'], ('ENDED', ''))[0]}" if report else ""
                line = ", ".join(f"{v} {k}" for k, v in counts.items()) + rep
                if line != shown:
                    print(f"[{time.strftime('%H:%M:%S')}] members: {line}", flush=True)
                    shown = line
                now = time.time()
                alive = {j for j in watched if states.get(j, ("", ""))[0] in ALIVE}
                for j in watched - alive:
                    gone_since.setdefault(j, now)
                # a job just submitted may take a moment to show in squeue: ended means gone for a while
                if not alive and all(now - gone_since[j] > 2 * self.poll_s for j in watched):
                    return
                for j in alive:
                    gone_since.pop(j, None)
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs run on. `{plan.command} --status` shows them"
                  + (", and the report job writes the report" if report else ""), file=sys.stderr)
            raise


# --------------------------------------------------------------------------- choosing, and --status

def make_executor(cfg: Config, plan: SweepPlan, run_member: Callable, worker: tuple, pregenerate: tuple):
    """The executor sweep.executor names; a backend that cannot run here is one line (UserError)."""
    if cfg.sweep.executor == "slurm":
        return SlurmExecutor(cfg.slurm or SlurmConfig())
    if plan.detach:
        raise UserError('--detach: only a sweep on SLURM runs without this process (--set sweep.executor=slurm)')
    from markerlab.devices import visible_cuda_devices

    # Counted through NVML: CUDA must not be initialized here before a vLLM engine starts.
    devices = visible_cuda_devices()
    mode = cfg.sweep.parallel
    if mode == "auto":
        mode = "per_gpu" if len(devices) > 1 else "sequential"
    if mode == "per_gpu" and not devices:
        raise UserError("sweep.parallel: per_gpu needs CUDA GPUs and none is visible (use sequential or auto)")
    return LocalExecutor(mode, devices, run_member, worker, pregenerate)


def status_lines(plan: SweepPlan) -> list[str]:
    """--status: a line for the sweep, then one per member: stage reached, job id and state, log file."""
    jobs = read_jobs(plan)
    last = latest_jobs(jobs)
    on_slurm = bool(jobs.get("submissions"))
    states = query_states(_job_ids(jobs)) if on_slurm else {}
    no_squeue = on_slurm and shutil.which("squeue") is None
    rows, n_done = [], 0
    for m in plan.members:
        p = (judge_member(plan, m, jobs, states) if plan.member_stages
             else member_progress(m.run_dir, plan.stages))
        n_done += p.finished
        reached = p.reached
        job = last.get(m.name)
        if job:
            state, reason = ("?", "") if no_squeue else job_state(plan, m.name, job["job"], states)
            restarts = _restarts(plan.attempts_file(m.name), job["job"])
            where = f"job {job['job']} {state}" + (f" ({reason})" if reason else "") \
                + (f", requeued {restarts}x" if restarts else "")
            log = job["log"]
        else:
            where = "no job"
            log = str(m.run_dir / "train_log.txt") if (m.run_dir / "train_log.txt").is_file() else "-"
        rows.append((m.name, reached, where, log, p.detail))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    missing = len(plan.members) - n_done
    summary = plan.report_dir / "summary.json"
    if summary.is_file():
        try:
            sweep = read_json(summary).get("sweep", {})
        except (OSError, ValueError):
            sweep = {}
        report = (f"report {plan.report_dir / 'report.md'}"
                  + (f" (incomplete: {len(sweep['missing'])} missing)" if sweep and not sweep.get("complete")
                     else ""))
    else:
        report = "no report yet"
    head = (f"sweep {plan.name} ({'slurm' if on_slurm else 'local'}): {n_done} of {len(plan.members)} members "
            f"finished" + (f", {missing} not" if missing else "") + f"; {report}")
    lines = [head]
    lines += [f"{n:<{w[0]}}  {r:<{w[1]}}  {j:<{w[2]}}  log {log}" + (f"  ({detail})" if detail else "")
              for n, r, j, log, detail in rows]
    if no_squeue:
        lines.append("(squeue is not on PATH here: job states unknown)")
    last_sub = jobs["submissions"][-1] if jobs.get("submissions") else {}
    for what, job in [*(("generation", g) for g in last_sub.get("generate", [])),
                      *([("report", last_sub["report"])] if last_sub.get("report") else [])]:
        st = states.get(job["job"], ("?" if no_squeue else "ENDED", ""))[0]
        lines.append(f"{what} job {job['job']} {st}, log {job['log']}")
    return lines


def _restarts(path: Path, job: str) -> int:
    starts = sum(a.get("event") == "start" and a.get("job") == job for a in read_attempts(path))
    return max(0, starts - 1)


def single_status_line(cfg: Config, stages) -> str:
    """--status of one adapter's config: where its run directory stands."""
    p = member_progress(cfg.run_dir, stages)
    log = cfg.run_dir / "train_log.txt"
    return (f"{cfg.run.name}  {p.reached}" + (f" ({p.detail})" if p.detail else "")
            + f"  {cfg.run_dir}" + (f"  log {log}" if log.is_file() else ""))


__all__ = ["LocalExecutor", "SlurmExecutor", "SweepPlan", "SweepResult", "MemberTask", "GenerateTask",
           "ReportTask", "make_executor", "status_lines", "write_sweep_report", "sweep_summary_lines"]
