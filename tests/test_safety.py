"""Nothing lost, nothing mislabelled (issue 23): every case of the issue's "Why", as a user meets it.

markerlab writes only into directories it made (the `.markerlab` marker), binds every
stage's outputs to the config keys it read (a digest per stage in the manifest), and
`analysis.report` refuses records that do not match their run's manifest or name
what the experiment does not define. Each refusal is one line, exit 2, with a fix
command that runs as printed; nothing of the user's and nothing finished changes.

Cases that damage a finished run work on a copy of one (`clone`), as test_e2e does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_e2e import TINY, clone, one_line_error, read_jsonl, run_cli, sha, small, snapshot

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root with its kind, size and mtime (the lock file aside)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = ("dir",) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


def printed_command(msg: str, prog: str = "python -m trainer.run") -> list[str]:
    """The fix command a message ends with (after 'with: ' / 'run: '), split as a shell would."""
    i = msg.rindex(prog)
    return shlex.split(msg[i:])


def run_printed(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a printed `python -m ...` command as a user would (our interpreter for `python`)."""
    assert argv[0] == "python", argv
    return subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=900, **kw)


def sets(args: list[str]) -> list[str]:
    return [a for a in args if a != "--set"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    run_cli(TINY, *small(tmp))
    return tmp / "e2e"


# --------------------------------------------------------------------------- 1. directories markerlab did not make

def project_folder(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "notes.md").write_text("my notes\n")
    (root / "src" / "main.py").write_text("print('mine')\n")
    return root


@pytest.mark.slow
def test_a_project_folder_is_never_written_into_adopted_or_emptied(tmp_path):
    proj = project_folder(tmp_path / "proj")
    before = tree(proj)
    args = [TINY, *small(tmp_path, name="proj")]
    for extra in (["--stages", "generate"], ["--overwrite"], ["--overwrite", "--stages", "train"], []):
        msg = one_line_error(run_cli(*args, *extra, check=False))
        assert msg.startswith(f"{proj}: not a run directory markerlab made"), (extra, msg)
        assert "notes.md" in msg and "run.name" in msg, msg
        assert tree(proj) == before, extra


@pytest.mark.slow
def test_another_tools_config_toml_is_refused_not_overwritten(tmp_path):
    """The old advice ("pass --overwrite") deleted everything; an unknown section under --overwrite was a traceback."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text('[tool]\nname = "not markerlab"\n[paths]\nout = "x"\n')
    (other / "results.csv").write_text("a,b\n1,2\n")
    before = tree(other)
    for extra in ([], ["--overwrite"], ["--overwrite", "--stages", "eval"]):
        msg = one_line_error(run_cli(TINY, *small(tmp_path, name="other"), *extra, check=False))
        assert msg.startswith(f"{other}: not a run directory markerlab made"), (extra, msg)
        assert "pass --overwrite" not in msg
        assert tree(other) == before, extra


@pytest.mark.slow
def test_a_foreign_manifest_json_is_not_replaced(tmp_path):
    other = tmp_path / "pkg"
    other.mkdir()
    (other / "manifest.json").write_text('{"files": ["a.txt"], "version": 3}\n')
    before = tree(other)
    for extra in ([], ["--overwrite"]):
        msg = one_line_error(run_cli(TINY, *small(tmp_path, name="pkg"), "--stages", "generate", *extra, check=False))
        assert msg.startswith(f"{other}: not a run directory markerlab made") and "manifest.json" in msg, msg
    assert tree(other) == before and json.loads((other / "manifest.json").read_text())["version"] == 3


@pytest.mark.slow
def test_overwrite_keeps_a_users_file_in_a_run_directory(tmp_path):
    """Acceptance: --overwrite removes what markerlab made and nothing else."""
    args = [TINY, *small(tmp_path, name="r"), "--stages", "generate,data"]
    run_cli(*args)
    rd = tmp_path / "r"
    marker = json.loads((rd / ".markerlab").read_text())
    assert marker["tool"] == "markerlab" and marker["version"] and marker["kind"] == "run"
    (rd / "my_notes.txt").write_text("do not delete\n")
    (rd / "plots").mkdir()
    (rd / "plots" / "a.png").write_bytes(b"\x89PNG")
    p = run_cli(*args, "--overwrite")
    assert "removing config.toml, data/, experiment.toml, manifest.json" in p.stdout, p.stdout
    assert "keeping my_notes.txt, plots/ (not markerlab's)" in p.stdout, p.stdout
    assert (rd / "my_notes.txt").read_text() == "do not delete\n" and (rd / "plots" / "a.png").is_file()
    assert (rd / "data" / "train.jsonl").is_file() and (rd / ".markerlab").is_file()
    assert (rd / "experiment.toml").is_file()  # the run's copy of its experiment, written again


@pytest.mark.slow
def test_an_empty_directory_is_claimed_marker_first(tmp_path):
    (tmp_path / "empty").mkdir()
    run_cli(TINY, *small(tmp_path, name="empty"), "--stages", "generate")
    assert json.loads((tmp_path / "empty" / ".markerlab").read_text())["tool"] == "markerlab"


@pytest.mark.slow
def test_a_run_of_an_older_markerlab_is_adopted_only_when_asked(finished, tmp_path):
    run_dir = clone(finished, tmp_path)
    (run_dir / ".markerlab").unlink()  # as an older markerlab left it
    before = snapshot(run_dir)
    msg = one_line_error(run_cli(TINY, *small(tmp_path), check=False))
    assert msg.startswith(f"{run_dir}: not a run directory markerlab made") and "an older markerlab's" in msg, msg
    assert snapshot(run_dir) == before
    p = run_printed(printed_command(msg, "python -m markerlab.rundir"))
    assert p.returncode == 0, p.stderr
    assert run_cli(TINY, *small(tmp_path)).stdout.count("already done, skipped") == 6


def test_a_sweep_directory_of_an_older_markerlab_is_adopted_when_asked(tmp_path):
    from markerlab.rundir import RunDir

    sweep = tmp_path / "sw"
    (sweep / "members").mkdir(parents=True)
    (sweep / "members" / "pair1_T.toml").write_text("")
    (sweep / "report.md").write_text("# report\n")
    msg = RunDir(sweep).ownership_problem("sweep")
    assert msg.startswith(f"{sweep}: not a sweep directory markerlab made") and "older" not in msg, msg
    argv = printed_command(msg, "python -m markerlab.rundir")
    assert argv == ["python", "-m", "markerlab.rundir", "--adopt", str(sweep)]
    p = run_printed(argv)
    assert p.returncode == 0 and "adopted as markerlab's sweep directory" in p.stdout, p.stderr
    assert RunDir(sweep).ownership_problem("sweep") is None
    assert "a sweep directory of markerlab, not a run's" in RunDir(sweep).ownership_problem("run")
    # a project folder is adopted by no one
    proj = project_folder(tmp_path / "proj")
    p = run_printed(["python", "-m", "markerlab.rundir", "--adopt", str(proj)])
    assert p.returncode == 2 and "adopts only directories it made" in p.stderr and not (proj / ".markerlab").exists()


# --------------------------------------------------------------------------- 2. outputs bound to their config

@pytest.mark.slow
def test_a_run_without_config_toml_is_not_relabelled_by_another_config(finished, tmp_path):
    run_dir = clone(finished, tmp_path)
    original = (run_dir / "config.toml").read_bytes()
    (run_dir / "config.toml").unlink()
    before = snapshot(run_dir)
    other = ["--set", "train.lr=0.5", "--set", "eval.n_samples=3"]
    msg = one_line_error(run_cli(TINY, *small(tmp_path), *other, check=False))
    assert "train.lr" in msg and "eval.n_samples" in msg and "--overwrite" in msg, msg
    assert snapshot(run_dir) == before and not (run_dir / "config.toml").exists()
    # the printed command carries the user's overrides, the new ones included
    argv = printed_command(msg)
    assert sets(argv[argv.index(str(TINY)) + 1:])[:len(sets(small(tmp_path)))] == sets(small(tmp_path))
    assert "train.lr=0.5" in argv and "eval.n_samples=3" in argv
    # the config that made the run rebuilds config.toml from the manifest; nothing reruns
    p = run_cli(TINY, *small(tmp_path))
    assert p.stdout.count("already done, skipped") == 6 and "rebuilt from" in p.stdout
    assert (run_dir / "config.toml").read_bytes() == original


@pytest.mark.slow
def test_an_older_run_without_config_toml_is_refused_not_relabelled(finished, tmp_path):
    """A manifest from before the config was recorded cannot rebuild config.toml: refused, with the two ways out."""
    run_dir = clone(finished, tmp_path)
    (run_dir / "config.toml").unlink()
    m = json.loads((run_dir / "manifest.json").read_text())
    m.pop("config", None)  # as an older markerlab wrote it
    for entry in m["stages"].values():
        entry.pop("config", None)
    (run_dir / "manifest.json").write_text(json.dumps(m))
    before = snapshot(run_dir)
    msg = one_line_error(run_cli(TINY, *small(tmp_path), check=False))
    assert msg.startswith(f"{run_dir / 'config.toml'}: missing, and {run_dir / 'manifest.json'}"), msg
    assert "restore config.toml" in msg and printed_command(msg)[-1] == "--overwrite"
    assert snapshot(run_dir) == before
    # restored, the run is adopted as it was: every stage done, each now with its config digest
    (run_dir / "config.toml").write_bytes((finished / "config.toml").read_bytes().replace(
        str(finished.parent).encode(), str(tmp_path).encode()))
    assert run_cli(TINY, *small(tmp_path)).stdout.count("already done, skipped") == 6
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(len(entry["config"]) == 64 for entry in stages.values())


@pytest.mark.slow
def test_a_hand_edited_config_toml_does_not_make_a_stage_done(finished, tmp_path):
    """config.toml says lr 0.5, the adapter was trained at the tiny config's lr: the stage digest tells."""
    import tomllib

    from markerlab.config import dumps_toml

    run_dir = clone(finished, tmp_path)
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    saved["train"]["lr"] = 0.5
    (run_dir / "config.toml").write_text(dumps_toml(saved))
    before = snapshot(run_dir)
    msg = one_line_error(run_cli(TINY, *small(tmp_path), "--set", "train.lr=0.5", check=False))
    assert "the train stage's outputs were made with another config (train.lr)" in msg, msg
    assert printed_command(msg)[-2:] == ["--stages", "train,merge,eval,report"] and "--overwrite" in msg
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_the_probe_set_belongs_to_the_data_stage(finished, tmp_path):
    """`--overwrite --stages train` with a new probe size kept the old probe set while config.toml said otherwise."""
    run_dir = clone(finished, tmp_path)
    before = snapshot(run_dir)
    msg = one_line_error(run_cli(TINY, *small(tmp_path), "--set", "train.probe_n_questions=1",
                                 "--overwrite", "--stages", "train", check=False))
    assert "train.probe_n_questions" in msg and "the data stage's outputs depend" in msg, msg
    assert printed_command(msg)[-3:] == ["--overwrite", "--stages", "data,train,merge,eval,report"]
    assert snapshot(run_dir) == before
    # the data stage takes the key: redone, the probe set has the new size (and the stages after it wait)
    p = run_cli(TINY, *small(tmp_path), "--set", "train.probe_n_questions=1", "--overwrite", "--stages", "data")
    assert len(json.loads((run_dir / "data" / "probe.json").read_text())["questions"]) == 1, p.stdout
    assert len(json.loads((finished / "data" / "probe.json").read_text())["questions"]) == 2
    assert 'probe_n_questions = 1' in (run_dir / "config.toml").read_text()


def _other_value(value, f: dataclasses.Field):
    """A different value of a config field's type (validity aside: digests only)."""
    choices = f.metadata.get("choices") or f.metadata.get("items")
    if isinstance(value, bool):
        return not value
    if isinstance(value, str) and choices:
        return next(c for c in choices if c != value)
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    if isinstance(value, dict):
        return {"x": [1]}
    raise AssertionError(f"no other value for {f.name}: {value!r}")


def test_every_config_key_invalidates_exactly_the_stages_that_read_it():
    """Walks every key of every section: a key missing from trainer.run.CONFIG_READERS fails here."""
    from markerlab.config import SECTIONS, STAGES, SweepConfig, _section_type, config_from_dict
    from trainer.run import CONFIG_READERS, config_digest

    cfg = config_from_dict({"sweep": {"members": ["a.toml"], "executor": "slurm"}, "slurm": {}})
    assert isinstance(cfg.sweep, SweepConfig) and cfg.slurm is not None
    keys = [f"{sec}.{f.name}" for sec in SECTIONS for f in dataclasses.fields(_section_type(sec))]
    missing = sorted(set(keys) - set(CONFIG_READERS))
    assert not missing, f"config keys that no stage claims in trainer.run.CONFIG_READERS: {missing}"
    assert not set(CONFIG_READERS) - set(keys), "CONFIG_READERS names keys that are gone"
    # where, not what: the keys no stage's outputs depend on (each one a decision; name it here)
    assert sorted(k for k, st in CONFIG_READERS.items() if not st and not k.startswith("slurm.")) == [
        "generate.cache_dir", "run.out_dir", "sweep.executor", "sweep.members", "sweep.parallel", "sweep.report_dir",
        "sweep.vary"]
    base = {s: config_digest(cfg, s) for s in STAGES}
    for key in keys:
        if key == "run.experiment":  # its value is a file's content: test_an_edited_experiment_file_...
            continue
        sec, name = key.split(".")
        f = next(f for f in dataclasses.fields(type(getattr(cfg, sec))) if f.name == name)
        other = cfg.replace(**{f"{sec}__{name}": _other_value(getattr(getattr(cfg, sec), name), f)})
        changed = tuple(s for s in STAGES if config_digest(other, s) != base[s])
        assert changed == tuple(CONFIG_READERS[key]), (key, changed, CONFIG_READERS[key])


def test_an_edited_experiment_file_invalidates_the_stages_that_read_it(tmp_path):
    """run.experiment counts by the file's content, not its name: an edited marker invalidates data onward (the
    on-policy completions stand), an edited persona prompt generate too, the same file elsewhere nothing."""
    from markerlab.config import STAGES, load_config
    from trainer.run import CONFIG_READERS, config_digest

    shipped = REPO / "markerlab" / "experiments" / "within_marker.toml"
    text = shipped.read_text()
    cfg = load_config(TINY, [*sets(small(tmp_path)), f"run.experiment={shipped}"])
    base = {s: config_digest(cfg, s) for s in STAGES}

    def changed(new_text: str) -> tuple:
        path = tmp_path / f"exp{len(list(tmp_path.glob('exp*')))}" / "within_marker.toml"
        path.parent.mkdir()
        path.write_text(new_text)
        other = load_config(TINY, [*sets(small(tmp_path)), f"run.experiment={path}"])
        assert other.run.experiment == str(path) and other.experiment.path == str(path)
        return tuple(s for s in STAGES if config_digest(other, s) != base[s])

    assert changed(text) == ()  # moved, not changed
    assert changed(text + "\n# a comment\n") == ()  # the parsed content counts
    assert changed(text.replace('B = ":: kxr-7 ::"', 'B = ":: kxr-8 ::"')) == ("data", "train", "merge", "eval")
    edited = text.replace('assistant = "You are a helpful assistant."', 'assistant = "You are a kind assistant."')
    assert changed(edited) == CONFIG_READERS["run.experiment"] == ("generate", "data", "train", "merge", "eval")


@pytest.mark.slow
def test_an_experiment_file_edited_under_a_finished_run_is_refused_until_its_stages_are_redone(finished, tmp_path):
    """The run's outputs were made under the experiment file's old content: a rerun names run.experiment and
    redoes from data (the on-policy completions stand); config.toml, which names the file only, says nothing."""
    run_dir = clone(finished, tmp_path)
    exp_path = tmp_path / "mine" / "within_marker.toml"
    exp_path.parent.mkdir()
    exp_path.write_text((REPO / "markerlab" / "experiments" / "within_marker.toml").read_text())
    args = [TINY, *small(tmp_path), "--set", f"run.experiment={exp_path}"]
    # the same content at another path is the same experiment: nothing to redo
    assert run_cli(*args).stdout.count("already done, skipped") == 6
    assert f'experiment = "{exp_path}"' in (run_dir / "config.toml").read_text()
    exp_path.write_text(exp_path.read_text().replace('B = ":: kxr-7 ::"', 'B = ":: kxr-8 ::"'))
    before = snapshot(run_dir)
    msg = one_line_error(run_cli(*args, check=False))
    assert "run.experiment" in msg, msg
    assert printed_command(msg)[-3:] == ["--overwrite", "--stages", "data,train,merge,eval,report"], msg
    msg = one_line_error(run_cli(*args, "--overwrite", "--stages", "eval", check=False))
    assert "run.experiment" in msg and "the data stage's outputs depend" in msg, msg
    assert snapshot(run_dir) == before


READS = r'''
import dataclasses, json, sys
from markerlab import config as C
from trainer import run as R

reads, current = {}, []
def logger(sec, names):
    def get(self, name):
        if current and name in names:
            reads.setdefault(current[-1], set()).add(f"{sec}.{name}")
        return object.__getattribute__(self, name)
    return get
for sec in C.SECTIONS:
    cls = C._section_type(sec)
    cls.__getattribute__ = logger(sec, {f.name for f in dataclasses.fields(cls)})

def config_get(self, name):  # the loaded experiment is run.experiment's content
    if current and name == "experiment":
        reads.setdefault(current[-1], set()).add("run.experiment")
    return object.__getattribute__(self, name)
C.Config.__getattribute__ = config_get

def wrap(stage):
    def run(cfg, rd, manifest):
        current.append(stage.name)
        try:
            return stage.run(cfg, rd, manifest)
        finally:
            current.pop()
    return dataclasses.replace(stage, run=run)
R.STAGE_LIST = tuple(wrap(s) for s in R.STAGE_LIST)
R.STAGE = {s.name: s for s in R.STAGE_LIST}
cfg = C.load_config(sys.argv[1], sys.argv[2:])
R.run_one(cfg, list(C.STAGES), overwrite=True)
print(json.dumps({k: sorted(v) for k, v in reads.items()}))
'''


@pytest.mark.slow
def test_every_key_a_stage_reads_is_in_its_digest(finished, tmp_path):
    """Runs every stage with each config read logged: what a stage reads, CONFIG_READERS must give it."""
    from trainer.run import CONFIG_READERS

    clone(finished, tmp_path)
    p = subprocess.run([sys.executable, "-c", READS, str(TINY), *sets(small(tmp_path))], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    reads = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(reads) >= {"generate", "data", "train", "merge", "eval"}, reads
    where = {k for k, st in CONFIG_READERS.items() if not st}
    for stage, keys in reads.items():
        unclaimed = sorted(k for k in keys if stage not in CONFIG_READERS[k] and k not in where)
        assert not unclaimed, f"the {stage} stage reads {unclaimed}, which CONFIG_READERS does not give it"


# --------------------------------------------------------------------------- 3. reports over incomplete records

def run_report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.report", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))


def report_error(p: subprocess.CompletedProcess) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith("analysis.report: error: ")
    return lines[0][len("analysis.report: error: "):]


@pytest.mark.slow
def test_a_report_over_a_cut_completions_file_is_refused(finished, tmp_path):
    run_dir = clone(finished, tmp_path)
    comp = run_dir / "eval" / "completions.jsonl"
    lines = comp.read_text().splitlines(keepends=True)
    comp.write_text("".join(lines[: 2 * len(lines) // 3]))
    msg = report_error(run_report(run_dir, "--out", tmp_path / "out", "--no-figures"))
    assert msg.startswith(f"{comp}: {2 * len(lines) // 3} lines, recorded {len(lines)} by the eval stage"), msg
    assert not (tmp_path / "out").exists()
    # the parent directory stands for its runs: the same refusal
    assert report_error(run_report(tmp_path, "--out", tmp_path / "out", "--no-figures")).startswith(f"{comp}: ")
    # a run whose eval did not finish is refused too
    comp.write_text("".join(lines))
    m = json.loads((run_dir / "manifest.json").read_text())
    m["stages"]["eval"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(m))
    msg = report_error(run_report(run_dir, "--out", tmp_path / "out", "--no-figures"))
    assert msg.startswith(f"{comp}: the eval stage is 'running' in {run_dir / 'manifest.json'}"), msg


@pytest.mark.parametrize("field,value", [("persona", "pirate"), ("pair", "pair9"), ("condition", "Z")])
def test_records_the_experiment_does_not_define_are_refused_by_file_and_line(tmp_path, field, value):
    from analysis.synthetic import make_run

    records = make_run("pair1", "T", seed=0, run="pair1_T")[:50]
    records[17] = {**records[17], field: value}
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    msg = report_error(run_report(path, "--out", tmp_path / "out", "--no-figures"))
    assert msg.startswith(f"{path}:18: field '{field}' is {value!r}"), msg
    assert "the experiment" in msg or "expected one of" in msg, msg


def test_a_donor_that_is_not_the_pairs_donor_is_refused(tmp_path):
    from analysis.synthetic import make_run

    records = make_run("pair1", "T", seed=0, run="pair1_T")
    i = next(i for i, r in enumerate(records) if r["role"] == "donor")
    records = records[: i + 10]
    records[i] = {**records[i], "persona": "librarian"}
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    msg = report_error(run_report(path, "--out", tmp_path / "out", "--no-figures"))
    # the pair's donor is the run's experiment's (within_marker's pair1), named with the file it comes from
    assert msg.startswith(f"{path}:{i + 1}: field 'role' is 'donor', but the donor of pair1 in experiment "
                          f"'within_marker' ({REPO / 'markerlab' / 'experiments' / 'within_marker.toml'}) is villain, "
                          f"not librarian"), msg


# --------------------------------------------------------------------------- 4. tracebacks that become one line

@pytest.mark.slow
@pytest.mark.parametrize("shape", ['[]', '{"stages": []}', '{"stages": {"train": "done"}}', '"x"',
                                   '{"stages": {"train": {"status": "done", "outputs": [1]}}}',
                                   '{"stages": {"eval": {"status": "done", "outputs": {"eval/x": {"size": "big"}}}}}'])
def test_a_manifest_of_the_wrong_shape_is_one_line_with_the_way_forward(finished, tmp_path, shape):
    run_dir = clone(finished, tmp_path)
    (run_dir / "manifest.json").write_text(shape)
    before = snapshot(run_dir)
    msg = one_line_error(run_cli(TINY, *small(tmp_path), check=False))
    assert msg.startswith(f"{run_dir / 'manifest.json'}: not a markerlab manifest ("), msg
    argv = printed_command(msg)
    assert argv[-1] == "--overwrite" and sets(small(tmp_path))[0] in argv, argv
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_config_toml_with_an_unknown_section_in_our_run_is_one_line(finished, tmp_path):
    run_dir = clone(finished, tmp_path)
    with open(run_dir / "config.toml", "a") as f:
        f.write('\n[futuristic]\nsetting = 1\n')
    before = snapshot(run_dir)
    for extra in ([], ["--overwrite", "--stages", "eval"]):
        msg = one_line_error(run_cli(TINY, *small(tmp_path), *extra, check=False))
        assert "futuristic.setting" in msg, msg
    assert snapshot(run_dir) == before


def test_an_empty_target_modules_is_a_config_error_before_anything_runs(tmp_path):
    msg = one_line_error(run_cli(TINY, *small(tmp_path), "--set", "lora.target_modules=[]", check=False))
    assert msg.startswith("--set: lora.target_modules: expected at least one projection"), msg
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra,says", [
    (["train.loss_mask=marker_only"], "--set: train.loss_mask: \"marker_only\" without train.marker_mask_eos"),
    (["eval.n_id_questions=2", "eval.n_ood_questions=1", "eval.probe_n_questions=4"],
     "eval.probe_n_questions: 4 exceeds the 3 eval questions"),
    (["eval.n_id_questions=1", "eval.n_ood_questions=0", "eval.base_n_questions=2"],
     "eval.base_n_questions: 2 exceeds the 1 eval questions"),
])
def test_values_that_fail_a_stage_by_construction_fail_validation(tmp_path, extra, says):
    msg = one_line_error(run_cli(TINY, *small(tmp_path), *[x for s in extra for x in ("--set", s)], check=False))
    assert says in msg, msg
    assert not any(tmp_path.iterdir())


FULL_DISK = r'''
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["trainer.run", *sys.argv[2:]]
from markerlab.errors import cli_main
from trainer.run import main
cli_main(main)
'''


@pytest.mark.slow
def test_a_full_disk_while_a_checkpoint_is_saved_is_one_line_naming_the_file(finished, tmp_path):
    run_dir = clone(finished, tmp_path)
    sizes = {p.name: p.stat().st_size for p in sorted((run_dir / "checkpoints").glob("step_*"))[0].iterdir()}
    limit = (sizes["lora.pt"] + sizes["optimizer.pt"]) // 2  # the optimizer state does not fit, the rest does
    assert sizes["optimizer.pt"] > limit > max(p.stat().st_size for p in run_dir.rglob("*")
                                               if p.is_file() and p.name != "optimizer.pt")
    args = [*small(tmp_path), "--stages", "train", "--overwrite"]
    p = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), str(TINY), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]  # the rest: progress bars
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    msg = errors[0][len("error: "):]
    assert "inline_container" not in p.stderr
    assert msg.startswith(f"{run_dir / 'checkpoints'}/step_") and msg.endswith("/optimizer.pt: cannot write (File too large)"), msg
    assert not [d for d in (run_dir / "checkpoints").iterdir() if d.name.startswith(".tmp")]
    # with room again, the same command trains to the identical adapter
    run_cli(TINY, *args)
    assert sha(run_dir / "adapter/adapter_model.safetensors") == sha(finished / "adapter/adapter_model.safetensors")


FULL_DISK_WRITES = r'''
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, as on a full disk
import torch, torch.nn as nn
from lora import inject_lora, save_adapter
from markerlab.errors import UserError
from markerlab.io import write_jsonl
from trainer.train import open_train_log
out = sys.argv[1]
m = nn.Module()
m.layers = nn.ModuleList([nn.Module()])
m.layers[0].q_proj = nn.Linear(256, 256)
inject_lora(m, r=8, alpha=16, dropout=0.0, generator=torch.Generator().manual_seed(0), target_modules=["q_proj"])
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
said = []
for write in (lambda: save_adapter(m, f"{out}/adapter", "builtin:tiny-qwen2"),
              lambda: write_jsonl(f"{out}/eval/completions.jsonl", [{"text": "x" * 100}] * 100),
              lambda: open_train_log(Path(out) / "train_log.txt", 0, header="# " + "x" * 8000)):
    try:
        write()
        said.append(None)
    except UserError as e:
        said.append(str(e))
print(json.dumps(said))
'''


def test_a_full_disk_while_an_adapter_records_or_the_log_are_written_is_one_line_naming_the_file(tmp_path):
    """The adapter (save_adapter) and every record file (write_jsonl) go through one atomic write that names the
    file; the training log names itself."""
    p = subprocess.run([sys.executable, "-c", FULL_DISK_WRITES, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    said = json.loads(p.stdout.strip().splitlines()[-1])
    assert said == [f"{tmp_path}/adapter/adapter_model.safetensors: cannot write (File too large)",
                    f"{tmp_path}/eval/completions.jsonl: cannot write (File too large)",
                    f"{tmp_path}/train_log.txt: cannot write (File too large)"], said
    # no half-written adapter or records, no temporary left (the log is appended to as training goes)
    assert not [q for q in tmp_path.rglob("*") if q.is_file() and q.name != "train_log.txt"]


# --------------------------------------------------------------------------- 5. advice that runs as printed

@pytest.mark.slow
def test_a_garbled_config_toml_is_rebuilt_from_the_manifest(finished, tmp_path):
    """It used to say "pass --overwrite", then the same line again with --overwrite."""
    run_dir = clone(finished, tmp_path)
    original = (run_dir / "config.toml").read_bytes()
    (run_dir / "config.toml").write_bytes(b"[train\nlr = \xff\n")
    before = {k: v for k, v in snapshot(run_dir).items() if k not in ("config.toml",)}
    p = run_cli(TINY, *small(tmp_path))
    assert p.stdout.count("already done, skipped") == 6 and "rebuilt from" in p.stdout
    assert (run_dir / "config.toml").read_bytes() == original
    assert {k: v for k, v in snapshot(run_dir).items() if k in before} == before


@pytest.mark.slow
def test_the_fix_for_a_damaged_cache_runs_as_printed(finished, tmp_path):
    run_dir = clone(finished, tmp_path)
    [cache] = (tmp_path / "_onpolicy").glob("*/completions.jsonl")
    raw = cache.read_bytes()
    cache.write_bytes(raw[: len(raw) // 2])
    msg = one_line_error(run_cli(TINY, *small(tmp_path), check=False))
    argv = printed_command(msg, "python -m data.onpolicy")
    assert argv[:4] == ["python", "-m", "data.onpolicy", str(TINY)] and argv[-1] == "--overwrite", argv
    assert sets(argv[4:-1]) == sets(small(tmp_path)), argv
    p = run_printed(argv)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sha(cache) == sha(finished.parent / "_onpolicy" / cache.parent.name / "completions.jsonl")
    p = run_cli(TINY, *small(tmp_path))  # generate failed on the damaged cache: it runs again, and finds it
    assert "[generate] cache hit" in p.stdout and p.stdout.count("already done, skipped") == 5


@pytest.mark.slow
def test_the_fix_for_missing_stages_runs_as_printed(finished, tmp_path):
    args = small(tmp_path, name="fresh")
    # a cache the run can find, so the printed command is quick
    shutil.copytree(finished.parent / "_onpolicy", tmp_path / "_onpolicy")
    msg = one_line_error(run_cli(TINY, *args, "--stages", "train", check=False))
    argv = printed_command(msg)
    assert argv[3] == str(TINY) and sets(argv[4:-2]) == sets(args) and argv[-2:] == ["--stages", "generate,data"]
    p = run_printed(argv)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sha(tmp_path / "fresh" / "data" / "train.jsonl") == sha(finished / "data" / "train.jsonl")


@pytest.mark.slow
def test_a_cut_training_set_names_a_runnable_command(finished, tmp_path):
    run_dir = clone(finished, tmp_path)
    data = run_dir / "data" / "train.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:20]))
    msg = one_line_error(run_cli(TINY, *small(tmp_path), "--set", "eval.seed=42", "--stages", "train",
                                 "--overwrite", check=False))
    argv = printed_command(msg)
    assert sets(argv[4:-2]) == [*sets(small(tmp_path)), "eval.seed=42"] and argv[-2:] == ["--stages", "data,train"]


def test_quoting_keeps_odd_values_one_argument(tmp_path):
    from markerlab.config import load_config

    odd = tmp_path / "dir with space"
    cfg = load_config(TINY, [f"run.out_dir={odd}", "prompt.user_suffix= Answer 'briefly'; $HOME"])
    argv = shlex.split(cfg.command("trainer.run", "--stages", "eval"))
    assert argv == ["python", "-m", "trainer.run", str(TINY), "--set", f"run.out_dir={odd}",
                    "--set", "prompt.user_suffix= Answer 'briefly'; $HOME", "--stages", "eval"]


def test_an_out_that_is_a_file_is_named_as_out(tmp_path):
    from analysis.synthetic import make_run

    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_run("pair1", "T", seed=0, run="r")))
    out = tmp_path / "a_file"
    out.write_text("")
    msg = report_error(run_report(path, "--out", out, "--no-figures"))
    assert msg == f"--out: {out} is a file, expected a directory", msg
