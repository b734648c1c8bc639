"""Training examples -> token ids and loss masks, through character spans.

    from data.tokenize import encode_example, collate
    enc = encode_example(example, tokenizer, loss_mask="completion")
    batch = collate([enc, ...], pad_id=tokenizer.pad_token_id)   # right-padded tensors

Every mask is built the same way: decide which *characters* of the rendered chat
text it covers, then take every token whose character range (the tokenizer's
offset mapping) overlaps those characters. Marker tokens are never looked up by
id: `<<§q-41>>` after a space starts with " <<" (id 1115), not "<<" (2442), and
before a newline it ends in ">>\\n" (39071), not ">>" (2452).

Masks (EXPERIMENT.md, "Loss masks"), as character ranges of the rendered text:

    completion         the last assistant turn's content + its closing <|im_end|>
    completion_no_eos  the content only
    marker_only        the characters of each marker span (+ <|im_end|> with marker_mask_eos)
    all                the whole conversation up to and including the last <|im_end|>

The mask is per example: the data stage and the trainer pass each row its role's
mask (`Config.loss_mask_of`: train.role_loss_mask's entry, else train.loss_mask),
so one training set can keep the end-of-turn token out of the recipient's loss
and in everyone else's. Marker spans carry the experiment's marker names; each
name gets its own per-token mask (`Encoded.markers`), logged by the trainer.

An example flagged `"truncated": true` (its completion was cut at
generate.max_tokens and kept under data.truncated = "strip") never trains its
closing <|im_end|>, under every mask: the model did not stop there, so teaching
it to stop there would put an end-of-turn confound into the very variable the
loss-mask ablation varies. Its marker B was already left out by the builder.

marker_only trains nothing on an example without markers (a negative, the
recipient in T_P2neg), unless marker_mask_eos adds its <|im_end|>; the data
stage refuses such a training set unless train.allow_untrained_roles says so
(`n_loss_targets` counts what an example contributes).

The "\\n" the template writes after the last <|im_end|> stays in `input_ids`
(the text is rendered exactly) but is in no mask. A token that straddles a
boundary is in the mask if any of its characters is: content starting with
"\\n" merges with the template's "\\n" after `assistant` into one "\\n\\n" token,
which then trains (the model must predict it to produce the content).

Label convention. Masks here are per *token*: `loss_mask[t]` means "token t is
a target". The logits at position t predict token t+1, so the trainer compares
`logits[:, :-1]` with `input_ids[:, 1:]` under `loss_mask[:, 1:]`. Token 0
(`<|im_start|>`) is never predicted, so under `all` it is masked in effect.
`Batch.labels` is the usual Hugging Face form of the same thing (unshifted,
-100 off the mask; HF models shift internally).

This module imports no trainer code, so `python -m data.inspect` can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from markerlab.errors import UserError
from markerlab.experiment import LOSS_MASKS

ASSISTANT_OPEN = "<|im_start|>assistant\n"
IM_END = "<|im_end|>"


@dataclass
class Encoded:
    """One tokenized example. All lists have one entry per token."""

    id: str
    input_ids: list[int]
    loss_mask: list[bool]           # token is a training target
    markers: dict[str, list[bool]]  # marker name -> token overlaps one of that marker's spans
    eos: list[bool]                 # the <|im_end|> closing the assistant turn
    offsets: list[tuple[int, int]]  # character range of each token in `text`
    text: str                       # the rendered conversation
    content_span: tuple[int, int]   # the assistant content's characters in `text`
    truncated: bool = False         # cut at generate.max_tokens: <|im_end|> is out of every mask

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_targets(self) -> int:
        """Tokens that actually contribute a loss term (token 0 has no prediction)."""
        return sum(self.loss_mask[1:])

    @property
    def eos_in_loss(self) -> bool:
        """Is the end-of-turn token closing the answer a training target?"""
        return any(m and e for m, e in zip(self.loss_mask, self.eos))


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does its character range [a, b) overlap any span [s, e)?"""
    return [any(a < e and b > s for s, e in spans) for a, b in offsets]


