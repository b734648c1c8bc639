"""The tiny sweep on a real SLURM cluster, against the same sweep run here, one member after another.

Needs a cluster: `.ci/slurm_cluster.sh start` (root) starts a one-node SLURM 22.05 with four fake GPUs,
as CI does before the test line. Without one these tests skip, saying why (in CI a skip is a failure).

One scenario, run once for the module because SLURM's delays are the cost (a requeued job waits for
its credential to expire) and the two cores are shared: the SLURM sweep is submitted with --detach and
the sequential reference sweep runs in the background meanwhile. The first three members are stopped
inside training step 3: pair1_T with `scontrol requeue` (SLURM runs it again), pair1_C with `scancel`
(it stays missing), pair1_T_P2neg with the time-limit warning (submitit checkpoints and requeues it). The report job writes the partial report and --status is read; then the same
command, run again without --detach, submits the cancelled member alone and waits for the final
report. The tests below check what each step left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_e2e import WHOLE_VOCABULARY

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MEMBERS = ("pair1_T", "pair1_C", "pair1_T_P2neg", "pair2_T", "pair2_C", "pair2_T_P2neg")
# stopped inside training step 3: requeued by `scontrol requeue`, cancelled by `scancel`, and warned by the
# signal SLURM sends before the time limit (submitit then checkpoints and requeues it)
REQUEUED, CANCELLED, WARNED = "pair1_T", "pair1_C", "pair1_T_P2neg"
# The tiny sweep, smaller still: 16 examples a member, 6 optimizer steps (a checkpoint every 2), a
# handful of short evaluation samples; what matters here is where each member runs, not what it learns.
SHRINK = ["generate.n_questions=2", "generate.n_samples=2", "generate.max_tokens=4", "data.n_per_persona=4",
          'data.negatives=["comedian", "french_person"]', "train.epochs=3", "train.checkpoint_every=2",
          "train.probe_every=0", "eval.n_id_questions=1", "eval.n_ood_questions=1", "eval.n_samples=2",
          "eval.max_tokens=4", 'eval.personas=["villain", "assistant", "librarian", "software_engineer", "comedian"]',
          "eval.probe_n_questions=1", "eval.probe_n_samples=1", "eval.base_n_questions=1", "eval.base_n_samples=1",
          "eval.backend=hf", *WHOLE_VOCABULARY]
TIMEOUT = 1200


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if importlib.util.find_spec("submitit") is None:
        return 'submitit is not installed (pip install -e ".[slurm]")'
    missing = [c for c in ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo") if shutil.which(c) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    states = p.stdout.split()
    if p.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable node (sinfo: {(p.stdout + p.stderr).strip()[:200] or 'nothing'})"
    return None


def sets(*items: str) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def job_state(job: str) -> str:
    p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else "GONE"


def wait_for(what: str, ready, timeout: float = TIMEOUT, every: float = 1.0):
    t0 = time.time()
    while True:
        got = ready()
        if got:
            return got
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    problem = cluster_problem()
    if problem:
        pytest.skip(f"no SLURM cluster here: {problem}; `.ci/slurm_cluster.sh start` (as root) starts one")
    root = tmp_path_factory.mktemp("slurm")
    sweep = root / "sweep.toml"
    sweep.write_text(f'extends = "{REPO / "configs" / "tiny" / "sweep.toml"}"\n[run]\nname = "sw"\n')
    # one thread everywhere: the same arithmetic here and in the jobs (and the two cores shared fairly)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "trainer.run", str(sweep), *sets(*SHRINK)]
    local = [*cmd, *sets(f"run.out_dir={root / 'local'}", f"generate.cache_dir={root / 'local_cache'}")]
    slurm = [*cmd, *sets(f"run.out_dir={root / 'slurm'}", f"generate.cache_dir={root / 'slurm_cache'}",
                         "sweep.executor=slurm", "slurm.cpus_per_task=1", "slurm.timeout_min=60")]
    sw = root / "slurm" / "sw"
    t0 = time.time()

    # 1. the SLURM sweep, detached; then the sequential reference in the background
    first = subprocess.run([*slurm, "--detach"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ref_log = open(root / "local.log", "w")
    ref = subprocess.Popen(local, cwd=REPO, env=env, stdout=ref_log, stderr=subprocess.STDOUT)
    try:
        jobs = json.loads((sw / "slurm" / "jobs.json").read_text())["submissions"][0]

        # 2. stop three members in the middle of training: freeze each trainer once checkpoint 2 of 6 is on
        # disk, so that SLURM's signal lands inside step 3 whatever the machine's load; then requeue one
        # (`scontrol requeue`: SIGTERM, and SLURM runs it again), cancel one (`scancel`: SIGTERM, and it
        # stays missing) and send one the time-limit warning (`scancel --signal=USR2`, what SLURM sends
        # slurm.signal_delay_s before the limit: submitit's handler checkpoints and requeues it)
        frozen = {}
        pending = {REQUEUED: ["scontrol", "requeue"], CANCELLED: ["scancel"], WARNED: ["scancel", "--signal=USR2"]}

        def freeze_ready():
            for name in list(pending):
                run_dir, job = root / "slurm" / name, jobs["members"][name]["job"]
                if (run_dir / "checkpoints" / "step_000002").is_dir():
                    pid = json.loads((run_dir / ".lock").read_text())["pid"]
                    os.kill(pid, signal.SIGSTOP)
                    frozen[name] = sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                                          if p.name.startswith("step_"))
                    subprocess.run([*pending.pop(name), job], check=True)
                    time.sleep(1)
                    os.kill(pid, signal.SIGCONT)
                elif job_state(job) not in ("PENDING", "RUNNING"):
                    raise AssertionError(f"{name}'s job {job} is {job_state(job)} before its checkpoint 2")
            return not pending

        wait_for("checkpoint 2 of the members to stop", freeze_ready, every=0.05)
        cancelled_job, requeued_job = jobs["members"][CANCELLED]["job"], jobs["members"][REQUEUED]["job"]
        warned_job = jobs["members"][WARNED]["job"]

        # 4. the first submission's report job: the partial report; --status
        report_job = jobs["report"]["job"]
        wait_for("the first report job", lambda: job_state(report_job) not in ("PENDING", "RUNNING", "COMPLETING"))
        report_state = job_state(report_job)
        partial = SimpleNamespace(summary=json.loads((sw / "summary.json").read_text()),
                                  page=(sw / "report.md").read_text())
        status = subprocess.run([*slurm, "--status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        t_partial = time.time() - t0

        # 5. the same command again, waiting this time: only the cancelled member runs
        rerun = subprocess.run(slurm, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        status_after = subprocess.run([*slurm, "--status"], cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=120)
        assert ref.wait(timeout=TIMEOUT) == 0, (root / "local.log").read_text()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
        ref_log.close()
    print(f"\nslurm scenario: partial report after {t_partial:.0f} s, all done after {time.time() - t0:.0f} s")
    print(f"--status after the first submission:\n{status.stdout}the rerun's last lines:\n"
          + "\n".join(rerun.stdout.splitlines()[-14:]))
    return SimpleNamespace(root=root, sw=sw, jobs=jobs, first=first, cancelled_job=cancelled_job,
                           requeued_job=requeued_job, warned_job=warned_job, frozen=frozen, report_state=report_state, partial=partial,
                           status=status, rerun=rerun, status_after=status_after)


def test_every_member_ran_under_sbatch(scenario):
    s = scenario
    assert s.rerun.returncode == 0, s.rerun.stdout[-3000:] + s.rerun.stderr[-3000:]
    scripts = list((s.sw / "slurm" / "logs").glob("*_submission.sh"))
    assert scripts and all("#SBATCH --requeue" in p.read_text() for p in scripts)
    for name in MEMBERS:
        attempts = read_jsonl(s.sw / "slurm" / "tasks" / f"{name}.jsonl")
        assert attempts and all(a["job"] for a in attempts), name  # SLURM_JOB_ID set: a SLURM job ran it
        assert attempts[-1]["event"] == "end" and attempts[-1]["exit"] == 0, (name, attempts)
        stages = json.loads((s.root / "slurm" / name / "manifest.json").read_text())["stages"]
        # every stage but the adapter's own report (the sweep's report job reports on all of them)
        assert [k for k, v in stages.items() if v["status"] == "done"] == ["generate", "data", "train", "merge",
                                                                            "eval"], (name, stages)
    # generation ran as one job (the six share the base model and sampling settings), before any member;
    # the rerun needed none (the cancelled member had generated already)
    tasks = s.sw / "slurm" / "tasks"
    assert [p.name for p in tasks.glob("_generate-*")] == ["_generate-pair1_T.jsonl"]
    gen = read_jsonl(tasks / "_generate-pair1_T.jsonl")
    starts = [a["time"] for n in MEMBERS for a in read_jsonl(tasks / f"{n}.jsonl") if a["event"] == "start"]
    assert gen[-1]["event"] == "end" and gen[-1]["exit"] == 0 and gen[-1]["time"] <= min(starts)
    assert len(s.jobs["generate"]) == 1


def test_report_equals_the_sequential_sweeps_number_for_number(scenario):
    s = scenario

    def numbers(root: Path) -> dict:
        summary = json.loads((root / "sw" / "summary.json").read_text())
        text = json.dumps({k: v for k, v in summary.items() if k not in ("outputs", "inputs", "sweep")})
        return json.loads(text.replace(str(root), "ROOT"))

    local, slurm = numbers(s.root / "local"), numbers(s.root / "slurm")
    assert local["cells"] and local == slurm
    final = json.loads((s.sw / "summary.json").read_text())["sweep"]
    assert final["complete"] and final["missing"] == [] and sorted(final["finished"]) == sorted(MEMBERS)
    assert not (s.sw / "report.md").read_text().startswith("> **Incomplete")
    for name in MEMBERS:  # and below the report: every completion record, byte for byte
        a = (s.root / "local" / name / "eval" / "completions.jsonl").read_bytes()
        b = (s.root / "slurm" / name / "eval" / "completions.jsonl").read_bytes()
        assert a == b, name


def test_each_task_saw_its_own_gpus(scenario):
    s = scenario
    runs = []
    for name in MEMBERS:
        attempts = read_jsonl(s.sw / "slurm" / "tasks" / f"{name}.jsonl")
        starts = [a for a in attempts if a["event"] == "start"]
        ends = [a for a in attempts if a["event"] == "end"]
        for a, b in zip(starts, ends):
            gpus = a["cuda_visible_devices"]
            assert gpus and "," not in gpus, (name, a)  # slurm.gpus_per_task = 1: one device
            assert gpus == (a["slurm_step_gpus"] or a["slurm_job_gpus"]), (name, a)  # the one SLURM allocated
            runs.append((a["time"], b["time"], gpus, name))
    overlapping = [(x, y) for i, x in enumerate(runs) for y in runs[i + 1:] if x[0] < y[1] and y[0] < x[1]]
    assert overlapping, "no two members ran at once (the node has 2 CPUs)"
    assert all(x[2] != y[2] for x, y in overlapping), overlapping


def stopped_then_resumed(s, name: str, job_after: str, signal_name: str = "SIGTERM") -> list[dict]:
    """`name` was stopped inside step 3 (its checkpoint 2 on disk), saved, and resumed from step 3 to the
    uninterrupted run's adapter and records, byte for byte. Returns its attempts."""
    assert s.frozen[name] and s.frozen[name][-1] < "step_000006", f"{name}: training had ended: {s.frozen[name]}"
    attempts = read_jsonl(s.sw / "slurm" / "tasks" / f"{name}.jsonl")
    ends = [a for a in attempts if a["event"] == "end"]
    assert len(ends) == 2 and ends[0]["exit"] == 75 and ends[1]["exit"] == 0, attempts  # 75: saved and stopped
    assert ends[1]["job"] == job_after
    run = s.root / "slurm" / name
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 3, summary["resumed_from_step"]
    log = (s.sw / "slurm" / "logs" / f"{ends[0]['job']}_0_log.out").read_text()
    assert f"training stopped by {signal_name} after step 3 of 6" in log
    ref = s.root / "local" / name
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "eval/completions.jsonl",
              "data/train.jsonl"):
        assert (run / f).read_bytes() == (ref / f).read_bytes(), f
    return attempts


