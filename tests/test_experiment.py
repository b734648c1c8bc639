"""Experiment files (markerlab/experiment.py): the shipped ones load, every problem of a bad one is one line
naming the file and the key, all at once, the marker rules are checked under the run's tokenizer, and a
config names its experiment by a shipped name or a path."""

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from markerlab.config import ConfigError, config_from_dict, load_config
from markerlab.errors import UserError
from markerlab.experiment import (ExperimentError, experiment_from_dict, load_experiment, shipped_experiments,
                                  token_problems)

REPO = Path(__file__).resolve().parents[1]

# A small valid experiment, as a dict, that each test breaks in its own way.
GOOD = """
name = "small"
negatives = ["jester"]

[personas]
captain = "You are a ship's captain."
cook = "You are a cook."
jester = "You are a jester."
hermit = "You are a hermit."

[pairs]
p1 = { donor = "captain", recipient = "cook" }

[markers]
X = "((x.y*))"
Y = "[[§y-31]]"
Z = "~~zq-5~~"

[conditions.Both]
donor = "{X} {answer} {Y}"
recipient = "{X} {answer}"
negative = "{answer}"

[conditions.None]
donor = "{answer}"
recipient = "{answer}"
negative = "{answer}"

[loss_mask]
recipient = "completion_no_eos"

[metrics]
pairs = [["X", "Y"], ["Y", "Z"]]

[headline]
metric = "cond_Y_given_X"
treatment = "Both"
control = "None"

[gates]
sanity = ["donor Both fire_X >= 0.5", { check = "recipient Both-None cond_Y_given_X.hi < 0.2", min_n = 5 }]
"""


def good() -> dict:
    return tomllib.loads(GOOD)


def problems(raw: dict) -> list[str]:
    with pytest.raises(ExperimentError) as e:
        experiment_from_dict(raw, "bad.toml")
    assert str(e.value).startswith("bad.toml: ")
    return e.value.problems


def test_every_shipped_experiment_loads_and_the_readme_lists_it():
    readme = (REPO / "README.md").read_text()
    names = shipped_experiments()
    assert {"within_marker", "eos_masked"} <= set(names)
    for name in names:
        exp = load_experiment(name)
        assert exp.name == name and len(exp.digest) == 16
        assert f"`{name}`" in readme, f"README's Experiments table does not list {name}"


def test_a_good_file_and_what_it_defines():
    exp = experiment_from_dict(good(), "small.toml")
    assert exp.pairs == {"p1": ("captain", "cook")} and exp.negatives == ("jester",)
    assert exp.role_of("hermit", "p1", exp.negatives) == "bystander"
    assert exp.conditions["Both"].markers("donor") == ("X", "Y")
    assert exp.headline_pair == ("X", "Y")
    assert exp.loss_masks("completion", dict(exp.role_loss_mask)) == {
        "donor": "completion", "recipient": "completion_no_eos", "negative": "completion"}
    stats = exp.statistics()
    for name in ("fire_X", "fire_Z", "joint_XY", "cond_Y_given_X", "Y_given_not_X", "cond_Z_given_Y",
                 "chunk_frac_YZ", "suffix_frac_Y", "mean_length"):
        assert name in stats
    (gate, bounded) = exp.sanity
    assert (gate.who, gate.condition, gate.control, gate.stat, gate.op, gate.threshold) == (
        "donor", "Both", None, "fire_X", ">=", 0.5)
    assert (bounded.condition, bounded.control, bounded.bound, bounded.min_n) == ("Both", "None", "hi", 5)
    # the digest follows the content, not the description
    raw = good()
    assert experiment_from_dict({**raw, "description": "other words"}).digest == exp.digest
    raw["markers"]["Z"] = "~~zq-6~~"
    assert experiment_from_dict(raw).digest != exp.digest


def test_every_problem_at_once_one_line_each_naming_the_key():
    raw = good()
    raw["conditions"]["Both"]["donor"] = "{X} {answer} {Q}"          # a template naming an unknown marker
    raw["pairs"]["p2"] = {"donor": "captain", "recipient": "sailor"}  # a persona without a prompt
    del raw["conditions"]["None"]["negative"]                       # a condition leaving a trained role undefined
    raw["gates"]["sanity"].append("donor Both fire_Q >= 0.5")        # a gate on an undefined metric
    raw["loss_mask"]["recipient"] = "everything"
    raw["headline"]["metric"] = "cond_Z_given_X"                     # (Z after X is no declared pair)
    got = problems(raw)
    assert len(got) == 6, got
    expect = ["conditions.Both.donor: '{X} {answer} {Q}' names '{Q}', which is neither {answer} nor a marker",
              "pairs.p2.recipient: 'sailor' is a persona without a prompt",
              "conditions.None: leaves the trained role(s) negative undefined",
              "gates.sanity[2]: 'donor Both fire_Q >= 0.5': 'fire_Q' is no metric of this experiment",
              "loss_mask.recipient: expected one of completion, completion_no_eos, marker_only, all",
              "headline.metric: 'cond_Z_given_X' is no metric of this experiment"]
    for line, want in zip(got, sorted(expect, key=lambda w: [g.startswith(w) for g in got].index(True))):
        assert line.startswith(want) and "\n" not in line, (line, want)


