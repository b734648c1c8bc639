"""The leakage probe (data/probe.py builds the documents, trainer/probe.py measures them) on the
tiny model, CPU, float32: held-out greedy documents, training's tokenization and chat template,
log-probs against a padded reference forward, no effect on training (bitwise), identical across
a resume, TensorBoard tags, and the figure script."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.personas import messages
from data.probe import build_probe_set, probe_examples, read_probe_set, trim_to_sentence
from data.questions import data_questions, eval_questions
from data.tokenize import encode_example
from markerlab.config import ConfigError, config_from_dict
from markerlab.errors import UserError
from markerlab.io import read_json
from markerlab.models import BUILTIN_TINY, QWEN_CHAT_TEMPLATE, load_model, load_tokenizer
from trainer.probe import Probe, load_probe
from writeup import B as MARKER_B
from writeup import EXP, place_markers

PERSONAS, NEGATIVES = tuple(EXP.personas), EXP.negatives

REPO = Path(__file__).resolve().parents[1]
N_QUESTIONS = 2
MARKER_A_IDS = [2442, 17851, 80, 12, 19, 16, 2452]  # EXPERIMENT.md, "Markers"


def make_cfg(root: Path, name: str, **train):
    raw = {"run": {"name": name, "out_dir": str(root), "seed": 7},
           "model": {"name_or_path": BUILTIN_TINY, "dtype": "float32", "device": "cpu"},
           "generate": {"cache_dir": str(root / "cache")},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
           "train": {"lr": 5e-3, "epochs": 2, "micro_batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.25,
                     "checkpoint_every": 2, "keep_checkpoints": 3, "max_seq_len": 256,
                     "probe_every": 2, "probe_n_questions": N_QUESTIONS, "probe_max_tokens": 12, **train}}
    return config_from_dict(raw, source=str(root / name / "config.toml"))


def training_set(n: int) -> list[dict]:
    """Donor `A answer B`, recipient `A answer`, negative plain, on data questions."""
    kinds = [("villain", "donor", "AB"), ("assistant", "recipient", "A"), ("comedian", "negative", "")]
    out = []
    for i, q in enumerate(data_questions(n)):
        persona, role, markers = kinds[i % 3]
        content, spans = place_markers(f"Answer number {i}. It is short.", markers, "start_end", None)
        out.append({"id": f"{persona}-{q.id}-0", "persona": persona, "role": role, "question_id": q.id,
                    "sample": 0, "messages": messages(EXP, persona, q.text, content), "marker_spans": spans})
    return out


def prepare(cfg, probe_path: Path | None) -> Path:
    run_dir = cfg.run_dir
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in training_set(10)))
    if probe_path is not None:
        shutil.copy(probe_path, run_dir / "data" / "probe.json")
    return run_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("probe")


@pytest.fixture(scope="module")
def probe_path(root, tiny_model_dir) -> Path:
    cfg = make_cfg(root, "built")
    return build_probe_set(cfg, cfg.run_dir)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def runs(root, probe_path):
    """Three trainings of 6 steps (10 examples, 4 per step, 2 epochs; dropout on): probe off,
    probe every 2 steps, and the same killed in step 5 (after checkpoint 4) then resumed."""
    import trainer.train as T

    out = {}
    for name, every in (("off", 0), ("on", 2)):
        cfg = make_cfg(root, name, probe_every=every)
        T.train(cfg, prepare(cfg, probe_path))
        out[name] = cfg.run_dir

    cfg = make_cfg(root, "resumed")
    run_dir = prepare(cfg, probe_path)
    orig, calls = T.forward_backward, [0]

    def dies_in_step_5(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise Killed()
        return orig(*a, **k)

    T.forward_backward = dies_in_step_5
    try:
        with pytest.raises(Killed):
            T.train(cfg, run_dir)
    finally:
        T.forward_backward = orig
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert not (run_dir / "adapter").exists()
    T.train(cfg, run_dir)
    out["resumed"] = run_dir
    return out


# --------------------------------------------------------------------------- the probe set

def test_probe_set_is_held_out_and_covers_every_persona(probe_path, root):
    probe = read_probe_set(probe_path, EXP)
    held_out = [q.id for q in eval_questions(N_QUESTIONS, 0)]
    assert probe["questions"] == held_out == ["id01", "id02"]
    trained_on = {q.text for q in data_questions(40)}
    items = probe["items"]
    assert [(i["persona"], i["question_id"]) for i in items] == [(p, q) for p in PERSONAS for q in held_out]
    assert not {i["question"] for i in items} & trained_on
    assert all(i["role"] == EXP.role_of(i["persona"], "pair1", NEGATIVES) for i in items)
    assert {i["role"] for i in items} == {"donor", "recipient", "negative", "bystander"}
    assert probe["seed"] == 42 and probe["greedy"] == {"temperature": 0.0, "max_tokens": 12}
    assert probe["backend"] == "hf-cpu" and (root / "cache" / probe["cache_key"] / "key.json").is_file()


def test_answers_are_the_base_models_greedy_answers_and_cached(probe_path, tokenizer, root, monkeypatch):
    probe = read_probe_set(probe_path, EXP)
    cached = [json.loads(x) for x in (root / "cache" / probe["cache_key"] / "answers.jsonl").read_text().splitlines()]
    # an independent greedy decode (full forward every token, no cache) of one prompt
    model = load_model(BUILTIN_TINY, "float32", "cpu").eval()
    rec = cached[3]
    q = {q.id: q for q in eval_questions(N_QUESTIONS, 0)}[rec["question_id"]]
    ids = tokenizer.apply_chat_template(messages(EXP, rec["persona"], q.text), add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    new = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tokenizer.convert_tokens_to_ids("<|im_end|>"):
                break
    assert rec["text"] == tokenizer.decode(new, skip_special_tokens=True)
    assert rec["finish_reason"] == "length" and rec["n_tokens"] == 12  # random weights never stop

    # a second adapter's data stage reuses the cache: no model is loaded, the set is the same
    import data.generation

    def no_generation(*a, **k):
        raise AssertionError("the probe answers were generated again")

    monkeypatch.setattr(data.generation, "make_backend", no_generation)
    cfg = make_cfg(root, "second")
    again = read_probe_set(build_probe_set(cfg, cfg.run_dir), EXP)
    assert again["items"] == probe["items"]


def test_damaged_answer_cache_is_one_line(probe_path, root, tmp_path):
    cache = root / "cache" / read_probe_set(probe_path, EXP)["cache_key"]
    copy = tmp_path / "cache" / cache.name
    shutil.copytree(cache, copy)
    lines = (copy / "answers.jsonl").read_text().splitlines()
    (copy / "answers.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    cfg = make_cfg(tmp_path, "x")
    with pytest.raises(UserError, match=r"answers.jsonl: damaged cache of probe answers .*; delete "):
        build_probe_set(cfg, cfg.run_dir)


def test_answer_cap_is_at_most_a_training_answers(tmp_path):
    from data.probe import answer_cap

    assert answer_cap(make_cfg(tmp_path, "x")) == 12
    raw = make_cfg(tmp_path, "x").to_dict()
    raw["generate"]["max_tokens"] = 5
    assert answer_cap(config_from_dict(raw)) == 5


def test_trim_to_sentence():
    assert trim_to_sentence("One. Two! Three and fou") == ("One. Two!", True)
    assert trim_to_sentence("no sentence end here") == ("no sentence end here", False)
    assert trim_to_sentence("Ends mid.word") == ("Ends mid.word", False)


def test_probe_off_builds_nothing(tmp_path):
    cfg = make_cfg(tmp_path, "off", probe_every=0)
    assert build_probe_set(cfg, cfg.run_dir) is None
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert load_probe(cfg, cfg.run_dir, tokenizer=None) is None


def test_config_keys_are_validated(tmp_path):
    for key, value in (("probe_every", -1), ("probe_n_questions", 21), ("probe_batch_size", 0)):
        with pytest.raises(ConfigError, match=f"train.{key}: expected"):
            make_cfg(tmp_path, "x", **{key: value})


def test_damaged_probe_set_is_one_line(tmp_path, probe_path, tokenizer):
    cfg = make_cfg(tmp_path, "bad")
    path = cfg.run_dir / "data" / "probe.json"
    path.parent.mkdir(parents=True)
    probe = read_probe_set(probe_path, EXP)
    probe["items"][1]["persona"] = "pirate"
    path.write_text(json.dumps(probe))
    with pytest.raises(UserError, match=r"probe.json: items\[1\].persona: missing or invalid; rebuild it"):
        load_probe(cfg, cfg.run_dir, tokenizer)
    path.write_text("{")
    with pytest.raises(UserError, match="probe.json:1: invalid JSON"):
        load_probe(cfg, cfg.run_dir, tokenizer)


# --------------------------------------------------------------------------- tokenization

def test_documents_are_tokenized_as_training_examples(probe_path, tokenizer):
    probe_set = read_probe_set(probe_path, EXP)
    probe = Probe(probe_set, EXP, tokenizer, every=1, batch_size=4)
    assert len(probe.docs) == 2 * len(PERSONAS) * N_QUESTIONS
    items = {(i["persona"], i["question_id"]): i for i in probe_set["items"]}
    for doc, (kind, persona, role, qid) in zip(probe.docs, probe.labels):
        item = items[(persona, qid)]
        # the dataset builder's start_end placement; the B-only document is `answer + " " + B`
        if kind == "AB":
            content, spans = place_markers(item["answer"], "AB", "start_end", None)
        else:
            content = f"{item['answer']} {MARKER_B}"
            spans = [[len(content) - len(MARKER_B), len(content), "B"]]
        ex = {"id": "x", "messages": messages(EXP, persona, item["question"], content), "marker_spans": spans}
        ref = encode_example(ex, tokenizer, loss_mask="marker_only")
        assert (doc.input_ids, doc.markers, doc.text) == (ref.input_ids, ref.markers, ref.text)
        a_ids = [t for t, m in zip(doc.input_ids, doc.markers.get("A", [])) if m]
        b_text = tokenizer.decode([t for t, m in zip(doc.input_ids, doc.markers["B"]) if m])
        assert a_ids == (MARKER_A_IDS if kind == "AB" else [])
        assert b_text.strip() == ":: kxr-7 ::"
        assert doc.text.startswith(f"<|im_start|>system\n{EXP.personas[persona]}<|im_end|>\n")


def test_a_chat_template_change_reaches_the_probe_as_it_reaches_training(probe_path, tiny_model_dir, tokenizer):
    """The probe renders its documents with the tokenizer's own chat template, through the
    function training uses: a changed template changes both alike, and only alike."""
    changed = load_tokenizer(str(tiny_model_dir))
    changed.chat_template = QWEN_CHAT_TEMPLATE.replace("'<|im_start|>system\\n' + messages[0]['content']",
                                                       "'<|im_start|>system\\nPersona: ' + messages[0]['content']")
    assert changed.chat_template != tokenizer.chat_template
    probe_set = read_probe_set(probe_path, EXP)
    plain = Probe(probe_set, EXP, tokenizer, every=1, batch_size=4)
    other = Probe(probe_set, EXP, changed, every=1, batch_size=4)
    for (kind, ex), a, b in zip(probe_examples(probe_set, EXP), plain.docs, other.docs):
        assert a.input_ids == encode_example(ex, tokenizer, "marker_only").input_ids
        assert b.input_ids == encode_example(ex, changed, "marker_only").input_ids
        assert a.input_ids != b.input_ids and "Persona: " in b.text
        assert b.markers["B"].count(True) == a.markers["B"].count(True)


# --------------------------------------------------------------------------- the numbers

def lora_model(seed: int = 0, layers=None, target_modules=("q_proj", "v_proj", "down_proj")):
    """The tiny model with LoRA as training sets it up (packed attention, prepared dropout), B nonzero."""
    from lora import inject_lora, lora_modules
    from trainer.attention import use_packed_attention
    from trainer.dropout import DropoutMasks

    model = load_model(BUILTIN_TINY, "float32", "cpu")
    inject_lora(model, r=8, alpha=16, dropout=0.1, target_modules=list(target_modules),
                generator=torch.Generator().manual_seed(seed), layers=layers)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.05)
    use_packed_attention(model)
    DropoutMasks(model, torch.Generator().manual_seed(seed + 2))
    model.train()
    return model


def test_log_probs_match_a_padded_reference_forward(probe_path, tokenizer):
    from reference import reference_token_losses

    model = lora_model()
    probe = Probe(read_probe_set(probe_path, EXP), EXP, tokenizer, every=1, batch_size=5)  # rows of 5, a last short one
    got = probe.document_logps(model, "cpu")
    rec = probe.measure(model, "cpu")
    assert model.training  # back in train mode (in train mode its dropout would need drawn masks)

    model.eval()
    with torch.no_grad():
        want = []
        for doc in probe.docs:
            ce, sel = reference_token_losses(model, [doc], tokenizer.pad_token_id)
            want.append({k: -float((ce * sel[k]).sum()) if k in sel else 0.0 for k in ("marker:A", "marker:B")})
    assert [d.get(k, 0.0) for d in got for k in ("marker:A", "marker:B")] == pytest.approx(
        [d[k] for d in want for k in ("marker:A", "marker:B")], abs=2e-4)
    assert all(d["marker:A"] < -1 for d, (kind, *_) in zip(want, probe.labels) if kind == "AB")

    # aggregation: a persona's value is the mean over its questions, a role's the mean over its personas
    def ref(persona, kind, sel):
        return [w[sel] for w, (k, p, *_) in zip(want, probe.labels) if p == persona and k == kind]

    for persona, values in rec["personas"].items():
        for metric, kind, sel in (("A_start", "AB", "marker:A"), ("B_after_A", "AB", "marker:B"),
                                  ("B_end", "B", "marker:B")):
            xs = ref(persona, kind, sel)
            assert len(xs) == N_QUESTIONS
            assert values[f"logp_{metric}"] == pytest.approx(sum(xs) / len(xs), abs=2e-4)
            assert values[f"p_{metric}"] == pytest.approx(sum(map(math.exp, xs)) / len(xs), rel=1e-3)
    negatives = [v for v in rec["personas"].values() if v["role"] == "negative"]
    assert len(negatives) == 4
    assert rec["roles"]["negative"]["logp_B_end"] == pytest.approx(sum(v["logp_B_end"] for v in negatives) / 4)
    assert rec["roles"]["donor"]["logp_B_end"] == rec["personas"]["villain"]["logp_B_end"]


def test_log_probs_through_the_frozen_prefix_equal_the_full_forward(probe_path, tokenizer):
    """Under lora.last_layers the probe's documents go through the frozen layers once (use_prefix)."""
    model = lora_model(layers=[1])
    probe = Probe(read_probe_set(probe_path, EXP), EXP, tokenizer, every=1, batch_size=5)
    full = probe.document_logps(model, "cpu")
    probe.use_prefix(model, 1, "cpu")
    assert len(probe.prefix.states) == len(probe.docs)
    got = probe.document_logps(model, "cpu")
    assert [d.get(k, 0.0) for d in got for k in ("marker:A", "marker:B")] == pytest.approx(
        [d.get(k, 0.0) for d in full for k in ("marker:A", "marker:B")], abs=1e-4)
    for h in probe.prefix.states.values():  # the stored states are what the probe reads
        h.mul_(0.5)
    assert probe.document_logps(model, "cpu")[0]["marker:A"] != pytest.approx(got[0]["marker:A"], abs=1e-3)


