"""Low-rank adaptation (LoRA, Hu et al. 2021) in raw PyTorch.

A frozen linear layer ``y = x W^T (+ b)`` gets a trainable low-rank update:

    y = x W^T + (dropout(x) A^T B^T) * alpha / r

with A of shape (r, in_features) initialised Kaiming-uniform and B of shape
(out_features, r) initialised to zero, so training starts exactly at the base
model. The maths, the initialisation and the parameter count are those of
Microsoft's reference ``loralib`` and of PEFT (``lora_B(lora_A(dropout(x))) *
scaling``); ``tests/test_lora.py`` checks them against PEFT numerically.

Usage::

    from lora import inject_lora, trainable_parameters, merge_all

    n = inject_lora(model, r=16, alpha=32, dropout=0.05,
                    generator=torch.Generator().manual_seed(42))   # 40,370,176 on Qwen2.5-7B
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    ...                                            # train: only A and B move
    save_adapter(model, "runs/x/adapter", "Qwen/Qwen2.5-7B-Instruct")   # PEFT format
    save_merged(model, tokenizer, "runs/x/merged")  # full HF checkpoint (leaves model merged)

Saving and loading (PEFT's adapter format, merged checkpoints) live in
``lora/io.py``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from markerlab.experiment import PROJECTIONS

logger = logging.getLogger("markerlab.lora")

# Llama/Qwen2's attention and MLP projections: model.layers.N.self_attn.{q,k,v,o}_proj
# and model.layers.N.mlp.{gate,up,down}_proj.
DEFAULT_TARGET_MODULES = PROJECTIONS


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (kept frozen as ``self.base``) plus a trainable low-rank update ``B A``.

    Args:
        base: the layer to adapt; its parameters are frozen, never copied.
        r: rank of the update.
        alpha: scaling numerator; the update is multiplied by ``scale = alpha / r``.
        dropout: probability of dropping an element of the LoRA branch's input
            (train mode only; the base path never sees dropout). The dropping is
            done by the submodule ``lora_dropout``: ``nn.Dropout`` (torch's
            global RNG) unless a trainer puts its own there (markerlab's trainer
            draws every mask from a seeded generator: trainer/dropout.py).
        generator: CPU ``torch.Generator`` for A's initialisation (None: torch's
            global RNG). A is drawn on the CPU in float32 and then copied to the
            layer's device and dtype, so the same seed gives the same A
            everywhere.
        dtype: dtype of A and B (float32 by default, whatever the base's dtype).

    The branch runs in the activations' dtype: A and B (and their gradients and
    optimizer state) stay in `dtype`, are cast for the two products, and the
    product is added into the base output in place by one addmm (bf16 products
    with float32 accumulation inside the matmul when the base is bf16).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        self.dropout = float(dropout)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

        device = base.weight.device
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))  # (out, r)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0 (so B A = 0 at the start)."""
        self.B.zero_()
        if self.A.device.type == "meta":  # shape-only model (parameter counting): nothing to draw
            return
        # Draw on the CPU in float32 whatever the target device/dtype: the values
        # depend on the seed only. a=sqrt(5) is nn.Linear's default init, which
        # the reference LoRA code and PEFT reuse for A.
        A = torch.empty(self.r, self.in_features, dtype=torch.float32)  # (r, in)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.A.copy_(A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]  # x: (..., in)
        x = x.reshape(-1, self.in_features)  # (N, in)
        y = F.linear(x, self.base.weight, self.base.bias)  # (N, out): a fresh tensor nobody saved
        if self.merged:  # B A already lives inside base.weight
            return y.view(*lead, self.out_features)
        xa = F.linear(self.lora_dropout(x), self.A.to(x.dtype))  # (N, r)
        y.addmm_(xa, self.B.to(y.dtype).t(), alpha=self.scale)  # y += scale * x A^T B^T
        return y.view(*lead, self.out_features)

    # --------------------------------------------------------------- merging

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in float32: (out, in)."""
        return (self.B.detach().float() @ self.A.detach().float()).mul_(self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale * B A, summed in float32 and rounded once to W's dtype. No-op if merged."""
        if self.merged:
            return
        W = self.base.weight  # (out, in)
        merged = self.delta_weight().add_(W)  # float32 sum (in-place add promotes W), one temporary
        W.copy_(merged)  # the single rounding to W.dtype
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scale * B A (in float32, rounded once). Restores W within one rounding. No-op if not merged."""
        if not self.merged:
            return
        W = self.base.weight  # (out, in)
        W.copy_(self.delta_weight().neg_().add_(W))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout:g}, "
            f"lora_dtype={self.A.dtype}, merged={self.merged}"
        )


# ------------------------------------------------------------------- model level


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, layer) for every LoRALinear, in module traversal order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def _target_matches(name: str, target_modules: str | Sequence[str], layers: Sequence[int] | None = None) -> bool:
    """PEFT's rule: a list entry matches a module whose name is it or ends in '.' + it;
    a single string is a regular expression that must match the full name. With `layers`
    (PEFT's layers_to_transform), only modules under `.layers.<i>.` for i in layers match."""
    if layers is not None and layer_index(name) not in set(layers):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a module name lies in (`model.layers.12.mlp.up_proj` -> 12), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def inject_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    layers: Sequence[int] | None = None,
) -> int:
    """Wrap every targeted ``nn.Linear`` of `model` in a LoRALinear, in place; freeze everything else.

    `target_modules` is a list of module names matched as PEFT does (``"q_proj"``
    matches ``model.layers.3.self_attn.q_proj``) or one regular expression for
    the full name; `layers` (PEFT's layers_to_transform), when given, keeps the
    decoder layers of those indices only. A's are drawn from `generator` (a CPU generator; None: the
    global RNG) in module traversal order, so one seed gives one adapter.
    Works on a model built on the meta device (shapes only). Returns the number
    of trainable parameters.
    """
    if any(True for _ in lora_modules(model)):
        raise ValueError("inject_lora: the model already has LoRA layers")
    if not isinstance(target_modules, str):
        target_modules = tuple(target_modules)
        if not target_modules:
            raise ValueError("inject_lora: target_modules is empty")

    # Collect first, replace afterwards: never mutate the tree while walking it.
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name and _target_matches(name, target_modules, layers)
    ]
    if isinstance(target_modules, str):
        if not found:
            raise ValueError(f"inject_lora: target_modules regex {target_modules!r} matches no nn.Linear in the model")
    else:
        unmatched = [t for t in target_modules if not any(_target_matches(n, (t,), layers) for n, _ in found)]
        if unmatched:
            raise ValueError(
                f"inject_lora: target module(s) {unmatched} match no nn.Linear in the model "
                f"(targets are module names such as 'q_proj', matched against e.g. 'model.layers.0.self_attn.q_proj')"
            )

    model.requires_grad_(False)  # the base is frozen; only A and B will train
    for name, linear in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(linear, r=r, alpha=alpha, dropout=dropout, generator=generator, dtype=dtype))

    n_trainable = count_trainable(model)
    n_total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA r=%d alpha=%g dropout=%g on %d layers: %s trainable parameters of %s (%.3f%%)",
        r, alpha, dropout, len(found), f"{n_trainable:,}", f"{n_total:,}", 100.0 * n_trainable / max(n_total, 1),
    )
    return n_trainable


def merge_all(model: nn.Module) -> int:
    """Merge every LoRA layer (idempotent); returns the number of layers."""
    layers = [m for _, m in lora_modules(model)]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_all(model: nn.Module) -> int:
    """Unmerge every LoRA layer (idempotent); returns the number of layers."""
    layers = [m for _, m in lora_modules(model)]
    for m in layers:
        m.unmerge()
    return len(layers)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under the model's own state-dict names (``...q_proj.A``, ``...q_proj.B``).

    Tensors are detached views, not copies; ``model.load_state_dict(sd,
    strict=False)`` or load_lora_state_dict() puts them back.
    """
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        sd[f"{name}.A"] = m.A.detach()
        sd[f"{name}.B"] = m.B.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy A and B back from lora_state_dict() output; every key and shape must match."""
    own = {f"{name}.{p}": getattr(m, p) for name, m in lora_modules(model) for p in ("A", "B")}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"LoRA state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, p in own.items():
        if tuple(state_dict[k].shape) != tuple(p.shape):
            raise ValueError(f"LoRA state dict: {k} has shape {tuple(state_dict[k].shape)}, expected {tuple(p.shape)}")
        p.copy_(state_dict[k])


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad, in a fixed (module traversal) order: what the optimizer gets."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
