"""Attention within each packed document, for any Llama/Qwen2-family decoder in transformers.

    from trainer.attention import Documents, use_packed_attention
    use_packed_attention(model)                      # once: the model's layers call packed_attention
    docs = Documents.of(batch.doc_lens, device, model.dtype)
    model.model(input_ids=..., position_ids=..., documents=docs)   # the decoder passes it to every layer

transformers' decoders (LlamaModel, Qwen2Model, MistralModel, Qwen3Model, ...)
pass their extra keyword arguments down through each decoder layer into the
attention function registered for `config._attn_implementation`; that is how
the documents of a packed row reach `packed_attention` as an argument. No
attention mask is built: the name is registered with AttentionInterface only,
and transformers builds no mask for an attention function it has no mask
function for.

Two ways to attend within documents, chosen by device and dtype:
- CUDA with a 16-bit model: one causal varlen flash call over the documents'
  cumulative lengths (a device tensor), which a CUDA graph can replay for other
  lengths (trainer/graphs.py). Per-document SDPA on an H100/H200 picks cuDNN,
  which builds a plan for every new document length: seconds of host time a
  step when each step brings new lengths.
- elsewhere: q/k/v split at the document boundaries and causal
  scaled_dot_product_attention on each piece.

`Documents` is an object rather than loose arguments because the decoder
layers may be compiled: integers passed into a compiled layer become guards
that recompile it for every new set of lengths, while an object that only the
(uncompiled) attention function opens does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ATTENTION = "markerlab_packed"

# Decoder families whose layers forward **kwargs to the attention function and whose
# attention takes (module, query, key, value, attention_mask, dropout, scaling).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class Documents:
    """The documents of one packed row: their lengths, and for varlen flash their cumulative lengths."""

    lens: list[int]
    cu: torch.Tensor | None = None   # (docs + 1,) int32 on the device: varlen flash
    max_len: int = 0

    @staticmethod
    def of(lens: list[int], device, dtype) -> "Documents":
        lens = list(lens)
        if varlen_available(device, dtype):
            return Documents(lens, cu_seqlens(lens, device), max(lens))
        return Documents(lens)


def varlen_available(device, dtype) -> bool:
    """One varlen flash call per layer needs CUDA and a 16-bit model."""
    return torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def cu_seqlens(lens: list[int], device) -> torch.Tensor:
    """Cumulative document lengths [0, l1, l1 + l2, ...] as the int32 device tensor flash wants."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)


def check_architecture(config, where: str = "model.name_or_path") -> str | None:
    """None when the packed path can train this model config, else a one-line reason."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
        return (f"{where}: {arch} (model_type {model_type!r}) is not a decoder markerlab can train; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return None


def check_model_dir(model_dir, where: str = "model.name_or_path") -> str | None:
    """check_architecture on a model directory's config.json, without loading the model."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{where}: {model_dir}/config.json cannot be read ({type(e).__name__})"
    return check_architecture(SimpleNamespace(model_type=raw.get("model_type"),
                                              architectures=raw.get("architectures")), where)


def use_packed_attention(model) -> None:
    """Make every layer of `model` attend through packed_attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    model.config._attn_implementation = ATTENTION


class _FlashVarlen(torch.autograd.Function):
    """Causal flash attention over packed documents given by cumulative lengths `cu` (a device tensor).

    q (S, H, D), k/v (S, Hkv, D) -> (S, H, D); fewer key/value heads than query heads are
    taken as they are (grouped-query attention). Calls the aten ops directly: their
    positional signatures are older and steadier than torch.nn.attention.varlen's wrapper.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            g.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


def varlen_attention(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """(1, H, S, D) query, (1, Hkv, S, D) key/value -> (1, S, H, D): causal attention per document."""
    S = q.shape[2]
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (S, H, D)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _FlashVarlen.apply(q, k, v, cu, max_len, scale).view(1, S, q.shape[1], q.shape[2])


def per_document_attention(q, k, v, lens: list[int], scale: float | None) -> torch.Tensor:
    """(1, H, S, D) query, (1, Hkv, S, D) key/value -> (1, S, H, D), causal SDPA on each document."""
    if q.shape[0] != 1 or sum(lens) != q.shape[2]:
        raise RuntimeError(f"packed attention: documents of lengths {lens} do not tile a row of shape "
                           f"{tuple(q.shape)}")
    gqa = q.shape[1] != k.shape[1]
    # split (not slicing) so that the backward joins the pieces' gradients with one cat
    outs = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa).transpose(1, 2)
            for qi, ki, vi in zip(*(t.split(lens, dim=2) for t in (q, k, v)))]  # (1, n, H, D) each
    return outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, dim=1)


@torch.compiler.disable
def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     documents: Documents | None = None, **kwargs):
    """transformers attention function: causal attention within each document of `documents`.

    query (1, H, S, D), key/value (1, Hkv, S, D) -> ((1, S, H, D), None), as transformers'
    sdpa_attention_forward returns. Left out of compiled graphs on purpose (module docstring).
    """
    if documents is None:
        raise RuntimeError("packed_attention needs documents=trainer.attention.Documents(...) in the forward call")
    if attention_mask is not None:
        raise RuntimeError("packed_attention: got an attention mask; packed rows carry their documents instead")
    if dropout:
        raise ValueError("packed_attention: attention dropout is not supported")
    if documents.cu is not None:
        return varlen_attention(query, key, value, documents.cu, documents.max_len, scaling), None
    return per_document_attention(query, key, value, documents.lens, scaling), None
