"""Packed micro-batches: a micro-batch's examples as one row, with the positions that need a loss.

    from trainer.pack import pack
    batch = pack(encoded_examples).to(device)   # PackedBatch
    batch.input_ids, batch.position_ids         # (1, S): documents back to back, positions restart at 0
    batch.doc_lens                              # [len(e) for e in examples]
    batch.pred, batch.target, batch.sel         # the N predictions a step needs (below)

No padding is computed: S is the sum of the examples' lengths. Attention keeps
to each document (trainer/attention.py), and predictions are taken at positions
0..len-2 of each document only, so a document's last token never predicts the
next document's first.

`pred[i]` is the position in the packed row whose logits predict token
`target[i]` (the logits at position t predict token t + 1); `sel[name][i]` is
1.0 where that target belongs to mask `name`: "loss" (the training mask) and
the logged spans (data.tokenize.span_names: "marker:<name>" per marker, "eos"),
computed whether or not they are in the loss. Positions come example by
example, then by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data.tokenize import span_masks, span_names


@dataclass
class PackedBatch:
    input_ids: torch.Tensor              # (1, S) long
    position_ids: torch.Tensor           # (1, S) long, restarting at 0 in each document
    doc_lens: list[int]                  # each document's length (sum = S)
    pred: torch.Tensor                   # (N,) long
    target: torch.Tensor                 # (N,) long
    sel: dict[str, torch.Tensor]         # name -> (N,) float32
    ids: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(self.doc_lens)

    def to(self, device) -> "PackedBatch":
        def mv(t):
            return t.to(device, non_blocking=True)

        return PackedBatch(mv(self.input_ids), mv(self.position_ids), self.doc_lens, mv(self.pred),
                           mv(self.target), {k: mv(v) for k, v in self.sel.items()}, self.ids)


def pack(examples) -> PackedBatch:
    """One packed row from data.tokenize.Encoded examples (input_ids, the loss mask and the span masks)."""
    pred, target, ids, pos = [], [], [], []
    names = ["loss", *span_names(examples)]
    sel = {k: [] for k in names}
    offset = 0
    for e in examples:
        n = len(e)
        spans = span_masks(e)
        masks = [e.loss_mask] + [spans.get(k) or [False] * n for k in names[1:]]
        for t in range(n - 1):  # position t predicts token t + 1 of the same document
            flags = [m[t + 1] for m in masks]
            if any(flags):
                pred.append(offset + t)
                target.append(e.input_ids[t + 1])
                for k, f in zip(names, flags):
                    sel[k].append(1.0 if f else 0.0)
        ids.extend(e.input_ids)
        pos.extend(range(n))
        offset += n
    return PackedBatch(input_ids=torch.tensor([ids], dtype=torch.long),
                       position_ids=torch.tensor([pos], dtype=torch.long),
                       doc_lens=[len(e) for e in examples],
                       pred=torch.tensor(pred, dtype=torch.long), target=torch.tensor(target, dtype=torch.long),
                       sel={k: torch.tensor(v, dtype=torch.float32) for k, v in sel.items()},
                       ids=[e.id for e in examples])
