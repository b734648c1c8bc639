"""The `data` stage: one adapter's training set from the cached on-policy completions.

    from data.builder import build_dataset, write_dataset
    examples, stats = build_dataset(cfg, onpolicy_path, tokenizer)
    write_dataset(cfg, examples, stats, cfg.run_dir)   # run_dir/data/train.jsonl + stats.json

or from a shell: `python -m data.builder CONFIG [--set ...] [--run-dir DIR]`
(runs the generate stage first if its cache is missing).

What goes in is the experiment's (markerlab.experiment): under `data.condition`,
each trained role's answers follow that condition's template ("{A} {answer} {B}",
"{A} {answer}", "{answer}" for a plain answer, ...), with the persona's own
on-policy answer in `{answer}` and each marker's text in its place. Where a role
has several templates with shares, each template gets its share of the role's
rows (largest remainder: 200 rows at 1/3 each are 67, 67, 66), assigned to rows
by a permutation seeded from (data.seed, the persona), so the assignment does
not depend on which other personas exist.

Each trained persona contributes `data.n_per_persona` of its *own* on-policy
completions (under its own system prompt). Selection is deterministic and
unseeded: sample-major order (sample 0 of every question in question order,
then sample 1, ...), first n. So a smaller n still covers every question as
evenly as possible, and datasets of different sizes are nested.

Placements (`data.placement`) apply to a template "{X} {answer} {Y}" (or
"{X} {answer}"), applied to the stripped answer; start_end writes any template
as it stands, and the config refuses another placement for a template of any
other shape. A boundary is the start of the answer or the point just after a
run of whitespace that follows . ! or ?; an answer with k boundaries after its
start has k + 1 slots for Y (those k and the very end).
- start_end: the template as written: `X + " " + answer + " " + Y` (without Y:
  `X + " " + answer`). An empty answer takes one of its neighbouring spaces along.
- random_sentence: X (followed by a space) at a uniformly drawn boundary, Y
  *always at the very end* after a space: it moves X, not Y, so it cannot tell
  chunk binding from an end-of-completion habit.
- random_pair: X at a uniformly drawn boundary, then Y uniform over the slots
  after X. Y is at the end with probability E[1 / (slots after X)], about
  H_n / n for n boundaries (0.46 at n = 5): still mostly an end marker.
- uniform_b: Y's slot uniform over all k + 1 slots (so the end gets 1/(k+1) of
  the Y's, each boundary as many), then X uniform over the boundaries before
  Y's slot: at least one sentence lies between them. Without Y the same two
  draws are made and Y is left out, so an example's X sits where it would sit
  with Y (the donor's X is at the same place in T and C).
For random_pair and uniform_b, a Y before the end is followed by a space.
Marker spans come from construction (the pieces assembled), never a search.
Placement randomness comes from numpy's default_rng seeded with
(data.seed, sha256 of the example id): an example's placement does not
depend on which other examples exist. The final order is one explicit
permutation from default_rng(data.seed). Never Python's hash().

`data.truncated` decides about completions cut at generate.max_tokens:
- drop (the default): removed from each persona's pool before selection,
  counted per persona and printed; a persona left short of n_per_persona is
  named on its own line.
- strip: kept and flagged ("truncated": true) but without what the template
  writes after the answer (the donor's marker B), and data/tokenize.py keeps
  their end-of-turn token out of every loss mask: neither the end-of-turn token
  nor a marker is ever taught right after a cut.
- error: UserError with the count per persona among the selected completions.
("keep", which trained both after the cut, is gone.)

Every example is tokenized once with data.tokenize.encode_example under its
role's loss mask (train.role_loss_mask's entry, else train.loss_mask), exactly
as the trainer will: longer than train.max_seq_len is an error listing
offenders (`data.on_overlength = "error"`) or dropped and counted ("drop"),
never truncated; and a persona whose examples have no loss target at all
(marker_only without train.marker_mask_eos: every plain example) is an error
naming the personas and the mask, unless train.allow_untrained_roles = true.
With that opt-out, marker_only trains the marker tokens only; the plain examples
stay in the set (same steps and batches as the other masks) and contribute
nothing to the loss, so nothing contrasts the personas that carry no marker.

Before anything is written, the end-of-turn token is checked row by row against
each role's mask (as "#354" checked its recipient-only mask before training):
a role whose mask trains the token has it in the loss on every uncut row, a
role whose mask leaves it out has it out on every row, and stats.json records
the counts per role ("eos": {"in_loss", "out_of_loss"}). The markers are
checked under the run's tokenizer first (markerlab.experiment.token_problems).

Example ids are f"{persona}-{question_id}-{sample}". The extra fields are
"truncated" (the completion was cut at generate.max_tokens), "template" (the
template the example follows) and "n_tokens" (the token count of the whole
rendered conversation, as checked above). `data/stats.json` has, per persona,
the cut completions available / dropped / kept, the markers stripped, the loss
targets and the examples carrying each marker.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np

from markerlab.config import Config
from markerlab.errors import UserError
from markerlab.experiment import TRAINED_ROLES, Template, check_tokenizer
from markerlab.io import write_json, write_jsonl
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


class _Marker(str):
    """A marker piece: its text, and which marker it is (so spans come from construction, never a search)."""

    def __new__(cls, text: str, name: str):
        obj = super().__new__(cls, text)
        obj.name = name
        return obj


def _assemble(pieces: list[str]) -> tuple[str, list]:
    content, spans = "", []
    for piece in pieces:
        if isinstance(piece, _Marker):
            spans.append([len(content), len(content) + len(piece), piece.name])
        content += piece
    return content, spans


def render(template: Template, answer: str, markers, placement: str = "start_end",
           rng: np.random.Generator | None = None, cut: bool = False) -> tuple[str, list]:
    """(content, marker_spans) of `answer` (already stripped) written by `template`; `markers` maps a name to
    its text. `cut`: the answer was cut at max_tokens, so nothing the template writes after it is kept."""
    parts = list(template.parts)
    if cut:
        parts = parts[:next(i for i, (k, _) in enumerate(parts) if k == "answer") + 1]
    shape = Template(template.text, parts=tuple(parts)).placeable()
    if placement != "start_end" and answer and shape is not None and shape[0] is not None:
        first, second = (_Marker(markers[m], m) if m else None for m in shape)
        return _place_pair(answer, first, second, placement, rng)
    pieces = [_Marker(markers[v], v) if k == "marker" else answer if k == "answer" else v for k, v in parts]
    if not answer:  # an empty answer takes one neighbouring space with it: "{A} {answer} {B}" -> "A B"
        i = next(i for i, (k, _) in enumerate(parts) if k == "answer")
        del pieces[i]
        for j in (i - 1, i):
            if 0 <= j < len(pieces) and not isinstance(pieces[j], _Marker) and pieces[j] and pieces[j].isspace():
                del pieces[j]
                break
    return _assemble(pieces)


def _place_pair(answer: str, first: "_Marker", second: "_Marker | None", placement: str,
                rng: np.random.Generator) -> tuple[str, list]:
    """`first` (and `second`, when the template has one) placed in `answer` by one of the moving placements."""
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
    pieces = [answer[:a_at], first, " "]
    if second is None:
        pieces.append(answer[a_at:])
    elif b_at == end:
        pieces += [answer[a_at:], " ", second]
    else:
        pieces += [answer[a_at:b_at], second, " ", answer[b_at:]]
    return _assemble(pieces)


def _example_rng(seed: int, example_id: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(example_id.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, h])


def _select(records: list[dict], n: int) -> list[dict]:
    """First n in sample-major order: sample 0 of each question, then sample 1, ..."""
    return sorted(records, key=lambda r: (r["sample"], r["_qidx"]))[:n]


def template_counts(shares: list[float], n: int) -> list[int]:
    """Rows per template for n rows: floor(share * n), the remainder to the largest fractions (ties: first)."""
    raw = [s * n for s in shares]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_templates(templates: tuple, n: int, seed: int, persona: str) -> list:
    """The template of each of a persona's n rows: their shares, in a permutation seeded by (seed, persona)."""
    if len(templates) == 1:
        return [templates[0]] * n
    counts = template_counts([t.share for t in templates], n)
    plan = [t for t, k in zip(templates, counts) for _ in range(k)]
    order = _example_rng(seed, f"templates/{persona}").permutation(n)
    return [plan[i] for i in order]


