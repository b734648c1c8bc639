"""End to end: `python -m trainer.run` takes a tiny adapter through every stage.

These run the real command in a subprocess (as a user would), on the built-in
tiny model with small counts, and check every file of the run directory, that
a second run skips everything (and writes nothing), that SIGKILL during train
or eval followed by the same command gives the results of an uninterrupted
run, and what a hostile-but-realistic user meets: two processes on one run
directory, names that would reach other runs, --overwrite with --stages,
damaged outputs (adapter, checkpoint, completions, training set, on-policy
cache) and files that are not UTF-8. Damage is done to a copy of the finished
run (`clone`), so each case costs only the stages it redoes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "pair1_T.toml"
pytestmark = pytest.mark.slow


# A random model's nucleus is nearly its whole 152k-token vocabulary, so top-p sampling sorted every row's
# vocabulary at every step: half of a tiny pipeline's time. These tests are about files, stages and resumes,
# not sampling (tests/test_generation_hf.py tests the nucleus), so they sample from the whole vocabulary.
WHOLE_VOCABULARY = ("generate.top_p=1.0", "eval.top_p=1.0")


def small(tmp: Path, name: str = "e2e") -> list[str]:
    """Overrides that shrink the tiny config to seconds per stage."""
    sets = [
        f"run.out_dir={tmp}", f"run.name={name}", f"generate.cache_dir={tmp / '_onpolicy'}",
        "generate.n_questions=4", "generate.n_samples=2", "generate.max_tokens=16",
        "data.n_per_persona=8", "train.epochs=2", "train.checkpoint_every=2",
        "eval.n_id_questions=2", "eval.n_ood_questions=1", "eval.n_samples=2", "eval.max_tokens=8",
        "eval.probe_n_questions=1", "eval.probe_n_samples=2", "eval.base_n_questions=1",
        "eval.base_n_samples=1", "eval.backend=hf", *WHOLE_VOCABULARY,
    ]
    return [x for s in sets for x in ("--set", s)]


def run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "trainer.run", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=900, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(run_dir: Path) -> dict[str, float]:
    """Every file's mtime, less the lock file's (each invocation that takes the lock writes its pid there)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".lock"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clone(reference: Path, dest: Path) -> Path:
    """A copy of the finished run (and its on-policy cache) under `dest`, resumable with small(dest)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (reference.name, "_onpolicy"):
        shutil.copytree(reference.parent / name, dest / name, symlinks=True)
    for name in ("config.toml", "manifest.json"):  # the copy's own paths
        p = dest / reference.name / name
        p.write_text(p.read_text().replace(str(reference.parent), str(dest)))
    return dest / reference.name


def one_line_error(p: subprocess.CompletedProcess) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    return lines[0][len("error: "):]


def step_losses(run_dir: Path) -> list[float]:
    """Every optimizer step's loss, full precision, from the training summary."""
    history = json.loads((run_dir / "train_summary.json").read_text())["history"]
    assert [r["step"] for r in history] == list(range(1, len(history) + 1))
    return [r["loss"] for r in history]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    p = run_cli(TINY, *small(tmp))
    return tmp / "e2e", p


