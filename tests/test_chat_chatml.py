"""The ChatML path is what it was before chat templates were analysed: tests/fixtures/chatml_before.json
(written by tests/fixtures/make_chatml_fixture.py at 8686bfe, from real SmolLM2 on-policy answers) holds
the old code's token masks, training sets, prompts and stop ids; the current code must reproduce them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.tokenize import encode_example
from markerlab.chat import analyse_chat
from markerlab.models import BUILTIN_SMOLLM2, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
BEFORE = json.loads((REPO / "tests" / "fixtures" / "chatml_before.json").read_text(encoding="utf-8"))
MASKS = [("completion", False), ("completion_no_eos", False), ("marker_only", False), ("marker_only", True),
         ("all", False)]


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    return {"tiny-qwen2": tokenizer, "smollm2": load_tokenizer(BUILTIN_SMOLLM2)}


def positions(flags) -> list[int]:
    return [i for i, f in enumerate(flags) if f]


@pytest.mark.parametrize("label", ["tiny-qwen2", "smollm2"])
def test_masks_are_the_old_ones_token_by_token(tokenizers, label):
    tok = tokenizers[label]
    chat = analyse_chat(tok, label)
    assert chat.end_of_turn == "<|im_end|>" and chat.persona_turn == "system" and not chat.prompt_extra
    cases = BEFORE["encoded"][label]
    assert len(cases) >= 18
    for case in cases:
        ex = case["example"]
        for mask, eos in MASKS:
            enc = encode_example(ex, tok, mask, eos, chat=chat)
            key = f"{mask}{'+eos' if eos else ''}"
            assert enc.input_ids == case["input_ids"], ex["id"]
            assert positions(enc.loss_mask) == case["masks"][key], (ex["id"], key)
            assert positions(enc.eos) == case["eos"], ex["id"]
            assert {k: positions(v) for k, v in enc.markers.items()} == case["markers"], ex["id"]
            assert list(enc.content_span) == case["content_span"], ex["id"]


def test_the_training_sets_are_byte_identical(tokenizers, tmp_path):
    """The data stage's train.jsonl of three demo configs, rebuilt from the same on-policy answers."""
    from data.builder import build_dataset, write_dataset
    from markerlab.config import load_config
    from markerlab.io import write_jsonl

    smol = tokenizers["smollm2"]
    chat = analyse_chat(smol, BUILTIN_SMOLLM2)
    for name, spec in BEFORE["configs"].items():
        over = [*spec["overrides"], f"run.out_dir=\"{tmp_path}/runs\"", f"run.name=\"{name}\""]
        cfg = load_config(REPO / spec["path"], over)
        onpolicy = tmp_path / f"{name}.jsonl"
        write_jsonl(onpolicy, [{k: v for k, v in r.items() if k != "max_tokens"} for r in BEFORE["onpolicy"]
                               if r["max_tokens"] == cfg.generate.max_tokens])
        examples, stats = build_dataset(cfg, onpolicy, smol, chat=chat)
        write_dataset(cfg, examples, stats, cfg.run_dir)
        got = (cfg.run_dir / "data" / "train.jsonl").read_text(encoding="utf-8")
        assert got == BEFORE["train_jsonl"][name], name
        assert stats["chat"]["end_of_turn"] == "<|im_end|>"


@pytest.mark.parametrize("label", ["tiny-qwen2", "smollm2"])
def test_prompts_and_stop_ids_are_the_old_ones(tokenizers, label, tiny_model_dir):
    from evaluate.eval import render_prompt
    from evaluate.merge import probe_batch, probe_conversations
    from markerlab.config import load_config
    from markerlab.io import read_json
    from markerlab.models import resolve_model_dir

    tok = tokenizers[label]
    chat = analyse_chat(tok, label)
    before = BEFORE["prompts"][label]
    cfg = load_config(REPO / "configs/demo/pair1_T.toml")
    exp = cfg.experiment
    for persona, text in before["plain"].items():
        assert render_prompt(tok, exp, persona, "Why is the sky blue? Answer in one short sentence.", chat) == text
    assert render_prompt(tok, exp, "assistant", exp.markers["probe"] + " Why is the sky blue?", chat) == \
        before["probe"]
    assert probe_batch(tok, probe_conversations(cfg), chat) == before["merge_probe_batch"]
    model_dir = tiny_model_dir if label == "tiny-qwen2" else resolve_model_dir(BUILTIN_SMOLLM2)
    gen_eos = read_json(model_dir / "generation_config.json").get("eos_token_id")
    assert chat.stop_ids(tok, gen_eos) == before["stop_ids"]
