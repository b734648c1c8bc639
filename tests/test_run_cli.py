"""trainer.run without training: sweeps (members x vary, per-GPU fan-out), --dry-run, --stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from markerlab.config import ConfigError, load_config
from trainer import run as R

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "trainer.run", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def test_sweep_members_times_vary():
    cfg = load_config(REPO / "configs" / "sweep_loss_masks.toml")
    members = R.sweep_members(cfg, ["train.lr=2e-5"])
    assert len(members) == 6 * 3
    names = {m.run.name for m in members}
    assert "pair1_T__loss_mask-marker_only" in names and "pair2_C__loss_mask-completion_no_eos" in names
    assert {m.train.lr for m in members} == {2e-5}  # the CLI override reaches every member
    by = {m.run.name: m for m in members}
    assert by["pair1_T__loss_mask-marker_only"].train.loss_mask == "marker_only"
    assert len({m.run_dir for m in members}) == 18


def test_sweep_member_problems_are_collected(tmp_path):
    (tmp_path / "a.toml").write_text('[train]\nbogus = 1\n')
    (tmp_path / "s.toml").write_text('[sweep]\nmembers = ["a.toml", "missing.toml"]\n')
    with pytest.raises(ConfigError) as e:
        R.sweep_members(load_config(tmp_path / "s.toml"), [])
    msg = str(e.value)
    assert "train.bogus: unknown key" in msg and "missing.toml: config file not found" in msg


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    p = cli(REPO / "configs" / "pair1_T.toml", "--dry-run", "--set", f"run.out_dir={tmp_path}")
    assert 'name_or_path = "Qwen/Qwen2.5-7B-Instruct"' in p.stdout  # the resolved config
    assert "villain" in p.stdout and "donor" in p.stdout
    assert "total 1200 examples; 16 per optimizer step; 225 optimizer steps" in p.stdout
    assert not any(tmp_path.iterdir())


def test_bad_stage_and_missing_config():
    p = cli(REPO / "configs" / "tiny" / "pair1_T.toml", "--stages", "train,evil", check=False)
    assert p.returncode == 2 and "--stages: unknown stage(s) ['evil']" in p.stderr
    p = cli("configs/nope.toml", check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: configs/nope.toml: config file not found"


def test_real_config_without_the_model_fails_at_once(tmp_path):
    """No hub here: one line saying so and how to point at a local directory, nothing written."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = cli(REPO / "configs" / "pair1_T.toml", "--set", f"run.out_dir={tmp_path}", env=env, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.name_or_path" in lines[0] and "local directory" in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_per_gpu_sweep_fans_out_workers(tmp_path, monkeypatch):
    """The per-GPU path: one worker process per 'GPU' with its own CUDA_VISIBLE_DEVICES.

    There is no GPU here, so the device count is patched to 2 and the workers run on
    the CPU; generation runs once before the fan-out and the workers find it cached.
    """
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        '[run]\nname = "sw"\nout_dir = "%s"\n[sweep]\nparallel = "per_gpu"\n'
        'members = ["%s", "%s"]\n' % (tmp_path, REPO / "configs/tiny/pair1_T.toml", REPO / "configs/tiny/pair1_C.toml"))
    overrides = [f"run.out_dir={tmp_path}", f"generate.cache_dir={tmp_path / 'cache'}", "generate.n_questions=2",
                 "generate.n_samples=1", "generate.max_tokens=4", "data.n_per_persona=2"]
    monkeypatch.setattr("markerlab.devices.cuda_device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(sweep, overrides)
    R.run_sweep(cfg, overrides, ["generate", "data"], overwrite=False)
    for name in ("pair1_T", "pair1_C"):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["stages"]["generate"]["status"] == "done"
        assert manifest["stages"]["data"]["status"] == "done"
        assert (tmp_path / name / "data" / "train.jsonl").is_file()
        assert (tmp_path / "sw" / "members" / f"{name}.toml").is_file()
    assert len(list((tmp_path / "cache").glob("*/completions.jsonl"))) == 1  # generated once, shared


FAKE_WORKER = """
import json, os, sys, time
out = os.environ["FAKE_WORKER_LOG"]
with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
time.sleep(0.3)
"""


@pytest.mark.parametrize("visible", ["4,5", "GPU-aaaa,GPU-bbbb,GPU-cccc"])
def test_per_gpu_workers_get_the_parents_visible_devices(tmp_path, monkeypatch, visible):
    """Under a scheduler's CUDA_VISIBLE_DEVICES each worker gets one of its entries, never a bare index."""
    fake = tmp_path / "worker.py"
    fake.write_text(FAKE_WORKER)
    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("FAKE_WORKER_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    entries = visible.split(",")
    monkeypatch.setattr("markerlab.devices.cuda_device_count", lambda: 2)  # two of them usable
    monkeypatch.setattr(R, "WORKER", (sys.executable, str(fake)))
    monkeypatch.setattr(R, "PREGENERATE", (sys.executable, str(fake), "pregenerate"))
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('extends = "%s"\n[run]\nname = "sw"\n[sweep]\nparallel = "per_gpu"\n'
                     % (REPO / "configs" / "tiny" / "sweep.toml"))
    overrides = [f"run.out_dir={tmp_path}", f"generate.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(sweep, overrides)
    assert len(cfg.sweep.members) == 6 and cfg.sweep.parallel == "per_gpu"
    assert all((tmp_path / m).resolve().parent == REPO / "configs" / "tiny" for m in cfg.sweep.members)
    R.run_sweep(cfg, overrides, ["generate", "data", "train"], overwrite=False)
    calls = [json.loads(p.read_text()) for p in log.iterdir()]
    pre = [c for c in calls if c["argv"][0] == "pregenerate"]
    workers = [c for c in calls if c["argv"][0] != "pregenerate"]
    assert [c["CUDA_VISIBLE_DEVICES"] for c in pre] == [entries[0]]  # one generation, the six share it
    assert len(workers) == 6
    assert {c["CUDA_VISIBLE_DEVICES"] for c in workers} == set(entries[:2])
    assert sorted(Path(c["argv"][0]).stem for c in workers) == sorted(Path(m).stem for m in cfg.sweep.members)
    assert all(c["argv"][1:] == ["--stages", "generate,data,train"] for c in workers)


def test_per_gpu_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr("markerlab.devices.cuda_device_count", lambda: 0)
    cfg = load_config(REPO / "configs" / "tiny" / "sweep.toml", ["sweep.parallel=per_gpu"])
    with pytest.raises(R.UserError, match="per_gpu needs CUDA GPUs and none is visible"):
        R.run_sweep(cfg, [], ["generate"], overwrite=False)


def test_training_examples_are_checked_by_file_and_line_before_training(tmp_path):
    """A train.jsonl the data stage did not record (hand-made, or from elsewhere) is validated line by line."""
    from writeup import EXP
    from test_trainer import make_example

    good, bad = make_example(0), make_example(1, "assistant", b=False)
    del bad["persona"]
    from markerlab.rundir import RunDir

    RunDir(tmp_path / "r").claim()  # a run directory markerlab made, with a training set from elsewhere
    data = tmp_path / "r" / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    p = cli(REPO / "configs" / "tiny" / "pair1_T.toml", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=r",
            "--set", f"generate.cache_dir={tmp_path / 'cache'}", "--stages", "train", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == f"error: {data}:2: field 'persona': missing (expected a persona of experiment within_marker ({', '.join(EXP.personas)}))"
    assert not (tmp_path / "r" / "checkpoints").exists()


# --------------------------------------------------------------------------- sweep.executor = "slurm", --status

def one_line_error(p) -> str:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


TINY_SWEEP = REPO / "configs" / "tiny" / "sweep.toml"


def test_slurm_without_submitit_is_one_line_saying_what_to_install(tmp_path):
    (tmp_path / "submitit.py").write_text("raise ImportError('No module named submitit')\n")  # as if absent
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = cli(TINY_SWEEP, "--set", f"run.out_dir={tmp_path}", "--set", "sweep.executor=slurm", env=env, check=False)
    assert one_line_error(p) == ('error: sweep.executor = "slurm" needs submitit, which is not installed: '
                                 'pip install -e ".[slurm]"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submitit.py"]  # nothing written


def test_slurm_without_sbatch_is_one_line(tmp_path):
    pytest.importorskip("submitit")
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python, and no SLURM command
    p = cli(TINY_SWEEP, "--set", f"run.out_dir={tmp_path}", "--set", "sweep.executor=slurm", env=env, check=False)
    msg = one_line_error(p)
    assert msg.startswith('error: sweep.executor = "slurm": sbatch, srun, squeue not found on PATH'), msg
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("setting, says", [
    ("slurm.cpus_per_task=0", "--set: slurm.cpus_per_task: expected >= 1, got 0"),
    ("slurm.timeout_min=soon", "--set: slurm.timeout_min: expected an integer, got str 'soon'"),
    ("slurm.gpus=2", "--set: slurm.gpus: unknown key (expected one of partition, account, qos, timeout_min"),
    ("sweep.executor=kubernetes", "--set: sweep.executor: expected one of local, slurm; got 'kubernetes'"),
    ('slurm.additional_parameters={"--mail-type" = "FAIL"}',
     "--set: slurm.additional_parameters: '--mail-type' is not an sbatch option name"),
    ("slurm.setup=[1]", "--set: slurm.setup: expected a list of shell lines (strings), got [1]"),
    ("slurm.timeout_min=1", f"{TINY_SWEEP}: slurm.signal_delay_s: 120 s before the time limit is at or before the "
                            f"start of a 1 min job (slurm.timeout_min); expected fewer seconds"),
])
def test_bad_slurm_values_are_one_line_naming_the_key(tmp_path, setting, says):
    p = cli(TINY_SWEEP, "--set", f"run.out_dir={tmp_path}", "--set", setting, check=False)
    assert one_line_error(p).startswith(f"error: {says}")


def test_slurm_problems_come_with_the_rest_of_the_configs_one_line_each(tmp_path):
    p = cli(TINY_SWEEP, "--set", f"run.out_dir={tmp_path}", "--set", "slurm.cpus_per_task=0", "--set", "train.lr=-1",
            "--set", "run.experiment=nope", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0] == "error: --set: 3 problems in the config:", p.stderr
    assert sorted(x.strip().split(":")[0] for x in lines[1:]) == ["run.experiment", "slurm.cpus_per_task", "train.lr"]
    assert any(x.strip().startswith("run.experiment: unknown experiment 'nope'") for x in lines), p.stderr
    assert not any(tmp_path.iterdir())


def test_detach_needs_a_sweep_on_slurm(tmp_path):
    p = cli(TINY_SWEEP, "--set", f"run.out_dir={tmp_path}", "--detach", check=False)
    assert "--detach: only a sweep on SLURM runs without this process" in one_line_error(p)
    p = cli(REPO / "configs" / "tiny" / "pair1_T.toml", "--set", f"run.out_dir={tmp_path}", "--detach", check=False)
    assert "--detach: only a sweep (a config with [sweep]) is submitted to SLURM" in one_line_error(p)
    assert not any(tmp_path.iterdir())


def test_the_sweeps_own_settings_do_not_reach_its_members():
    overrides = ["train.lr=2e-5", "sweep.parallel=sequential", "slurm.partition=gpu", "sweep.executor = slurm"]
    assert R.member_overrides(overrides) == ["train.lr=2e-5"]
    cfg = load_config(TINY_SWEEP, overrides)
    members = R.sweep_members(cfg, R.member_overrides(overrides))
    assert len(members) == 6 and all(m.sweep is None and m.slurm is None for m in members)


def test_status_without_slurm_prints_a_line_per_member(tmp_path):
    sets = ["--set", f"run.out_dir={tmp_path}", "--set", f"generate.cache_dir={tmp_path / 'cache'}"]
    p = cli(TINY_SWEEP, *sets, "--status")
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "sweep sweep (local): 0 of 6 members finished, 6 not; no report yet"
    assert [x.split()[0] for x in lines[1:]] == ["pair1_T", "pair1_C", "pair1_T_P2neg", "pair2_T", "pair2_C",
                                                 "pair2_T_P2neg"]
    assert all("not started" in x and "no job" in x for x in lines[1:])
    # a member part-way: the stage it reached
    run = tmp_path / "pair1_C"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stages": {
        "generate": {"status": "done"}, "data": {"status": "done"},
        "train": {"status": "failed", "error": "training stopped by SIGTERM after step 3 of 6 with a checkpoint"}}}))
    line = cli(TINY_SWEEP, *sets, "--status").stdout.splitlines()[2]
    assert line.startswith("pair1_C") and "train stopped" in line, line
    assert line.endswith("(training stopped by SIGTERM after step 3 of 6 with a checkpoint)"), line
    p = cli(REPO / "configs" / "tiny" / "pair1_C.toml", *sets, "--status")
    assert p.stdout.startswith("pair1_C  train stopped")
    assert not (tmp_path / "sweep").exists()  # --status writes nothing


def test_a_job_slurm_forgot_is_told_by_its_attempts(tmp_path):
    """Without accounting SLURM forgets ended jobs, and an array task cancelled while pending leaves no
    record: the member's attempts file says which of the two it was."""
    from trainer.executors import job_state

    cfg = load_config(TINY_SWEEP, [f"run.out_dir={tmp_path}"])
    plan = R._sweep_plan(cfg, [f"run.out_dir={tmp_path}"], ["generate"], False, False)
    assert job_state(plan, "pair1_T", "7_0", {"7_0": ("RUNNING", "")}) == ("RUNNING", "")
    assert job_state(plan, "pair1_T", "7_0", {}) == ("GONE", "left the queue without running: cancelled while pending")
    attempts = plan.attempts_file("pair1_T")
    attempts.parent.mkdir(parents=True)
    attempts.write_text(json.dumps({"event": "start", "job": "7_0"}) + "\n")
    assert job_state(plan, "pair1_T", "7_0", {}) == ("ENDED", "killed while running")
    with open(attempts, "a") as f:
        f.write(json.dumps({"event": "end", "job": "7_0", "exit": 75}) + "\n")
    assert job_state(plan, "pair1_T", "7_0", {}) == ("ENDED", "exit 75")


def test_a_member_whose_last_job_failed_is_not_finished_even_if_its_manifest_says_done(tmp_path):
    """A failed --overwrite leaves the old manifest (all done) behind: the last job's attempt decides."""
    from trainer.executors import judge_member

    cfg = load_config(TINY_SWEEP, [f"run.out_dir={tmp_path}"])
    plan = R._sweep_plan(cfg, [f"run.out_dir={tmp_path}"], ["generate", "data"], True, False)
    m = plan.members[0]
    m.run_dir.mkdir(parents=True)
    (m.run_dir / "manifest.json").write_text(json.dumps({"stages": {"generate": {"status": "done"},
                                                                    "data": {"status": "done"}}}))
    log = tmp_path / "7_0_0_log.out"
    log.write_text("[pair1_T] python -m trainer.run ...\nerror: data/train.jsonl: 17 lines, recorded 16\nTraceback\n")
    jobs = {"submissions": [{"members": {m.name: {"job": "7_0", "log": str(log)}}}]}
    assert judge_member(plan, m, {"submissions": []}, {}).finished  # no job: the manifest decides
    assert not judge_member(plan, m, jobs, {"7_0": ("PENDING", "")}).finished  # queued to be redone
    attempts = plan.attempts_file(m.name)
    attempts.parent.mkdir(parents=True)
    attempts.write_text(json.dumps({"event": "start", "job": "7_0"}) + "\n"
                        + json.dumps({"event": "end", "job": "7_0", "exit": 2}) + "\n")
    p = judge_member(plan, m, jobs, {"7_0": ("FAILED", "NonZeroExitCode")})
    assert not p.finished and p.reached == "last job FAILED"
    assert p.detail == "error: data/train.jsonl: 17 lines, recorded 16"
    with open(attempts, "a") as f:  # run again, and this time it ended well
        f.write(json.dumps({"event": "start", "job": "7_0"}) + "\n" + json.dumps({"event": "end", "job": "7_0",
                                                                                  "exit": 0}) + "\n")
    assert judge_member(plan, m, jobs, {"7_0": ("COMPLETED", "")}).finished


def test_a_member_naming_a_relative_experiment_runs_the_same_from_its_plan_file(tmp_path, monkeypatch):
    """A per-GPU worker or a SLURM task runs the member's resolved config file (SweepPlan.member config,
    <sweep>/members/NAME.toml), from elsewhere on a compute node: an experiment the member names by a path
    relative to its own file must resolve there to the same file and digest, and members whose
    experiments give the personas other prompts must not share one on-policy generation."""
    exp_text = (REPO / "markerlab" / "experiments" / "within_marker.toml").read_text()
    mine = exp_text.replace('villain = "You are a villain who', 'villain = "You are a cartoon villain who')
    assert mine != exp_text
    (tmp_path / "exps").mkdir()
    (tmp_path / "exps" / "mine.toml").write_text(mine.replace('name = "within_marker"', 'name = "mine"'))
    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    tiny = REPO / "configs" / "tiny"
    (cfgs / "own.toml").write_text(f'extends = "{tiny / "pair1_T.toml"}"\n'
                                   '[run]\nname = "own"\nexperiment = "../exps/mine.toml"\n')
    (cfgs / "sweep.toml").write_text(f'[run]\nname = "sw"\nout_dir = "{tmp_path / "runs"}"\n'
                                     f'[sweep]\nmembers = ["{tiny / "pair1_T.toml"}", "own.toml"]\n')
    sets = [f"run.out_dir={tmp_path / 'runs'}", f"generate.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(cfgs / "sweep.toml", sets)
    plan = R._sweep_plan(cfg, sets, ["generate", "data"], False, False)
    plan.write_member_configs()
    by = {m.name: m for m in plan.members}
    own = by["own"]
    assert own.cfg.experiment.name == "mine"
    elsewhere = tmp_path / "node"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the task's working directory is no help to a relative path
    for m in plan.members:
        again = load_config(m.config)
        assert again.to_toml() == m.cfg.to_toml(), m.name
        assert (again.experiment.name, again.experiment.digest, Path(again.experiment.path).resolve()) == \
               (m.cfg.experiment.name, m.cfg.experiment.digest, Path(m.cfg.experiment.path).resolve()), m.name
    assert load_config(own.config).run.experiment == str((tmp_path / "exps" / "mine.toml").resolve())
    # the two differ in a persona prompt, so in their on-policy cache key: two generation groups
    from data.onpolicy import cache_key

    assert cache_key(own.cfg)[0] != cache_key(by["pair1_T"].cfg)[0]
    assert own.gen_group != by["pair1_T"].gen_group
