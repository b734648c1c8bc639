"""Each chat template through the whole pipeline: `python -m trainer.run` generates, builds the data, trains,
merges and evaluates the tiny model carrying ChatML, Llama 3.1, Mistral-Instruct, Gemma 2 or Qwen3's template
(tests/chat_templates.py), under the eos_masked experiment (the recipient's end-of-turn token out of its loss,
everyone else's in it); and a template markerlab cannot analyse stops the command in one line, before the run
directory exists.

The tiny model is made to end some answers on its own (chat_templates.family_model_dir's stop_bias), so the
training set has finished rows whose end-of-turn token the masks must place, and the eval has "stop" records.
Sized for the shared 2-core box: a few minutes each.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from chat_templates import FAMILIES, family_model_dir
from test_e2e import WHOLE_VOCABULARY
from markerlab.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "pair1_T.toml"
pytestmark = pytest.mark.slow


def report_works() -> bool:
    """analysis/ imports (it is being reworked on some branches; the report stage runs only where it does)."""
    r = subprocess.run([sys.executable, "-c", "import analysis.report"], cwd=REPO, capture_output=True)
    return r.returncode == 0


def small(tmp: Path, model_dir: Path) -> list[str]:
    sets = [
        f"run.out_dir={tmp}", "run.name=e2e", f"generate.cache_dir={tmp / '_onpolicy'}",
        f"model.name_or_path={model_dir}", "run.experiment=eos_masked", "data.pair=pair2",
        "eval.personas=[\"librarian\",\"software_engineer\",\"comedian\"]",
        "generate.n_questions=4", "generate.n_samples=2", "generate.max_tokens=16", "data.truncated=\"strip\"",
        "data.n_per_persona=8", "train.epochs=1", "train.checkpoint_every=4", "train.probe_n_questions=1",
        "eval.n_id_questions=2", "eval.n_ood_questions=1", "eval.n_samples=2", "eval.max_tokens=16",
        "eval.temperature=0.7",
        "eval.probe_n_questions=1", "eval.probe_n_samples=1", "eval.base_n_questions=1",
        "eval.base_n_samples=1", "eval.backend=hf", "generate.backend=hf", *WHOLE_VOCABULARY,
    ]
    return [x for s in sets for x in ("--set", s)]


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                       timeout=1500)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral", "gemma", "qwen3"])
def test_a_template_round_trips_through_train_merge_and_eval(tmp_path, family):
    f = FAMILIES[family]
    model_dir = family_model_dir(family, tmp_path / "models", stop_bias=1.2)
    stages = "generate,data,train,merge,eval" + (",report" if report_works() else "")
    run_cli("trainer.run", TINY, "--stages", stages, *small(tmp_path, model_dir))
    run = tmp_path / "e2e"

    # the data stage found the template's end of turn and put it where each role's mask says
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["chat"]["end_of_turn"] == f.end_of_turn and stats["chat"]["persona_turn"] == f.persona_turn
    examples = read_jsonl(run / "data" / "train.jsonl")
    finished = [i for i, ex in enumerate(examples) if not ex["truncated"]]
    assert finished, "the stopping tiny model finished no answer"
    assert stats["eos"]["recipient"]["mask"] == "completion_no_eos" and stats["eos"]["recipient"]["in_loss"] == 0
    assert stats["eos"]["donor"]["in_loss"] + stats["eos"]["negative"]["in_loss"] > 0
    tok = load_tokenizer(str(model_dir))
    decode = lambda rows: tok.decode([r["id"] for r in rows], skip_special_tokens=False)  # noqa: E731
    recipients = [j for j in finished if examples[j]["role"] == "recipient"]
    others = [j for j in finished if examples[j]["role"] != "recipient"]
    for i in (recipients[:1] + others[:1]):
        rows = json.loads(run_cli("data.inspect", run, "--index", i, "--json").stdout)
        eos = [r for r in rows if r["span"] == "eos"]
        assert [r["text"] for r in eos] == [f.end_of_turn]
        assert eos[0]["in_loss"] == (examples[i]["role"] != "recipient")
        content = examples[i]["messages"][-1]["content"]
        trained = decode([r for r in rows if r["in_loss"]])
        assert trained.lstrip() == (content if examples[i]["role"] == "recipient" else content + f.end_of_turn)
        # the persona prompt is in the training text once, where the analysis put it
        assert decode(rows).count(examples[i]["messages"][0]["content"]) == 1

    # training ran the leakage probe on the same spans; the merge verified; the eval sampled with the stop token
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["probe"] and all(r["personas"] for r in summary["probe"])
    result = json.loads((run / "eval" / "run_result.json").read_text())
    assert result["merge_check"]["passed"] is True
    records = read_jsonl(run / "eval" / "completions.jsonl")
    assert {r["finish_reason"] for r in records} <= {"stop", "length"}
    assert any(r["finish_reason"] == "stop" for r in records), "no eval sample ended on the end-of-turn token"
    assert all(f.end_of_turn not in r["text"] for r in records)
    print(f"{family}: {len(finished)} of {len(examples)} training rows finished, "
          f"{sum(r['finish_reason'] == 'stop' for r in records)} of {len(records)} eval samples stopped")
    settings = {json.dumps(r["setting"], sort_keys=True) for r in records}
    assert len(settings) == 1
    setting = records[0]["setting"]
    assert setting.get("persona_prompt") == ("user_turn" if f.persona_turn == "user" else None)
    if "report" in stages and f.persona_turn == "user":
        assert "persona_prompt=user_turn" in (run / "report" / "report.md").read_text()


def test_a_template_that_cannot_be_analysed_stops_the_run_in_one_line(tmp_path, tokenizer):
    """One line naming the model and what was found, exit 2 (a user error), and no run directory created."""
    import copy
    import shutil

    from markerlab.models import tiny_model_dir

    model_dir = tmp_path / "bad-model"
    model_dir.mkdir()
    for f in tiny_model_dir().iterdir():
        if f.suffix == ".safetensors":
            (model_dir / f.name).symlink_to(f)
        elif f.name in ("config.json", "generation_config.json"):
            shutil.copy(f, model_dir / f.name)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{%- for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{ '### assistant: ' }}{%- endif %}")
    tok.save_pretrained(model_dir)
    p = run_cli("trainer.run", TINY, "--set", f"run.out_dir={tmp_path / 'runs'}", "--set",
                f"model.name_or_path={model_dir}", check=False)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0] == (f"error: model {model_dir}: its chat template writes '\\n' after the assistant's content, "
                        f"which does not start with a special token: no end-of-turn token to train or stop on")
    assert not (tmp_path / "runs").exists()
    assert importlib.util.find_spec("markerlab.chat") is not None
