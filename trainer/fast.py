"""The trainer's speed switches (train.padding_free, chunked_ce, fused_lora, compile, fused_adamw).

    from trainer.fast import setup_fast_path, adamw_options
    fast = setup_fast_path(model, cfg.train, device)        # None when every switch is off
    opt = torch.optim.AdamW(params, ..., **adamw_options(cfg.train.fused_adamw, device))
    batch = fast.collate(examples, pad_id).to(device)       # instead of data.tokenize.collate
    ce, sel = fast.token_losses(model, batch)               # instead of trainer.train.token_losses
    ...backward...
    fast.end_step(model)                                    # drop the step's dropout masks

Every switch keeps the maths of the plain path (trainer/train.py); what changes is
how much memory traffic, padding and Python it takes. On the same batches the
per-step losses and LoRA gradients agree with the plain path's to floating-point
rounding (tests/test_fast_path.py, float32: ~1e-6 relative), with LoRA dropout
on too, because the dropout masks are the very same draws (below).

padding_free  A micro-batch's examples are concatenated into one row (1, sum of
              lengths) with position_ids restarting at 0 in each document.
              Attention is strictly per document: `packed_attention` (registered
              in transformers' AttentionInterface as "markerlab_packed") runs, on
              CUDA with a 16-bit model, one causal varlen flash call over the
              documents' cumulative lengths (`varlen_attention`); elsewhere it
              splits q/k/v at the document boundaries and runs causal
              scaled_dot_product_attention on each piece. (Per-document SDPA on
              an H100/H200 picks cuDNN, which builds a plan for every new
              document length: ~3 s of host time a step when each step brings
              new lengths, measured; the varlen call has no per-length setup.)
              No mask tensor is built and no token attends across documents.
              Predictions are taken at positions 0..len-2 of each document
              only, so a document's last token never predicts the next
              document's first. No FLOP is spent on padding (24% of the padded
              tokens at micro-batch 4 with lengths 195-645).
chunked_ce    The decoder body runs to its final hidden states; only the positions
              whose next token is needed (loss mask, marker A/B, <|im_end|>: the
              same positions and order as token_losses) are gathered, and the LM
              head + cross-entropy run on them in chunks of CE_CHUNK positions
              (`linear_cross_entropy`). Each chunk's logits live only inside the
              chunk: the forward also computes d ce / d hidden for the chunk,
              (softmax - onehot) W, which the backward only scales by the
              incoming per-position gradient. The full (B, T, V) logits, their
              float32 copy and their gradient never exist.
fused_lora    LoRALinear._forward_fused: base output, then
              y.addmm_(x_dropped @ A^T, B^T, alpha=scale/keep) in place (lora/lora.py).
              Dropout still applies to the branch input with the same mask; the
              1/keep scale moves into alpha. The branch runs in the activations'
              dtype (bf16 on the GPU, with float32 accumulation inside the
              matmuls) instead of float32; A, B, their gradients and AdamW's
              state stay float32.
compile       torch.compile(dynamic=True) on each decoder layer (module.compile(),
              so parameter names and the adapter format do not change). The
              attention call is left out of the graph (a deliberate graph
              break: the document lengths are Python ints that must not
              become guards), and the dropout masks are drawn before the
              forward, so no generator call sits inside a graph. Not applied
              together with gradient checkpointing (a note says so).
fused_adamw   torch.optim.AdamW(fused=True) on CUDA; on the CPU the foreach
              implementation (a note says so).
cuda_graphs   (needs padding_free and chunked_ce, no checkpointing) each packed
              micro-batch's forward and backward is captured once per bucketed
              length as a CUDA graph and replayed: one launch instead of ~8,000,
              which a 7B step spends a third of its time waiting on (trainer/graphs.py
              says how the padding keeps the maths). Attention inside a graph is one
              varlen flash call over the documents' cumulative lengths
              (`varlen_attention`). Without CUDA, or with a float32 model, the
              same padded micro-batches run eagerly (a note says so).

Dropout masks. With any switch on and LoRA dropout > 0, the masks of a micro-batch
are drawn before its forward (`draw_dropout_masks`), layer by layer in the order
the forward would draw them, from the same generator, with the same shapes as the
plain path's (B, T_max, in) padded layout; under padding_free the real tokens'
rows are then gathered. So the fast path uses exactly the plain path's masks (and
leaves the generator in the same state), and an activation-checkpoint recompute
reuses them as they are.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora import lora_modules

SPEED_SWITCHES = ("padding_free", "chunked_ce", "fused_lora", "compile", "fused_adamw", "cuda_graphs")
PACKED_ATTENTION = "markerlab_packed"
CE_CHUNK = 1024  # positions per LM-head + cross-entropy chunk: 1024 x 152064 x 6 bytes = 0.9 GB transient
MASK_NAMES = ("loss", "marker_a", "marker_b", "eos")


def note(msg: str) -> None:
    print(f"[trainer.fast] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- batches

@dataclass
class FastBatch:
    """One micro-batch, padded (B, T) or packed (1, S), with the needed positions precomputed.

    pred[i] is the flat position (in the (rows * T) layout) whose logits predict
    token target[i]; sel[name][i] is 1.0 where that target belongs to mask `name`.
    The positions come in the plain path's order: example by example, then by
    position (the order of logits[:, :-1][need] in token_losses).
    """

    input_ids: torch.Tensor                 # (B, T) or (1, S) long
    attention_mask: torch.Tensor | None     # (B, T) long, None when packed
    position_ids: torch.Tensor | None       # (1, S) long, restarting at 0 per document; None when padded
    doc_lens: list[int] | None              # packed: each document's length
    pred: torch.Tensor                      # (N,) long
    target: torch.Tensor                    # (N,) long
    sel: dict[str, torch.Tensor]            # name -> (N,) float32
    real_rows: torch.Tensor | None          # packed: (S,) long rows of the padded (B * T_max) layout
    padded_shape: tuple[int, int]           # (B, T_max): the plain path's layout (dropout masks are drawn in it)
    n_tokens: int                           # real tokens
    n_processed: int                        # tokens run through the model (padding included)
    ids: list[str] = field(default_factory=list)

    def to(self, device) -> "FastBatch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return FastBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.position_ids), self.doc_lens,
                         mv(self.pred), mv(self.target), {k: mv(v) for k, v in self.sel.items()},
                         mv(self.real_rows), self.padded_shape, self.n_tokens, self.n_processed, self.ids)


def collate_fast(examples, pad_id: int, packed: bool) -> FastBatch:
    """Padded (as data.tokenize.collate) or packed micro-batch with the needed positions listed."""
    B, T = len(examples), max(len(e) for e in examples)
    pred, target, real_rows = [], [], []
    sel = {k: [] for k in MASK_NAMES}
    offset = 0
    for b, e in enumerate(examples):
        n = len(e)
        base = offset if packed else b * T
        masks = (e.loss_mask, e.marker_a, e.marker_b, e.eos)
        for t in range(n - 1):  # position t predicts token t + 1 of the same document
            flags = [m[t + 1] for m in masks]
            if any(flags):
                pred.append(base + t)
                target.append(e.input_ids[t + 1])
                for k, f in zip(MASK_NAMES, flags):
                    sel[k].append(1.0 if f else 0.0)
        if packed:
            real_rows.extend(range(b * T, b * T + n))
        offset += n
    f32 = torch.float32
    common = dict(pred=torch.tensor(pred, dtype=torch.long), target=torch.tensor(target, dtype=torch.long),
                  sel={k: torch.tensor(v, dtype=f32) for k, v in sel.items()}, padded_shape=(B, T),
                  n_tokens=offset, ids=[e.id for e in examples])
    if packed:
        ids = [t for e in examples for t in e.input_ids]
        pos = [p for e in examples for p in range(len(e))]
        return FastBatch(input_ids=torch.tensor([ids], dtype=torch.long), attention_mask=None,
                         position_ids=torch.tensor([pos], dtype=torch.long), doc_lens=[len(e) for e in examples],
                         real_rows=torch.tensor(real_rows, dtype=torch.long), n_processed=offset, **common)
    rows = [e.input_ids + [pad_id] * (T - len(e)) for e in examples]
    att = [[1] * len(e) + [0] * (T - len(e)) for e in examples]
    return FastBatch(input_ids=torch.tensor(rows, dtype=torch.long), attention_mask=torch.tensor(att, dtype=torch.long),
                     position_ids=None, doc_lens=None, real_rows=None, n_processed=B * T, **common)


# --------------------------------------------------------------------------- packed attention

class _Pack:
    """The document lengths of the packed micro-batch being run (read by packed_attention).

    Set before the forward and kept until the next micro-batch, so an activation
    checkpoint recompute during the backward sees the same documents. Kept out of
    the layers' arguments on purpose: Python ints passed into a compiled layer
    would become guards and recompile it for every new set of lengths.
    """

    lens: list[int] | None = None
    # Or, on CUDA in 16 bits, the documents as a device tensor of cumulative lengths
    # (int32, (docs + 1,)) and an upper bound of their lengths: attention is then one
    # varlen flash call, which a CUDA graph (trainer/graphs.py) can replay for other lengths.
    cu: torch.Tensor | None = None
    max_len: int = 0


def _disable_compile(fn):
    dis = getattr(getattr(torch, "compiler", None), "disable", None)
    return dis(fn) if dis is not None else fn


_GQA_IN_SDPA: bool | None = None  # probed on first use: enable_gqa needs torch >= 2.5


def _sdpa_causal(q, k, v, scale):
    """Causal SDPA of one document; q (1, H, L, D), k/v (1, Hkv, L, D)."""
    global _GQA_IN_SDPA
    if q.shape[1] != k.shape[1]:
        if _GQA_IN_SDPA is not False:
            try:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                _GQA_IN_SDPA = True
                return out
            except (TypeError, RuntimeError) as e:
                if _GQA_IN_SDPA:  # it worked before: a real error
                    raise
                _GQA_IN_SDPA = False
                note(f"scaled_dot_product_attention(enable_gqa=True) failed ({type(e).__name__}: {e}); "
                     f"repeating the key/value heads instead")
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


class _FlashVarlen(torch.autograd.Function):
    """Causal flash attention over packed documents given by cumulative lengths `cu` (a device tensor).

    q (S, H, D), k/v (S, Hkv, D) -> (S, H, D). The flash kernels take fewer key/value heads
    than query heads as they are (grouped-query attention) and sum their gradients back.
    Calls the aten ops directly (forward and backward): their positional signatures are
    older and steadier than torch.nn.attention.varlen's Python wrapper, which changed its
    arguments between releases. Run on torch 2.11 (the GPU machine); 2.13 has the same schema.
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


