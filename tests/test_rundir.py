"""Run-directory plumbing without a model: the lock, file records, one-line file errors, the on-policy cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from markerlab.errors import UserError
from markerlab.io import (atomic_write_text, exclusive_lock, file_record, iter_jsonl, make_temp_dir, read_json,
                          record_mismatch)
from markerlab.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from markerlab.io import exclusive_lock
with exclusive_lock(sys.argv[1], "thing"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "--as-a-test"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_gets_one_line_naming_the_first_and_sigkill_releases(tmp_path):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    proc = hold_lock(lock)
    try:
        with pytest.raises(UserError) as e:
            with exclusive_lock(lock, f"run directory {lock.parent}"):
                pass
        msg = str(e.value)
        assert msg.startswith(f"run directory {lock.parent} is in use by pid {proc.pid} (")
        assert "--as-a-test" in msg and "\n" not in msg
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with exclusive_lock(lock, "thing"):  # the kernel dropped the killed holder's lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_file_records_name_what_changed(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    rec = file_record(p, lines=True)
    assert rec["lines"] == 2 and rec["size"] == p.stat().st_size and len(rec["sha256"]) == 64
    assert record_mismatch(p, rec) is None
    p.write_text('{"a": 1}\n')
    assert record_mismatch(p, rec) == "1 lines, recorded 2"
    p.write_text('{"a": 1}\n\n{"a": 3}\n')
    assert record_mismatch(p, rec).startswith("sha256 ") and "(same size)" in record_mismatch(p, rec)
    assert record_mismatch(tmp_path / "gone", rec) == "missing"
    assert file_record(p, digest=False) == {"size": p.stat().st_size}


def test_unreadable_files_are_one_line_with_the_place(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(UserError) as e:
        list(iter_jsonl(p))
    assert str(e.value) == f"{p}:2: not UTF-8 text (byte 10 of the line: invalid continuation byte)"
    j = tmp_path / "x.json"
    j.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match=r"x.json: not UTF-8 text \(byte 7"):
        read_json(j)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"file/out.json: cannot write \("):
        atomic_write_text(blocker / "out.json", "{}")


def test_temporary_directories_get_ordinary_permissions(tmp_path):
    ordinary = tmp_path / "ordinary"
    ordinary.mkdir()
    tmp = make_temp_dir(tmp_path, ".tmp-")
    assert tmp.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777 != 0o700


def test_rundir_names_every_path_once(tmp_path):
    rd = RunDir(tmp_path / "r")
    assert rd.rel(rd.train_jsonl) == "data/train.jsonl"
    assert rd.rel(rd.adapter_weights) == "adapter/adapter_model.safetensors"
    assert rd.rel(rd.completions) == "eval/completions.jsonl" and rd.rel(rd.lock_file) == ".lock"
    assert rd.rel(Path("/elsewhere/x")) == "/elsewhere/x"
    rd.root.mkdir()
    for p in (rd.config, rd.lock_file, rd.manifest):
        p.write_text("")
    assert rd.contents() == sorted([rd.config, rd.manifest])


# --------------------------------------------------------------------------- the shared on-policy cache

def onpolicy_cfg(tmp_path):
    from markerlab.config import config_from_dict

    return config_from_dict({"model": {"name_or_path": "builtin:tiny-qwen2", "dtype": "float32", "device": "cpu"},
                             "generate": {"backend": "hf", "n_questions": 2, "n_samples": 1, "max_tokens": 4,
                                          "cache_dir": str(tmp_path / "cache")},
                             "data": {"n_per_persona": 1}}, source="c.toml")


def test_an_entry_being_generated_is_locked(tmp_path, tiny_model_dir):
    from data.onpolicy import cache_key, run_onpolicy

    cfg = onpolicy_cfg(tmp_path)
    entry = tmp_path / "cache" / cache_key(cfg)[0]
    entry.mkdir(parents=True)
    proc = hold_lock(entry / ".lock")
    try:
        with pytest.raises(UserError) as e:
            run_onpolicy(cfg)
        assert str(e.value).startswith(f"on-policy cache entry {entry} is in use by pid {proc.pid} (")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_damaged_cache_is_blamed_on_the_cache_file(tmp_path, tiny_model_dir):
    from data.onpolicy import run_onpolicy

    cfg = onpolicy_cfg(tmp_path)
    path = run_onpolicy(cfg)
    stats = read_json(path.parent / "stats.json")
    assert stats["completions"] == file_record(path)
    assert run_onpolicy(cfg) == path  # a hit
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]))  # cut at a line boundary
    with pytest.raises(UserError) as e:
        run_onpolicy(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{path}: damaged on-policy cache ({len(lines) - 3} lines, stats.json says {len(lines)})")
    assert "python -m data.onpolicy c.toml --overwrite" in msg and "n_per_persona" not in msg
    path.write_bytes(b"".join(lines)[:-7])  # cut inside the last line (and inside a character, maybe)
    with pytest.raises(UserError, match="damaged on-policy cache"):
        run_onpolicy(cfg)
    t0 = time.time()
    assert run_onpolicy(cfg, overwrite=True) == path and time.time() - t0 < 300
    assert run_onpolicy(cfg) == path
