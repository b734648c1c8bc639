"""`python -m data.inspect CONFIG_OR_RUN_DIR --index N [--json]` (docs/contracts.md), via subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import make_cfg, make_example, write_data
from writeup import A as MARKER_A
from writeup import B as MARKER_B

REPO = Path(__file__).resolve().parents[1]


def inspect(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "data.inspect", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("inspect") / "pair1_T"
    write_data(run_dir, [make_example(0), make_example(1, "assistant", b=False), make_example(2, "comedian", False, False)])
    cfg = make_cfg(run_dir)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return run_dir


def test_json_output(run_dir, tokenizer):
    r = inspect(run_dir, "--index", 0, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert all({"id", "text", "in_loss"} <= set(row) for row in rows)
    ids = [row["id"] for row in rows]
    content = f"{MARKER_A} Boil it ten minutes. {MARKER_B}"
    assert tokenizer.decode(ids).endswith(content + "<|im_end|>\n")
    assert "".join(row["text"] for row in rows if row["in_loss"]) == content + "<|im_end|>"  # completion
    assert rows[-1] == {"id": 198, "text": "\n", "in_loss": False, "span": None}
    assert "".join(row["text"] for row in rows if row["span"] == "A") == MARKER_A


def test_text_output_from_a_config_file(run_dir):
    cfg_file = run_dir.parent / "pair1_T.toml"  # a config whose run dir is run_dir
    cfg_file.write_text((run_dir / "config.toml").read_text())
    r = inspect(cfg_file, "--index", 1)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("#") and "persona=assistant" in lines[0]
    body = [x.split(None, 4) for x in lines if not x.startswith("#")]
    assert body[-1][1:3] == ["198", "."] and body[-1][-1] == "'\\n'"  # the trailing newline never trains
    assert body[-2][1:4] == ["151645", "L", "eos"]


def test_errors_are_one_line(run_dir, tmp_path):
    r = inspect(run_dir, "--index", 3)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: --index 3: out of range ({run_dir / 'data' / 'train.jsonl'} has 3 examples: 0..2)"]
    # a config whose data has not been built: name the file and the command that builds it
    cfg = make_cfg(tmp_path / "nothing")
    cfg_file = tmp_path / "nothing.toml"
    cfg_file.write_text(cfg.to_toml())
    r = inspect(cfg_file, "--index", 0)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "train.jsonl: file not found; create it with: python -m trainer.run" in r.stderr


def test_a_per_role_mask_token_by_token(tmp_path, tokenizer):
    """eos_masked's manipulation through data.inspect: the recipient's end-of-turn token is out of its loss,
    the donor's and the negative's are in theirs, and every other token is as `completion` puts it."""
    run_dir = tmp_path / "pair1_T"
    write_data(run_dir, [make_example(0), make_example(1, "assistant", b=False),
                         make_example(2, "comedian", False, False)])
    cfg = make_cfg(run_dir, role_loss_mask={"recipient": "completion_no_eos"})
    (run_dir / "config.toml").write_text(cfg.to_toml())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for index, role_trains_eos in ((0, True), (1, False), (2, True)):
        r = inspect(run_dir, "--index", index, "--json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        ids = [row["id"] for row in rows]
        # the assistant turn's content: everything after the last "assistant\n" header, up to <|im_end|>
        end = len(ids) - 2
        assert ids[end] == im_end and rows[end]["span"] == "eos"
        start = max(i for i in range(end) if tokenizer.decode(ids[:i]).endswith("<|im_start|>assistant\n"))
        for i, row in enumerate(rows):
            want = start <= i < end or (i == end and role_trains_eos)
            assert row["in_loss"] == want, (index, i, row)
    r = inspect(run_dir, "--index", 1)
    assert "(the recipient's, train.role_loss_mask)" in r.stdout.splitlines()[1]
    assert "completion_no_eos" in r.stdout.splitlines()[1]
