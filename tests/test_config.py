"""Config loading: every problem at once, overrides, round trip, every shipped config."""

import json
import tomllib
from pathlib import Path

import pytest

from markerlab import config as C
from markerlab.config import Config, ConfigError, config_from_dict, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_TOML = sorted(CONFIGS.rglob("*.toml"))
# Every shipped config resolved by the code before configs inherited from bases
# (tests/fixtures/resolved_configs.json, "section.key" -> value; a sweep member is
# stored as its member file, relative to configs/, and the keys in which it differs).
BEFORE = json.loads((REPO / "tests" / "fixtures" / "resolved_configs.json").read_text())


def _extended() -> set[Path]:
    """Files that other shipped configs extend (a base need not name an adapter)."""
    out = set()
    for p in ALL_TOML:
        ext = tomllib.loads(p.read_text()).get("extends")
        if isinstance(ext, str):
            out.add((p.parent / ext).resolve())
    return out


EXTENDED = _extended()


def flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, t in cfg.to_dict().items() for k, v in t.items()}


def test_unknown_key_wrong_type_bad_value_reported_together(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[train]\nbogus = 1\nlr = "fast"\nloss_mask = "everything"\n'
                 '[data]\npair = "pair1"\ncondition = "T"\nnegatives = ["nobody"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.bogus: unknown key" in msg
    assert "train.lr: expected a number, got str 'fast'" in msg
    assert "train.loss_mask: expected one of completion, completion_no_eos, marker_only, all" in msg
    assert "data.negatives: unknown persona(s) ['nobody']; expected personas of (experiment within_marker" in msg
    assert len(e.value.problems) == 4


def test_unknown_section_and_cross_checks():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"trian": {}, "data": {"n_per_persona": 500}, "train": {"betas": [0.9]}})
    msg = str(e.value)
    assert "[trian]: unknown section" in msg
    assert "data.n_per_persona: 500 exceeds" in msg
    assert "train.betas: expected two numbers" in msg


def test_bools_are_not_numbers_and_ints_widen_to_floats():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got bool"):
        config_from_dict({"train": {"epochs": True}})
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_overrides_parse_as_toml_then_string():
    assert parse_override("train.lr=2e-5") == ("train", "lr", 2e-5)
    assert parse_override('data.negatives=["comedian"]') == ("data", "negatives", ["comedian"])
    assert parse_override("model.name_or_path=/models/qwen") == ("model", "name_or_path", "/models/qwen")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("lr=1")


def test_override_applies_and_is_validated(tmp_path):
    p = REPO / "configs" / "tiny" / "pair1_T.toml"
    cfg = load_config(p, ["train.lr=0.5", "run.name=x"])
    assert cfg.train.lr == 0.5 and cfg.run.name == "x"
    with pytest.raises(ConfigError, match="train.epochs: expected >= 1"):
        load_config(p, ["train.epochs=0"])


def test_defaults_are_the_source_hyperparameters():
    c = Config()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 32.0, 0.05)
    assert (c.train.lr, c.train.epochs, c.train.warmup_ratio, c.train.grad_clip) == (1e-5, 3, 0.05, 1.0)
    assert (c.train.micro_batch_size, c.train.grad_accum, c.train.max_seq_len) == (4, 4, 1024)
    assert (c.eval.n_samples, c.eval.temperature, c.eval.max_tokens) == (10, 1.0, 600)
    assert (c.generate.n_samples, c.generate.temperature, c.generate.max_tokens) == (5, 0.7, 512)