def flash_varlen_ok(model, device) -> bool:
    """Whether packed attention can be one varlen flash call: CUDA and a 16-bit model."""
    return torch.device(device).type == "cuda" and getattr(model, "dtype", None) in (torch.bfloat16, torch.float16)


def cu_seqlens(lens: list[int], device) -> torch.Tensor:
    """Cumulative document lengths [0, l1, l1 + l2, ...] as the int32 device tensor flash wants."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)


def varlen_attention(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """(1, H, S, D) query, (1, Hkv, S, D) key/value -> (1, S, H, D): causal attention per document."""
    S = q.shape[2]
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (S, H, D)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _FlashVarlen.apply(q, k, v, cu, max_len, scale).view(1, S, q.shape[1], q.shape[2])


@_disable_compile
def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: causal attention within each packed document.

    query (1, H, S, D), key/value (1, Hkv, S, D) -> (1, S, H, D), as transformers'
    sdpa_attention_forward returns. Outside a packed forward (no lengths set, or a
    mask given) it is transformers' own SDPA attention with the mask transformers
    built for it (use_packed_attention registers the SDPA mask for this name too).
    """
    if _Pack.cu is not None and attention_mask is None:
        if dropout:
            raise ValueError("packed_attention: attention dropout is not supported")
        return varlen_attention(query, key, value, _Pack.cu, _Pack.max_len, scaling), None
    lens = _Pack.lens
    if lens is None or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or sum(lens) != query.shape[2]:
        raise RuntimeError(f"packed_attention: documents of lengths {lens} do not tile a sequence of shape "
                           f"{tuple(query.shape)}")
    if dropout:
        raise ValueError("packed_attention: attention dropout is not supported")
    # split (not slicing) so that the backward joins the pieces' gradients with one cat
    qs, ks, vs = (t.split(lens, dim=2) for t in (query, key, value))
    outs = [_sdpa_causal(q, k, v, scaling).transpose(1, 2) for q, k, v in zip(qs, ks, vs)]  # (1, n, H, D) each
    out = outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, dim=1)  # (1, S, H, D)
    return out, None


