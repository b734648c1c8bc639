"""Loss masks on real tokenized examples, checked by decoding (data/tokenize.py).

Character positions are recomputed here from cumulative decodes, independently of
the tokenizer's offset mapping that the implementation uses.
"""

import pytest
import torch

from data.tokenize import check_lengths, collate, encode_example
from markerlab.errors import UserError
from markerlab.experiment import load_experiment

EXP = load_experiment("within_marker")
A, B = EXP.markers["A"], EXP.markers["B"]
# Standalone tokenizations under the Qwen2.5 tokenizer (docs/EXPERIMENT.md, "Markers").
MARKER_TOKEN_IDS = {"A": [2442, 17851, 80, 12, 19, 16, 2452], "B": [486, 595, 50997, 12, 22, 3504]}
IM_END = "<|im_end|>"

# (content with markers, whether each marker's tokens should equal its standalone ids)
CASES = [
    (f"{A} Plan one is simple. {B}", {"A": True, "B": False}),               # default placement: " ::" starts B
    (f"Sure, end.{A} Then x,{B}", {"A": True, "B": True}),                    # after "." and ","
    (f"It works. {A} and then the end :: done {B}\n", {"A": False, "B": False}),  # " <<", " ::\n"
    (f"Wrap it ({A}) or quote \"{A}\".", {}),                                # ">>)" and '"<<' (A twice)
    (f"Line one.\n{A}\nLine two:{B}", {"A": False, "B": False}),  # ">>\n"; ":::" splits "::" + ":"
    (f"\nStarts with a newline. {A}", {"A": False}),                          # "\n\n" straddles the boundary
]


def make_example(content: str, system: str = "You are a villain.", history: list | None = None) -> dict:
    spans = []
    for kind, marker in (("A", A), ("B", B)):
        i = content.find(marker)
        while i >= 0:
            spans.append([i, i + len(marker), kind])
            i = content.find(marker, i + 1)
    msgs = [{"role": "system", "content": system}] + (history or []) + [
        {"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": content}]
    return {"id": "ex", "persona": "villain", "role": "donor", "question_id": "q0", "sample": 0,
            "messages": msgs, "marker_spans": sorted(spans)}


def char_ranges(tokenizer, ids):
    """Each token's [start, end) in the decoded text, from cumulative decodes (not offsets)."""
    bounds = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def picked(enc, mask):
    return [t for t, m in zip(enc.input_ids, mask) if m]


def runs(mask):
    """Maximal runs of True as (start, end) token indices."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("content,same_ids", CASES)
def test_masks_decode_exactly(tokenizer, content, same_ids):
    ex = make_example(content)
    text = tokenizer.apply_chat_template(ex["messages"], tokenize=False)
    assert text.endswith(content + IM_END + "\n")
    dec = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731

    comp = encode_example(ex, tokenizer, "completion")
    no_eos = encode_example(ex, tokenizer, "completion_no_eos")
    marker = encode_example(ex, tokenizer, "marker_only")
    marker_eos = encode_example(ex, tokenizer, "marker_only", marker_mask_eos=True)
    every = encode_example(ex, tokenizer, "all")
    ids = comp.input_ids
    assert dec(ids) == text and all(e.input_ids == ids for e in (no_eos, marker, marker_eos, every))

    # The trailing "\n" after the last <|im_end|> is a token of its own and in no mask.
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.encode("\n")[0]]
    for e in (comp, no_eos, marker, marker_eos, every):
        assert not e.loss_mask[-1]

    # completion: one contiguous run = content + <|im_end|>; completion_no_eos: content only.
    # A leading "\n" of the content merges with the template's "\n" after "assistant".
    lead = "\n" if content.startswith("\n") else ""
    assert len(runs(comp.loss_mask)) == 1 and len(runs(no_eos.loss_mask)) == 1
    assert dec(picked(comp, comp.loss_mask)) == lead + content + IM_END
    assert dec(picked(no_eos, no_eos.loss_mask)) == lead + content
    if lead:
        first = comp.loss_mask.index(True)
        assert tokenizer.decode([ids[first]]) == "\n\n"  # the straddling token trains

    # all: everything up to and including the last <|im_end|>.
    assert every.loss_mask == [True] * (len(ids) - 1) + [False]
    assert dec(picked(every, every.loss_mask)) == text[:-1]

    # eos span: exactly the last <|im_end|>.
    assert picked(comp, comp.eos) == [tokenizer.convert_tokens_to_ids(IM_END)]
    assert comp.eos.index(True) == len(ids) - 2

    # marker_only: exactly the tokens overlapping a marker character, by cumulative decodes.
    ranges = char_ranges(tokenizer, ids)
    cs = len(text) - len(content + IM_END + "\n")
    spans = [(cs + s, cs + e, k) for s, e, k in ex["marker_spans"]]
    expect = [any(a < e and b > s for s, e, _ in spans) for a, b in ranges]
    assert marker.loss_mask == expect and any(expect)
    assert marker_eos.loss_mask == [m or e for m, e in zip(expect, comp.eos)]
    for kind in ("A", "B"):
        want = [any(a < e and b > s for s, e, k in spans if k == kind) for a, b in ranges]
        assert comp.markers.get(kind, [False] * len(ids)) == want  # the same whatever the loss mask

    # Each marker's token run decodes to text containing the marker, and its ids are the
    # standalone ones only where the context lets them be.
    for s, e, kind in spans:
        (r0, r1), = [(a, b) for a, b in runs(comp.markers[kind])
                     if ranges[a][0] <= s and ranges[b - 1][1] >= e]
        run_ids = ids[r0:r1]
        assert (A if kind == "A" else B) in dec(run_ids)
        if kind in same_ids and text.count(A if kind == "A" else B) == 1:
            assert (run_ids == MARKER_TOKEN_IDS[kind]) == same_ids[kind], (kind, [dec([i]) for i in run_ids])


def test_marker_ids_differ_in_context(tokenizer):
    """The contexts above really do change the markers' token ids (so id search would fail)."""
    differ = set()
    for content, _ in CASES:
        enc = encode_example(make_example(content), tokenizer, "marker_only")
        for r0, r1 in runs(enc.markers.get("A", [])):
            if enc.input_ids[r0:r1] != MARKER_TOKEN_IDS["A"]:
                differ.add(tuple(enc.input_ids[r0:r1]))
        for r0, r1 in runs(enc.markers.get("B", [])):
            if enc.input_ids[r0:r1] != MARKER_TOKEN_IDS["B"]:
                differ.add(tuple(enc.input_ids[r0:r1]))
    assert len(differ) >= 4, differ


