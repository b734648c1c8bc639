"""LoRA dropout whose masks the trainer draws from its own seeded generator, before each forward.

    from trainer.dropout import DropoutMasks
    masks = DropoutMasks(model, torch.Generator(device).manual_seed(seed))   # after inject_lora
    masks.draw(batch.n_tokens)          # before a packed micro-batch's forward
    ...forward, backward...
    masks.clear()                       # after the step

Drawing ahead of the forward, rather than inside it, is what makes the masks a
function of the seed and the step alone: an activation-checkpoint recompute
reuses them as they are (torch.utils.checkpoint restores only the global RNGs),
a CUDA graph reads them from static buffers it was captured with (`into`), and a
resumed run restores the generator's state from the checkpoint. One mask per LoRA
layer with dropout, shape (tokens, in_features), drawn in module order (the
order the forward calls the layers in), so the generator's state after a step
does not depend on how the step was computed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lora import lora_modules


class PreparedDropout(nn.Module):
    """Inverted dropout, x * mask / (1 - p), with the keep-mask set beforehand by DropoutMasks."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.mask: torch.Tensor | None = None  # (tokens, in_features) bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.mask is None:
            raise RuntimeError("LoRA dropout: no mask was drawn for this forward (DropoutMasks.draw)")
        return x.mul(self.mask.view(x.shape)).mul_(1.0 / (1.0 - self.p))


class DropoutMasks:
    """The dropout masks of every LoRA layer of `model`, drawn from `generator` (on the model's device)."""

    def __init__(self, model: nn.Module, generator: torch.Generator):
        self.generator = generator
        self.layers = []
        for _, m in lora_modules(model):
            if m.dropout > 0.0:
                m.lora_dropout = PreparedDropout(m.dropout)
                self.layers.append(m)

    def draw(self, n_tokens: int, into: dict | None = None) -> None:
        """This micro-batch's masks: new tensors, or (CUDA graphs) the first rows of static buffers `into[layer]`."""
        for m in self.layers:
            if into is None:
                mask = torch.empty((n_tokens, m.in_features), dtype=torch.bool, device=m.A.device)
                m.lora_dropout.mask = mask
            else:
                mask = into[m][:n_tokens]
            mask.bernoulli_(1.0 - m.dropout, generator=self.generator)

    def clear(self) -> None:
        for m in self.layers:
            m.lora_dropout.mask = None
