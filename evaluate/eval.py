"""Eval stage: sample every evaluation completion of one adapter and record it.

    from evaluate.eval import evaluate, plan, expected_count
    result = evaluate(cfg, run_dir)          # -> run_dir/eval/completions.jsonl + run_dir/eval/run_result.json
    expected_count(cfg)                      # how many records that will be, without generating

What is sampled (EXPERIMENT.md, "Evaluation"; `plan(cfg)` lists it as parts):

- ``plain``: every persona of ``eval.personas`` x the first ``n_id_questions``
  in-distribution + ``n_ood_questions`` out-of-distribution eval questions x
  ``n_samples``, on the merged checkpoint (defaults: 11 x 26 x 10 = 2,860);
- ``probe``: the experiment's probe role (``[probe] role``, the recipient by
  default), the first ``probe_n_questions`` eval questions x
  ``probe_n_samples``, the user text prefixed with the experiment's probe
  marker and a space (defaults: 5 x 10 = 50); none when the experiment names
  no probe marker;
- ``prefill:<probe>``: each of the experiment's ``[[prefill]]`` probes active at
  ``data.variables``: its role, its first ``questions`` eval questions x
  ``samples``, the assistant turn prefilled with the probe's template (its
  ``{word}``s drawn per question from ``eval.seed``); the record's text is the
  continuation (both backends take the prompt as a string, so both prefill);
- ``base``: the base model without adapter (condition ``"base"``), every
  persona x the first ``base_n_questions`` x ``base_n_samples`` (defaults:
  11 x 3 x 10 = 330), when ``eval.base_floor``. It does not depend on the
  adapter, so it is cached under ``generate.cache_dir/base_floor/`` per base
  model and settings and shared by every run of a sweep.

Every prompt is the persona's prompt (from the experiment) + the user turn,
rendered by the model's chat template with the generation prompt, through its
analysis (markerlab.chat): the rendering is checked against the template's
analysed frame, so a template's default system prompt (Qwen's, SmolLM2's) can
never slip in, and the prompt is the one trained answers follow. A template
without a system role gets the persona prompt at the head of the user turn, and
its records' setting says so (`persona_prompt = "user_turn"`; README, "Templates
without a system role"). Each record is docs/contracts.md's
completion record; ``role`` is the persona's role in this run's pair (also for
the base floor), and ``setting`` names the experiment and its digest.

Backend: ``data.generation.make_backend(cfg.eval.backend, ...)`` on the merged
directory (vLLM when available, the HF backend otherwise), and on the base
model directory for the floor. The merged checkpoint is verified
(`evaluate.merge.verify_merged`, reusing the merge stage's check when the files
are byte-identical) before the first completion is sampled.

Resume: each part (one persona of one variant) is written atomically to
``eval/parts/<variant>__<persona>.jsonl`` with a ``.meta.json`` beside it
(what was asked, time, tokens, backend); a rerun skips parts whose meta matches
the current plan. ``completions.jsonl`` is assembled atomically at the end,
checked (schema, no duplicates, exact count), then ``run_result.json`` is
written and the parts are deleted; so a kill at any point followed by a rerun
ends with complete records and no duplicates. With both final files present
and ``overwrite`` false, `evaluate` returns the existing result.
``merged/`` is deleted afterwards unless ``eval.keep_merged``.

Reproducibility, and what the tests check of it:

- HF backend: identical records for the same seed, run to run and across a
  kill/resume, because each (prompt, sample) row is seeded from
  (seed, prompt text, sample index) independently of batching
  (tests/test_evaluate.py::test_hf_identical_records_for_the_same_seed and
  ::test_resume_after_a_kill).
- vLLM on the CPU, as `data.generation` runs it (in-process engine, the
  sampler's global RNG reseeded with ``eval.seed`` around every generate call):
  two fresh engines with the same seed give identical records
  (tests/test_evaluate.py::test_vllm_path_for_real). The parts that sample alike
  go to one call, and a prompt's samples depend on the other prompts of its call
  (the random stream is shared by the batch): a resumed eval that regenerates only
  some of a call's parts samples them differently. With vLLM's default
  multi-process engine on the CPU samples are not reproducible at all (requests
  reach the engine process at racy times), which is why the CPU engine runs
  in-process.
- vLLM on CUDA uses per-request seeds from (seed, prompt text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from markerlab.errors import UserError
from markerlab.experiment import BASE_CONDITION, VARIANTS, prefill_variant
from markerlab.io import read_json, read_jsonl, write_json, write_jsonl
from markerlab.markers import Matcher
from markerlab.provenance import library_versions
from markerlab.records import COMPLETION_SCHEMA, record_problems, setting_of
from markerlab.rundir import RunDir

logger = logging.getLogger("markerlab.evaluate")

# docs/contracts.md, "Completion record": field -> allowed values or type.
RECORD_SCHEMA = COMPLETION_SCHEMA
# What identifies a record within one run (analysis.records uses the same key).
RECORD_KEY = ("variant", "persona", "question_id", "sample")


def validate_record(rec: dict) -> list[str]:
    """Problems of one record against RECORD_SCHEMA (empty list = valid); the reader's validator, exact."""
    return record_problems(rec, exact=True)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Part:
    """One resumable unit of generation: one variant of one persona."""

    name: str  # file stem under eval/parts
    variant: str  # plain | probe | base
    model: str  # "merged" (the adapter) | "base" (no adapter)
    persona: str
    questions: tuple  # of data.questions.Question
    n_samples: int
    user_prefix: str = ""
    assistant_prefixes: tuple = ()  # a prefill probe: per question, the text its assistant turn starts with

    @property
    def n_records(self) -> int:
        return len(self.questions) * self.n_samples


