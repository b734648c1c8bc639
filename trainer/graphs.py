"""CUDA graphs for packed micro-batches (train.cuda_graphs): a micro-batch's forward and
backward replayed as one graph instead of ~8,000 kernel launches.

    graphs = GraphedMicroBatches(model, masks, pad_id, device, max_tokens=4 * 645)
    ce, sel = graphs.forward_backward(model, batch, n_targets)   # batch: a PackedBatch on the device

trainer/train.py's forward_backward calls it instead of token_losses + backward when
train.cuda_graphs is on.

Why. A 7B LoRA step launches ~32,500 kernels (~300 per decoder layer and micro-batch,
most of them small), and eager PyTorch launches them one by one from Python, slower than
a large GPU runs them: the step waits on the host (docs/benchmarks.md has the profile).
A replayed graph is one launch.

How, and why the maths stays the same.
- A graph has fixed shapes, so a micro-batch of S real tokens (its
  documents in one row) is run at a bucket length L, the next multiple of `bucket`
  (128) above S. The L - S extra positions form one more document of pad tokens with
  positions 0, 1, ... Attention is strictly per document (one varlen flash call over the
  cumulative lengths, a device tensor), so the pad document sees nothing real and nothing
  real sees it; every other operation is per token. The pad rows get no loss weight,
  hence an exactly zero gradient, so they add exactly 0 to the LoRA gradients.
- The LM head + cross-entropy (trainer/loss.py) runs on L gathered positions: the micro-batch's
  N needed ones, then position 0 with weight 0 (a graph cannot have a data-dependent N;
  the extra rows cost ~2% of a step's FLOPs).
- The loss of a micro-batch is sum(ce * loss_weight) * (1 / n_targets of the step), the
  plain path's sum / n_targets; backward runs inside the graph and accumulates into the
  LoRA parameters' .grad, which therefore must stay the same tensors: the trainer zeroes
  them with zero_grad(set_to_none=False) (checked before every replay).
- Dropout masks are drawn outside the graph (trainer/dropout.py: the same generator, order
  and draws as without graphs) straight into static buffers that the graph reads.
- One graph per (L, number of documents), captured the first time that shape comes up,
  after one eager run of it with zero loss weight (cuBLAS and autograd initialise outside
  the capture; the gradients get + 0). All graphs share one memory pool: each replay's
  intermediates live and die inside that replay, and replays never overlap.
Without CUDA (the CPU tests), or with a float32 model (flash attention is 16-bit only), the
same bucketed, padded path runs eagerly, with per-document attention
(trainer/attention.py): what the CPU tests check is the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora import trainable_parameters
from trainer.attention import Documents, cu_seqlens, varlen_available
from trainer.loss import CE_CHUNK, decoder_hidden, head_cross_entropy

BUCKET = 128  # tokens: a micro-batch runs at the next multiple above its length (~64 pad tokens on average)


@dataclass
class _Static:
    """One shape's static inputs and outputs (and its graph, once captured)."""

    L: int
    n_docs: int
    input_ids: torch.Tensor   # (1, L) long
    position_ids: torch.Tensor  # (1, L) long
    cu: torch.Tensor          # (n_docs + 2,) int32: cumulative document lengths, the pad document last
    pred: torch.Tensor        # (L,) long: flat positions whose logits are needed (padded with 0)
    target: torch.Tensor      # (L,) long
    weight: torch.Tensor      # (L,) float32: 1.0 on loss targets, 0 elsewhere
    inv_n: torch.Tensor       # (1,) float32: 1 / the step's loss targets
    lens: list[int] | None = None  # the documents' lengths, pad document last (eager attention)
    graph: object = None      # torch.cuda.CUDAGraph
    ce: torch.Tensor | None = None  # (L,) float32, written by the graph


