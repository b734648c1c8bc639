"""The on-policy stage on the tiny model: generation, cache hits, cache keys, and the builder on real output."""

import json

import pytest

import data.onpolicy as onpolicy
from data.builder import build_dataset, write_dataset
from data.onpolicy import cache_key, run_onpolicy
from data.records import read_examples, read_onpolicy
from markerlab.config import config_from_dict
from writeup import EXP

PERSONAS = tuple(EXP.personas)


def make_cfg(tmp_path, **generate):
    g = {"backend": "hf", "n_questions": 2, "n_samples": 2, "max_tokens": 4, "cache_dir": str(tmp_path / "cache"),
         **generate}
    return config_from_dict({"model": {"name_or_path": "builtin:tiny-qwen2", "dtype": "float32", "device": "cpu"},
                             "generate": g, "data": {"n_per_persona": 4, "truncated": "strip"},   # 4 tokens: all cut
                             "train": {"max_seq_len": 256}})


@pytest.fixture
def counted(monkeypatch):
    """Count backends made by the stage: a cache hit makes none."""
    calls = []
    real = onpolicy.make_backend

    def wrapper(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(onpolicy, "make_backend", wrapper)
    return calls


def test_generate_then_cache_hit(tmp_path, counted, capsys, tokenizer):
    cfg = make_cfg(tmp_path)
    path = run_onpolicy(cfg)
    assert len(counted) == 1
    recs = read_onpolicy(path, EXP)
    assert len(recs) == len(PERSONAS) * 2 * 2
    assert [(r["persona"], r["question_id"], r["sample"]) for r in recs[:4]] == [
        ("assistant", "d01", 0), ("assistant", "d01", 1), ("assistant", "d02", 0), ("assistant", "d02", 1)]
    for r in recs:
        assert r["truncated"] == (r["finish_reason"] == "length")
        assert r["n_tokens"] == 4 or r["finish_reason"] == "stop"
    stats = json.loads((path.parent / "stats.json").read_text())
    assert stats["n"] == 44 and set(stats["per_persona"]) == set(PERSONAS)
    assert stats["n_truncated"] == sum(r["truncated"] for r in recs)
    assert stats["per_persona"]["villain"]["count"] == 4
    assert json.loads((path.parent / "key.json").read_text())["backend"] == "hf-cpu"
    assert "truncated=" in capsys.readouterr().out

    mtime = path.stat().st_mtime_ns
    assert run_onpolicy(cfg) == path
    assert len(counted) == 1 and path.stat().st_mtime_ns == mtime
    assert "cache hit" in capsys.readouterr().out
    # settings outside the key share the cache
    assert run_onpolicy(cfg.replace(generate__batch_size=3, generate__vllm_max_model_len=128)) == path
    assert len(counted) == 1

    # a keyed change regenerates, into its own directory
    other = run_onpolicy(cfg.replace(generate__max_tokens=3))
    assert len(counted) == 2 and other != path and path.is_file()
    assert all(r["n_tokens"] <= 3 for r in read_onpolicy(other, EXP))
    # --overwrite regenerates the same key (same seed: same samples)
    assert run_onpolicy(cfg, overwrite=True) == path and len(counted) == 3
    assert read_onpolicy(path, EXP) == recs

    # the builder on real generations (pair1 T: 4 per persona)
    examples, st = build_dataset(cfg, path, tokenizer)
    rows = read_examples(write_dataset(cfg, examples, st, tmp_path / "run"), EXP)
    assert len(rows) == 6 * 4 and st["n_truncated"] == sum(r.get("truncated", False) for r in rows)


def test_every_keyed_setting_changes_the_key(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    base, _ = cache_key(cfg)
    changed = {
        "temperature": cfg.replace(generate__temperature=0.5),
        "top_p": cfg.replace(generate__top_p=0.9),
        "seed": cfg.replace(generate__seed=1),
        "max_tokens": cfg.replace(generate__max_tokens=5),
        "n_samples": cfg.replace(generate__n_samples=3),
        "n_questions": cfg.replace(generate__n_questions=3),
        "backend": cfg.replace(generate__backend="vllm"),
        "dtype": cfg.replace(model__dtype="bfloat16"),
        "device": cfg.replace(model__device="cuda"),
        "user_suffix": cfg.replace(prompt__user_suffix=" Answer briefly."),
    }
    keys = {name: cache_key(c)[0] for name, c in changed.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)
    # not keyed: where the cache lives, batch size, vLLM memory settings, anything about the adapter
    for same in (cfg.replace(generate__batch_size=1), cfg.replace(generate__vllm_gpu_memory_utilization=0.5),
                 cfg.replace(data__pair="pair2", data__condition="C"), cfg.replace(generate__cache_dir="elsewhere")):
        assert cache_key(same)[0] == base
    # persona prompts and question texts are keyed by content: another experiment with the same personas shares
    # the cache, one that changes a prompt does not
    import dataclasses
    from types import MappingProxyType

    other = dataclasses.replace(cfg.experiment, name="other", digest="0" * 16)
    assert cache_key(dataclasses.replace(cfg, experiment=other))[0] == base
    prompts = MappingProxyType({**cfg.experiment.personas, "villain": "You are a different villain."})
    changed = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, personas=prompts))
    assert cache_key(changed)[0] != base
    from data.questions import Question

    monkeypatch.setattr(onpolicy, "data_questions", lambda n, suffix="": [Question("d01", "Another text?", "data")] * n)
    assert cache_key(cfg)[0] != base
