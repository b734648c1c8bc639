"""The leakage probe's fixed documents, built in the data stage (trainer/probe.py measures them).

    from data.probe import build_probe_set, read_probe_set, probe_examples
    path = build_probe_set(cfg, run_dir)        # run_dir/data/probe.json; None when train.probe_every = 0
    probe = read_probe_set(path, cfg.experiment)  # validated
    for kind, example in probe_examples(probe, cfg.experiment):  # training-format examples
        ...

Not to be confused with the eval stage's probe *marker* (prefixed to the
question): this probe watches the experiment's headline marker pair (X, Y), the
pair its headline metric is about (cond_B_given_A: A and B), while the adapter
trains. An experiment whose headline is not a pair metric has no documents to
probe, and the trainer says so.

What it holds. Every persona of the experiment (the trained ones and the bystanders)
answers each of the first `train.probe_n_questions` in-distribution eval
questions (id01, id02, ... in file order). Eval questions are disjoint from the
data questions, so no probe prompt is ever trained on. The answer is the base
model's own greedy answer (temperature 0) under that persona's system prompt,
capped at `train.probe_max_tokens` (and at `generate.max_tokens`: no longer than
a training answer can be): a fixed on-policy answer that costs one short batch
of generations per base model. An answer cut at the cap is trimmed
back to its last sentence end (when it has one) so that marker B is probed after
a finished sentence, as in training, rather than after half a word; the record
says so ("trimmed"). The on-policy completions cannot serve: they answer the data
questions, which are trained on.

The greedy answers are cached beside the on-policy completions, in
`generate.cache_dir/probe-<key>/answers.jsonl` (key: the base model's identity,
dtype, persona prompts, the questions, the cap, the backend and device, as for
the on-policy cache), so the six adapters of a base model generate them once.
The run's copy, `data/probe.json`, records how it was built: the questions, the
greedy settings (the seed is recorded though greedy decoding draws nothing), the
backend, the cache it came from, and per item persona, role (in this run's pair),
question, answer, finish reason and whether it was trimmed.

Documents (`probe_examples`), per item, in the training example format so that
the trainer tokenizes them with training's own chat template and span masks:
- "XY" (e.g. "AB"): "{X} {answer} {Y}" (data.builder.render): marker X's tokens at
  the start of the answer, and marker Y's tokens after `X answer`;
- "Y" (e.g. "B"):   "{answer} {Y}": marker Y's tokens after the plain answer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from markerlab.config import Config
from markerlab.errors import UserError
from markerlab.experiment import ROLES, Template, make_template
from markerlab.io import read_json, read_jsonl, write_json, write_jsonl
from markerlab.rundir import RunDir

from .builder import render, sentence_boundaries
from .personas import messages
from .questions import eval_questions

VERSION = 1                   # bump when the file's format or the answers' meaning changes


def probe_questions(cfg: Config):
    """The held-out questions: the first train.probe_n_questions in-distribution eval questions."""
    return eval_questions(n_id=cfg.train.probe_n_questions, n_ood=0, suffix=cfg.prompt.user_suffix)


def answer_cap(cfg: Config) -> int:
    """Tokens a greedy probe answer may take: train.probe_max_tokens, at most generate.max_tokens."""
    return min(cfg.train.probe_max_tokens, cfg.generate.max_tokens)


def trim_to_sentence(text: str) -> tuple[str, bool]:
    """A cut answer back to its last sentence end: (text, trimmed). Unchanged without a sentence end."""
    last = sentence_boundaries(text)[-1]
    if last == 0:
        return text, False
    return text[:last].rstrip(), True


def _cache_key(cfg: Config) -> tuple[str, dict]:
    from markerlab.models import model_identity

    from .onpolicy import backend_label

    material = {
        "version": VERSION,
        "model": model_identity(cfg.model.name_or_path),
        "dtype": cfg.model.dtype,
        "personas": dict(cfg.experiment.personas),
        "questions": [[q.id, q.text] for q in probe_questions(cfg)],
        "greedy": {"temperature": 0.0, "max_tokens": answer_cap(cfg)},
        "backend": backend_label(cfg),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    return key, material


def probe_answers(cfg: Config) -> tuple[list[dict], Path, dict]:
    """The base model's greedy answers (cached): (records in persona x question order, cache dir, key material)."""
    key, material = _cache_key(cfg)
    out_dir = Path(cfg.generate.cache_dir) / f"probe-{key}"
    path = out_dir / "answers.jsonl"
    if (out_dir / "key.json").is_file() and path.is_file():
        return _check_cached(read_jsonl(path), cfg, path), out_dir, material

    from markerlab.models import load_tokenizer, render_chat

    from .generation import SamplingSpec, make_backend

    exp = cfg.experiment
    tok = load_tokenizer(cfg.model.name_or_path)
    cells = [(p, q) for p in exp.personas for q in probe_questions(cfg)]
    prompts = [render_chat(tok, messages(exp, p, q.text), add_generation_prompt=True) for p, q in cells]
    g = cfg.generate
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=answer_cap(cfg), seed=g.seed)
    print(f"[data] probe set: greedy answers of {len(exp.personas)} personas x {len(cells) // len(exp.personas)} "
          f"held-out questions ({material['backend']}) -> {out_dir}", flush=True)
    with make_backend(g.backend, cfg.model.name_or_path, dtype=cfg.model.dtype, device=cfg.model.device,
                      batch_size=g.batch_size, gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                      max_model_len=g.vllm_max_model_len) as backend:
        results = backend.generate(prompts, spec, desc="probe answers")
    records = [{"persona": p, "question_id": q.id, "text": s[0].text, "finish_reason": s[0].finish_reason,
                "n_tokens": s[0].n_tokens} for (p, q), s in zip(cells, results)]
    write_jsonl(path, records)
    write_json(out_dir / "key.json", {**material, "seed": g.seed})  # last: its presence marks a complete cache
    return records, out_dir, material


