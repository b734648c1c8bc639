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
