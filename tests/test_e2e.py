"""End to end: `python -m trainer.run` takes a tiny adapter through every stage.

These run the real command in a subprocess (as a user would), on the built-in
tiny model with small counts, and check every file of the run directory, that
a second run skips everything, and that SIGKILL during train or eval followed
by the same command gives the results of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "pair1_T.toml"
pytestmark = pytest.mark.slow


def small(tmp: Path, name: str = "e2e") -> list[str]:
    """Overrides that shrink the tiny config to seconds per stage."""
    sets = [
        f"run.out_dir={tmp}", f"run.name={name}", f"generate.cache_dir={tmp / '_onpolicy'}",
        "generate.n_questions=4", "generate.n_samples=2", "generate.max_tokens=16",
        "data.n_per_persona=8", "train.epochs=2", "train.checkpoint_every=2",
        "eval.n_id_questions=2", "eval.n_ood_questions=1", "eval.n_samples=2", "eval.max_tokens=8",
        "eval.probe_n_questions=1", "eval.probe_n_samples=2", "eval.base_n_questions=1",
        "eval.base_n_samples=1", "eval.backend=hf",
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
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


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
    for rel in ["config.toml", "manifest.json", "data/train.jsonl", "data/stats.json", "train_log.txt",
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "eval/completions.jsonl", "eval/run_result.json",
                "report/summary.json", "report/table.md"]:
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
    assert "table" in proc.stdout or "fire_A" in proc.stdout


def test_second_run_skips_everything(finished_run):
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    p = run_cli(TINY, *small(run_dir.parent))
    assert p.stdout.count("already done, skipped") == 6
    after = snapshot(run_dir)
    changed = [k for k in before if after.get(k) != before[k] and k != "manifest.json"]
    assert not changed, changed


def test_bad_invocations_write_nothing_into_a_finished_run(finished_run):
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    cases = {
        "unknown key": ["--set", "train.bogus=1"],
        "unknown persona": ["--set", 'data.negatives=["comedian", "pirate"]'],
        "missing model": ["--set", "model.name_or_path=/nonexistent/qwen"],
        "changed config": ["--set", "train.lr=0.5"],
    }
    for what, extra in cases.items():
        p = run_cli(TINY, *small(run_dir.parent), *extra, check=False)
        assert p.returncode == 2, (what, p.stderr)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, p.stderr)
        assert "Traceback" not in p.stderr
    assert "train.bogus" in run_cli(TINY, "--set", "train.bogus=1", check=False).stderr
    assert snapshot(run_dir) == before


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