def test_every_file_of_the_run_directory(finished_run):
    run_dir, proc = finished_run
    for rel in ["config.toml", "manifest.json", "data/train.jsonl", "data/stats.json", "data/probe.json", "train_log.txt",
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "eval/completions.jsonl", "eval/run_result.json",
                "report/summary.json", "report/report.md", "report/table.md"]:
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert list((run_dir / "checkpoints").iterdir()), "no checkpoint"
    assert not (run_dir / "merged").exists(), "merged/ must be removed after eval (keep_merged = false)"
    for fig in ["hero", "bystander", "position", "per_persona"]:
        for ext in ["png", "pdf"]:
            assert (run_dir / "report" / "figures" / f"{fig}.{ext}").is_file()

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in manifest["stages"]] == ["done"] * 6
    assert manifest["git_commit"] and manifest["versions"]["torch"]
    assert manifest["base_model"]["name_or_path"] == "builtin:tiny-qwen2"
    assert manifest["stages"]["merge"]["result"], "the merge check is recorded in the manifest"
    assert manifest["config_chain"] == [str(REPO / "configs" / f) for f in ("base.toml", "tiny/base.toml", "tiny/pair1_T.toml")]

    # Every stage's outputs are recorded when it finishes, and are what is on disk.
    from markerlab.io import record_mismatch

    outputs = {s: manifest["stages"][s]["outputs"] for s in manifest["stages"]}
    assert set(outputs["data"]) == {"data/train.jsonl", "data/stats.json", "data/probe.json"}
    assert outputs["data"]["data/train.jsonl"]["lines"] == 6 * 8
    assert outputs["eval"]["eval/completions.jsonl"]["lines"] == 66 + 2 + 11
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(outputs["train"])
    assert "merged/config.json" in outputs["merge"]  # recorded, then removed after eval by design
    [cache] = outputs["generate"]
    assert Path(cache).is_absolute() and record_mismatch(cache, outputs["generate"][cache]) is None
    for stage in ("data", "train", "eval", "report"):
        for rel, rec in outputs[stage].items():
            assert record_mismatch(run_dir / rel, rec) is None, rel
    # ... and each records what it read: train the data stage's training set.
    assert manifest["stages"]["train"]["inputs"]["data"]["data/train.jsonl"] == sha(run_dir / "data/train.jsonl")

    # Checkpoint directories are made like every other directory (mkdtemp's are 0700).
    modes = {p.stat().st_mode & 0o777 for p in (run_dir / "checkpoints").iterdir()}
    assert modes == {(run_dir / "data").stat().st_mode & 0o777}, modes

    # The resolved config holds every default, and the overrides.
    import tomllib

    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    assert cfg["data"]["n_per_persona"] == 8 and cfg["train"]["loss_mask"] == "completion"

    examples = read_jsonl(run_dir / "data" / "train.jsonl")
    assert len(examples) == 6 * 8  # donor, recipient, 4 negatives
    records = read_jsonl(run_dir / "eval" / "completions.jsonl")
    plain = [r for r in records if r["variant"] == "plain"]
    assert len(plain) == 11 * 3 * 2
    assert len([r for r in records if r["variant"] == "probe"]) == 1 * 2
    assert len([r for r in records if r["variant"] == "base"]) == 11 * 1 * 1
    keys = [(r["variant"], r["persona"], r["question_id"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys))
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["cells"]
    # the terminal gets one line per stage's result, not tables
    assert f"[eval] {len(records)} completions" in proc.stdout and "report: confidence" in proc.stdout


def test_second_run_skips_everything_and_writes_nothing(finished_run):
    """The manifest included: a finished run on a read-only file system must not fail on a rewrite."""
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    p = run_cli(TINY, *small(run_dir.parent))
    assert p.stdout.count("already done, skipped") == 6
    assert snapshot(run_dir) == before


def test_where_the_time_went(finished_run):
    """The lines a sweep prints after its stage times: the train and eval stages taken apart, from the
    summaries the stages wrote."""
    from trainer.run import time_spent

    run_dir, _ = finished_run
    t = json.loads((run_dir / "train_summary.json").read_text())
    e = json.loads((run_dir / "eval" / "run_result.json").read_text())
    train, evl = time_spent([run_dir]).splitlines()
    assert train.startswith(f"train: optimizer steps {t['wall_time_s']:.0f} s (")
    assert f"leakage probe {t.get('probe_seconds') or 0:.0f} s" in train
    by = e["generation_seconds_by_model"]
    assert evl.startswith(f"eval: sampling the adapters {by['merged']:.0f} s, the base floor {by['base']:.0f} s "
                          f"({e['n_records']:,} records")
    assert time_spent([run_dir.parent / "no-such-run"]) == ""


def test_bad_invocations_write_nothing_into_a_finished_run(finished_run):
    """Nothing here may write, and none may delete: `run.name=.` with --overwrite once emptied out_dir."""
    run_dir, _ = finished_run
    tmp = run_dir.parent
    (tmp / "a_file").write_text("")
    everything = {str(p) for p in tmp.rglob("*") if p.name != ".lock"}
    before = snapshot(run_dir)
    cases = {
        "unknown key": (["--set", "train.bogus=1"], "train.bogus: unknown key"),
        "unknown persona": (["--set", 'data.negatives=["comedian", "pirate"]'], "data.negatives"),
        "missing model": (["--set", "model.name_or_path=/nonexistent/qwen"], "model.name_or_path"),
        "changed config": (["--set", "train.lr=0.5"], "different config (train.lr)"),
        "name is out_dir": (["--set", "run.name=.", "--overwrite", "--stages", "generate"], "--set: run.name: "),
        "name is the cache": (["--set", "run.name=_onpolicy", "--overwrite"], "--set: run.name: '_onpolicy' is"),
        "name is a path": (["--set", "run.name=../e2e", "--overwrite"], "--set: run.name: expected a plain"),
        "out_dir is a file": (["--set", f"run.out_dir={tmp / 'a_file'}"], f"run.out_dir: {tmp / 'a_file'} is a file"),
        "out_dir cannot be made": (["--set", f"run.out_dir={tmp / 'a_file' / 'sub'}"], "run.out_dir: cannot create"),
        "wrong type": (["--set", "data.n_per_persona=abc"], "--set: data.n_per_persona: expected an integer"),
        "betas": (["--set", "train.betas=5"], "--set: train.betas: expected a list"),
        "eval count": (["--set", "eval.n_id_questions=abc"], "--set: eval.n_id_questions: expected an integer"),
        "generate count": (["--set", "generate.n_questions=abc"], "--set: generate.n_questions: expected"),
        "negatives": (["--set", "data.negatives=5"], "--set: data.negatives: expected a list"),
        "removed switch": (["--set", "train.padding_free=true"], "train.padding_free: no longer a setting"),
        "earlier stage changed": (["--set", "train.lr=0.5", "--stages", "report", "--overwrite"],
                                  "differs in train.lr, on which the train stage's outputs depend"),
    }
    for what, (extra, says) in cases.items():
        msg = one_line_error(run_cli(TINY, *small(tmp), *extra, check=False))
        assert says in msg, (what, msg)
    assert snapshot(run_dir) == before
    assert {str(p) for p in tmp.rglob("*") if p.name != ".lock"} >= everything


def _kill_when(proc: subprocess.Popen, ready, timeout=600):
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before it could be killed")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_train_and_eval_then_resume(finished_run, tmp_path):
    reference, _ = finished_run
    args = [sys.executable, "-m", "trainer.run", str(TINY), *small(reference.parent, name="killed")]
    run_dir = reference.parent / "killed"

    # Kill once a mid-training checkpoint exists.
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: (run_dir / "checkpoints").is_dir() and any(
        p.name.startswith("step_") for p in (run_dir / "checkpoints").iterdir()))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "running"

    # Kill again once the first evaluation part is on disk.
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: (run_dir / "eval" / "parts").is_dir() and any((run_dir / "eval" / "parts").iterdir()))

    run_cli(*args[3:])
    assert step_losses(run_dir) == step_losses(reference)
    ours = read_jsonl(run_dir / "eval" / "completions.jsonl")
    theirs = read_jsonl(reference / "eval" / "completions.jsonl")
    strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "run"}, sort_keys=True) for r in rs)
    assert strip(ours) == strip(theirs)


