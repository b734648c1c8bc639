"""The padded reference computation: the oracle the training path is checked against.

One row per example, right-padded, transformers' own SDPA attention with the
padding mask, full logits upcast to float32, cross-entropy at the same
positions and in the same order as trainer/pack.py lists them. LoRA dropout
uses the very masks the training path draws: `reference_masks` draws them from
a copy of the trainer's generator in the packed (tokens, in) layout, then
scatters each example's rows into the padded (B * T, in) layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.tokenize import collate
from trainer.dropout import DropoutMasks


def reference_token_losses(model, examples, pad_id: int):
    """(ce (N,), sel) for one micro-batch, the padded way."""
    batch = collate(examples, pad_id)
    masks = {"loss": batch.loss_mask, **batch.spans}
    targets = {k: m[:, 1:] for k, m in masks.items()}  # (B, T-1): is token t+1 a target of mask k
    need = torch.stack(list(targets.values())).any(0)
    impl = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    finally:
        model.config._attn_implementation = impl
    pred = logits[:, :-1][need].float()
    ce = F.cross_entropy(pred, batch.input_ids[:, 1:][need], reduction="none")
    return ce, {k: m[need].to(ce.dtype) for k, m in targets.items()}


def reference_masks(masks: DropoutMasks, examples) -> None:
    """Draw the micro-batch's packed masks as the trainer would, and lay them out padded."""
    lens = [len(e) for e in examples]
    S, T = sum(lens), max(lens)
    masks.draw(S)
    for m in masks.layers:
        packed = m.lora_dropout.mask  # (S, in)
        padded = torch.ones((len(lens) * T, m.in_features), dtype=torch.bool)
        a = 0
        for b, n in enumerate(lens):
            padded[b * T:b * T + n] = packed[a:a + n]
            a += n
        m.lora_dropout.mask = padded


def reference_forward_backward(model, examples, micro: int, pad_id: int, masks: DropoutMasks) -> dict:
    """trainer.train.forward_backward's quantities, computed the padded way."""
    n_targets = sum(e.n_loss_targets for e in examples)
    from data.tokenize import span_names

    loss_sum, spans = 0.0, {k: [0.0, 0.0] for k in span_names(examples)}
    for i in range(0, len(examples), micro):
        chunk = examples[i:i + micro]
        if model.training:
            reference_masks(masks, chunk)
        ce, sel = reference_token_losses(model, chunk, pad_id)
        mb = (ce * sel["loss"]).sum()
        (mb / n_targets).backward()
        loss_sum += mb.item()
        for k in spans:
            if k in sel:
                spans[k][0] += (ce.detach() * sel[k]).sum().item()
                spans[k][1] += sel[k].sum().item()
    masks.clear()
    return {"loss": loss_sum / n_targets,
            "span_loss": {"loss_" + k.replace(":", "_"): (s / c if c else None) for k, (s, c) in spans.items()}}
