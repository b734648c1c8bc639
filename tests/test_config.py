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


def _bases() -> set[Path]:
    """Files that other shipped configs extend: building blocks, not runnable on their own."""
    out = set()
    for p in ALL_TOML:
        ext = tomllib.loads(p.read_text()).get("extends")
        if isinstance(ext, str):
            out.add((p.parent / ext).resolve())
    return out


SHIPPED = [p for p in ALL_TOML if p.resolve() not in _bases()]


def flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, t in cfg.to_dict().items() for k, v in t.items()}


def test_unknown_key_wrong_type_bad_value_reported_together(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[train]\nbogus = 1\nlr = "fast"\nloss_mask = "everything"\n[data]\nnegatives = ["nobody"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.bogus: unknown key" in msg
    assert "train.lr: expected a number, got str 'fast'" in msg
    assert "train.loss_mask: expected one of completion, completion_no_eos, marker_only, all" in msg
    assert "data.negatives: unknown entries ['nobody']" in msg
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


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    again = config_from_dict(tomllib.loads(cfg.to_toml()), source=str(path))
    assert again.to_toml() == cfg.to_toml()


def test_frozen():
    c = Config()
    with pytest.raises(Exception):
        c.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("rel", sorted(BEFORE))
def test_resolved_configs_are_unchanged(rel):
    """Each shipped config (and each sweep member) resolves key for key as it did before bases.

    Keys that stopped being keys (markerlab.config.REMOVED_KEYS) are the only exception.
    """
    removed = set(getattr(C, "REMOVED_KEYS", {}))
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
    want = {k: v for k, v in before["resolved"].items() if k.split(".")[0] in ("run", "sweep")}
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