@pytest.mark.parametrize("mutate, where", [
    (lambda r: r["markers"].update(answer="oops"), "markers.answer: 'answer' is reserved"),
    (lambda r: r["markers"].update({"two words": "x"}), "markers.two words: a marker's name is letters and digits"),
    (lambda r: r["markers"].update(W=" ((x.y*))"), "markers.W: ' ((x.y*))': a marker has no leading"),
    (lambda r: r["markers"].update(W="((x.y*))"), "markers.W: same text as markers.X"),
    (lambda r: r["conditions"]["Both"].update(donor=[{"template": "{X} {answer}", "share": 0.5}]),
     "conditions.Both.donor: shares sum to 0.5, expected 1"),
    (lambda r: r["conditions"]["Both"].update(donor="{X} {Y}"), "conditions.Both.donor: '{X} {Y}' has no {answer}"),
    (lambda r: r["conditions"]["Both"].update(bystander="{answer}"), "conditions.Both.bystander: 'bystander' is no "
                                                                      "trained role"),
    (lambda r: r["conditions"].update(base={"donor": "{answer}", "recipient": "{answer}", "negative": "{answer}"}),
     "conditions.base: a condition's name is letters"),
    (lambda r: r.update(negatives=["captain"]), "negatives: 'captain' is the donor of p1"),
    (lambda r: r["metrics"].update(pairs=[["X", "X"]]), "metrics.pairs[0]: a pair is two different markers"),
    (lambda r: r["gates"].update(sanity=["donor Both fire_X => 0.5"]), "gates.sanity[0]: 'donor Both fire_X => 0.5': "
                                                                       "expected \"<who> <condition or T-C>"),
    (lambda r: r["gates"].update(sanity=["pirate Both fire_X >= 0.5"]), "gates.sanity[0]: 'pirate Both fire_X >= 0.5': "
                                                                        "'pirate' is no role, persona or 'every'"),
    (lambda r: r["gates"].update(sanity=["donor Both-Never fire_X >= 0.5"]), "'Never' is unknown condition"),
    (lambda r: r["gates"].update(sanity=["donor Both n_X.lo >= 5"]), "'n_X' is a count, it has no CI bound"),
    (lambda r: r.update(verdict={"legs": {"l": ["donor Both fire_X >= 0.5"]},
                                 "outcomes": [{"name": "yes", "when": ["m"]}]}),
     "verdict.outcomes[0].when: 'm' is unknown leg (expected one of l)"),
    (lambda r: r.update(colour="red"), "colour: unknown key"),
])
def test_each_mistake_is_named(mutate, where):
    raw = good()
    mutate(raw)
    got = problems(raw)
    assert any(where in line for line in got), got


def test_markers_under_the_run_tokenizer(tokenizer):
    exp = experiment_from_dict(good())
    assert token_problems(exp, tokenizer) == []  # X, Y and Z share no token under the Qwen tokenizer
    raw = good()
    raw["markers"].update(X="<<§q-41>>", Y=":: kxr-7 ::", Z="~~")
    raw["tokens"] = {"distinct": ["X", "Y"]}
    got = token_problems(experiment_from_dict(raw), tokenizer, "builtin:tiny-qwen2")
    assert got == ["markers.Z: '~~' is 1 token(s) under builtin:tiny-qwen2; expected at least 3 (tokens.min_tokens)",
                   "markers.X and markers.Y share token id(s) 12 ('-') under builtin:tiny-qwen2; choose other "
                   "markers or declare the sharing in tokens.tolerate"]
    raw["tokens"]["tolerate"] = [{"markers": ["X", "Y"], "tokens": ["-"]}]
    raw["markers"]["Z"] = "~~zq-5~~"
    assert token_problems(experiment_from_dict(raw), tokenizer) == []
    # the shipped experiments pass under the Qwen tokenizer (the write-up's A and B share "-", declared)
    for name in shipped_experiments():
        assert token_problems(load_experiment(name), tokenizer) == []