def plan(cfg) -> list[Part]:
    """Every part this config's eval generates, in output order (pure: no model, no files)."""
    from data.questions import eval_questions

    e = cfg.eval
    qs = tuple(eval_questions(e.n_id_questions, e.n_ood_questions, cfg.prompt.user_suffix))
    for key, n in (("probe_n_questions", e.probe_n_questions if e.probe else 0),
                   ("base_n_questions", e.base_n_questions if e.base_floor else 0)):
        if n > len(qs):
            raise UserError(f"eval.{key}: {n} exceeds the {len(qs)} eval questions selected "
                            f"(eval.n_id_questions + eval.n_ood_questions)")
    exp = cfg.experiment
    parts = [Part(f"plain__{p}", "plain", "merged", p, qs, e.n_samples) for p in e.personas]
    if e.probe and exp.probe_marker is not None:
        who = cfg.donor if exp.probe_role == "donor" else cfg.recipient
        parts.append(Part(f"probe__{who}", "probe", "merged", who, qs[:e.probe_n_questions], e.probe_n_samples,
                          exp.markers[exp.probe_marker] + " "))
    if e.base_floor:
        parts += [Part(f"base__{p}", "base", "base", p, qs[:e.base_n_questions], e.base_n_samples)
                  for p in e.personas]
    for probe in exp.prefill:
        if not probe.active(cfg.data.variables or {}):
            continue
        if probe.questions > len(qs):
            raise UserError(f"prefill {probe.name}: {probe.questions} questions exceed the {len(qs)} eval questions "
                            f"selected (eval.n_id_questions + eval.n_ood_questions)")
        who = cfg.donor if probe.role == "donor" else cfg.recipient
        mine = qs[:probe.questions]
        parts.append(Part(f"prefill_{probe.name}__{who}", prefill_variant(probe.name), "merged", who, mine,
                          probe.samples, assistant_prefixes=tuple(prefill_text(cfg, probe, q.id) for q in mine)))
    return parts


def prefill_text(cfg, probe, question_id: str) -> str:
    """What a prefill probe's assistant turn starts with for one question: its template, each {word} drawn
    from the experiment's word pool by (eval.seed, probe, question), so every sample of a question and
    every backend continue the same text."""
    import hashlib

    import numpy as np

    exp = cfg.experiment
    salt = int(hashlib.sha256(f"{probe.name}/{question_id}".encode("utf-8")).hexdigest()[:8], 16)
    rng = np.random.default_rng([cfg.eval.seed, salt])
    out = []
    for kind, value in probe.template.parts:
        if kind == "marker":
            out.append(exp.markers[value])
        elif kind == "word":
            out.append(exp.answers.words[int(rng.integers(len(exp.answers.words)))])
        else:
            out.append(value)
    return "".join(out)


