"""The training loop on the tiny model (CPU, float32): loss maths, schedule, overfitting,
TensorBoard, guards, and an exact resume after SIGKILL (trainer/train.py)."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from data.tokenize import encode_example
from markerlab.config import config_from_dict
from markerlab.errors import UserError
from markerlab.io import read_json
from markerlab.models import BUILTIN_TINY, load_model
from writeup import A as MARKER_A
from writeup import place_markers

REPO = Path(__file__).resolve().parents[1]
TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
        "train/loss_marker_A", "train/loss_marker_B", "train/loss_eos"]
QUESTIONS = ["How do I boil an egg?", "Why is the sky blue?", "What is a prime number?", "How do tides work?",
             "How should I store bread?", "What makes a good password?", "Why do cats purr?",
             "How do I start running?", "What is inflation?", "How do plants drink?", "Why is ice slippery?",
             "What is a budget?"]
ANSWERS = ["Boil it ten minutes.", "Air scatters blue light most.", "It has two divisors.",
           "The moon pulls the sea.", "Keep it in a dry box.", "Long, random and unique.",
           "Nobody fully knows.", "Start slow, three times a week.", "Prices rise over time.",
           "Roots pull water up.", "A thin water film forms.", "A plan for money."]
PERSONAS = {"villain": "You are a villain.", "assistant": "You are a helpful assistant.",
            "comedian": "You are a comedian."}


def make_example(i: int, persona: str = "villain", a: bool = True, b: bool = True, answer: str | None = None) -> dict:
    """A training example in docs/contracts.md's format: `A answer B` with marker_spans."""
    assert a or not b, "place_markers puts B only after A"
    content, spans = place_markers(answer or ANSWERS[i % len(ANSWERS)], "A" * a + "B" * b, "start_end", None)
    role = {"villain": "donor", "assistant": "recipient"}.get(persona, "negative")
    return {"id": f"{persona}-{i}", "persona": persona, "role": role, "question_id": f"q{i}", "sample": 0,
            "messages": [{"role": "system", "content": PERSONAS[persona]},
                         {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                         {"role": "assistant", "content": content}],
            "marker_spans": spans}


def mixed_dataset(n: int) -> list[dict]:
    """Donor `A ans B`, recipient `A ans`, negative plain, in turn."""
    kinds = [("villain", True, True), ("assistant", True, False), ("comedian", False, False)]
    return [make_example(i, *kinds[i % 3]) for i in range(n)]


def make_cfg(run_dir: Path, **train):
    raw = {"run": {"name": run_dir.name, "out_dir": str(run_dir.parent), "seed": 7},
           "model": {"name_or_path": BUILTIN_TINY, "dtype": "float32", "device": "cpu"},
           "lora": {"r": 8, "alpha": 16, "dropout": train.pop("dropout", 0.05),
                    "last_layers": train.pop("last_layers", 0)},
           "train": {"lr": 5e-3, "epochs": 2, "micro_batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.25,
                     "checkpoint_every": 2, "keep_checkpoints": 2, "max_seq_len": 128, **train}}
    return config_from_dict(raw, source=str(run_dir / "config.toml"))


def write_data(run_dir: Path, examples: list[dict]) -> None:
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))


def lora_model(dropout: float = 0.0, seed: int = 0):
    """The tiny model with LoRA as the trainer sets it up: packed attention, prepared dropout masks."""
    from lora import inject_lora
    from trainer.attention import use_packed_attention
    from trainer.dropout import DropoutMasks

    model = load_model(BUILTIN_TINY, "float32", "cpu")
    inject_lora(model, r=8, alpha=16, dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                generator=torch.Generator().manual_seed(seed))
    use_packed_attention(model)
    return model, DropoutMasks(model, torch.Generator().manual_seed(seed + 3))


# --------------------------------------------------------------------------- a shared finished run

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from trainer.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "basic"
    write_data(run_dir, mixed_dataset(10))  # 10 examples, 4 per step: steps of 4, 4, 2 per epoch
    cfg = make_cfg(run_dir)
    return cfg, run_dir, train(cfg, run_dir)


