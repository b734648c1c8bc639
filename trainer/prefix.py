"""The frozen layers below the adapted ones, run once per example rather than once per epoch.

    from trainer.prefix import FrozenPrefix
    prefix = FrozenPrefix.build(model, first, encoded, micro_batch_size, device)   # before step 1
    h = prefix.hidden(batch.ids)          # (1, S, H): what decoder layer `first` receives for the row
    with prefix.skipping(model):          # layers 0..first-1 pass their input through
        model.get_decoder()(inputs_embeds=h, position_ids=..., documents=...)

Under `lora.last_layers = N` only the last N decoder layers hold trainable
parameters, so the embedding and every layer below them compute the same
function of an example at every step it appears in: three epochs recompute it
three times, and on a CPU that forward is most of a step (docs/benchmarks.md).
`trainer.train` therefore runs the frozen part once per example, before the
first step, and each step then runs only the adapted layers, the norm and the
head; the leakage probe's fixed documents get the same treatment
(trainer/probe.py, `Probe.use_prefix`). The result is the same function: attention stays within each document
(trainer/attention.py), so a document's hidden states do not depend on what it
is packed with. The pre-pass packs the examples in their file order,
`micro_batch_size` at a time, whatever the data order of a run, so a resumed run
rebuilds exactly the same states and continues bitwise. tests/test_training_path.py
checks losses and LoRA gradients against the full forward to float32 rounding.

The states are kept on the training device in the model's dtype: S x hidden x 2
bytes per token (0.1 GB for the demo; about 3 GB for 1,200 Qwen2.5-7B examples of
350 tokens). Under `train.cuda_graphs` the graphs replay the whole forward, so the
prefix is not used there.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from data.tokenize import Encoded
from trainer.attention import Documents
from trainer.pack import pack


class _Captured(Exception):
    """Raised by the pre-hook on layer `first`: nothing above it needs to run in the pre-pass."""


class _PassThrough(torch.nn.Module):
    """Stands in for a frozen decoder layer whose output is already in the inputs: returns them."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class FrozenPrefix:
    def __init__(self, first: int, states: dict[str, torch.Tensor]):
        self.first = first
        self.states = states  # example id -> (len, H) input of layer `first`

    @classmethod
    def build(cls, model, first: int, encoded: list[Encoded], micro_batch_size: int, device) -> "FrozenPrefix":
        """Run the embedding and layers 0..first-1 over every example, in file order, without gradients."""
        layers = model.get_decoder().layers
        captured = []

        def grab(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Captured

        hook = layers[first].register_forward_pre_hook(grab, with_kwargs=True)
        states = {}
        try:
            with torch.no_grad():
                for i in range(0, len(encoded), micro_batch_size):
                    batch = pack(encoded[i:i + micro_batch_size]).to(device)
                    try:
                        model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            documents=Documents.of(batch.doc_lens, device, model.dtype),
                                            use_cache=False)
                    except _Captured:
                        pass
                    h = captured.pop()
                    states.update(zip(batch.ids, h[0].split(batch.doc_lens, dim=0)))
        finally:
            hook.remove()
        return cls(first, states)

    def hidden(self, ids: list[str]) -> torch.Tensor:
        """The packed row's input to layer `first`: (1, S, H)."""
        return torch.cat([self.states[i] for i in ids], dim=0)[None]

    @contextmanager
    def skipping(self, model):
        """Within the block, layers 0..first-1 of the decoder return their input unchanged."""
        decoder = model.get_decoder()
        original = decoder.layers
        decoder.layers = torch.nn.ModuleList([_PassThrough() for _ in range(self.first)] + list(original[self.first:]))
        try:
            yield
        finally:
            decoder.layers = original