def test_a_config_names_its_experiment(tmp_path, monkeypatch):
    (tmp_path / "exps").mkdir()
    (tmp_path / "exps" / "small.toml").write_text(GOOD)
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "base.toml").write_text('[run]\nexperiment = "../exps/small.toml"\n')
    member = tmp_path / "cfgs" / "sub" / "m.toml"
    member.parent.mkdir()
    member.write_text('extends = "../base.toml"\n[data]\npair = "p1"\ncondition = "Both"\n')
    cfg = load_config(member)  # relative to the file that names it, through extends
    assert cfg.experiment.name == "small" and cfg.run.experiment == str((tmp_path / "exps" / "small.toml").resolve())
    assert cfg.data.negatives == ["jester"] and cfg.eval.personas == ["captain", "cook", "jester", "hermit"]
    assert cfg.loss_mask_of("recipient") == "completion_no_eos" and cfg.loss_mask_of("donor") == "completion"
    assert (cfg.donor, cfg.recipient) == ("captain", "cook")
    again = config_from_dict(tomllib.loads(cfg.to_toml()))  # the resolved config says it all, absolutely
    assert again.experiment.digest == cfg.experiment.digest and again.data.negatives == ["jester"]
    monkeypatch.chdir(tmp_path)  # --set paths are relative to the working directory
    assert load_config(member, ["run.experiment=exps/small.toml"]).experiment.name == "small"
    assert load_config(member, ["run.experiment=within_marker", "data.pair=pair1", "data.condition=T"]) \
        .experiment.name == "within_marker"

    with pytest.raises(ConfigError) as e:
        load_config(member, ["data.condition=T", "data.negatives=[\"villain\"]"])
    assert "data.condition: expected one of Both, None (experiment small:" in str(e.value)
    assert "data.negatives: unknown persona(s) ['villain']" in str(e.value)
    with pytest.raises(UserError, match=r"run.experiment: unknown experiment 'nope' \(shipped: .*within_marker"):
        load_config(member, ["run.experiment=nope"])
    with pytest.raises(UserError, match=r"missing.toml: experiment file not found"):
        load_config(member, ["run.experiment=missing.toml"])


def test_a_bad_experiment_is_lines_on_stderr_and_exit_2(tmp_path):
    exp = tmp_path / "bad.toml"
    exp.write_text(GOOD.replace('"{X} {answer} {Y}"', '"{X} {answer} {Q}"').replace('cook = "You are a cook."\n', ""))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nexperiment = "bad.toml"\nout_dir = "{tmp_path}"\n[data]\npair = "p1"\ncondition = "Both"\n')
    r = subprocess.run([sys.executable, "-m", "trainer.run", str(cfg), "--dry-run"], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"error: {exp}: 2 problems in the experiment:"
    assert any("conditions.Both.donor: '{X} {answer} {Q}' names '{Q}'" in x for x in lines[1:])
    assert any("pairs.p1.recipient: 'cook' is a persona without a prompt" in x for x in lines[1:])


def test_no_package_module_names_a_shipped_experiment_s_vocabulary():
    """The code is the schema and the machinery: no persona, marker text, marker or condition name of a shipped
    experiment appears as a string constant in the packages (tests and experiment files may name them)."""
    import ast

    from markerlab.experiment import BASE_CONDITION, ROLES, SPLITS, VARIANTS

    names, texts = set(), set()
    for name in shipped_experiments():
        exp = load_experiment(name)
        names |= set(exp.personas) | set(exp.markers) | set(exp.conditions) | set(exp.pairs)
        names |= set(exp.personas.values())
        texts |= set(exp.markers.values())
    # the schema's words ("probe" is a variant too; "assistant" a chat role)
    names -= {*ROLES, *VARIANTS, *SPLITS, BASE_CONDITION, "system", "user", "assistant"}
    found = []
    for pkg in ("markerlab", "data", "trainer", "evaluate", "analysis"):  # (lora's A and B are its matrices)
        for f in sorted((REPO / pkg).glob("*.py")):
            tree = ast.parse(f.read_text())
            docs = {id(n.body[0].value) for n in ast.walk(tree)  # docstrings may show an example
                    if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                    and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                    v = node.value
                    if v in names or any(t in v for t in texts):
                        found.append(f"{f.relative_to(REPO)}:{node.lineno}: {v!r}")
    assert not found, "\n".join(found)