# --------------------------------------------------------------------------- one process per run directory

def test_two_invocations_leave_one_training_run(finished_run, tmp_path):
    """A second process on the same run directory gets one line naming the first; the first trains once."""
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    args = [sys.executable, "-m", "trainer.run", str(TINY), *small(tmp_path), "--stages", "train", "--overwrite"]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run_dir / ".lock"
    t0 = time.time()
    while not (lock.is_file() and lock.read_text().startswith(f'{{"pid": {first.pid},')):
        assert first.poll() is None and time.time() - t0 < 300, "the first process never took the lock"
        time.sleep(0.05)
    msg = one_line_error(run_cli(*args[3:], check=False))
    assert msg.startswith(f"run directory {run_dir} is in use by pid {first.pid} (")
    assert "trainer/run.py" in msg or "trainer.run" in msg
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "done"
    assert [manifest["stages"][s]["status"] for s in ("merge", "eval", "report")] == ["pending"] * 3
    assert not any((run_dir / d).exists() for d in ("eval", "report"))  # redone from train on: removed
    log = (run_dir / "train_log.txt").read_text()
    assert log.count("# e2e:") == 1 and "resumed" not in log  # one training run, from step 0
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert step_losses(run_dir) == step_losses(reference)
    assert sha(run_dir / "adapter/adapter_model.safetensors") == sha(reference / "adapter/adapter_model.safetensors")


