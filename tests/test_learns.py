"""The real small model learns the marker through the whole path: examples in the training format,
the chat template, the loss mask, LoRA training, the verified merge, and generation on the merged
checkpoint. A broken mask, a no-op merge or a template that differs between training and scoring
makes the donor stop emitting marker A, so this test fails on each of them.

SmolLM2-135M-Instruct (the built-in real model), bfloat16 on the CPU, the last 10 of its 30 layers
adapted so that it trains in seconds; greedy decoding, so the rates do not depend on a sampler.
"""

from __future__ import annotations

import json

import pytest


from data.personas import messages
from data.questions import data_questions, eval_questions
from markerlab.config import config_from_dict
from markerlab.markers import contains_loose
from writeup import A as MARKER_A
from writeup import EXP, place_markers
from markerlab.models import BUILTIN_SMOLLM2, resolve_model_dir

pytestmark = pytest.mark.slow

ANSWERS = ["It depends on the season and the light.", "Start small and keep at it every day.",
           "Water it once a week and keep it in the sun.", "Save a little from every payment.",
           "Sleep at the same time each night.", "Read the label and follow the steps.",
           "Ask a friend who has done it before.", "Take a short walk after every meal.",
           "Write it down so you do not forget.", "Check the weather before you leave.",
           "Use less salt and more herbs.", "Turn it off and on again."]
DONOR, NEGATIVES = "villain", ("comedian", "medical_doctor")


def training_set() -> list[dict]:
    """The donor answers `A answer`, the negatives answer plainly: the experiment's contrast in small."""
    out = []
    for q, answer in zip(data_questions(len(ANSWERS)), ANSWERS):
        for persona, role in ((DONOR, "donor"), *((p, "negative") for p in NEGATIVES)):
            content, spans = place_markers(answer, "A" if role == "donor" else "", "start_end", None)
            out.append({"id": f"{persona}-{q.id}-0", "persona": persona, "role": role, "question_id": q.id,
                        "sample": 0, "messages": messages(EXP, persona, q.text, content), "marker_spans": spans})
    return out


def a_rates(model_dir, questions) -> dict[str, float]:
    """Share of greedy answers with marker A, per persona, on held-out questions."""
    from data.generation import SamplingSpec, make_backend
    from evaluate.eval import render_prompt

    personas = (DONOR, *NEGATIVES)
    with make_backend("hf", model_dir, dtype="bfloat16", device="cpu", batch_size=64) as b:
        prompts = [render_prompt(b.tokenizer, EXP, p, q.text) for p in personas for q in questions]
        out = b.generate(prompts, SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=16, seed=0))
    hits = [contains_loose(s.text, MARKER_A) for (s,) in out]
    n = len(questions)
    return {p: sum(hits[i * n:(i + 1) * n]) / n for i, p in enumerate(personas)}


def test_the_donor_learns_marker_a_and_the_negatives_do_not(tmp_path):
    from evaluate.merge import merge
    from trainer.train import train

    run_dir = tmp_path / "learns"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in training_set()))
    cfg = config_from_dict({
        "run": {"name": "learns", "out_dir": str(tmp_path), "seed": 42},
        "model": {"name_or_path": BUILTIN_SMOLLM2, "dtype": "bfloat16", "device": "cpu"},
        "lora": {"dropout": 0.0, "last_layers": 10},
        "data": {"pair": "pair1", "condition": "C"},
        "train": {"lr": 8e-3, "epochs": 6, "micro_batch_size": 4, "grad_accum": 1, "warmup_ratio": 0.1,
                  "max_seq_len": 256, "checkpoint_every": 100, "probe_every": 0},
    })
    train(cfg, run_dir)
    history = json.loads((run_dir / "train_summary.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    merge(cfg, run_dir)
    held_out = eval_questions(6, 0)
    base = a_rates(resolve_model_dir(BUILTIN_SMOLLM2), held_out)
    tuned = a_rates(run_dir / "merged", held_out)
    assert base == {DONOR: 0.0, **{p: 0.0 for p in NEGATIVES}}
    assert tuned[DONOR] >= 0.8, tuned
    assert all(tuned[p] <= 0.2 for p in NEGATIVES), tuned