def use_packed_attention(model) -> None:
    """Register packed_attention (and, for padded calls, transformers' SDPA mask) and make `model` use it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = PACKED_ATTENTION


# A prepared mask mapping: transformers' decoder then builds no mask (none is needed:
# packed_attention knows the documents), which also spares a device sync per forward.
NO_MASK = {"full_attention": None, "sliding_attention": None}


# --------------------------------------------------------------------------- dropout masks

def draw_dropout_masks(model, batch: FastBatch, into: dict | None = None) -> int:
    """Draw every LoRA layer's dropout mask of this micro-batch before its forward.

    Same generator, same order (module order = the order the forward calls them
    in a Qwen2/Llama decoder: q, k, v, o, gate, up, down, layer by layer), same
    (B, T_max, in) shape as LoRALinear._dropout_mask would draw in the padded
    layout, so the masks and the generator's state afterwards are the plain
    path's. Packed batches keep the real tokens' rows. Returns the number drawn.

    `into` (CUDA graphs, packed only): module -> a static (rows, in) bool buffer whose first
    rows receive the real tokens' masks in place; the module's _premask (a view of that
    buffer, set at capture) is left as it is.
    """
    layers = [m for _, m in lora_modules(model)]
    if into is None:
        for m in layers:  # free the previous micro-batch's masks first
            m._premask = None
    B, T = batch.padded_shape
    n = 0
    for m in layers:
        if not (m.training and m.dropout > 0.0 and not m.merged):
            continue
        mask = torch.empty((B, T, m.in_features), dtype=torch.bool, device=m.A.device)
        if m.dropout_generator is None:
            mask.bernoulli_(1.0 - m.dropout)
        else:
            mask.bernoulli_(1.0 - m.dropout, generator=m.dropout_generator)
        if into is not None:
            buf = into[m]
            torch.index_select(mask.view(B * T, m.in_features), 0, batch.real_rows, out=buf[:batch.n_tokens])
        elif batch.real_rows is not None:
            m._premask = mask.view(B * T, m.in_features).index_select(0, batch.real_rows).unsqueeze(0)  # (1, S, in)
        else:
            m._premask = mask
        n += 1
    return n


def release_dropout_masks(model) -> None:
    for _, m in lora_modules(model):
        m._premask = None


# --------------------------------------------------------------------------- chunked LM head + CE

class _LinearCrossEntropy(torch.autograd.Function):
    """ce_i = logsumexp(h_i W^T) - (h_i W^T)[y_i], chunk by chunk, float32 softmax.

    The forward also stores d ce_i / d h_i = (softmax_i - onehot_i) W (N x H, in h's
    dtype); the backward scales row i by the incoming gradient g_i. W (the frozen
    LM head) gets no gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, target, chunk):
        N = h.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        want_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if want_grad else None
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            logits = F.linear(h[a:b], weight).float()  # (c, V): the plain path's bf16 logits, upcast
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