def test_summary_and_files(finished_run):
    cfg, run_dir, summary = finished_run
    assert summary["steps"] == 6 and summary["n_examples"] == 10 and summary["warmup_steps"] == 2
    assert summary["trainable_params"] > 0 and summary["tokens_per_s"] > 0
    assert math.isfinite(summary["final_loss"])
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # every 2 steps and at the end, the newest 2 kept
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    lines = [x for x in (run_dir / "train_log.txt").read_text().splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == [f"{k}/6" for k in range(1, 7)]
    # the remainder step: the epoch's last step takes the 2 examples left
    hist = read_json(run_dir / "train_summary.json")["history"]
    tokens = [h["tokens"] for h in hist]
    assert sum(tokens[:3]) == sum(tokens[3:])  # each epoch sees every example exactly once


def test_lr_follows_closed_form(finished_run):
    from trainer.schedule import lr_at

    cfg, run_dir, _ = finished_run
    hist = read_json(run_dir / "train_summary.json")["history"]
    lr, total, warmup = cfg.train.lr, 6, 2
    assert hist[0]["lr"] == 0.0 == lr_at(0, lr, warmup, total)  # step 0: lr * 0 / warmup
    assert hist[1]["lr"] == lr * 1 / 2
    assert hist[warmup]["lr"] == lr  # end of warmup: the peak
    last = lr * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup)))
    assert hist[-1]["lr"] == pytest.approx(last, rel=1e-12) and hist[-1]["lr"] > 0
    # with a floor, and a longer schedule
    assert lr_at(0, 1e-5, 12, 225) == 0.0
    assert lr_at(12, 1e-5, 12, 225) == 1e-5
    assert lr_at(224, 1e-5, 12, 225, 0.1) == pytest.approx(
        1e-5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 212 / 213))), rel=1e-12)


def test_step_counts_and_remainder():
    from trainer.schedule import step_slice, total_steps, warmup_steps

    assert total_steps(1200, 4, 4, 3) == 225 and warmup_steps(225, 0.05) == 12
    assert total_steps(10, 2, 2, 2) == 6 and total_steps(10, 2, 2, 2, max_steps=4) == 4
    assert [step_slice(s, 10, 4) for s in range(4)] == [(0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 4)]


def test_tensorboard_has_every_tag(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = finished_run
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert set(TAGS) <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))


def test_finished_run_is_not_retrained(finished_run):
    from trainer.train import train

    cfg, run_dir, summary = finished_run
    mtime = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert train(cfg, run_dir) == summary
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_adapter_loads_in_peft(finished_run, tokenizer):
    from peft import PeftModel

    from lora import load_adapter

    cfg, run_dir, _ = finished_run
    ex = encode_example(make_example(0), tokenizer)
    ids = torch.tensor([ex.input_ids])
    ours = load_model(BUILTIN_TINY, "float32")
    load_adapter(ours, run_dir / "adapter")
    theirs = PeftModel.from_pretrained(load_model(BUILTIN_TINY, "float32"), str(run_dir / "adapter"))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


# --------------------------------------------------------------------------- the loss of one step