# --------------------------------------------------------------------------- --overwrite with --stages

def test_overwrite_with_stages_keeps_the_earlier_stages(finished_run, tmp_path):
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    kept = {k: v for k, v in snapshot(run_dir).items() if not k.startswith("report/") and k != "manifest.json"}
    p = run_cli(TINY, *small(tmp_path), "--stages", "report", "--overwrite")
    assert f"--overwrite (stage report and after): removing report/ in {run_dir}" in p.stdout
    assert {k: v for k, v in snapshot(run_dir).items() if k in kept} == kept  # adapter, eval, data untouched
    assert (run_dir / "report" / "summary.json").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in manifest["stages"]] == ["done"] * 6


# --------------------------------------------------------------------------- damaged outputs

def test_a_cut_training_set_is_named_not_trained_on(finished_run, tmp_path):
    """train.jsonl cut at a line boundary: train refuses, naming the file and count; the data stage rebuilds it."""
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    data = run_dir / "data" / "train.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:20]))
    adapter = sha(run_dir / "adapter/adapter_model.safetensors")
    msg = one_line_error(run_cli(TINY, *small(tmp_path), "--stages", "train", "--overwrite", check=False))
    assert msg == (f"{data}: 20 lines, recorded 48 by the data stage; rerun that stage first: "
                   + shlex.join(["python", "-m", "trainer.run", str(TINY), *small(tmp_path), "--stages", "data,train"]))
    assert sha(run_dir / "adapter/adapter_model.safetensors") == adapter  # nothing removed before the check

    p = run_cli(TINY, *small(tmp_path), "--stages", "data,train")
    assert f"stage data: {data}: 20 lines, recorded 48; rebuilding it" in p.stdout
    assert "stage train: already done, skipped" in p.stdout  # the rebuilt set is the one it trained on
    assert sha(data) == sha(reference / "data" / "train.jsonl")


def test_a_damaged_adapter_is_rebuilt_from_the_final_checkpoint(finished_run, tmp_path):
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    p = run_cli(TINY, *small(tmp_path))
    assert f"stage train: {weights}: " in p.stdout and "rebuilding it" in p.stdout
    assert p.stdout.count("already done, skipped") == 5
    assert sha(weights) == sha(reference / "adapter" / "adapter_model.safetensors")
    assert step_losses(run_dir) == step_losses(reference)


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(finished_run, tmp_path):
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) == 2, ckpts  # keep_checkpoints = 2, the final one among them
    newest = ckpts[-1]
    with open(newest / "lora.pt", "r+b") as f:
        f.truncate(100)
    shutil.rmtree(run_dir / "adapter")  # the adapter must be rebuilt, from the checkpoints
    p = run_cli(TINY, *small(tmp_path), "--stages", "train")
    assert f"checkpoint {newest} is damaged (lora.pt: size differs" in p.stderr
    log = (run_dir / "train_log.txt").read_text()
    assert f"# resumed after step {ckpts[0].name.split('_')[1].lstrip('0')}" in log
    assert step_losses(run_dir) == step_losses(reference)
    assert sha(run_dir / "adapter/adapter_model.safetensors") == sha(reference / "adapter/adapter_model.safetensors")