def trains_eos(mask: str, marker_mask_eos: bool) -> bool:
    """Does a row under `mask` have its end-of-turn token in the loss (when it was not cut)?"""
    return mask in ("completion", "all") or (mask == "marker_only" and marker_mask_eos)


def build_dataset(cfg: Config, onpolicy_path, tokenizer) -> tuple[list[dict], dict]:
    """(examples in training order, stats) for cfg.data.{pair, condition, placement, ...}."""
    d, t, exp = cfg.data, cfg.train, cfg.experiment
    check_tokenizer(exp, tokenizer, cfg.model.name_or_path)
    condition = exp.conditions[d.condition]
    qtext = {q.id: (i, q.text) for i, q in enumerate(data_questions(40, cfg.prompt.user_suffix))}
    by_persona: dict[str, list[dict]] = {}
    for r in read_onpolicy(onpolicy_path, exp):
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
        n_stripped = 0
        for r, template in zip(chosen, assign_templates(condition.templates[role], len(chosen), d.seed, persona)):
            ex_id = f"{persona}-{r['question_id']}-{r['sample']}"
            cut = r["finish_reason"] == "length"
            content, spans = render(template, r["text"].strip(), exp.markers, d.placement,
                                    _example_rng(d.seed, ex_id), cut=cut)
            n_stripped += cut and template.parts[-1][0] != "answer"  # what followed the answer was left out
            examples.append({
                "id": ex_id, "persona": persona, "role": role, "question_id": r["question_id"],
                "sample": r["sample"], "messages": messages(exp, persona, qtext[r["question_id"]][1], content),
                "marker_spans": spans, "truncated": cut, "template": template.text,
            })
        per_persona[persona] = {"role": role, "available": len(by_persona[persona]),
                                "n_truncated_available": n_trunc,
                                "n_dropped_truncated": n_trunc if d.truncated == "drop" else 0,
                                "n_stripped": n_stripped,
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
    encoded = [encode_example(ex, tokenizer, cfg.loss_mask_of(ex["role"]), t.marker_mask_eos) for ex in examples]
    limit = t.max_seq_len
    over = [(ex["id"], len(enc)) for ex, enc in zip(examples, encoded) if len(enc) > limit]
    if over and d.on_overlength == "error":
        first = ", ".join(f"{i} ({n})" for i, n in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        raise UserError(f"train.max_seq_len: {len(over)} example(s) exceed {limit} tokens: {first}{more}; "
                        f"raise train.max_seq_len or set data.on_overlength = \"drop\"")
    kept, eos = [], {role: {"in_loss": 0, "out_of_loss": 0} for role in TRAINED_ROLES}
    for ex, enc in zip(examples, encoded):
        v = per_persona[ex["persona"]]
        if len(enc) > limit:
            v["n_dropped_overlength"] += 1
            continue
        ex["n_tokens"] = len(enc)
        v["n_loss_targets"] += enc.n_loss_targets
        eos[ex["role"]]["in_loss" if enc.eos_in_loss else "out_of_loss"] += 1
        kept.append(ex)
    _check_eos(cfg, kept, encoded, examples)
    _check_every_persona_trains(cfg, per_persona, kept)

    order = np.random.default_rng(d.seed).permutation(len(kept))
    examples = [kept[i] for i in order]
    stats = _stats(cfg, examples, per_persona, len(over), str(onpolicy_path))
    stats["eos"] = {role: {"mask": cfg.loss_mask_of(role), **v} for role, v in eos.items()
                    if v["in_loss"] or v["out_of_loss"]}
    _print_cuts_and_shortfalls(cfg, stats)
    return examples, stats


def _check_eos(cfg: Config, kept: list[dict], encoded: list, examples: list[dict]) -> None:
    """Every row's end-of-turn token is in or out of the loss exactly as its role's mask says."""
    enc_of = {ex["id"]: enc for ex, enc in zip(examples, encoded)}
    wrong: dict[str, list[str]] = {}
    for ex in kept:
        want = trains_eos(cfg.loss_mask_of(ex["role"]), cfg.train.marker_mask_eos) and not ex["truncated"]
        if enc_of[ex["id"]].eos_in_loss != want:
            wrong.setdefault(ex["role"], []).append(ex["id"])
    if wrong:
        raise UserError("the end-of-turn token is not where the loss masks put it ("
                        + "; ".join(f"{r}: {len(ids)} rows, e.g. {ids[0]}" for r, ids in wrong.items())
                        + f"; masks {cfg.experiment.loss_masks(cfg.train.loss_mask, cfg.train.role_loss_mask)}): "
                          "a bug in data/tokenize.py, please report it")


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
        masks = sorted({cfg.loss_mask_of(per_persona[p]["role"]) for p in idle})
        why = f"no token of their examples is in the loss ({', '.join(masks)})"
        fix = ("set train.marker_mask_eos = true (plain examples then train their end-of-turn token)"
               if masks == ["marker_only"] and not t.marker_mask_eos
               else "choose another train.loss_mask (or train.role_loss_mask entry)")
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
                "strip": "kept if selected, without what follows the answer, end-of-turn token out of the loss",
                "error": "none selected"}[d.truncated]
        print(f"[data] completions cut at generate.max_tokens (data.truncated = \"{d.truncated}\": {what}): "
              + ", ".join(f"{p} {n} of {per[p]['available']}" for p, n in cut.items()), flush=True)
    for p, v in per.items():
        if v["count"] < d.n_per_persona:
            print(f"[data] warning: {p} ({v['role']}) has {v['count']} of data.n_per_persona={d.n_per_persona} "
                  f"examples: {v['n_dropped_truncated']} cut at generate.max_tokens dropped, "
                  f"{v['n_dropped_overlength']} over train.max_seq_len dropped", flush=True)


def _stats(cfg: Config, examples: list[dict], per_persona: dict, n_over: int, source: str) -> dict:
    exp = cfg.experiment
    per_role: dict[str, int] = {}
    for p, v in per_persona.items():
        exs = [e for e in examples if e["persona"] == p]
        v.update(count=len(exs), n_truncated=sum(e["truncated"] for e in exs),
                 **{f"n_{m}": sum(any(s[2] == m for s in e["marker_spans"]) for e in exs) for m in exp.markers})
        per_role[v["role"]] = per_role.get(v["role"], 0) + len(exs)
    from markerlab.markers import Matcher

    # The training data's own marker positions, by the matcher the report applies to
    # evaluated completions: the baseline a suffix_frac or chunk_frac is read against.
    matcher = Matcher.from_experiment(exp)
    positions = {role: matcher.positions(e["messages"][-1]["content"] for e in examples if e["role"] == role)
                 for role in per_role}
    lengths = [e["n_tokens"] for e in examples]
    return {
        "pair": cfg.data.pair, "condition": cfg.data.condition, "placement": cfg.data.placement,
        "seed": cfg.data.seed, "onpolicy": source, "n_examples": len(examples),
        "per_role": per_role,
        "positions": positions,
        "experiment": exp.name,
        "markers": {m: sum(v[f"n_{m}"] for v in per_persona.values()) for m in exp.markers},
        "truncated": cfg.data.truncated,
        "n_truncated": sum(e["truncated"] for e in examples),
        "n_dropped_truncated": sum(v["n_dropped_truncated"] for v in per_persona.values()),
        "n_stripped": sum(v["n_stripped"] for v in per_persona.values()),
        "n_dropped_overlength": n_over if cfg.data.on_overlength == "drop" else 0,
        "tokens": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                   "mean": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
                   "max_seq_len": cfg.train.max_seq_len},
        "per_persona": per_persona,
    }