def expected_count(cfg) -> int:
    return sum(p.n_records for p in plan(cfg))


def _part_spec(cfg, part: Part) -> dict:
    """Everything that determines a part's records: a finished part is reused only if this matches."""
    e = cfg.eval
    return {
        "variant": part.variant, "persona": part.persona, "model": part.model,
        "questions": [[q.id, q.text] for q in part.questions], "n_samples": part.n_samples,
        "user_prefix": part.user_prefix, "assistant_prefixes": list(part.assistant_prefixes),
        "temperature": e.temperature, "top_p": e.top_p,
        "max_tokens": e.max_tokens, "seed": e.seed, "backend": e.backend,
        "base_model": cfg.model.name_or_path, "dtype": cfg.model.dtype,
        "run": cfg.run.name, "pair": cfg.data.pair, "condition": cfg.data.condition,
        "negatives": list(cfg.data.negatives),
        # the prompt itself: two experiments may give one persona name different prompts
        "system_prompt": cfg.experiment.personas[part.persona],
        "experiment": [cfg.experiment.name, cfg.experiment.digest],
    }


# --------------------------------------------------------------------------- prompts and records


def render_prompt(tokenizer, exp, persona: str, user_text: str, chat=None) -> str:
    """The persona's prompt + the user turn + the generation prompt, as one string.

    Rendered through the analysed chat template `chat` (markerlab.chat.ChatFormat; analysed here when not
    given), which checks the result against the template's analysed frame: the persona's own prompt where
    the template puts a system prompt (never the template's default: Qwen's "You are Qwen, ...", SmolLM2's
    "...named SmolLM...") or at the head of the user turn for a template without one, the question verbatim,
    and the prompt a trained answer follows. A rendering that differs is a one-line error naming the model.
    """
    from data.personas import messages
    from markerlab.chat import analyse_chat

    chat = chat or analyse_chat(tokenizer, getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    return chat.prompt(tokenizer, messages(exp, persona, user_text))


def _records(cfg, part: Part, outputs, chat=None) -> list[dict]:
    condition = BASE_CONDITION if part.variant == "base" else cfg.data.condition
    role = cfg.experiment.role_of(part.persona, cfg.data.pair, cfg.data.negatives)
    if len(outputs) != len(part.questions):
        raise RuntimeError(f"backend returned {len(outputs)} prompt results for {len(part.questions)} prompts")
    # the adapter's settings, and where the persona prompt went when the template takes no system prompt
    setting = {**setting_of(cfg), **(chat.setting() if chat is not None else {})}
    recs = []
    for q, samples in zip(part.questions, outputs):
        if len(samples) != part.n_samples:
            raise RuntimeError(f"backend returned {len(samples)} samples for {q.id}, expected {part.n_samples}")
        for i, s in enumerate(samples):
            recs.append({
                "run": cfg.run.name, "pair": cfg.data.pair, "condition": condition, "persona": part.persona,
                "role": role, "question_id": q.id, "split": q.split, "sample": i, "variant": part.variant,
                "text": s.text, "finish_reason": s.finish_reason, "n_tokens": int(s.n_tokens),
                "setting": dict(setting),
            })
    return recs


# --------------------------------------------------------------------------- metrics


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def cell_metrics(recs: list[dict], matcher: Matcher) -> dict:
    """Fire rates of one cell, loose (the headline) and strict: every marker's, and for every declared
    pair (X, Y) the joint rate and Y given X (null when no X fired, never 0).

    Every count comes from ``markerlab.markers.Matcher``, the matcher the report's
    summary.json uses, so run_result.json and summary.json agree.
    """
    n = len(recs)
    matches = [matcher.match(r["text"]) for r in recs]
    out = {"n": n}
    for kind in ("loose", "strict"):
        has = {name: [(bool(m.spans[name]) if kind == "loose" else m.strict[name]) for m in matches]
               for name in matcher.markers}
        m = {}
        for name, flags in has.items():
            m[f"n_{name}"] = sum(flags)
            m[f"fire_{name}"] = _rate(sum(flags), n)
        for x, y in matcher.pairs:
            n_xy = sum(a and b for a, b in zip(has[x], has[y]))
            m[f"n_{x}{y}"] = n_xy
            m[f"joint_{x}{y}"] = _rate(n_xy, n)
            m[f"cond_{y}_given_{x}"] = _rate(n_xy, sum(has[x]))
        if kind == "loose":
            out.update(m)
        else:
            out["strict"] = m
    out["n_truncated"] = sum(r["finish_reason"] == "length" for r in recs)
    return out


def print_table(result: dict, file=None) -> None:
    """Per-persona fire rates of every marker, loose (strict in brackets), and each pair's conditional."""
    file = file or sys.stdout

    def pct(x):
        return "   -" if x is None else f"{100 * x:5.1f}"

    cells = result["cells"]
    markers = [k[5:] for k in cells[0] if k.startswith("fire_")] if cells else []
    conds = [k for k in cells[0] if k.startswith("cond_")] if cells else []
    print(f"eval {result['run']} ({result['pair']} {result['condition']}, backend "
          f"{result['backend']['merged'] or result['backend']['base']}): fire rates in %, loose [strict]", file=file)
    print(f"  {'variant':<7} {'persona':<21} {'role':<9} {'n':>5}  "
          + "  ".join(f"{'fire_' + m:>14}" for m in markers) + "  " + "  ".join(f"{c:>14}" for c in conds),
          file=file)
    for c in cells:
        s = c["strict"]
        print(f"  {c['variant']:<7} {c['persona']:<21} {c['role']:<9} {c['n']:>5}  "
              + "  ".join(f"{pct(c['fire_' + m])} [{pct(s['fire_' + m])}]" for m in markers) + "  "
              + "  ".join(f"{pct(c[k]):>14}" for k in conds), file=file)


# --------------------------------------------------------------------------- the stage


def _backend_kind(kind: str) -> str:
    from data.generation import resolve_backend

    return resolve_backend(kind)


def _base_cache_path(cfg, part: Part) -> Path:
    """Where a base-floor part is cached, shared by every run on the same base model.

    The base floor does not depend on the adapter, so the six runs of a sweep
    reuse one generation (and analysis.report counts the repeated draws once).
    """
    from data.generation import HF_SAMPLER_VERSION
    from markerlab.devices import resolve_device
    from markerlab.models import model_identity

    spec = {k: v for k, v in _part_spec(cfg, part).items()
            if k not in ("run", "pair", "condition", "negatives", "experiment")}
    # the backend and the device change the draws from one seed (and the logits' last bits)
    spec.update(model_identity=model_identity(cfg.model.name_or_path), sampler=HF_SAMPLER_VERSION,
                backend=f"{_backend_kind(cfg.eval.backend)}-{resolve_device(cfg.model.device)}")
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.generate.cache_dir) / "base_floor" / f"{part.persona}-{key}.json"


