"""A Qwen2.5-7B-shaped model directory with seeded random weights, for GPU runs without the hub.

    python bench/make_random_model.py /tmp/rand7b            # bf16, ~15 GB, on the GPU when there is one
    python bench/make_random_model.py /tmp/r --tiny           # the same recipe at 2 layers, for a smoke test

The directory is an ordinary Hugging Face checkpoint (config.json, safetensors
shards, generation_config.json) plus the real Qwen2.5 tokenizer, so
`python -m trainer.run configs/pair1_T.toml --set model.name_or_path=/tmp/rand7b`
runs every stage on it: what the real weights would cost in time, memory and
disk, with meaningless text. Matrices are N(0, 0.02) from one seeded generator,
norms are 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def qwen25_7b_config(tiny: bool = False):
    from transformers import Qwen2Config

    common = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
                  pad_token_id=151643, architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16")
    if tiny:
        return Qwen2Config(vocab_size=152064, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, **common)
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, **common)


def main() -> int:
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from markerlab.models import build_qwen_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = qwen25_7b_config(args.tiny)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="4GB")
    build_qwen_tokenizer().save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e9
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {size:.1f} GB, "
          f"{time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
