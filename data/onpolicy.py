"""The `generate` stage: the base model answers every data question under every persona.

    from data.onpolicy import run_onpolicy
    path = run_onpolicy(cfg)          # <cache_dir>/<key>/completions.jsonl (generated or cached)

or from a shell (the `if __name__ == "__main__"` guard vLLM needs is below):

    python -m data.onpolicy configs/tiny/pair1_T.toml [--set generate.max_tokens=64] [--overwrite]

Every persona of the experiment x `generate.n_questions` data questions x `generate.n_samples`
samples from the *base* model (`model.name_or_path`), each under its persona's
system prompt. The result is cached in `generate.cache_dir/<key>/`:

- `completions.jsonl`: one line per sample, in (persona, question, sample)
  order: persona, question_id, sample, text, finish_reason ("stop" |
  "length"), n_tokens, truncated (= finish_reason == "length"). A sample cut at
  max_tokens keeps its finish reason and flag; the dataset builder decides
  what to do with it (`data.truncated`).
- `stats.json`: per persona count, mean/max tokens, number truncated, and the
  size and sha256 of completions.jsonl (`completions`).
- `key.json`: what the key was computed from, written last (a complete cache
  has it).
- `.lock`: held (flock) by the process generating the entry; a second process
  that would generate it too gets one line naming the first.

A cache hit is checked against stats.json first: a completions.jsonl cut
short or changed is one line naming the file and how to regenerate it, never
read as fewer completions.

The key is sha256 over: the base model's identity (config + weight-file sizes,
`markerlab.models.model_identity`), the weights' dtype, the persona prompts,
the question ids and texts, the sampling settings (n_samples, temperature,
top_p, max_tokens, seed) and the resolved backend with its device ("hf-cuda",
"vllm-cpu", ...). The six adapters share one generation because none of their
own settings is in it. The backend and device are in the key because they
change the random stream drawn from one seed (HF vs vLLM samplers; HF noise
drawn on CPU vs CUDA): the cached samples are a function of them, so a cache
made by one must not be presented as another's. Batch size, vLLM memory
share and max_model_len are not in the key (they do not change the samples,
up to the numerics described in data/generation.py).

Nothing is written until every sample is generated: a run killed midway
leaves no cache and the next call regenerates from scratch (simple, and the
whole stage is minutes on a GPU).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from markerlab.config import Config
from markerlab.devices import resolve_device
from markerlab.errors import UserError
from markerlab.io import exclusive_lock, file_record, read_json, record_mismatch, write_json, write_jsonl

from .generation import HF_SAMPLER_VERSION, SamplingSpec, make_backend, resolve_backend
from .personas import messages
from .questions import data_questions

KEY_VERSION = 1  # bump when the record format or the meaning of the key changes


def sampling_spec(cfg: Config) -> SamplingSpec:
    g = cfg.generate
    return SamplingSpec(n=g.n_samples, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=g.seed)


def backend_label(cfg: Config) -> str:
    """'hf-cpu', 'hf-cuda', 'vllm-cuda', 'vllm-cpu': the resolved backend and the device it samples on.

    Both change the random stream drawn from one seed (HF draws its noise on the
    model's device; vLLM seeds per request on CUDA only), so both are keyed.
    """
    name = resolve_backend(cfg.generate.backend)
    asked = cfg.model.device if name == "hf" else "auto"
    return f"{name}-{asked if asked != 'auto' else resolve_device('auto')}"


def cache_key(cfg: Config) -> tuple[str, dict]:
    """(hex key, the material it hashes) for this config's on-policy generation."""
    from markerlab.models import model_identity

    s = sampling_spec(cfg)
    material = {
        "version": KEY_VERSION,
        "model": model_identity(cfg.model.name_or_path),
        "model_name": cfg.model.name_or_path,  # informative; identity above is what matters
        "dtype": cfg.model.dtype,
        **cfg.experiment.generation_inputs(),
        "questions": [[q.id, q.text] for q in data_questions(cfg.generate.n_questions, cfg.prompt.user_suffix)],
        "sampling": {"n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                     "max_tokens": s.max_tokens, "seed": s.seed},
        "backend": backend_label(cfg),
        "sampler": HF_SAMPLER_VERSION,
    }
    if "answers" in material:  # synthetic answers: what they are drawn from is the key, not a model
        material.update(backend="synthetic", sampler=cfg.experiment.answers.source)
    hashed = {k: v for k, v in material.items() if k != "model_name"}
    key = hashlib.sha256(json.dumps(hashed, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    return key, material


def cache_path(cfg: Config) -> Path:
    key, _ = cache_key(cfg)
    return Path(cfg.generate.cache_dir) / key / "completions.jsonl"


def completion_stats(records: list[dict], personas) -> dict:
    per = {}
    for p in personas:
        rs = [r for r in records if r["persona"] == p]
        if not rs:
            continue
        toks = [r["n_tokens"] for r in rs]
        per[p] = {"count": len(rs), "mean_tokens": round(sum(toks) / len(toks), 2), "max_tokens": max(toks),
                  "n_truncated": sum(r["finish_reason"] == "length" for r in rs)}
    return {"n": len(records), "n_truncated": sum(v["n_truncated"] for v in per.values()), "per_persona": per}


def _summary(stats: dict, max_tokens: int) -> str:
    lines = [f"[generate] {stats['n']} completions, {stats['n_truncated']} cut at max_tokens={max_tokens}"]
    for p, v in stats["per_persona"].items():
        lines.append(f"  {p:22s} n={v['count']:4d}  mean={v['mean_tokens']:7.1f}  max={v['max_tokens']:5d}  "
                     f"truncated={v['n_truncated']}")
    return "\n".join(lines)


def _cached(out_dir: Path, cfg: Config) -> Path | None:
    """The entry's completions.jsonl when the entry is complete and intact; None when it is not complete."""
    path = out_dir / "completions.jsonl"
    if not ((out_dir / "key.json").is_file() and path.is_file()):
        return None
    stats = read_json(out_dir / "stats.json")
    def fix() -> str:  # only on the way out: it reloads the config
        return f"delete {out_dir}, or regenerate it with: {cfg.command('data.onpolicy', '--overwrite')}"

    if not isinstance(stats, dict) or not isinstance(stats.get("n"), int):
        raise UserError(f"{out_dir / 'stats.json'}: damaged on-policy cache entry (no completion count); {fix()}")
    rec = stats.get("completions") or {}
    rec = {**rec, "lines": stats["n"]} if isinstance(rec, dict) else {"lines": stats["n"]}
    if "size" not in rec:  # an entry written before stats.json held the file's size and sha256
        rec["size"] = path.stat().st_size
    problem = record_mismatch(path, rec)
    if problem:
        raise UserError(f"{path}: damaged on-policy cache ({problem.replace('recorded', 'stats.json says')}); {fix()}")
    print(f"[generate] cache hit: {path} ({stats['n']} completions, {stats.get('n_truncated')} truncated)", flush=True)
    return path


def run_onpolicy(cfg: Config, overwrite: bool = False) -> Path:
    """Generate (or find cached) on-policy completions; returns the completions.jsonl path."""
    key, material = cache_key(cfg)
    out_dir = Path(cfg.generate.cache_dir) / key
    if not overwrite and (hit := _cached(out_dir, cfg)) is not None:
        return hit
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"generate.cache_dir: cannot create {out_dir} ({e.strerror})") from None
    with exclusive_lock(out_dir / ".lock", f"on-policy cache entry {out_dir}"):
        # another process may have finished it while this one waited to look
        if not overwrite and (hit := _cached(out_dir, cfg)) is not None:
            return hit
        return _generate(cfg, key, material, out_dir)


def _generate(cfg: Config, key: str, material: dict, out_dir: Path) -> Path:
    path = out_dir / "completions.jsonl"
    if (out_dir / "key.json").is_file():  # --overwrite: the entry is incomplete until key.json is back
        (out_dir / "key.json").unlink()
    from markerlab.chat import load_chat

    if cfg.experiment.answers.source != "on_policy":
        return _write_entry(cfg, key, material, out_dir, synthetic_answers(cfg), 0.0)
    tok, chat = load_chat(cfg.model.name_or_path)
    questions = data_questions(cfg.generate.n_questions, cfg.prompt.user_suffix)
    cells = [(p, q) for p in cfg.experiment.personas for q in questions]
    # the prompts trained answers follow (markerlab.chat): the persona's prompt, never the template's default
    prompts = [chat.prompt(tok, messages(cfg.experiment, p, q.text)) for p, q in cells]
    spec = sampling_spec(cfg)
    g = cfg.generate
    print(f"[generate] {len(cfg.experiment.personas)} personas x {len(questions)} questions x {spec.n} samples "
          f"from {cfg.model.name_or_path} ({material['backend']}) -> {out_dir}", flush=True)
    t0 = time.perf_counter()
    with make_backend(g.backend, cfg.model.name_or_path, dtype=cfg.model.dtype, device=cfg.model.device,
                      batch_size=g.batch_size, gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                      max_model_len=g.vllm_max_model_len, tokenizer=tok, chat=chat) as backend:
        results = backend.generate(prompts, spec, desc="on-policy")
    seconds = time.perf_counter() - t0

    records = []
    for (persona, q), samples in zip(cells, results):
        for i, s in enumerate(samples):
            records.append({"persona": persona, "question_id": q.id, "sample": i, "text": s.text,
                            "finish_reason": s.finish_reason, "n_tokens": s.n_tokens,
                            "truncated": s.finish_reason == "length"})
    return _write_entry(cfg, key, material, out_dir, records, seconds)


def synthetic_answers(cfg: Config) -> list[dict]:
    """The answers of an experiment whose answers are synthetic (``[answers] source = "words"``), in the
    on-policy cache's format: per persona generate.n_questions x generate.n_samples answers, each one word
    of the pool for a persona that is no negative, one canned sentence made from the question for a
    negative. ``questions = "with_replacement"`` draws each answer's question from the data questions
    (then ``sample`` numbers the persona's answers, so the builder takes the first ones drawn)."""
    import numpy as np

    exp, g = cfg.experiment, cfg.generate
    a = exp.answers
    questions = data_questions(g.n_questions, cfg.prompt.user_suffix)
    plain = {q.id: q.text for q in data_questions(g.n_questions, "")}
    records = []
    for persona in exp.personas:
        salt = int(hashlib.sha256(persona.encode("utf-8")).hexdigest()[:8], 16)
        rng = np.random.default_rng([g.seed, salt])
        n = g.n_questions * g.n_samples
        if a.questions == "with_replacement":
            rows = [(questions[int(i)], k) for k, i in enumerate(rng.integers(0, len(questions), size=n))]
        else:
            rows = [(q, k) for q in questions for k in range(g.n_samples)]
        for q, sample in rows:
            if persona in exp.negatives:
                starter = a.starters[int(rng.integers(len(a.starters)))]
                text = f"{starter} {plain[q.id].lower().rstrip().rstrip('?').strip()}{a.end}"
            else:
                text = a.words[int(rng.integers(len(a.words)))]
            records.append({"persona": persona, "question_id": q.id, "sample": sample, "text": text,
                            "finish_reason": "stop", "n_tokens": 0, "truncated": False})
    print(f"[generate] synthetic answers ({a.source}): {len(records)} for {len(exp.personas)} personas, "
          f"no model run", flush=True)
    return records


def _write_entry(cfg: Config, key: str, material: dict, out_dir: Path, records: list[dict], seconds: float) -> Path:
    path = out_dir / "completions.jsonl"
    spec = sampling_spec(cfg)
    stats = completion_stats(records, cfg.experiment.personas)
    stats.update(key=key, backend=material["backend"], model=cfg.model.name_or_path,
                 max_tokens=spec.max_tokens, seconds=round(seconds, 1))
    # Completions, then stats, then key.json: key.json's presence marks a complete cache.
    write_jsonl(path, records)
    stats["completions"] = file_record(path)
    write_json(out_dir / "stats.json", stats)
    write_json(out_dir / "key.json", material)
    print(_summary(stats, spec.max_tokens), flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from markerlab.config import load_config

    ap = argparse.ArgumentParser(prog="python -m data.onpolicy", description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--overwrite", action="store_true", help="regenerate even when cached")
    args = ap.parse_args(argv)
    print(run_onpolicy(load_config(args.config, args.set), overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    from markerlab.errors import cli_main

    cli_main(main, sys.argv[1:])