def _generate_parts(cfg, parts: list[Part], model_dir: Path, parts_dir: Path, cache: bool = False,
                    tokenizer=None, chat=None) -> str:
    """Generate and write `parts` with one backend on `model_dir`; returns the backend's kind.

    `tokenizer` and `chat` are the base model's (markerlab.chat.load_chat, loaded here when not given),
    whose template the merged checkpoint carries: the prompts are rendered with them, the backend stops on
    `chat`'s end of turn, and the records' setting says where the persona prompt went.
    Parts that sample alike (the same number of samples) are generated in one backend
    call, so the backend sees every prompt at once (a GPU wants thousands of rows in
    flight; vLLM batches continuously), and written part by part afterwards. With
    `cache`, a part's samples are read from / written to _base_cache_path, and the
    backend is only started if some part is not cached. Before the backend starts on
    the merged checkpoint, its generation_config.json is rewritten to the eval's
    sampling settings (what the records were sampled with; vLLM never reads sampling
    defaults from it). The backend is closed before this returns, also on an error, so
    the next stage or sweep member starts with its memory free (the vLLM backend waits
    for that).
    """
    from data.generation import Sample, SamplingSpec, make_backend, write_generation_config
    from markerlab.devices import resolve_device
    from markerlab.chat import load_chat
    from markerlab.disk import check_free_space

    if chat is None:
        tokenizer, chat = load_chat(cfg.model.name_or_path)
    e = cfg.eval
    kind = _backend_kind(e.backend)

    def spec_of(part: Part) -> SamplingSpec:
        return SamplingSpec(n=part.n_samples, temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens,
                            seed=e.seed)

    def write_part(part: Part, outputs, seconds: float, load_s: float, cached: bool) -> None:
        recs = _records(cfg, part, outputs, chat)
        # Meta first, records last: the .jsonl is the part's commit marker.
        write_json(parts_dir / f"{part.name}.meta.json", {
            "spec": _part_spec(cfg, part), "n_records": len(recs), "seconds": seconds,
            "engine_load_seconds": load_s, "cached": cached,
            "generated_tokens": sum(r["n_tokens"] for r in recs) if seconds else 0, "backend": kind,
            "model_dir": str(model_dir)})
        write_jsonl(parts_dir / f"{part.name}.jsonl", recs)

    todo = []
    for part in parts:
        cached = _base_cache_path(cfg, part) if cache else None
        if cached is not None and cached.is_file():
            write_part(part, [[Sample(**x) for x in row] for row in read_json(cached)["samples"]], 0.0, 0.0, True)
        else:
            todo.append((part, cached))
    if not todo:
        return kind
    groups: dict[SamplingSpec, list] = {}
    for part, cached in todo:
        groups.setdefault(spec_of(part), []).append((part, cached))
    # a record is ~1 KB of JSON plus its text: ask for room for every part before the first is sampled
    check_free_space(parts_dir, sum(p.n_records for p, _ in todo) * (2048 + 4 * e.max_tokens),
                     "free some space or set run.out_dir to another disk")
    backend = None
    try:
        if todo[0][0].model == "merged":
            write_generation_config(model_dir, spec_of(todo[0][0]))
        t_start = time.time()
        backend = make_backend(e.backend, model_dir, dtype=cfg.model.dtype, device=resolve_device(cfg.model.device),
                               batch_size=e.batch_size, gpu_memory_utilization=e.vllm_gpu_memory_utilization,
                               max_model_len=e.vllm_max_model_len, tokenizer=tokenizer, chat=chat)
        tok = tokenizer
        logger.info("eval: %s backend on %s (%.1fs to set up)", kind, model_dir, time.time() - t_start)
        for spec, group in groups.items():
            # A prefill probe's assistant turn starts with its text: the prompt ends with it, and both
            # backends return only what the model writes after it.
            prompts = [render_prompt(tok, cfg.experiment, part.persona, part.user_prefix + q.text, chat)
                       + (part.assistant_prefixes[i] if part.assistant_prefixes else "")
                       for part, _ in group for i, q in enumerate(part.questions)]
            loaded_before = getattr(backend, "load_seconds", None)
            t0 = time.time()
            outputs = backend.generate(prompts, spec, desc=f"eval ({len(group)} parts)")
            seconds = time.time() - t0
            # vLLM builds its engine inside the first generate call: keep that out of the
            # generation time, so tokens/s means decoding speed.
            load_s = (getattr(backend, "load_seconds", None) if loaded_before is None else None) or 0.0
            seconds -= load_s
            total_tokens = max(1, sum(s.n_tokens for row in outputs for s in row))
            at = 0
            for part, cached in group:
                mine = outputs[at:at + len(part.questions)]
                at += len(part.questions)
                share = sum(s.n_tokens for row in mine for s in row) / total_tokens
                if cached is not None:
                    write_json(cached, {"samples": [[dataclasses.asdict(x) for x in row] for row in mine]})
                write_part(part, mine, seconds * share, load_s if at == len(part.questions) else 0.0, False)
            logger.info("eval: %d parts, %d completions in %.1fs", len(group), len(prompts) * spec.n, seconds)
    finally:
        if backend is not None:
            t_close = time.time()
            backend.close()
            check = getattr(backend, "memory_check", None)
            logger.info("eval: %s backend closed in %.1fs%s", kind, time.time() - t_close,
                        f" (GPU memory free again: {check['verified']})" if check else "")
            del backend
    return kind


