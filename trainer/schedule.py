"""Step counts, the learning-rate schedule and the data order, in closed form.

Steps. An optimizer step takes `micro_batch_size * grad_accum` examples
("step size"). Each epoch is one fresh permutation of the examples cut into
ceil(n / step_size) steps; the epoch's last step takes whatever remains (fewer
micro-batches, the last one possibly short). No example is dropped, repeated,
or borrowed from the next epoch, and since a step's loss is a mean over its
masked tokens, a short step has the same scale, only more noise.

    total_steps = epochs * ceil(n / step_size), capped by max_steps when > 0

(1,200 examples, 16 per step, 3 epochs: 225 steps.) The schedule is defined on
the capped total, so a max_steps run still decays to the end.

Learning rate at optimizer step s (0-based), Hugging Face's
get_cosine_schedule_with_warmup convention (what the source's HF/TRL run used),
with an optional floor `min_lr_ratio` as in its cosine_with_min_lr variant:

    warmup = ceil(warmup_ratio * total)
    s <  warmup:  lr * s / warmup                                  (step 0 is lr 0)
    s >= warmup:  lr * (r + (1 - r) * 0.5 * (1 + cos(pi * p))),   p = (s - warmup) / (total - warmup)

so the peak lr is reached at s = warmup and the last step s = total - 1 is
just above the floor (p < 1).
"""

from __future__ import annotations

import math


def steps_per_epoch(n_examples: int, micro_batch_size: int, grad_accum: int) -> int:
    return math.ceil(n_examples / (micro_batch_size * grad_accum))


def total_steps(n_examples: int, micro_batch_size: int, grad_accum: int, epochs: int, max_steps: int = 0) -> int:
    total = epochs * steps_per_epoch(n_examples, micro_batch_size, grad_accum)
    return min(total, max_steps) if max_steps > 0 else total


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total)


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of 0-based optimizer step `step` (module docstring)."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def step_slice(step: int, n_examples: int, step_size: int) -> tuple[int, int, int]:
    """(epoch, start, end): optimizer step `step` takes perm_epoch[start:end]."""
    spe = math.ceil(n_examples / step_size)
    epoch, j = divmod(step, spe)
    return epoch, j * step_size, min((j + 1) * step_size, n_examples)