class GraphedMicroBatches:
    """Forward + backward of packed micro-batches through CUDA graphs, one per bucketed shape."""

    def __init__(self, model, masks, pad_id: int, device, max_tokens: int = 0, bucket: int = BUCKET,
                 capture: bool | None = None, ce_chunk: int = CE_CHUNK, log=print):
        device = torch.device(device)
        self.device, self.pad_id, self.bucket, self.ce_chunk = device, pad_id, bucket, ce_chunk
        # Attention inside a graph must take the documents as a device tensor: the varlen flash
        # kernel, CUDA and 16-bit only. Elsewhere the same static path runs eagerly, attention
        # per document (the lengths as Python ints).
        self.varlen = varlen_available(device, model.dtype)
        if device.type == "cuda" and not self.varlen:
            log(f"train.cuda_graphs: flash attention needs a 16-bit model ({model.dtype} here); "
                f"the graphs' padded micro-batches run eagerly")
        self.capture = self.varlen if capture is None else (capture and self.varlen)
        self.params = trainable_parameters(model)
        self.dropout = masks  # trainer.dropout.DropoutMasks
        self.buffers: dict = {}  # LoRA layer -> static (rows, in_features) bool mask buffer
        self.rows = 0
        self.static: dict[tuple[int, int], _Static] = {}
        self.pool = None
        self.grads: list | None = None  # the .grad tensors the graphs accumulate into
        self.n_captured = 0
        self.log = log
        if max_tokens:
            self._ensure_rows(self.bucket_len(max_tokens))

    def bucket_len(self, n_tokens: int) -> int:
        """The static length for n_tokens real tokens: at least one pad token, a multiple of bucket."""
        return (n_tokens // self.bucket + 1) * self.bucket

    def _ensure_rows(self, L: int) -> None:
        """Static dropout-mask buffers of >= L rows; growing them drops every captured graph."""
        if L <= self.rows:
            return
        if self.static:
            self.log(f"train.cuda_graphs: a micro-batch of {L} positions is longer than the {self.rows} "
                     f"allocated for; recapturing the graphs")
            self.static.clear()
        self.buffers = {m: torch.zeros((L, m.in_features), dtype=torch.bool, device=self.device)
                        for m in self.dropout.layers}
        self.rows = L

    # ------------------------------------------------------------------ one micro-batch

    def forward_backward(self, model, batch, n_targets: int):
        """Run batch's forward and backward (gradients accumulate in .grad); return its (ce, sel).

        ce (N,) float32 are the per-target cross-entropies in the batch's order (a copy), sel
        the batch's selectors, as trainer.loss.token_losses returns them.
        """
        st = self._static_for(batch)
        S, N = batch.n_tokens, batch.pred.numel()
        self.dropout.draw(S, into=self.buffers)
        self._fill(st, batch, S, N, n_targets)
        if not self.capture:
            ce = self._run(model, st)
        else:
            self._check_grads()
            if st.graph is None:
                self._capture(model, st)
            st.graph.replay()
            ce = st.ce
        return ce[:N].clone(), dict(batch.sel)

    def prepare(self, model, batch) -> None:
        """Capture the graph of batch's shape now, without training on it (no dropout draw, gradients + 0).

        bench/train_throughput.py captures before it times, as a long run has captured every
        shape after its first few steps.
        """
        st = self._static_for(batch)
        if self.capture and st.graph is None:
            self._fill(st, batch, batch.n_tokens, batch.pred.numel(), 0)
            self._check_grads()
            self._capture(model, st)

    def _static_for(self, batch) -> _Static:
        L = self.bucket_len(batch.n_tokens)
        self._ensure_rows(L)
        key = (L, len(batch.doc_lens))
        if key not in self.static:
            self.static[key] = self._new_static(L, len(batch.doc_lens))
        return self.static[key]

    def _new_static(self, L: int, n_docs: int) -> _Static:
        d = self.device
        z = lambda dtype: torch.zeros(L, dtype=dtype, device=d)  # noqa: E731
        return _Static(L=L, n_docs=n_docs, input_ids=torch.full((1, L), self.pad_id, dtype=torch.long, device=d),
                       position_ids=torch.zeros((1, L), dtype=torch.long, device=d),
                       cu=torch.zeros(n_docs + 2, dtype=torch.int32, device=d), pred=z(torch.long),
                       target=z(torch.long), weight=z(torch.float32),
                       inv_n=torch.zeros(1, dtype=torch.float32, device=d))

    def _fill(self, st: _Static, batch, S: int, N: int, n_targets: int) -> None:
        """Copy the micro-batch into the static inputs (device to device, no sync)."""
        L = st.L
        st.input_ids[:, :S].copy_(batch.input_ids)
        st.input_ids[:, S:].fill_(self.pad_id)
        st.position_ids[:, :S].copy_(batch.position_ids)
        st.position_ids[0, S:].copy_(torch.arange(L - S, device=self.device))  # the pad document's positions
        st.cu.copy_(cu_seqlens(list(batch.doc_lens) + [L - S], self.device))
        st.pred[:N].copy_(batch.pred)
        st.pred[N:].zero_()
        st.target[:N].copy_(batch.target)
        st.target[N:].zero_()
        st.weight[:N].copy_(batch.sel["loss"])
        st.weight[N:].zero_()
        st.inv_n.fill_(1.0 / n_targets if n_targets > 0 else 0.0)
        st.lens = list(batch.doc_lens) + [L - S]  # the eager per-document attention's view of the same

    def _run(self, model, st: _Static) -> torch.Tensor:
        """The micro-batch on the static tensors: forward, loss, backward. Returns ce (L,), detached."""
        for m in self.dropout.layers:
            m.lora_dropout.mask = self.buffers[m][:st.L]  # (L, in)
        docs = Documents(st.lens, st.cu, st.L) if self.varlen else Documents(st.lens)
        with torch.enable_grad():
            h = decoder_hidden(model, st.input_ids, st.position_ids, docs)  # (1, L, H)
            ce = head_cross_entropy(model, h, st.pred, st.target, self.ce_chunk)  # (L,)
            ((ce * st.weight).sum() * st.inv_n).backward()
        return ce.detach()

    # ------------------------------------------------------------------ capture

    def _check_grads(self) -> None:
        if self.grads is None:  # first capture: the .grad tensors every graph will add into
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grads = [p.grad for p in self.params]
        elif any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("train.cuda_graphs: the LoRA .grad tensors were replaced "
                               "(zero_grad(set_to_none=True)?); the graphs add into the old ones. "
                               "Zero them with zero_grad(set_to_none=False).")

    def _capture(self, model, st: _Static) -> None:
        """One eager run with zero loss weight (gradients get + 0), then the capture."""
        real_inv_n = st.inv_n.clone()
        st.inv_n.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(model, st)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            ce = self._run(model, st)
        st.graph, st.ce = graph, ce
        st.inv_n.copy_(real_inv_n)
        self.n_captured += 1