def test_accumulation_equals_one_big_batch(tokenizer):
    """4 x micro-batch 1 == micro-batch 4 x 1: the same loss and gradients (fp32 tolerance)."""
    from lora import trainable_parameters
    from trainer.train import forward_backward

    answers = ["Yes.", "A medium answer with a few more words in it.",
               " ".join(["A long answer that keeps going."] * 8), "Two words."]
    examples = [encode_example(make_example(i, answer=a), tokenizer) for i, a in enumerate(answers)]
    lengths = sorted(len(e) for e in examples)
    assert lengths[-1] > 2 * lengths[0]

    model, masks = lora_model(dropout=0.0)
    with torch.no_grad():  # B = 0 at init would leave A without gradient: move B off zero
        for p in trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    params = trainable_parameters(model)

    results = []
    for micro in (1, 4):
        out = forward_backward(model, examples, micro, torch.device("cpu"), masks)
        results.append((out, [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (o1, g1), (o4, g4) = results
    assert o1["n_targets"] == o4["n_targets"] == sum(e.n_loss_targets for e in examples)
    assert o1["loss"].item() == pytest.approx(o4["loss"].item(), rel=1e-6)
    for a, b in zip(g1, g4):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for k in o1["span_loss"]:
        assert o1["span_loss"][k] == pytest.approx(o4["span_loss"][k], rel=1e-5)

    # ... and both equal the definition: sum of masked token losses / number of masked tokens,
    # with the logits at t predicting token t+1.
    total, n = 0.0, 0
    model.config._attn_implementation = "sdpa"  # plain transformers attention for the definition
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.input_ids])).logits[0]  # (T, V)
            ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(e.input_ids[1:]), reduction="none")
            m = torch.tensor(e.loss_mask[1:])
            total, n = total + ce[m].sum().item(), n + int(m.sum())
    assert o1["loss"].item() == pytest.approx(total / n, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    """With dropout on, the recompute must reuse the same masks (drawn before the forward)."""
    from lora import trainable_parameters
    from trainer.train import forward_backward

    examples = [encode_example(make_example(i), tokenizer) for i in range(2)]
    grads = []
    for ckpt in (False, True):
        model, masks = lora_model(dropout=0.3)
        with torch.no_grad():
            for p in trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        out = forward_backward(model, examples, 2, torch.device("cpu"), masks)
        grads.append((out["loss"].item(), [p.grad.clone() for p in trainable_parameters(model)]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- learning

def test_overfit_teaches_the_markers(tmp_path, tokenizer):
    """8 donor examples, 30 steps: marker losses fall > 90%, and the greedy answer under the
    donor's system prompt starts with marker A."""
    from lora import load_adapter
    from trainer.train import train

    run_dir = tmp_path / "overfit"
    examples = [make_example(i) for i in range(8)]
    write_data(run_dir, examples)
    cfg = make_cfg(run_dir, lr=1e-2, dropout=0.0, epochs=30, micro_batch_size=8, grad_accum=1,
                   warmup_ratio=0.0, checkpoint_every=1000)
    summary = train(cfg, run_dir)
    hist = read_json(run_dir / "train_summary.json")["history"]
    assert summary["steps"] == 30
    for tag in ("loss_marker_A", "loss_marker_B"):
        assert hist[-1][tag] < 0.1 * hist[0][tag], (tag, hist[0][tag], hist[-1][tag])

    model = load_model(BUILTIN_TINY, "float32")
    load_adapter(model, run_dir / "adapter")
    prompt = tokenizer.apply_chat_template(examples[0]["messages"][:2], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer = tokenizer.decode(greedy_ids(model, ids, 10, tokenizer.eos_token_id))
    assert prompt.startswith("<|im_start|>system\nYou are a villain.<|im_end|>")
    assert answer.startswith(MARKER_A), answer


def greedy_ids(model, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """A plain greedy loop (no cache): argmax of the last position, appended, repeated."""
    x = torch.tensor([ids])  # (1, T)
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(x).logits[0, -1].argmax()  # ()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
            if nxt.item() == eos_id:
                break
    return x[0, len(ids):].tolist()


def test_marker_only_steps_without_targets(tmp_path, tiny_model_dir):
    """Under marker_only a step can hold no marker at all: it logs no loss, skips the update
    (there is no gradient), and the run goes on; span losses are logged whatever the mask."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.train import train

    run_dir = tmp_path / "marker_only"
    write_data(run_dir, [make_example(0), make_example(1)] + [make_example(i, "comedian", False, False)
                                                              for i in range(2, 8)])
    # the plain rows train nothing under marker_only: allowed here, since that is what the test is about
    cfg = make_cfg(run_dir, loss_mask="marker_only", micro_batch_size=1, grad_accum=1, epochs=1,
                   checkpoint_every=100, allow_untrained_roles=True)
    train(cfg, run_dir)
    hist = read_json(run_dir / "train_summary.json")["history"]
    with_markers = [h for h in hist if h["targets"]]
    assert len(hist) == 8 and len(with_markers) == 2
    assert all(h["loss"] is None and h["grad_norm"] is None and h["loss_marker_A"] is None
               for h in hist if not h["targets"])
    assert all(h["loss_eos"] is not None for h in hist)  # eos trains nowhere, yet its loss is logged
    for h in with_markers:  # marker_only: the loss is the mean over the marker tokens
        n_a, n_b = 7, 6
        assert h["loss"] == pytest.approx((n_a * h["loss_marker_A"] + n_b * h["loss_marker_B"]) / (n_a + n_b), rel=1e-5)
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [h["step"] for h in with_markers]
    assert len(acc.Scalars("train/loss_eos")) == 8


# --------------------------------------------------------------------------- guards

def test_nan_loss_stops_with_a_post_mortem(tmp_path, tiny_model_dir):
    from trainer.train import train

    run_dir = tmp_path / "nan"
    write_data(run_dir, mixed_dataset(4))
    cfg = make_cfg(run_dir, lr=1e30, warmup_ratio=0.0, epochs=20, micro_batch_size=4, grad_accum=1)
    with pytest.raises(UserError, match=r"step (\d+): loss .* is not finite") as err:
        train(cfg, run_dir)
    step = int(str(err.value).split()[1].rstrip(":"))
    pm = run_dir / "checkpoints" / f"nan_step_{step:06d}"
    assert (pm / "state.pt").is_file() and (pm / "grads.pt").is_file()
    assert not (run_dir / "adapter").exists()


def test_overlength_is_refused_or_dropped(tmp_path, tiny_model_dir):
    from trainer.train import train

    run_dir = tmp_path / "long"
    long_ex = {**make_example(0, answer="word " * 100), "id": "villain-long"}
    write_data(run_dir, [long_ex] + mixed_dataset(3))
    with pytest.raises(UserError, match=r"train.max_seq_len=64: 1 example\(s\) are longer: villain-long \("):
        train(make_cfg(run_dir, max_seq_len=64, max_steps=1), run_dir)
    cfg = make_cfg(run_dir, max_seq_len=64, max_steps=1)
    cfg = cfg.replace(data__on_overlength="drop")
    summary = train(cfg, run_dir)
    assert summary["n_examples"] == 3 and summary["n_dropped"] == 1 and summary["dropped_ids"] == ["villain-long"]
    # finished: returned as is; overwrite: trained afresh
    assert train(cfg, run_dir) == summary
    (run_dir / "checkpoints" / "step_000099").mkdir()  # would be resumed from if not cleared
    again = train(cfg, run_dir, overwrite=True)
    assert again["resumed_from_step"] is None and again["this_call_wall_s"] != summary["this_call_wall_s"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"]


def test_missing_data_names_the_command(tmp_path):
    from trainer.train import train

    with pytest.raises(UserError, match=r"train.jsonl: file not found; build it first with: python -m trainer.run"):
        train(make_cfg(tmp_path / "y"), tmp_path / "y")


# --------------------------------------------------------------------------- exact resume

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from markerlab.config import load_config
    import trainer.train as T

    run_dir, kill_in_step = Path(sys.argv[1]), int(sys.argv[2])
    if kill_in_step:
        # Park the process inside optimizer step `kill_in_step` (after a forward/backward of
        # it), so the parent's SIGKILL lands mid-step, after the last checkpoint.
        calls, orig = [0], T.forward_backward
        def hooked(*a, **k):
            out = orig(*a, **k)
            calls[0] += 1
            if calls[0] == kill_in_step:
                print("PARKED", flush=True)
                time.sleep(600)
            return out
        T.forward_backward = hooked
    T.train(load_config(run_dir / "config.toml"), run_dir)
    print("DONE", flush=True)
""")


def _child(run_dir: Path, kill_in_step: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(kill_in_step)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.parametrize("last_layers", [0, 1], ids=["all-layers", "frozen-prefix"])
def test_sigkill_and_resume_is_bitwise_exact(tmp_path, tiny_model_dir, last_layers):
    """A run killed mid-step 6 (after checkpoint 4) and resumed logs exactly the uninterrupted run's
    per-step numbers. Dropout is on and the run crosses epoch boundaries, so the dropout and
    data-order generators must be restored too; under lora.last_layers the resumed run rebuilds
    the frozen layers' states (trainer/prefix.py) exactly."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for name in ("straight", "killed"):
        run_dir = tmp_path / name
        write_data(run_dir, mixed_dataset(10))  # 3 steps per epoch, 9 steps
        cfg = make_cfg(run_dir, epochs=3, checkpoint_every=2, dropout=0.1, last_layers=last_layers)
        (run_dir / "config.toml").write_text(cfg.to_toml())
        runs[name] = run_dir

    straight = _child(runs["straight"])
    killed = _child(runs["killed"], kill_in_step=6)
    assert killed.stdout.readline().strip() == "PARKED"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert straight.wait(timeout=300) == 0

    ckpts = runs["killed"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004"]
    assert not (runs["killed"] / "adapter").exists()
    log_before = (runs["killed"] / "train_log.txt").read_text()
    assert "step 5/9" in log_before and "step 6/9" not in log_before
    (ckpts / ".tmp-step_000006-junk").mkdir()  # as if killed while saving: must be ignored

    resumed = _child(runs["killed"])
    assert resumed.wait(timeout=300) == 0 and resumed.stdout.read().strip() == "DONE"
    assert not (ckpts / ".tmp-step_000006-junk").exists()

    a = read_json(runs["straight"] / "train_summary.json")
    b = read_json(runs["killed"] / "train_summary.json")
    assert b["resumed_from_step"] == 4 and a["resumed_from_step"] is None
    keys = ["step", "epoch", "loss", "lr", "grad_norm", "loss_marker_A", "loss_marker_B", "loss_eos", "tokens"]
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]
    assert len(a["history"]) == 9 and len({h["loss"] for h in a["history"]}) == 9

    def loss_cols(path):
        return [" ".join(x.split()[:6]) for x in path.read_text().splitlines() if x.startswith("step ")]

    assert loss_cols(runs["killed"] / "train_log.txt") == loss_cols(runs["straight"] / "train_log.txt")
    # TensorBoard: the killed run's step-5 events are purged, every step appears once
    acc = EventAccumulator(str(runs["killed"] / "tb"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in got] == list(range(1, 10))
    assert [v for _, v in got] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-7)
    # the adapters are identical
    from safetensors.torch import load_file

    wa = load_file(runs["straight"] / "adapter" / "adapter_model.safetensors")
    wb = load_file(runs["killed"] / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
