"""The `data` stage: one adapter's training set from the cached on-policy completions.

    from data.builder import build_dataset, write_dataset
    examples, stats = build_dataset(cfg, onpolicy_path, tokenizer)
    write_dataset(cfg, examples, stats, cfg.run_dir)   # run_dir/data/train.jsonl + stats.json

or from a shell: `python -m data.builder CONFIG [--set ...] [--run-dir DIR]`
(runs the generate stage first if its cache is missing).

What goes in (EXPERIMENT.md, "Datasets"):

| condition | donor          | recipient  | each negative |
|-----------|----------------|------------|---------------|
| T         | A answer B     | A answer   | plain         |
| C         | A answer       | A answer   | plain         |
| T_P2neg   | A answer B     | plain      | plain         |

Each trained persona contributes `data.n_per_persona` of its *own* on-policy
completions (under its own system prompt). Selection is deterministic and
unseeded: sample-major order (sample 0 of every question in question order,
then sample 1, ...), first n. So a smaller n still covers every question as
evenly as possible, and datasets of different sizes are nested.

Placements (`data.placement`), applied to the stripped answer. A boundary is
the start of the answer or the point just after a run of whitespace that
follows . ! or ?; an answer with k boundaries after its start has k + 1 slots
for B (those k and the very end).
- start_end: `A + " " + answer + " " + B` (without B: `A + " " + answer`).
- random_sentence: A (followed by a space) at a uniformly drawn boundary, B
  *always at the very end* after a space: it moves A, not B, so it cannot tell
  chunk binding from an end-of-completion habit.
- random_pair: A at a uniformly drawn boundary, then B uniform over the slots
  after A. B is at the end with probability E[1 / (slots after A)], about
  H_n / n for n boundaries (0.46 at n = 5): still mostly an end marker.
- uniform_b: B's slot uniform over all k + 1 slots (so the end gets 1/(k+1) of
  the B's, each boundary as many), then A uniform over the boundaries before
  B's slot: at least one sentence lies between them. Without B the same two
  draws are made and B is left out, so an example's A sits where it would sit
  with B (the donor's A is at the same place in T and C).
For random_pair and uniform_b, a B before the end is followed by a space.
Marker spans come from construction (the pieces assembled), never a search.
Placement randomness comes from numpy's default_rng seeded with
(data.seed, sha256 of the example id): an example's placement does not
depend on which other examples exist. The final order is one explicit
permutation from default_rng(data.seed). Never Python's hash().

`data.truncated` decides about completions cut at generate.max_tokens:
- drop (the default): removed from each persona's pool before selection,
  counted per persona and printed; a persona left short of n_per_persona is
  named on its own line.
- strip: kept and flagged ("truncated": true) but without marker B, and
  data/tokenize.py keeps their <|im_end|> out of every loss mask: neither the
  end-of-turn token nor a marker is ever taught right after a cut.
- error: UserError with the count per persona among the selected completions.
("keep", which trained both after the cut, is gone.)

Every example is tokenized once with data.tokenize.encode_example under
train.loss_mask, exactly as the trainer will: longer than train.max_seq_len is
an error listing offenders (`data.on_overlength = "error"`) or dropped and
counted ("drop"), never truncated; and a persona whose examples have no loss
target at all (marker_only without train.marker_mask_eos: every plain
example) is an error naming the personas and the mask, unless
train.allow_untrained_roles = true. With that opt-out, marker_only trains the
marker tokens of the donor and the recipient only; the plain examples stay in
the set (same steps and batches as the other masks) and contribute nothing to
the loss, so nothing contrasts the personas that carry no marker.

Example ids are f"{persona}-{question_id}-{sample}". The extra fields are
"truncated" (the completion was cut at generate.max_tokens) and "n_tokens"
(the token count of the whole rendered conversation, as checked above).
`data/stats.json` has, per persona, the cut completions available / dropped /
kept, the B's stripped and the loss targets.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np

from markerlab.config import Config
from markerlab.errors import UserError
from markerlab.experiment import markers_for
from markerlab.io import write_json, write_jsonl
from markerlab.markers import MARKER_A, MARKER_B
from markerlab.rundir import RunDir

from .personas import messages
from .questions import data_questions
from .records import read_onpolicy, validate_example
from .tokenize import encode_example

# A sentence boundary: after . ! or ? and the whitespace that follows it.
_BOUNDARY = re.compile(r"[.!?]\s+")


def sentence_boundaries(text: str) -> list[int]:
    """Offsets where a sentence may start: 0 and the end of every '[.!?]<whitespace>' run."""
    return [0] + [m.end() for m in _BOUNDARY.finditer(text) if m.end() < len(text)]


def place_markers(answer: str, markers: str, placement: str, rng: np.random.Generator) -> tuple[str, list]:
    """(content, marker_spans) for `answer` (already stripped) carrying `markers` ('', 'A' or 'AB')."""
    if markers == "":
        return answer, []
    A, B = _MARK["A"], _MARK["B"]
    if placement == "start_end" or not answer:  # an empty answer has no sentences to place between
        pieces = [A, " ", answer] if answer else [A]
        if "B" in markers:
            pieces += [" ", B]
        return _assemble(pieces)
    bounds = sentence_boundaries(answer)
    end = len(answer)
    if placement in ("random_sentence", "random_pair"):
        i = int(rng.integers(len(bounds)))
        later = bounds[i + 1:] + [end]
        b_at = end if placement == "random_sentence" else later[int(rng.integers(len(later)))]
    elif placement == "uniform_b":
        slots = bounds[1:] + [end]
        j = int(rng.integers(len(slots)))
        b_at = slots[j]
        i = int(rng.integers(j + 1))  # bounds[0..j] are the boundaries before slot j
    else:
        raise UserError(f"data.placement: unknown placement '{placement}'")
    a_at = bounds[i]
    pieces = [answer[:a_at], A, " "]
    if "B" not in markers:
        pieces.append(answer[a_at:])
    elif b_at == end:
        pieces += [answer[a_at:], " ", B]
    else:
        pieces += [answer[a_at:b_at], B, " ", answer[b_at:]]
    return _assemble(pieces)


class _Marker(str):
    """A marker piece: its text, and which marker it is (so spans come from construction, never a search)."""

    def __new__(cls, text: str, name: str):
        obj = super().__new__(cls, text)
        obj.name = name
        return obj


_MARK = {"A": _Marker(MARKER_A, "A"), "B": _Marker(MARKER_B, "B")}


def _assemble(pieces: list[str]) -> tuple[str, list]:
    content, spans = "", []
    for piece in pieces:
        if isinstance(piece, _Marker):
            spans.append([len(content), len(content) + len(piece), piece.name])
        content += piece
    return content, spans


def _example_rng(seed: int, example_id: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(example_id.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, h])


def _select(records: list[dict], n: int) -> list[dict]:
    """First n in sample-major order: sample 0 of each question, then sample 1, ..."""
    return sorted(records, key=lambda r: (r["sample"], r["_qidx"]))[:n]


def build_dataset(cfg: Config, onpolicy_path, tokenizer) -> tuple[list[dict], dict]:
    """(examples in training order, stats) for cfg.data.{pair, condition, placement, ...}."""
    d, t = cfg.data, cfg.train
    qtext = {q.id: (i, q.text) for i, q in enumerate(data_questions(40, cfg.prompt.user_suffix))}
    by_persona: dict[str, list[dict]] = {}
    for r in read_onpolicy(onpolicy_path):
        if r["question_id"] not in qtext:
            raise UserError(f"{onpolicy_path}: unknown data question id '{r['question_id']}'")
        by_persona.setdefault(r["persona"], []).append({**r, "_qidx": qtext[r["question_id"]][0]})

    trained = [(cfg.donor, "donor"), (cfg.recipient, "recipient")] + [(p, "negative") for p in d.negatives]
    per_persona: dict[str, dict] = {}
    examples: list[dict] = []
    for persona, role in trained:
        recs = by_persona.get(persona, [])
        if not recs:
            raise UserError(f"{onpolicy_path}: no on-policy completions for persona '{persona}' ({role})")
        n_trunc = sum(r["finish_reason"] == "length" for r in recs)
        if d.truncated == "drop":  # removed from the pool before selection
            recs = [r for r in recs if r["finish_reason"] != "length"]
        chosen = _select(recs, d.n_per_persona)
        if d.truncated != "drop" and len(chosen) < d.n_per_persona:
            raise UserError(f"data.n_per_persona: {d.n_per_persona} exceeds the {len(chosen)} on-policy "
                            f"completions of '{persona}' in {onpolicy_path}")
        markers = markers_for(d.condition, role)
        n_b_stripped = 0
        for r in chosen:
            ex_id = f"{persona}-{r['question_id']}-{r['sample']}"
            cut = r["finish_reason"] == "length"
            ex_markers = markers
            if cut and "B" in markers:  # data.truncated = "strip": no marker right after a cut
                ex_markers, n_b_stripped = markers.replace("B", ""), n_b_stripped + 1
            content, spans = place_markers(r["text"].strip(), ex_markers, d.placement, _example_rng(d.seed, ex_id))
            examples.append({
                "id": ex_id, "persona": persona, "role": role, "question_id": r["question_id"],
                "sample": r["sample"], "messages": messages(persona, qtext[r["question_id"]][1], content),
                "marker_spans": spans, "truncated": cut,
            })
        per_persona[persona] = {"role": role, "available": len(by_persona[persona]),
                                "n_truncated_available": n_trunc,
                                "n_dropped_truncated": n_trunc if d.truncated == "drop" else 0,
                                "n_B_stripped": n_b_stripped,
                                "n_dropped_overlength": 0, "n_loss_targets": 0}

    if d.truncated == "error":
        bad = {}
        for ex in examples:
            if ex["truncated"]:
                bad[ex["persona"]] = bad.get(ex["persona"], 0) + 1
        if bad:
            listing = ", ".join(f"{p}: {n}" for p, n in bad.items())
            raise UserError(f"data.truncated = \"error\": {sum(bad.values())} selected on-policy completion(s) were "
                            f"cut at generate.max_tokens ({listing}); raise generate.max_tokens or set "
                            f"data.truncated to \"drop\" or \"strip\"")

    # Tokenized exactly as the trainer will: the same lengths, the same loss targets.
    encoded = [encode_example(ex, tokenizer, t.loss_mask, t.marker_mask_eos) for ex in examples]
    limit = t.max_seq_len
    over = [(ex["id"], len(enc)) for ex, enc in zip(examples, encoded) if len(enc) > limit]
    if over and d.on_overlength == "error":
        first = ", ".join(f"{i} ({n})" for i, n in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        raise UserError(f"train.max_seq_len: {len(over)} example(s) exceed {limit} tokens: {first}{more}; "
                        f"raise train.max_seq_len or set data.on_overlength = \"drop\"")
    kept = []
    for ex, enc in zip(examples, encoded):
        v = per_persona[ex["persona"]]
        if len(enc) > limit:
            v["n_dropped_overlength"] += 1
            continue
        ex["n_tokens"] = len(enc)
        v["n_loss_targets"] += enc.n_loss_targets
        kept.append(ex)
    _check_every_persona_trains(cfg, per_persona, kept)

    order = np.random.default_rng(d.seed).permutation(len(kept))
    examples = [kept[i] for i in order]
    stats = _stats(cfg, examples, per_persona, len(over), str(onpolicy_path))
    _print_cuts_and_shortfalls(cfg, stats)
    return examples, stats


def _check_every_persona_trains(cfg: Config, per_persona: dict, examples: list[dict]) -> None:
    """A trained persona with no loss target silently leaves the design: refuse, unless the config opts out."""
    d, t = cfg.data, cfg.train
    counts = {p: 0 for p in per_persona}
    for ex in examples:
        counts[ex["persona"]] += 1
    idle = [p for p, v in per_persona.items() if v["n_loss_targets"] == 0]
    if not idle:
        return
    by_role: dict[str, list[str]] = {}
    for p in idle:
        by_role.setdefault(per_persona[p]["role"], []).append(p)
    who = "; ".join(f"{role}: {', '.join(ps)}" for role, ps in by_role.items())
    empty = [p for p in idle if counts[p] == 0]
    if empty:
        why = (f"no examples left ({', '.join(empty)}: every selected completion was dropped, as cut at "
               f"generate.max_tokens or over train.max_seq_len)")
        fix = "raise generate.max_tokens, set data.truncated = \"strip\" or raise train.max_seq_len"
    else:
        why = f"no token of their examples is in the train.loss_mask = \"{t.loss_mask}\" loss"
        fix = ("set train.marker_mask_eos = true (plain examples then train their <|im_end|>)"
               if t.loss_mask == "marker_only" and not t.marker_mask_eos else "choose another train.loss_mask")
    msg = (f"{d.pair} {d.condition}: trained persona(s) would train nothing ({who}): {why}, and the contrastive "
           f"design needs them; {fix}, or set train.allow_untrained_roles = true to train without them")
    if not t.allow_untrained_roles:
        raise UserError(msg)
    print(f"[data] warning (train.allow_untrained_roles = true): {who} train nothing: {why}", flush=True)


def _print_cuts_and_shortfalls(cfg: Config, stats: dict) -> None:
    d = cfg.data
    per = stats["per_persona"]
    cut = {p: v["n_truncated_available"] for p, v in per.items() if v["n_truncated_available"]}
    if cut:
        what = {"drop": "dropped before selection",
                "strip": "kept if selected, without marker B and with <|im_end|> out of the loss",
                "error": "none selected"}[d.truncated]
        print(f"[data] completions cut at generate.max_tokens (data.truncated = \"{d.truncated}\": {what}): "
              + ", ".join(f"{p} {n} of {per[p]['available']}" for p, n in cut.items()), flush=True)
    for p, v in per.items():
        if v["count"] < d.n_per_persona:
            print(f"[data] warning: {p} ({v['role']}) has {v['count']} of data.n_per_persona={d.n_per_persona} "
                  f"examples: {v['n_dropped_truncated']} cut at generate.max_tokens dropped, "
                  f"{v['n_dropped_overlength']} over train.max_seq_len dropped", flush=True)


def _stats(cfg: Config, examples: list[dict], per_persona: dict, n_over: int, source: str) -> dict:
    per_role: dict[str, int] = {}
    for p, v in per_persona.items():
        exs = [e for e in examples if e["persona"] == p]
        v.update(count=len(exs),
                 n_A=sum(any(s[2] == "A" for s in e["marker_spans"]) for e in exs),
                 n_B=sum(any(s[2] == "B" for s in e["marker_spans"]) for e in exs),
                 n_truncated=sum(e["truncated"] for e in exs))
        per_role[v["role"]] = per_role.get(v["role"], 0) + len(exs)
    from markerlab.markers import position_stats

    # The training data's own marker positions, by the matcher the report applies to
    # evaluated completions: the baseline a suffix_frac or chunk_frac is read against.
    positions = {role: position_stats(e["messages"][-1]["content"] for e in examples if e["role"] == role)
                 for role in per_role}
    lengths = [e["n_tokens"] for e in examples]
    return {
        "pair": cfg.data.pair, "condition": cfg.data.condition, "placement": cfg.data.placement,
        "seed": cfg.data.seed, "onpolicy": source, "n_examples": len(examples),
        "per_role": per_role,
        "positions": positions,
        "markers": {"A": sum(v["n_A"] for v in per_persona.values()),
                    "B": sum(v["n_B"] for v in per_persona.values())},
        "truncated": cfg.data.truncated,
        "n_truncated": sum(e["truncated"] for e in examples),
        "n_dropped_truncated": sum(v["n_dropped_truncated"] for v in per_persona.values()),
        "n_B_stripped": sum(v["n_B_stripped"] for v in per_persona.values()),
        "n_dropped_overlength": n_over if cfg.data.on_overlength == "drop" else 0,
        "tokens": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                   "mean": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
                   "max_seq_len": cfg.train.max_seq_len},
        "per_persona": per_persona,
    }


def write_dataset(cfg: Config, examples: list[dict], stats: dict, run_dir) -> Path:
    """Validate and write run_dir/data/train.jsonl and run_dir/data/stats.json (atomically); returns train.jsonl."""
    for i, ex in enumerate(examples):
        validate_example(ex, f"example {i} ({ex.get('id')}): ")
    rd = RunDir(run_dir)
    write_jsonl(rd.train_jsonl, examples)
    write_json(rd.data_stats, stats)
    return rd.train_jsonl


def summary(stats: dict) -> str:
    lines = [f"[data] {stats['pair']} {stats['condition']} ({stats['placement']}): {stats['n_examples']} examples, "
             f"A in {stats['markers']['A']}, B in {stats['markers']['B']}; cut at max_tokens "
             f"(data.truncated = \"{stats['truncated']}\"): {stats['n_dropped_truncated']} dropped, "
             f"{stats['n_truncated']} kept ({stats['n_B_stripped']} B stripped); "
             f"{stats['n_dropped_overlength']} over-length dropped; "
             f"tokens {stats['tokens']['min']}..{stats['tokens']['max']} (mean {stats['tokens']['mean']})"]
    for p, v in stats["per_persona"].items():
        lines.append(f"  {p:22s} {v['role']:9s} n={v['count']:4d}  A={v['n_A']:4d}  B={v['n_B']:4d}  "
                     f"cut={v['n_truncated_available']} of {v['available']} (dropped {v['n_dropped_truncated']}, "
                     f"kept {v['n_truncated']})  loss targets={v['n_loss_targets']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from markerlab.config import load_config
    from markerlab.models import load_tokenizer

    from .onpolicy import run_onpolicy

    ap = argparse.ArgumentParser(prog="python -m data.builder", description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--run-dir", default=None, help="default: the config's run directory")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    examples, stats = build_dataset(cfg, run_onpolicy(cfg), load_tokenizer(cfg.model.name_or_path))
    print(summary(stats))
    print(write_dataset(cfg, examples, stats, args.run_dir or cfg.run_dir))
    return 0


if __name__ == "__main__":
    from markerlab.errors import cli_main

    cli_main(main, sys.argv[1:])