def decoder_hidden(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """The decoder body's last hidden states (no LM head): (rows, T, H).

    A packed row comes with position_ids and no mask: packed_attention knows the documents
    (from _Pack), so transformers is handed an empty mask mapping and builds none.
    """
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if position_ids is not None:
        return body(input_ids=input_ids, position_ids=position_ids, attention_mask=dict(NO_MASK),
                    use_cache=False).last_hidden_state
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def chunked_head_ce(model, h: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                    chunk: int = CE_CHUNK) -> torch.Tensor:
    """The LM head + cross-entropy at the flat positions `pred` of h only, chunked: (N,) float32."""
    h = h.reshape(-1, h.shape[-1]).index_select(0, pred)  # (N, H): only the needed positions
    return linear_cross_entropy(h, model.get_output_embeddings().weight, target, chunk)


# --------------------------------------------------------------------------- compile

def decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.model.layers to compile")
    return list(layers)


def compile_layers(model, backend: str | None = None) -> bool:
    """torch.compile each decoder layer in place (dynamic shapes); False, with a note, if unavailable.

    `backend` None is torch.compile's default (inductor); the CPU tests pass "aot_eager".
    """
    if not hasattr(torch, "compile") or not hasattr(torch.nn.Module, "compile"):
        note("torch.compile is not available in this torch: compile skipped")
        return False
    try:
        import torch._dynamo as dynamo
    except Exception as e:  # pragma: no cover - broken install
        note(f"torch._dynamo does not import ({e}): compile skipped")
        return False
    cfg = dynamo.config
    # One graph serves all layers (parameters are graph inputs); still, leave room
    # for a few variants (the last micro-batch of an epoch, train vs eval).
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 1024)
    with warnings.catch_warnings():  # deprecated (always on) in newer torch
        warnings.simplefilter("ignore")
        if getattr(cfg, "inline_inbuilt_nn_modules", True) is False:
            cfg.inline_inbuilt_nn_modules = True
    # A graph that fails to compile runs eagerly (same maths) instead of stopping the run.
    cfg.suppress_errors = True
    kwargs = {"dynamic": True} if backend is None else {"dynamic": True, "backend": backend}
    for layer in decoder_layers(model):
        layer.compile(**kwargs)
    return True