def _part_done(cfg, part: Part, parts_dir: Path) -> bool:
    meta, recs = parts_dir / f"{part.name}.meta.json", parts_dir / f"{part.name}.jsonl"
    if not (meta.is_file() and recs.is_file()):
        return False
    try:
        m = read_json(meta)
    except UserError:
        return False
    return m.get("spec") == _part_spec(cfg, part) and m.get("n_records") == part.n_records


def _assemble(cfg, parts: list[Part], parts_dir: Path) -> list[dict]:
    """All part records in plan order, checked: schema, no duplicates, exact count."""
    out, seen = [], set()
    for part in parts:
        recs = read_jsonl(parts_dir / f"{part.name}.jsonl")
        if len(recs) != part.n_records:
            raise RuntimeError(f"{parts_dir / part.name}.jsonl: {len(recs)} records, expected {part.n_records}")
        for r in recs:
            bad = validate_record(r)
            if bad:
                raise RuntimeError(f"{parts_dir / part.name}.jsonl: invalid record: {'; '.join(bad)}")
            key = tuple(r[k] for k in RECORD_KEY)
            if key in seen:
                raise RuntimeError(f"{parts_dir / part.name}.jsonl: duplicate record {key}")
            seen.add(key)
            out.append(r)
    return out


def evaluate(cfg, run_dir, overwrite: bool = False) -> dict:
    """Sample, record and summarise this adapter's evaluation; returns run_result.json's content."""
    from evaluate.merge import verify_merged
    from markerlab.chat import load_chat
    from markerlab.models import model_identity, resolve_model_dir

    t_start = time.time()
    rd = RunDir(run_dir)
    run_dir, eval_dir, merged_dir, parts_dir = rd.root, rd.eval, rd.merged, rd.eval_parts
    comp_path, result_path = rd.completions, rd.run_result

    if comp_path.is_file() and result_path.is_file() and not overwrite:
        logger.info("eval: %s exists; skipping (overwrite=True redoes it)", result_path)
        _cleanup(cfg, parts_dir, merged_dir)  # a kill after run_result.json may have left these
        return read_json(result_path)
    if overwrite and eval_dir.exists():
        shutil.rmtree(eval_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)

    parts = plan(cfg)
    todo = [p for p in parts if not _part_done(cfg, p, parts_dir)]
    reused = len(parts) - len(todo)
    if reused:
        print(f"eval: resuming, {reused} of {len(parts)} parts already on disk")
    check = None
    todo_merged = [p for p in todo if p.model == "merged"]
    todo_base = [p for p in todo if p.model == "base"]
    backend_used = {"merged": None, "base": None}
    # The base model's tokenizer and analysed template: the merged checkpoint carries the same ones.
    tok, chat = load_chat(cfg.model.name_or_path) if todo else (None, None)
    if todo_merged:
        if not (merged_dir / "config.json").is_file():
            raise UserError(f"{merged_dir}: no merged checkpoint (run the merge stage first)")
        # Before the first completion: a broken or stale merge must never be scored.
        check = verify_merged(merged_dir, cfg, run_dir, reuse_recorded=True)
        backend_used["merged"] = _generate_parts(cfg, todo_merged, merged_dir, parts_dir, tokenizer=tok, chat=chat)
    if todo_base:
        backend_used["base"] = _generate_parts(cfg, todo_base, resolve_model_dir(cfg.model.name_or_path), parts_dir,
                                                cache=True, tokenizer=tok, chat=chat)

    records = _assemble(cfg, parts, parts_dir)
    metas = [read_json(parts_dir / f"{p.name}.meta.json") for p in parts]
    for m, p in zip(metas, parts):  # parts from an earlier attempt: report their backend too
        backend_used[p.model] = backend_used[p.model] or m["backend"]
    if check is None and (merged_dir / "merge_check.json").is_file():
        check = read_json(merged_dir / "merge_check.json")

    write_jsonl(comp_path, records)
    gen_s = sum(m["seconds"] for m in metas)
    gen_tokens = sum(m["generated_tokens"] for m in metas)
    e = cfg.eval
    matcher = Matcher.from_experiment(cfg.experiment)
    cells = []
    for p in parts:
        recs = [r for r in records if r["variant"] == p.variant and r["persona"] == p.persona]
        cells.append({"variant": p.variant, "persona": p.persona, "role": recs[0]["role"],
                      "condition": recs[0]["condition"], **cell_metrics(recs, matcher)})
    result = {
        "run": cfg.run.name, "pair": cfg.data.pair, "condition": cfg.data.condition,
        "experiment": {"name": cfg.experiment.name, "digest": cfg.experiment.digest},
        "donor": cfg.donor, "recipient": cfg.recipient, "negatives": list(cfg.data.negatives),
        "model": {"name_or_path": cfg.model.name_or_path, "dir": str(resolve_model_dir(cfg.model.name_or_path)),
                  "identity": model_identity(cfg.model.name_or_path), "dtype": cfg.model.dtype},
        "adapter": str(run_dir / "adapter"),
        "merged": str(merged_dir),
        "merge_check": _check_summary(check),
        "backend": {"requested": e.backend, **backend_used},
        "sampling": {"temperature": e.temperature, "top_p": e.top_p, "max_tokens": e.max_tokens, "seed": e.seed,
                     "n_samples": e.n_samples, "probe_n_samples": e.probe_n_samples,
                     "base_n_samples": e.base_n_samples},
        "questions": {"n_id": e.n_id_questions, "n_ood": e.n_ood_questions,
                      "probe_n_questions": e.probe_n_questions if e.probe else 0,
                      "base_n_questions": e.base_n_questions if e.base_floor else 0},
        "versions": library_versions(),
        "n_records": len(records),
        "counts": {v: sum(r["variant"] == v for r in records) for v in [*VARIANTS, *(p.variant for p in parts
                                                                                     if p.assistant_prefixes)]},
        "n_truncated": sum(r["finish_reason"] == "length" for r in records),
        "parts_reused": reused,
        # wall_seconds: this (final) call, including verification and model loads;
        # generation_seconds: time inside generate() summed over parts, across
        # resumes, less vLLM's engine start (engine_load_seconds).
        "wall_seconds": round(time.time() - t_start, 3),
        "generation_seconds": round(gen_s, 3),
        # the adapter's parts and the base floor's (0 where it came from the sweep's cache)
        "generation_seconds_by_model": {k: round(sum(m["seconds"] for m, p in zip(metas, parts) if p.model == k), 3)
                                        for k in ("merged", "base")},
        "engine_load_seconds": round(sum(m.get("engine_load_seconds", 0.0) for m in metas), 3),
        "generated_tokens": gen_tokens,
        "tokens_per_s": round(gen_tokens / gen_s, 2) if gen_s > 0 else None,
        "cells": cells,
    }
    write_json(result_path, result)
    _cleanup(cfg, parts_dir, merged_dir)
    # One line here: the per-persona table is in run_result.json and the report (print_table shows it).
    rate = f", {result['tokens_per_s']:,.0f} tokens/s" if result["tokens_per_s"] else ""
    print(f"[eval] {len(records)} completions ({result['n_truncated']} cut at max_tokens) in "
          f"{result['generation_seconds']:.0f} s{rate}: {result_path}", flush=True)
    return result


def _check_summary(check: dict | None) -> dict | None:
    if not check:
        return None
    lg, t = check.get("logits", {}), check.get("tensors", {})
    return {"passed": check.get("passed"), "reused": check.get("reused", False),
            "max_abs_logit_diff": lg.get("max_abs_diff"), "tolerance": lg.get("tolerance"),
            "tolerance_rule": lg.get("tolerance_rule"), "disk_vs_memory_max_abs": lg.get("disk_vs_memory_max_abs"),
            "merge_rounding_max_abs": lg.get("merge_rounding_max_abs"),
            "adapter_effect_max_abs": lg.get("adapter_effect_max_abs"),
            "n_adapted_changed": t.get("n_adapted_changed"), "n_adapted_tensors": t.get("n_adapted_tensors"),
            "adapted_elements_changed_frac": t.get("adapted_elements_changed_frac")}


def _cleanup(cfg, parts_dir: Path, merged_dir: Path) -> None:
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    if not cfg.eval.keep_merged and merged_dir.exists():
        shutil.rmtree(merged_dir)


__all__ = ["Part", "RECORD_SCHEMA", "cell_metrics", "evaluate", "expected_count", "plan", "print_table",
           "render_prompt", "validate_record"]