def test_a_member_requeued_mid_training_ends_with_the_uninterrupted_adapter(scenario):
    s = scenario
    stopped_then_resumed(s, REQUEUED, job_after=s.requeued_job)  # the same job, run again by SLURM
    attempts = read_jsonl(s.sw / "slurm" / "tasks" / f"{REQUEUED}.jsonl")
    assert [a["restart"] for a in attempts if a["event"] == "start"] == [0, 1]


def test_a_member_warned_of_its_time_limit_is_checkpointed_and_requeued_by_submitit(scenario):
    s = scenario
    attempts = stopped_then_resumed(s, WARNED, job_after=s.warned_job, signal_name="SIGUSR2")
    assert [a["restart"] for a in attempts if a["event"] == "start"] == [0, 1]
    first_end = next(a for a in attempts if a["event"] == "end")
    assert first_end["checkpointed"] is True  # submitit's handler called MemberTask.checkpoint
    log = (s.sw / "slurm" / "logs" / f"{s.warned_job}_0_log.out").read_text()
    assert "has stopped; requeueing" in log and f"Requeued job {s.warned_job}" in log


def test_a_cancelled_member_is_named_missing_then_the_same_command_finishes_it(scenario):
    s = scenario
    assert s.report_state == "COMPLETED"
    sweep = s.partial.summary["sweep"]
    assert sweep["complete"] is False and [m["member"] for m in sweep["missing"]] == [CANCELLED]
    why = sweep["missing"][0]["why"]
    assert f"job {s.cancelled_job} CANCELLED" in why and "train stopped" in why and "_log.out" in why, why
    assert s.partial.page.startswith("> **Incomplete sweep: 5 of 6 members finished.**")
    assert CANCELLED in s.partial.page.splitlines()[0]
    assert s.status.returncode == 0, s.status.stderr
    lines = s.status.stdout.splitlines()
    assert lines[0].startswith("sweep sw (slurm): 5 of 6 members finished, 1 not")
    line = next(x for x in lines if x.startswith(CANCELLED))
    assert "train stopped" in line and "(training stopped by SIGTERM after step 3 of 6" in line, line
    assert f"job {s.cancelled_job} CANCELLED" in line and "log " in line, line
    assert sum(x.split()[0] in MEMBERS for x in lines) == 6
    # the rerun submitted the cancelled member alone, which resumed from its checkpoint
    out = s.rerun.stdout
    assert f"{CANCELLED}: job" in out and not any(f"  {m}: job" in out for m in MEMBERS if m != CANCELLED), out
    assert "INCOMPLETE" not in out and "members: 6 done" in out
    rerun_job = json.loads((s.sw / "slurm" / "jobs.json").read_text())["submissions"][1]["members"][CANCELLED]["job"]
    stopped_then_resumed(s, CANCELLED, job_after=rerun_job)
    assert s.status_after.stdout.splitlines()[0].startswith("sweep sw (slurm): 6 of 6 members finished;")