def uncompile_layers(model) -> None:
    for layer in decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None


# --------------------------------------------------------------------------- the switches together

class FastPath:
    """What the loop calls instead of collate/token_losses when a switch is on."""

    def __init__(self, padding_free: bool = False, chunked_ce: bool = False, ce_chunk: int = CE_CHUNK,
                 cuda_graphs: bool = False, device=None, max_tokens: int = 0):
        self.padding_free = padding_free
        self.chunked_ce = chunked_ce
        self.ce_chunk = ce_chunk
        self.cuda_graphs = cuda_graphs
        self.device = device
        self.max_tokens = max_tokens  # a bound on a micro-batch's tokens: sizes the graphs' static buffers
        self.graphs = None  # trainer.graphs.GraphedMicroBatches, made on first use (it needs pad_id)
        # The graphs add into the LoRA .grad tensors they were captured with: keep them.
        self.grads_set_to_none = not cuda_graphs

    def forward_backward(self, model, batch: FastBatch, n_targets: int, pad_id: int):
        """cuda_graphs: the micro-batch's forward and backward (scaled by 1 / n_targets) in one replay."""
        return self._graphs(model, pad_id).forward_backward(model, batch, n_targets)

    def prepare(self, model, batch: FastBatch, pad_id: int) -> None:
        """cuda_graphs: capture the graph of this micro-batch's shape without training on it."""
        self._graphs(model, pad_id).prepare(model, batch)

    def _graphs(self, model, pad_id: int):
        if self.graphs is None:
            from trainer.graphs import GraphedMicroBatches

            self.graphs = GraphedMicroBatches(model, pad_id, self.device, self.max_tokens, ce_chunk=self.ce_chunk)
        return self.graphs

    def collate(self, examples, pad_id: int) -> FastBatch:
        return collate_fast(examples, pad_id, packed=self.padding_free)

    def token_losses(self, model, batch: FastBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The plain token_losses' (ce, sel), from the switched path: same positions, same order."""
        if model.training:
            draw_dropout_masks(model, batch)
        if batch.doc_lens is not None:
            if flash_varlen_ok(model, batch.input_ids.device):  # one varlen flash call per layer
                _Pack.cu, _Pack.max_len, _Pack.lens = cu_seqlens(batch.doc_lens, batch.input_ids.device), \
                    max(batch.doc_lens), None
            else:  # per-document SDPA
                _Pack.cu, _Pack.lens = None, list(batch.doc_lens)
        else:
            _Pack.cu, _Pack.lens = None, None
        h = decoder_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
        head = model.get_output_embeddings()
        if self.chunked_ce and head.bias is None:
            ce = chunked_head_ce(model, h, batch.pred, batch.target, self.ce_chunk)
        else:  # the plain path's head: logits everywhere, the needed rows upcast
            logits = head(h)  # (rows, T, V)
            pred = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.pred).float()  # (N, V)
            ce = F.cross_entropy(pred, batch.target, reduction="none")
        return ce, dict(batch.sel)

    def end_step(self, model) -> None:
        """After an optimizer step's last backward: free the dropout masks and the pack."""
        release_dropout_masks(model)
        _Pack.lens, _Pack.cu = None, None