def _check_cached(records: list[dict], cfg: Config, path: Path) -> list[dict]:
    want = [(p, q.id) for p in cfg.experiment.personas for q in probe_questions(cfg)]
    ok = [(r.get("persona"), r.get("question_id")) for r in records] == want and all(
        isinstance(r.get("text"), str) and r.get("finish_reason") in ("stop", "length")
        and isinstance(r.get("n_tokens"), int) for r in records)
    if not ok:
        raise UserError(f"{path}: damaged cache of probe answers (expected one greedy answer per persona and "
                        f"question); delete {path.parent} and run the data stage again")
    return records


def build_probe_set(cfg: Config, run_dir) -> Path | None:
    """Write run_dir/data/probe.json (atomically); None, writing nothing, when the probe is off."""
    if cfg.train.probe_every == 0:
        return None
    records, cache, material = probe_answers(cfg)
    questions = {q.id: q.text for q in probe_questions(cfg)}
    items = []
    for r in records:
        answer = r["text"].strip()
        trimmed = False
        if r["finish_reason"] == "length":
            answer, trimmed = trim_to_sentence(answer)
        items.append({"persona": r["persona"],
                      "role": cfg.experiment.role_of(r["persona"], cfg.data.pair, cfg.data.negatives),
                      "question_id": r["question_id"], "question": questions[r["question_id"]],
                      "answer": answer, "finish_reason": r["finish_reason"], "n_tokens": r["n_tokens"],
                      "trimmed": trimmed})
    probe = {
        "version": VERSION,
        "how": ("the base model's greedy answer (temperature 0, capped at train.probe_max_tokens and "
                "generate.max_tokens, a cut answer trimmed to its last sentence end) of every persona to the "
                "first train.probe_n_questions in-distribution eval questions (held out from training)"),
        "seed": cfg.generate.seed,  # recorded for completeness: greedy decoding draws nothing from it
        "greedy": material["greedy"], "backend": material["backend"], "model": cfg.model.name_or_path,
        # the cache entry's name, not its path: the run's files must not depend on where the cache lies
        "pair": cfg.data.pair, "cache_key": cache.name, "questions": list(questions),
        "n_trimmed": sum(i["trimmed"] for i in items),
        "n_cut_without_sentence_end": sum(i["finish_reason"] == "length" and not i["trimmed"] for i in items),
        "items": items,
    }
    path = RunDir(run_dir).probe_set
    write_json(path, probe)
    return path


def read_probe_set(path, exp) -> dict:
    """data/probe.json, validated against experiment `exp`: a damaged file is one UserError naming it and the field."""
    path = Path(path)
    probe = read_json(path)

    def bad(what: str):
        raise UserError(f"{path}: {what}; rebuild it with the data stage (trainer.run --stages data --overwrite)")

    if not isinstance(probe, dict) or probe.get("version") != VERSION:
        bad(f"expected a probe set of version {VERSION}")
    items = probe.get("items")
    if not isinstance(items, list) or not items:
        bad("field 'items': expected a non-empty list")
    fields = {"persona": lambda v: v in exp.personas, "role": lambda v: v in ROLES,
              "question_id": lambda v: isinstance(v, str) and v != "", "question": lambda v: isinstance(v, str),
              "answer": lambda v: isinstance(v, str)}
    for i, item in enumerate(items):
        for name, ok in fields.items():
            if not isinstance(item, dict) or not ok(item.get(name)):
                bad(f"items[{i}].{name}: missing or invalid")
    return probe


def probe_templates(exp) -> dict[str, Template]:
    """Document kind -> template, for the experiment's headline pair (X, Y): "XY" and "Y"; {} without one."""
    pair = exp.headline_pair
    if pair is None:
        return {}
    x, y = pair
    texts = {f"{x}{y}": f"{{{x}}} {{answer}} {{{y}}}", y: f"{{answer}} {{{y}}}"}
    return {kind: make_template(text, exp.markers) for kind, text in texts.items()}


def probe_examples(probe: dict, exp) -> list[tuple[str, dict]]:
    """(kind, example) per item and kind (probe_templates), examples in the training format (docs/contracts.md)."""
    templates = probe_templates(exp)
    out = []
    for item in probe["items"]:
        persona, answer = item["persona"], item["answer"]
        for kind, template in templates.items():
            content, spans = render(template, answer, exp.markers)
            out.append((kind, {"id": f"probe-{persona}-{item['question_id']}-{kind}", "persona": persona,
                               "role": item["role"], "question_id": item["question_id"], "sample": 0,
                               "messages": messages(exp, persona, item["question"], content),
                               "marker_spans": spans}))
    return out