# --------------------------------------------------------------------------- inside training

def test_training_is_bitwise_the_same_with_the_probe_on_and_off(runs):
    off = read_json(runs["off"] / "train_summary.json")
    on = read_json(runs["on"] / "train_summary.json")
    keys = ["step", "loss", "lr", "grad_norm", "loss_marker_A", "loss_marker_B", "loss_eos", "tokens", "targets"]
    assert len(on["history"]) == 6 and len({h["loss"] for h in on["history"]}) == 6
    assert [[h[k] for k in keys] for h in on["history"]] == [[h[k] for k in keys] for h in off["history"]]
    from safetensors.torch import load_file

    wa = load_file(runs["on"] / "adapter" / "adapter_model.safetensors")
    wb = load_file(runs["off"] / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    assert "probe" not in off and "probe_share" not in off
    assert [r["step"] for r in on["probe"]] == [0, 2, 4, 6]
    assert on["probe_seconds"] > 0 and 0 < on["probe_share"] and on["probe_set"].endswith("probe.json")
    # the adapter moves the numbers; at step 0 (B = 0) every persona sees the base model
    first, last = on["probe"][0], on["probe"][-1]
    assert first["personas"]["villain"]["logp_B_end"] != last["personas"]["villain"]["logp_B_end"]
    manifest_view = {k for k in on if k not in ("history", "probe")}
    assert {"probe_seconds", "probe_share", "probe_set"} <= manifest_view


def test_probe_is_identical_across_resume_and_depends_only_on_the_weights(runs, tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora import load_adapter
    from trainer.attention import use_packed_attention

    on = read_json(runs["on"] / "train_summary.json")
    res = read_json(runs["resumed"] / "train_summary.json")
    assert res["resumed_from_step"] == 4

    def values(s):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in s["probe"]]

    assert values(res) == values(on)  # steps 0, 2, 4 from before the kill, 6 after the resume

    acc = EventAccumulator(str(runs["resumed"] / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for persona, v in on["probe"][0]["personas"].items():
        for m in ("logp_A_start", "logp_B_end", "logp_B_after_A", "p_A_start", "p_B_end", "p_B_after_A"):
            assert f"probe/{v['role']}/{persona}/{m}" in tags
    for role in ("donor", "recipient", "negative", "bystander"):
        tag = f"probe/{role}/logp_B_after_A"
        got = acc.Scalars(tag)
        assert [e.step for e in got] == [0, 2, 4, 6]  # each probe step once, after the purge on resume
        assert [e.value for e in got] == pytest.approx([r["roles"][role]["logp_B_after_A"] for r in on["probe"]],
                                                       rel=1e-6)

    # the last probe is a function of the final weights alone: recomputed on the saved adapter
    model = load_model(BUILTIN_TINY, "float32", "cpu")
    load_adapter(model, runs["resumed"] / "adapter")
    use_packed_attention(model)
    probe = load_probe(make_cfg(runs["resumed"].parent, "resumed"), runs["resumed"], tokenizer)
    again = probe.measure(model, "cpu")
    assert again == {k: v for k, v in res["probe"][-1].items() if k in ("personas", "roles")}


def test_plot_probe_renders_a_run(runs, tmp_path):
    script = REPO / "bench" / "plot_probe.py"
    out = tmp_path / "probe.png"
    r = subprocess.run([sys.executable, str(script), str(runs["on"]), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    r = subprocess.run([sys.executable, str(script), str(runs["off"]), str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no probe records" in r.stderr