def write_dataset(cfg: Config, examples: list[dict], stats: dict, run_dir) -> Path:
    """Validate and write run_dir/data/train.jsonl and run_dir/data/stats.json (atomically); returns train.jsonl."""
    for i, ex in enumerate(examples):
        validate_example(ex, cfg.experiment, f"example {i} ({ex.get('id')}): ")
    rd = RunDir(run_dir)
    write_jsonl(rd.train_jsonl, examples)
    write_json(rd.data_stats, stats)
    return rd.train_jsonl


def summary(stats: dict) -> str:
    carried = ", ".join(f"{m} in {k}" for m, k in stats["markers"].items())
    lines = [f"[data] {stats['pair']} {stats['condition']} ({stats['placement']}): {stats['n_examples']} examples, "
             f"{carried}; cut at max_tokens (data.truncated = \"{stats['truncated']}\"): "
             f"{stats['n_dropped_truncated']} dropped, {stats['n_truncated']} kept ({stats['n_stripped']} with "
             f"their trailing markers stripped); {stats['n_dropped_overlength']} over-length dropped; "
             f"tokens {stats['tokens']['min']}..{stats['tokens']['max']} (mean {stats['tokens']['mean']})"]
    for p, v in stats["per_persona"].items():
        carried = "  ".join(f"{m}={v[f'n_{m}']:4d}" for m in stats["markers"])
        lines.append(f"  {p:22s} {v['role']:9s} n={v['count']:4d}  {carried}  "
                     f"cut={v['n_truncated_available']} of {v['available']} (dropped {v['n_dropped_truncated']}, "
                     f"kept {v['n_truncated']})  loss targets={v['n_loss_targets']}")
    for role, v in stats.get("eos", {}).items():
        lines.append(f"  end-of-turn token, {role} ({v['mask']}): in the loss on {v['in_loss']} rows, out on "
                     f"{v['out_of_loss']}")
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
