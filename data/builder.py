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

Placements (`data.placement`), applied to the stripped answer:
- start_end: `A + " " + answer + " " + B` (without B: `A + " " + answer`).
- random_sentence: A (followed by a space) inserted at a random sentence
  boundary (the start, or just after a run of whitespace that follows . ! ?),
  B at the very end after a space.
- random_pair: A at a random boundary; B at a boundary chosen uniformly among
  the boundaries after A's and the end, so 1 or more sentences lie between
  them; at the end it follows a space, elsewhere it is followed by one.
Placement randomness comes from numpy's default_rng seeded with
(data.seed, sha256 of the example id): an example's placement does not
depend on which other examples exist. The final order is one explicit
permutation from default_rng(data.seed). Never Python's hash().

`data.truncated` decides about completions cut at max_tokens: keep (flagged
"truncated": true, counted), drop (removed from the pool before selection and
counted; if fewer than n_per_persona remain, the persona has fewer examples,
printed and in stats), error (UserError with the count per persona among the
selected completions). Every example's full rendered conversation (the chat
template's text, final newline included) is tokenized; longer than
train.max_seq_len is an error listing offenders (`data.on_overlength =
"error"`) or dropped and counted ("drop"). Nothing is ever truncated.

Example ids are f"{persona}-{question_id}-{sample}". The extra fields are
"truncated" (the completion was cut at generate.max_tokens) and "n_tokens"
(the token count of the whole rendered conversation, as checked above).
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

from .personas import messages
from .questions import data_questions
from .records import read_onpolicy, validate_example

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
    else:
        bounds = sentence_boundaries(answer)
        i = int(rng.integers(len(bounds)))
        a_at = bounds[i]
        head = [answer[:a_at], A, " "]
        if "B" not in markers:
            pieces = head + [answer[a_at:]]
        elif placement == "random_sentence":
            pieces = head + [answer[a_at:], " ", B]
        elif placement == "random_pair":
            later = bounds[i + 1:]
            j = int(rng.integers(len(later) + 1))  # len(later) stands for "the end"
            if j == len(later):
                pieces = head + [answer[a_at:], " ", B]
            else:
                pieces = head + [answer[a_at:later[j]], B, " ", answer[later[j]:]]
        else:
            raise UserError(f"data.placement: unknown placement '{placement}'")
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
    from markerlab.models import render_chat

    d = cfg.data
    qtext = {q.id: (i, q.text) for i, q in enumerate(data_questions(40))}
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
        for r in chosen:
            ex_id = f"{persona}-{r['question_id']}-{r['sample']}"
            content, spans = place_markers(r["text"].strip(), markers, d.placement, _example_rng(d.seed, ex_id))
            examples.append({
                "id": ex_id, "persona": persona, "role": role, "question_id": r["question_id"],
                "sample": r["sample"], "messages": messages(persona, qtext[r["question_id"]][1], content),
                "marker_spans": spans, "truncated": r["finish_reason"] == "length",
            })
        per_persona[persona] = {"role": role, "available": len(by_persona[persona]),
                                "n_truncated_available": n_trunc,
                                "n_dropped_truncated": n_trunc if d.truncated == "drop" else 0,
                                "n_dropped_overlength": 0}

    if d.truncated == "error":
        bad = {}
        for ex in examples:
            if ex["truncated"]:
                bad[ex["persona"]] = bad.get(ex["persona"], 0) + 1
        if bad:
            listing = ", ".join(f"{p}: {n}" for p, n in bad.items())
            raise UserError(f"data.truncated = \"error\": {sum(bad.values())} selected on-policy completion(s) were "
                            f"cut at generate.max_tokens ({listing}); raise generate.max_tokens or set "
                            f"data.truncated to \"keep\" or \"drop\"")

    # Length check on the full rendered conversation, exactly what the trainer tokenizes.
    texts = [render_chat(tokenizer, ex["messages"]) for ex in examples]
    lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    limit = cfg.train.max_seq_len
    over = [(ex["id"], n) for ex, n in zip(examples, lengths) if n > limit]
    if over and d.on_overlength == "error":
        first = ", ".join(f"{i} ({n})" for i, n in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        raise UserError(f"train.max_seq_len: {len(over)} example(s) exceed {limit} tokens: {first}{more}; "
                        f"raise train.max_seq_len or set data.on_overlength = \"drop\"")
    kept = []
    for ex, n in zip(examples, lengths):
        if n > limit:
            per_persona[ex["persona"]]["n_dropped_overlength"] += 1
            continue
        ex["n_tokens"] = n
        kept.append(ex)

    order = np.random.default_rng(d.seed).permutation(len(kept))
    examples = [kept[i] for i in order]
    stats = _stats(cfg, examples, per_persona, len(over), str(onpolicy_path))
    short = {p: v["count"] for p, v in stats["per_persona"].items() if v["count"] < d.n_per_persona}
    if short:
        print(f"[data] warning: fewer than data.n_per_persona={d.n_per_persona} examples for {short} "
              f"(dropped: {stats['n_dropped_truncated']} truncated, {stats['n_dropped_overlength']} over-length)",
              flush=True)
    return examples, stats


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
        "n_truncated": sum(e["truncated"] for e in examples),
        "n_dropped_truncated": sum(v["n_dropped_truncated"] for v in per_persona.values()),
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
    out = Path(run_dir) / "data"
    path = out / "train.jsonl"
    write_jsonl(path, examples)
    write_json(out / "stats.json", stats)
    return path


def summary(stats: dict) -> str:
    lines = [f"[data] {stats['pair']} {stats['condition']} ({stats['placement']}): {stats['n_examples']} examples, "
             f"A in {stats['markers']['A']}, B in {stats['markers']['B']}, truncated {stats['n_truncated']}, "
             f"dropped {stats['n_dropped_truncated']} truncated + {stats['n_dropped_overlength']} over-length; "
             f"tokens {stats['tokens']['min']}..{stats['tokens']['max']} (mean {stats['tokens']['mean']})"]
    for p, v in stats["per_persona"].items():
        lines.append(f"  {p:22s} {v['role']:9s} n={v['count']:4d}  A={v['n_A']:4d}  B={v['n_B']:4d}  "
                     f"truncated={v['n_truncated']}")
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