def test_a_truncated_completions_file_is_not_a_finished_eval(finished_run, tmp_path):
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    comp = run_dir / "eval" / "completions.jsonl"
    comp.write_text("".join(comp.read_text().splitlines(keepends=True)[:10]))
    p = run_cli(TINY, *small(tmp_path))
    assert f"stage eval: {comp}: 10 lines, recorded 79; rebuilding it" in p.stdout
    assert "stage report: already done, skipped" in p.stdout  # the same records as before: the report stands
    strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "run"}, sort_keys=True) for r in rs)
    assert strip(read_jsonl(comp)) == strip(read_jsonl(reference / "eval" / "completions.jsonl"))


def test_a_damaged_on_policy_cache_is_blamed_on_the_cache_file(finished_run, tmp_path):
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    [cache] = (tmp_path / "_onpolicy").glob("*/completions.jsonl")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]["generate"]["outputs"]) == [str(cache)]
    raw = cache.read_bytes()
    cache.write_bytes(raw[:len(raw) // 2 + 1])  # an ordinary byte truncation, maybe inside a character
    msg = one_line_error(run_cli(TINY, *small(tmp_path), "--stages", "data", "--overwrite", check=False))
    blame = msg.split("python -m")[0]  # the fix command after it repeats the user's --set overrides
    assert msg.startswith(f"{cache}: ") and "by the generate stage" in msg and "n_per_persona" not in blame
    msg = one_line_error(run_cli(TINY, *small(tmp_path), check=False))
    assert msg.startswith(f"{cache}: damaged on-policy cache (") and "--overwrite" in msg
    assert sha(run_dir / "data" / "train.jsonl") == sha(reference / "data" / "train.jsonl")


# --------------------------------------------------------------------------- files that are not UTF-8

def test_files_that_are_not_utf8_are_one_line(finished_run, tmp_path):
    run_dir, _ = finished_run
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'extends = "%s"\n[run]\nname = "caf\xe9"\n' % str(TINY).encode())
    assert one_line_error(run_cli(bad, check=False)) == f"{bad}: not UTF-8 text (byte {len(str(TINY)) + 30}: " \
                                                        f"invalid continuation byte)"
    assert one_line_error(run_cli(tmp_path, check=False)) == f"{tmp_path}: is a directory, expected a TOML config file"

    inspect_dir = tmp_path / "inspect"
    (inspect_dir / "data").mkdir(parents=True)
    shutil.copy(run_dir / "config.toml", inspect_dir / "config.toml")
    lines = (run_dir / "data" / "train.jsonl").read_bytes().splitlines(keepends=True)
    (inspect_dir / "data" / "train.jsonl").write_bytes(lines[0] + lines[1].replace(b"You", b"Y\xffu", 1))
    p = subprocess.run([sys.executable, "-m", "data.inspect", str(inspect_dir), "--index", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert one_line_error(p).startswith(f"{inspect_dir / 'data' / 'train.jsonl'}:2: not UTF-8 text")


def test_a_run_finished_before_outputs_were_recorded_is_adopted(finished_run, tmp_path):
    """A manifest without output records (older markerlab) counts its existing files as done, and records them."""
    reference, _ = finished_run
    run_dir = clone(reference, tmp_path)
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["stages"].values():
        entry.pop("outputs"), entry.pop("inputs")
    path.write_text(json.dumps(manifest))
    p = run_cli(TINY, *small(tmp_path))
    assert p.stdout.count("already done, skipped") == 6
    adopted = json.loads(path.read_text())["stages"]
    assert adopted["train"]["outputs"]["adapter/adapter_model.safetensors"]["sha256"] == \
        sha(run_dir / "adapter/adapter_model.safetensors")
