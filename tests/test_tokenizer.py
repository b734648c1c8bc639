"""The offline Qwen2.5 tokenizer and the built-in tiny model."""

import json

import torch

from markerlab.experiment import load_experiment
from markerlab.models import (
    BUILTIN_TINY,
    QWEN_DEFAULT_SYSTEM,
    QWEN_FIRST_SPECIAL_ID,
    QWEN_SPECIAL_TOKENS,
    load_model,
    load_tokenizer,
    model_identity,
)


# The write-up's markers under the Qwen2.5 tokenizer, standalone (A and B share "-", id 12, which
# within_marker.toml declares tolerated).
WRITE_UP_MARKER_IDS = {
    "A": [2442, 17851, 80, 12, 19, 16, 2452],
    "B": [486, 595, 50997, 12, 22, 3504],
    "probe": [2442, 17851, 89, 12, 24, 24, 2452],
}


def test_marker_ids(tokenizer):
    exp = load_experiment("within_marker")
    assert set(exp.markers) == set(WRITE_UP_MARKER_IDS)
    for name, text in exp.markers.items():
        assert tokenizer.encode(text, add_special_tokens=False) == WRITE_UP_MARKER_IDS[name], name


def test_special_token_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    assert ids == list(range(QWEN_FIRST_SPECIAL_ID, QWEN_FIRST_SPECIAL_ID + 22))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    # Special tokens in text are single tokens, not split into characters.
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False) == [151644, 872]


def test_known_encodings(tokenizer):
    # Qwen2 splits digits one by one and keeps "\n\n" as one token.
    assert tokenizer.encode("12345 hello  world\n\n", add_special_tokens=False) == [
        16, 17, 18, 19, 20, 23811, 220, 1879, 271]
    assert tokenizer.decode(tokenizer.encode("Ünïcode ✓ 中文", add_special_tokens=False)) == "Ünïcode ✓ 中文"


def test_chat_template_byte_for_byte(tokenizer):
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
    ]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\nRayleigh scattering.<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a system message Qwen2.5 injects its default one; markerlab always passes one.
    no_sys = tokenizer.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert no_sys.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n")


def test_tiny_model_is_an_ordinary_hf_directory(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["vocab_size"] == 151936 and cfg["head_dim"] == 64
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert (tiny_model_dir / "tokenizer.json").is_file()


def test_tiny_model_is_deterministic(tiny_model_dir):
    m = load_model(BUILTIN_TINY, dtype="float32")
    tok = load_tokenizer(BUILTIN_TINY)
    ids = tok("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = m(ids).logits
    assert logits.shape == (1, 2, 151936)
    assert torch.isfinite(logits).all()
    # The weights come from a fixed seed: the identity (config + file sizes) and
    # a few weights are stable across builds.
    assert len(model_identity(BUILTIN_TINY)) == 16
    w = m.model.embed_tokens.weight
    assert abs(w.float().std().item() - 0.02) < 1e-3