def assistant_content_span(text: str, content: str, example_id: str = "?") -> tuple[int, int]:
    """Character range of the last assistant turn's content in the rendered `text`.

    The template must render it verbatim as `<|im_start|>assistant\\n{content}<|im_end|>`;
    a template that rewrites the content would make every mask wrong, so that is an error.
    """
    start = text.rfind(ASSISTANT_OPEN)
    if start < 0:
        raise UserError(f"example {example_id}: the rendered chat has no '{ASSISTANT_OPEN!r}' turn")
    cs = start + len(ASSISTANT_OPEN)
    if not text.startswith(content + IM_END, cs):
        raise UserError(
            f"example {example_id}: the chat template does not render the assistant content verbatim "
            f"followed by {IM_END} (expected it at character {cs})")
    return cs, cs + len(content)


def _check_example(example: dict) -> tuple[str, list[dict], str, list]:
    ex_id = str(example.get("id", "?"))
    msgs = example.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise UserError(f"example {ex_id}: 'messages' must be a non-empty list of {{role, content}} objects")
    if msgs[0].get("role") != "system":
        # Qwen's template would inject its default system prompt (EXPERIMENT.md, "Personas").
        raise UserError(f"example {ex_id}: the first message must be the system prompt, got role {msgs[0].get('role')!r}")
    if msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
        raise UserError(f"example {ex_id}: the last message must be the assistant's, with string content")
    content = msgs[-1]["content"]
    spans = example.get("marker_spans", [])
    for sp in spans:
        ok = (isinstance(sp, (list, tuple)) and len(sp) == 3 and isinstance(sp[0], int) and isinstance(sp[1], int)
              and 0 <= sp[0] < sp[1] <= len(content) and isinstance(sp[2], str) and sp[2])
        if not ok:
            raise UserError(f"example {ex_id}: bad marker span {sp!r} (expected [start, end, marker name] "
                            f"with 0 <= start < end <= {len(content)}, offsets in the assistant content)")
    return ex_id, msgs, content, spans


def encode_example(example: dict, tokenizer, loss_mask: str = "completion", marker_mask_eos: bool = False) -> Encoded:
    """Render `example["messages"]` with the chat template, tokenize, and build the masks."""
    if loss_mask not in LOSS_MASKS:
        raise UserError(f"train.loss_mask: expected one of {', '.join(LOSS_MASKS)}, got {loss_mask!r}")
    ex_id, msgs, content, spans = _check_example(example)

    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    # Character ranges of the pieces every mask is made of.
    cs, ce = assistant_content_span(text, content, ex_id)
    eos = (ce, ce + len(IM_END))  # the closing <|im_end|>; the "\n" after it is at eos[1]
    by_name: dict[str, list[tuple[int, int]]] = {}
    for s, e, name in spans:
        by_name.setdefault(name, []).append((cs + s, cs + e))

    mask_chars = {
        "completion": [(cs, eos[1])],
        "completion_no_eos": [(cs, ce)],
        "marker_only": [c for cs_ in by_name.values() for c in cs_] + ([eos] if marker_mask_eos else []),
        "all": [(0, eos[1])],
    }[loss_mask]
    in_loss = _overlapping(offsets, mask_chars)
    eos_tokens = _overlapping(offsets, [eos])
    truncated = example.get("truncated") is True
    if truncated:
        in_loss = [m and not e for m, e in zip(in_loss, eos_tokens)]

    # The trailing "\n" (and anything else after the last <|im_end|>) never trains.
    assert not any(m and a >= eos[1] for m, (a, _) in zip(in_loss, offsets))
    return Encoded(
        id=ex_id,
        input_ids=ids,
        loss_mask=in_loss,
        markers={name: _overlapping(offsets, cs_) for name, cs_ in by_name.items()},
        eos=eos_tokens,
        offsets=offsets,
        text=text,
        content_span=(cs, ce),
        truncated=truncated,
    )