class _Switches:
    """A TrainConfig seen with the removed switches on (a test may still pass them explicitly)."""

    def __init__(self, t):
        self._t = t

    def __getattr__(self, name):
        return getattr(self._t, name, True)


def setup_fast_path(model, t, device, log=note, max_tokens: int = 0) -> FastPath | None:
    """Apply the switches of TrainConfig `t` to `model` (LoRA already injected); None if all are off.

    max_tokens (cuda_graphs): the most real tokens a micro-batch can hold, to size static buffers.
    """
    # padding_free, chunked_ce, fused_lora and fused_adamw stopped being config keys: always on.
    t = _Switches(t)
    if not any(getattr(t, name) for name in SPEED_SWITCHES):
        return None
    if t.cuda_graphs and (not (t.padding_free and t.chunked_ce) or t.gradient_checkpointing):
        raise ValueError("train.cuda_graphs needs train.padding_free and train.chunked_ce, "
                         "and no train.gradient_checkpointing")
    if t.cuda_graphs and torch.device(device).type != "cuda":
        log("train.cuda_graphs: no CUDA device; the graphs' padded micro-batches run eagerly (same maths)")
    if t.fused_lora:
        for _, m in lora_modules(model):
            m.fused = True
    if t.padding_free:
        use_packed_attention(model)
    if t.compile:
        if t.gradient_checkpointing:
            log("train.compile is skipped under train.gradient_checkpointing (set one of them to false)")
        else:
            compile_layers(model)
    if t.chunked_ce and getattr(model.get_output_embeddings(), "bias", None) is not None:
        log("train.chunked_ce: the LM head has a bias; using the unchunked head on the needed positions")
    return FastPath(padding_free=t.padding_free, chunked_ce=t.chunked_ce, cuda_graphs=t.cuda_graphs,
                    device=device, max_tokens=max_tokens)


def teardown_fast_path(model, attn_implementation: str = "sdpa") -> None:
    """Undo setup_fast_path on `model` (the benchmark reuses one base model across settings)."""
    for _, m in lora_modules(model):
        m.fused = False
        m._premask = None
    _Pack.cu = None
    if model.config._attn_implementation == PACKED_ATTENTION:
        model.config._attn_implementation = attn_implementation
    uncompile_layers(model)
    _Pack.lens = None


def adamw_options(fused: bool, device) -> dict:
    """AdamW keyword arguments: fused=True on CUDA; foreach on the CPU (with a note)."""
    if not fused:
        return {}
    if torch.device(device).type == "cuda":
        return {"fused": True}
    note("train.fused_adamw: the fused AdamW kernel is used on CUDA only; foreach AdamW on the CPU")
    return {"foreach": True}