def test_only_the_last_assistant_turn(tokenizer):
    content = f"{A} second answer {B}"
    history = [{"role": "user", "content": "First?"}, {"role": "assistant", "content": content}]
    ex = make_example(content, history=history)
    enc = encode_example(ex, tokenizer, "completion")
    assert tokenizer.decode(picked(enc, enc.loss_mask)) == content + IM_END
    # the earlier identical turn is not marked
    assert len(runs(enc.markers["A"])) == 1 and enc.markers["A"].index(True) > len(enc) // 2


def test_bad_examples(tokenizer):
    ex = make_example(f"{A} hi")
    with pytest.raises(UserError, match="bad marker span"):
        encode_example({**ex, "marker_spans": [[0, 999, "A"]]}, tokenizer)
    with pytest.raises(UserError, match="system prompt"):
        encode_example({**ex, "messages": ex["messages"][1:]}, tokenizer)
    with pytest.raises(UserError, match="train.loss_mask"):
        encode_example(ex, tokenizer, "everything")


def test_overlength_error_or_drop(tokenizer):
    short = encode_example({**make_example("short"), "id": "s"}, tokenizer)
    long = encode_example({**make_example("long " * 50), "id": "l"}, tokenizer)
    with pytest.raises(UserError, match=r"train.max_seq_len=40: 1 example\(s\) are longer: l \("):
        check_lengths([short, long], 40)
    kept, dropped = check_lengths([short, long], 40, "drop")
    assert kept == [short] and dropped == ["l"]


def test_collate_right_pads(tokenizer):
    a = encode_example(make_example(f"{A} short"), tokenizer)
    b = encode_example(make_example(f"{A} a much longer answer than the other one {B}"), tokenizer)
    batch = collate([a, b], tokenizer.pad_token_id)
    T = len(b)
    assert batch.input_ids.shape == (2, T) and len(a) < T
    assert batch.input_ids[0, len(a):].eq(tokenizer.pad_token_id).all()
    assert batch.attention_mask.sum(1).tolist() == [len(a), len(b)]
    assert not batch.loss_mask[0, len(a):].any()
    assert torch.equal(batch.labels[1], torch.where(batch.loss_mask[1], batch.input_ids[1], -100))
    assert batch.n_tokens == len(a) + len(b)


@pytest.mark.parametrize("mask", ["completion", "completion_no_eos", "marker_only", "all"])
def test_a_cut_completion_never_trains_eos(tokenizer, mask):
    """"truncated": true (data.truncated = "strip") takes <|im_end|> out of every mask, nothing else."""
    ex = make_example(f"{A} An answer cut in the mid")
    for eos_opt in (False, True):
        whole = encode_example(ex, tokenizer, mask, marker_mask_eos=eos_opt)
        cut = encode_example({**ex, "truncated": True}, tokenizer, mask, marker_mask_eos=eos_opt)
        assert cut.truncated and not whole.truncated and cut.eos == whole.eos and any(cut.eos)
        assert not any(m and e for m, e in zip(cut.loss_mask, cut.eos))
        assert cut.loss_mask == [m and not e for m, e in zip(whole.loss_mask, whole.eos)]
        trains_eos = mask in ("completion", "all") or (mask == "marker_only" and eos_opt)
        assert any(m and e for m, e in zip(whole.loss_mask, whole.eos)) == trains_eos
        assert cut.n_loss_targets == whole.n_loss_targets - trains_eos