@pytest.mark.parametrize("path", ALL_TOML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_round_trips(path):
    """Every file under configs/: a runnable config, or a base that other configs extend."""
    if path.resolve() in EXTENDED:
        raw, chain = C.read_chain(path)
        cfg = config_from_dict(raw, source=str(path))  # a base: the adapter's name, pair, condition may be absent
    else:
        cfg = load_config(path)
    again = config_from_dict(tomllib.loads(cfg.to_toml()), source=str(path))
    assert again.to_toml() == cfg.to_toml()


def test_the_configs_tree_is_small_and_says_things_once():
    lines = {p: p.read_text().count("\n") for p in ALL_TOML}
    assert sum(lines.values()) < 340, lines  # (each experiment brings its members: eos_masked 3 x 4 files)
    speed = [p for p in ALL_TOML if "Speed: the same maths as the plain loop" in p.read_text()]
    assert speed == [CONFIGS / "base.toml"]
    member = tomllib.loads((CONFIGS / "pair1_T.toml").read_text())
    assert member == {"extends": "base.toml", "run": {"name": "pair1_T"},
                      "data": {"pair": "pair1", "condition": "T"}}
    assert load_config(CONFIGS / "pair1_T.toml").chain == (str(CONFIGS / "base.toml"), str(CONFIGS / "pair1_T.toml"))


def test_frozen():
    c = Config()
    with pytest.raises(Exception):
        c.train.lr = 1.0  # type: ignore[misc]


# config key -> why its shipped value changed after the snapshot was taken
CHANGED_ON_PURPOSE = {
    "data.truncated": "'keep' trained <|im_end|> (and B) right after a cut; cut completions are now dropped "
                      "(real configs) or kept without EOS and B (the tiny ones, whose random model never stops)",
    "sweep.vary": "the loss-mask sweep's marker_only arm also trains <|im_end|>: without it the negatives, "
                  "whose examples carry no marker, would train nothing (now an error)",
    "train.marker_mask_eos": "the same, in the loss-mask sweep's members",
}


@pytest.mark.parametrize("rel", sorted(BEFORE))
def test_resolved_configs_are_unchanged(rel):
    """Each shipped config (and each sweep member) resolves key for key as it did before bases.

    Keys that stopped being keys (markerlab.config.REMOVED_KEYS) are an exception, and so are
    the values changed on purpose since (CHANGED_ON_PURPOSE, each with its reason).
    """
    removed = set(getattr(C, "REMOVED_KEYS", {})) | set(CHANGED_ON_PURPOSE)
    path = CONFIGS / rel
    assert path.is_file(), f"{rel} was shipped before and is gone"
    cfg = load_config(path)
    before = BEFORE[rel]
    if "members" not in before:
        assert cfg.sweep is None
        want = {k: v for k, v in before["resolved"].items() if k not in removed}
        got = flat(cfg)
        assert {k: got.get(k, "<missing>") for k in want} == want
        return
    # A sweep: its own run and sweep keys, then every member, in order.
    want = {k: v for k, v in before["resolved"].items() if k.split(".")[0] in ("run", "sweep") and k not in removed}
    got = flat(cfg)
    assert {k: got.get(k, "<missing>") for k in want} == want
    from trainer.run import sweep_members

    members = sweep_members(cfg, [])
    assert len(members) == len(before["members"])
    for m, rec in zip(members, before["members"]):
        base = BEFORE[rec["file"]]["resolved"]
        want = {k: v for k, v in {**base, **rec["differs"]}.items() if k not in removed}
        got = flat(m)
        assert {k: got.get(k, "<missing>") for k in want} == want, m.run.name


# --------------------------------------------------------------------------- inheritance

def _write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_extends_base_then_file_then_set(tmp_path):
    _write(tmp_path, "bases/root.toml", '[train]\nlr = 0.1\nepochs = 5\n[lora]\nr = 4\n')
    _write(tmp_path, "bases/mid.toml", 'extends = "root.toml"\n[train]\nlr = 0.2\n')
    leaf = _write(tmp_path, "leaf.toml", 'extends = "bases/mid.toml"\n[data]\npair = "pair2"\ncondition = "C"\n'
                                         '[lora]\nalpha = 8\n')
    cfg = load_config(leaf, ["train.epochs=7"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.lora.r, cfg.lora.alpha) == (0.2, 7, 4, 8.0)
    assert (cfg.data.pair, cfg.data.condition, cfg.run.name) == ("pair2", "C", "leaf")
    assert cfg.chain == tuple(str(tmp_path / p) for p in ("bases/root.toml", "bases/mid.toml", "leaf.toml"))
    assert "extends" not in cfg.to_toml()


def test_extends_cycle_and_missing_base_are_one_line(tmp_path):
    a = _write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    _write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(C.UserError) as e:
        load_config(a)
    assert str(e.value) == f"{a}: extends makes a cycle: {a} -> {tmp_path / 'b.toml'} -> {a}"
    c = _write(tmp_path, "c.toml", 'extends = "nope.toml"\n')
    with pytest.raises(C.UserError, match=r"c.toml: extends = 'nope.toml': .*nope.toml not found"):
        load_config(c)
    d = _write(tmp_path, "d.toml", 'extends = 3\n')
    with pytest.raises(ConfigError, match="extends: expected a file name"):
        load_config(d)


def test_a_member_that_forgets_its_condition_is_one_line(tmp_path):
    m = _write(tmp_path, "m.toml", f'extends = "{CONFIGS / "tiny" / "base.toml"}"\n[data]\npair = "pair1"\n')
    with pytest.raises(ConfigError) as e:
        load_config(m)
    assert str(e.value) == f"{m}: data.condition: required (one of T, C, T_P2neg)"
    s = _write(tmp_path, "s.toml", '[sweep]\nmembers = ["m.toml"]\n')
    from trainer.run import sweep_members

    with pytest.raises(ConfigError, match="m.toml: data.condition: required"):
        sweep_members(load_config(s), [])


def test_removed_switches_say_why(tmp_path):
    p = _write(tmp_path, "x.toml", '[data]\npair = "pair1"\ncondition = "T"\n[train]\npadding_free = true\n'
                                   'fused_adamw = false\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == [
        "train.padding_free: no longer a setting: packed micro-batches (one row, per-document attention) are how "
        "markerlab always trains; delete it",
        "train.fused_adamw: no longer a setting: fused AdamW is chosen automatically on CUDA; delete it"]
    assert set(C.REMOVED_KEYS) == {"train.padding_free", "train.chunked_ce", "train.fused_lora", "train.fused_adamw"}


# --------------------------------------------------------------------------- one line, never a traceback

TINY = CONFIGS / "tiny" / "pair1_T.toml"


@pytest.mark.parametrize("setting", ["data.n_per_persona=abc", "train.betas=5", "data.negatives=5", "sweep.vary=5",
                                     "sweep.members=5", "generate.n_questions=abc", "eval.n_id_questions=abc",
                                     "data.pair=3", "eval.n_ood_questions=true"])
def test_wrongly_typed_values_never_reach_the_cross_checks(setting):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny" / "sweep.toml" if setting.startswith("sweep.") else TINY, [setting])
    key = setting.split("=")[0]
    assert str(e.value).startswith(f"--set: {key}: expected "), str(e.value)
    assert len(e.value.problems) == 1, e.value.problems


def test_set_mistakes_are_blamed_on_set_the_file_on_the_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.epochs=0"])
    assert str(e.value) == "--set: train.epochs: expected >= 1, got 0"
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["trian.lr=1"])
    assert str(e.value).startswith("--set: [trian]: unknown section")
    bad = _write(tmp_path, "bad.toml", f'extends = "{TINY}"\n[train]\nepochs = 0\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["data.n_per_persona=abc"])
    assert e.value.problems == ["train.epochs: expected >= 1, got 0",
                                "--set data.n_per_persona: expected an integer, got str 'abc'"]
    assert str(e.value).startswith(f"{bad}: 2 problems")


def test_directory_non_utf8_and_unreadable_configs(tmp_path):
    with pytest.raises(C.UserError, match=r"is a directory, expected a TOML config file"):
        load_config(tmp_path)
    p = tmp_path / "latin1.toml"
    p.write_bytes('[run]\nname = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(C.UserError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: not UTF-8 text (byte 17: invalid continuation byte)"


@pytest.mark.parametrize("name", [".", "..", "a/b", "/abs", " ", "_onpolicy"])
def test_run_name_must_be_one_plain_directory_that_is_not_the_cache(name):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"run.name={name!r}".replace("'", '"')])
    assert str(e.value).startswith("--set: run.name: "), str(e.value)


def test_cache_inside_the_run_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="generate.cache_dir: .* is inside the run directory"):
        load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=x", f"generate.cache_dir={tmp_path / 'x' / 'c'}"])
    with pytest.raises(ConfigError, match="generate.cache_dir: .* is inside the run directory"):
        load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=x", f"generate.cache_dir={tmp_path / 'x' / 'a' / 'b'}"])


def test_sweep_vary_keys_are_settings_that_separate_arms(tmp_path):
    s = _write(tmp_path, "s.toml", '[sweep]\nmembers = ["a.toml"]\n[sweep.vary]\n"train.grad_accum" = [1, 2]\n'
                                   '"train.lr" = [0.1]\n')
    with pytest.raises(ConfigError) as e:
        load_config(s)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("sweep.vary: 'train.grad_accum' is not a setting that separates arms")
