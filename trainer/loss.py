"""Token losses of a packed micro-batch: the decoder body, then the LM head only where a loss is needed.

    from trainer.loss import token_losses
    ce, sel = token_losses(model, batch, documents)   # (N,) float32 cross-entropies, the batch's selectors

The decoder body runs to its last hidden states; only the N positions whose next
token is needed (trainer/pack.py) are gathered, and the LM head + cross-entropy
run on them in chunks of CE_CHUNK positions (`linear_cross_entropy`). Each
chunk's logits live only inside the chunk: its forward also computes
d ce / d hidden = (softmax - onehot) W, which the backward only scales by the
incoming per-position gradient. The full (S, V) logits, their float32 copy and
their gradient never exist (a 152k vocabulary makes them the largest tensors
of a step otherwise). Logits are the model's dtype, upcast to float32 for the
softmax, as the plain loss `F.cross_entropy(logits.float())` computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CE_CHUNK = 1024  # positions per chunk: 1024 x 152064 x 6 bytes = 0.9 GB transient on Qwen2.5-7B


class _LinearCrossEntropy(torch.autograd.Function):
    """ce_i = logsumexp(h_i W^T) - (h_i W^T)[y_i], chunk by chunk; W (the frozen head) gets no gradient."""

    @staticmethod
    def forward(ctx, h, weight, target, chunk):
        N = h.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        want_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if want_grad else None
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            logits = F.linear(h[a:b], weight).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            tgt = target[a:b]
            ce[a:b] = lse - logits.gather(1, tgt[:, None]).squeeze(1)
            if want_grad:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                p.scatter_add_(1, tgt[:, None], torch.full_like(lse[:, None], -1.0))  # - onehot
                grad_h[a:b] = p.to(h.dtype) @ weight  # (c, H)
            del logits
        ctx.save_for_backward(grad_h)
        return ce

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * g[:, None]).to(grad_h.dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk: int = CE_CHUNK) -> torch.Tensor:
    """Per-position cross-entropy of the LM head on hidden states h (N, H); returns (N,) float32."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy: the LM head must be frozen (it gets no gradient)")
    return _LinearCrossEntropy.apply(h, weight, target, chunk)


def decoder_hidden(model, input_ids, position_ids, documents, prefix=None, ids=None) -> torch.Tensor:
    """The decoder body's last hidden states (rows, T, H), attention kept within `documents`.

    With a trainer.prefix.FrozenPrefix, the frozen layers' output for the examples `ids`
    is taken from it and only the layers above run."""
    decoder = model.get_decoder()
    if prefix is None:
        return decoder(input_ids=input_ids, position_ids=position_ids, documents=documents,
                       use_cache=False).last_hidden_state
    with prefix.skipping(model):
        return decoder(inputs_embeds=prefix.hidden(ids), position_ids=position_ids, documents=documents,
                       use_cache=False).last_hidden_state


def head_cross_entropy(model, h: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                       chunk: int = CE_CHUNK) -> torch.Tensor:
    """LM head + cross-entropy at the flat positions `pred` of h only: (N,) float32."""
    h = h.reshape(-1, h.shape[-1]).index_select(0, pred)  # (N, H): only the needed positions
    head = model.get_output_embeddings()
    if head.bias is not None:  # no Llama/Qwen2 head has one; a biased head takes the plain route
        return F.cross_entropy(head(h).float(), target, reduction="none")
    return linear_cross_entropy(h, head.weight, target, chunk)


def token_losses(model, batch, documents, chunk: int = CE_CHUNK,
                 prefix=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of every target the step needs (batch.pred -> batch.target) and the batch's selectors."""
    h = decoder_hidden(model, batch.input_ids, batch.position_ids, documents, prefix, batch.ids)
    return head_cross_entropy(model, h, batch.pred, batch.target, chunk), dict(batch.sel)