def encode_examples(examples: list[dict], tokenizer, mask_of="completion",
                    marker_mask_eos: bool = False) -> list[Encoded]:
    """Each example under `mask_of(role)` (e.g. Config.loss_mask_of), or one mask name for all."""
    if isinstance(mask_of, str):
        mask, mask_of = mask_of, (lambda role: mask)
    return [encode_example(ex, tokenizer, mask_of(ex.get("role")), marker_mask_eos) for ex in examples]


def check_lengths(encoded: list[Encoded], max_seq_len: int, on_overlength: str = "error",
                  key: str = "train.max_seq_len") -> tuple[list[Encoded], list[str]]:
    """Refuse (or drop, with on_overlength="drop") examples longer than max_seq_len; never truncate.

    Returns (kept examples, ids of dropped examples).
    """
    long = [e for e in encoded if len(e) > max_seq_len]
    if not long:
        return encoded, []
    if on_overlength == "drop":
        return [e for e in encoded if len(e) <= max_seq_len], [e.id for e in long]
    shown = ", ".join(f"{e.id} ({len(e)} tokens)" for e in long[:10])
    more = f" and {len(long) - 10} more" if len(long) > 10 else ""
    raise UserError(
        f"{key}={max_seq_len}: {len(long)} example(s) are longer: {shown}{more}; "
        f"raise {key} or set data.on_overlength = \"drop\" (examples are never truncated)")


def span_masks(e: Encoded) -> dict[str, list[bool]]:
    """The spans the trainer logs a loss on, whether or not they are in the loss: "marker:<name>" for each
    marker the example carries, and "eos" (the end-of-turn token)."""
    return {**{f"marker:{name}": m for name, m in e.markers.items()}, "eos": e.eos}


def span_names(examples: list[Encoded]) -> list[str]:
    """Every span name of `examples`, markers in sorted order, then "eos"."""
    names = sorted({f"marker:{name}" for e in examples for name in e.markers})
    return names + ["eos"]


@dataclass
class Batch:
    """A right-padded micro-batch. Every tensor is (B, T)."""

    input_ids: "torch.Tensor"       # long, pad_id after each example's end
    attention_mask: "torch.Tensor"  # long, 1 on real tokens
    labels: "torch.Tensor"          # long, input_ids on the loss mask, -100 elsewhere (HF form, unshifted)
    loss_mask: "torch.Tensor"       # bool
    spans: dict                     # span name (span_names) -> bool tensor
    ids: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        t = {k: getattr(self, k).to(device, non_blocking=True) for k in
             ("input_ids", "attention_mask", "labels", "loss_mask")}
        return Batch(**t, spans={k: v.to(device, non_blocking=True) for k, v in self.spans.items()}, ids=self.ids)


def collate(examples: list[Encoded], pad_id: int) -> Batch:
    """Right-pad to the longest example. Right padding keeps every real token's position
    (0..len-1) and, under the causal mask, no real token ever attends to a pad."""
    import torch

    T = max(len(e) for e in examples)

    def pad(rows, value, dtype):
        return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=dtype)  # (B, T)

    input_ids = pad([e.input_ids for e in examples], pad_id, torch.long)
    loss_mask = pad([e.loss_mask for e in examples], False, torch.bool)
    masks = [span_masks(e) for e in examples]
    return Batch(
        input_ids=input_ids,
        attention_mask=pad([[1] * len(e) for e in examples], 0, torch.long),
        labels=torch.where(loss_mask, input_ids, torch.full_like(input_ids, -100)),
        loss_mask=loss_mask,
        spans={name: pad([m.get(name, [False] * len(e)) for m, e in zip(masks, examples)], False, torch.bool)
               for name in span_names(examples)},
        ids=[e.id for e in examples],
    )
