"""Training throughput on the Qwen2.5-7B architecture: markerlab's training path vs transformers + PEFT (+ TRL).

    python bench/train_throughput.py                       # on the GPU machine, repo root as cwd
    python bench/train_throughput.py --tiny --device cpu   # smoke test of this script (tiny model, CPU)

Builds Qwen2ForCausalLM with Qwen2.5-7B's shape (hidden 3584, intermediate 18944,
28 layers, 28 heads, 4 KV heads, vocab 152064, untied head) directly on the GPU in
bf16 with seeded random weights (no checkpoint is read), once. Every setting then
trains r=16 LoRA on the seven projections (alpha 32, dropout 0.05) of that same
base model, micro-batch 4 x accumulation 4, on the same synthetic examples:
token lengths uniform in 195-645, a 40-80 token system/user prefix outside the
loss, the completion and its <|im_end|> in the loss (the `completion` mask), a
few marker tokens. Constant lr 1e-4 (not the real 1e-5 with warmup: a larger
step makes the LoRA matter in the later steps' losses, for the loss check).

Settings (one JSON line each, then a markdown table). markerlab always trains packed
rows with per-document attention, the chunked LM head and the in-place LoRA add, with
fused AdamW on CUDA; what remains to choose is:
  ml_ckpt            markerlab with gradient checkpointing (the loss reference)
  ml                 markerlab, eager
  ml_compile         + train.compile
  ml_graphs          + train.cuda_graphs (every shape captured before timing: capture_s)
  ml_graphs_compile  + both (the real configs' default)
  peft_ckpt          transformers + PEFT, a plain loop, gradient checkpointing (the baseline)
  peft               the same without checkpointing
  trl                TRL's SFTTrainer + PEFT with checkpointing, only if `import trl` works

warmup             a throw-away first setting (ml, not in the table): the first one
                     or two settings of a process ran up to 4x slow on an H100 whatever
                     they were, so no measured setting goes first
--profile NAME[,..]  after NAME's timed steps, one more step under torch.profiler: the
                     top CUDA kernels by time and the share of the step's wall time the
                     GPU was busy (printed, and profile_NAME.txt in --out-dir)

Each setting: >= 2 warm-up optimizer steps (the first includes any compilation,
reported apart as first_step_s), then --steps timed steps (CUDA-synchronized
wall clock around the whole timed block; per-step CUDA events for the median).
tokens_per_s counts real (non-padding) tokens; padded_tokens_per_s counts what
the model processed (padding included; equal for padding-free settings).
peak_gib is torch.cuda.max_memory_allocated since the setting started (the
14.2 GiB of base weights included); peak_reserved_gib what the caching allocator
held, the honest figure under CUDA graphs (a replay uses its pool's memory
without allocating it). MFU = tokens/s x 4 x 7.07e9 / 989e12 (dense
bf16 peak of an H100/H200 SXM by the datasheet); mfu_measured uses ~790e12, the
bf16 matmul rate measured on these cards.

Same maths: every markerlab setting starts from the same LoRA init, dropout
generator and data, so its per-step losses and gradient norms are compared with
ml_ckpt's (max abs / relative difference, in the table).

Robustness: each setting runs in its own try/except (an OOM or a failure is a
JSON line with "error", the next setting still runs); settings are skipped once
--deadline-s (from the start of this script, model construction included) would
be passed, and a watchdog prints what was measured and exits at
--deadline-s + --grace-s whatever is running.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

T_START = time.time()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from data.tokenize import Encoded, collate  # noqa: E402
from lora import inject_lora, lora_modules, trainable_parameters  # noqa: E402
from trainer.attention import use_packed_attention  # noqa: E402
from trainer.compile import compile_layers, decoder_layers  # noqa: E402
from trainer.dropout import DropoutMasks  # noqa: E402
from trainer.graphs import GraphedMicroBatches  # noqa: E402
from trainer.pack import pack  # noqa: E402
from trainer.train import forward_backward  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SWITCHES = ("compile", "cuda_graphs")
N_MATMUL_7B = 7.07e9            # Qwen2.5-7B's matmul parameters (layers + LM head)
PEAK_DATASHEET = 989e12         # H100/H200 SXM dense bf16
PEAK_MEASURED = 790e12          # bf16 matmul measured on these cards (KINDS.md)
MICRO, ACCUM = 4, 4

# name -> (stack, switches, gradient checkpointing)
SETTINGS = {
    "warmup": ("ml", (), False),  # throw-away: a process's first setting runs slow (docs/benchmarks.md)
    "peft_ckpt": ("peft", (), True),
    "ml_graphs_compile": ("ml", SWITCHES, False),
    "ml_graphs": ("ml", ("cuda_graphs",), False),
    "ml": ("ml", (), False),
    "ml_ckpt": ("ml", (), True),
    "ml_compile": ("ml", ("compile",), False),
    "peft": ("peft", (), False),
    "trl": ("trl", (), True),
}
DEFAULT_ORDER = list(SETTINGS)  # most important first: a deadline drops the tail
REFERENCE = "ml_ckpt"
BASELINE = "peft_ckpt"

RESULTS: list[dict] = []
PRINT_LOCK = threading.Lock()


def elapsed() -> float:
    return time.time() - T_START


def log(msg: str) -> None:
    with PRINT_LOCK:
        print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def emit(rec: dict) -> None:
    RESULTS.append(rec)
    with PRINT_LOCK:
        print(json.dumps(rec), flush=True)
    if ARGS is not None and ARGS.out_dir:
        with open(Path(ARGS.out_dir) / "train_throughput.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


ARGS = None


# --------------------------------------------------------------------------- model and data

def model_config(tiny: bool):
    from transformers import Qwen2Config

    common = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, use_cache=False, use_sliding_window=False,
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    if tiny:
        return Qwen2Config(vocab_size=152064, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, **common)
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, **common)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    """The architecture with seeded N(0, 0.02) matrices, built in place on `device` in `dtype`."""
    from transformers import Qwen2ForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    # parameters are in `dtype` already; buffers (RoPE's inv_freq) stay float32, as from_pretrained leaves them
    bad = [n for n, p in model.named_parameters() if p.dtype != dtype or p.device.type != device.type]
    if bad:
        log(f"note: {len(bad)} parameters not built in {dtype} on {device} (e.g. {bad[0]}): moving them")
        for n in bad:
            p = model.get_parameter(n)
            p.data = p.data.to(device=device, dtype=dtype)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02, generator=g)
    model.config.use_cache = False
    try:
        model.set_attn_implementation("sdpa")
    except Exception:
        model.config._attn_implementation = "sdpa"
    model.requires_grad_(False)
    return model


def synth_examples(n: int, seed: int, lo: int = 195, hi: int = 645) -> list[Encoded]:
    """Token-id examples shaped like docs/contracts.md's chat examples rendered by Qwen2.5's template.

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n -- the prefix (40-80 tokens) is outside the
    loss; content + <|im_end|> are in it (`completion`); the final "\\n" is in no mask. Two
    thirds carry marker A on the first 3 content tokens, one third marker B on the last 3.
    """
    IM_START, IM_END, NL, SYSTEM, USER, ASSISTANT = 151644, 151645, 198, 8948, 872, 77091
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(lo, hi)
        p = rng.randint(40, min(80, L - 10))  # needs L >= 50
        n_sys = rng.randint(8, p - 13 - 8)  # 13 template tokens around the two texts
        n_user = p - n_sys - 13
        text = lambda k: [rng.randrange(100, 151000) for _ in range(k)]  # noqa: E731
        prefix = ([IM_START, SYSTEM, NL] + text(n_sys) + [IM_END, NL, IM_START, USER, NL] + text(n_user)
                  + [IM_END, NL, IM_START, ASSISTANT, NL])
        assert len(prefix) == p, (len(prefix), p)
        n_content = L - p - 2
        ids = prefix + text(n_content) + [IM_END, NL]
        loss = [False] * p + [True] * (n_content + 1) + [False]
        a = [False] * L
        b = [False] * L
        if i % 3 != 2:
            for t in range(p, p + 3):
                a[t] = True
        if i % 3 == 0:
            for t in range(p + n_content - 3, p + n_content):
                b[t] = True
        eos = [False] * (L - 2) + [True, False]
        out.append(Encoded(id=f"synth-{i}", input_ids=ids, loss_mask=loss, markers={"A": a, "B": b}, eos=eos,
                           offsets=[(0, 0)] * L, text="", content_span=(0, 0)))
    return out


def padded_tokens(examples) -> int:
    return sum(len(examples[i:i + MICRO]) * max(len(e) for e in examples[i:i + MICRO])
               for i in range(0, len(examples), MICRO))


# --------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, step_fn, steps_data, device, warmup: int, steps: int, packed: bool, extra: dict) -> dict:
    """Warm up, then time `steps` optimizer steps; the JSON record of the setting."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peaks then start from what is held now (graph pools too)
    losses, norms, first_step_s = [], [], None
    t0 = time.perf_counter()
    for k in range(warmup):
        tk = time.perf_counter()
        loss, norm = step_fn(steps_data[k])
        losses.append(float(loss))
        norms.append(float(norm))
        if k == 0:
            first_step_s = time.perf_counter() - tk
            log(f"{name}: first step {first_step_s:.1f}s, loss {losses[0]:.5f}")
    sync(device)
    warmup_s = time.perf_counter() - t0
    times, tok, proc = [], 0, 0
    sync(device)
    t1 = time.perf_counter()
    truncated = False
    for k in range(warmup, warmup + steps):
        if k > warmup + 1 and elapsed() > ARGS.deadline_s:
            truncated = True
            break
        if device.type == "cuda":
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
        tc = time.perf_counter()
        loss, norm = step_fn(steps_data[k])
        if device.type == "cuda":
            ev1.record()
        losses.append(float(loss))  # step_fn synced (.item()), as the trainer's loop does once per step
        norms.append(float(norm))
        times.append((ev0, ev1) if device.type == "cuda" else time.perf_counter() - tc)
        tok += sum(len(e) for e in steps_data[k])
        proc += tok_processed(steps_data[k], packed)
    sync(device)
    wall = time.perf_counter() - t1
    if device.type == "cuda":  # every event has completed after the synchronize
        times = [a.elapsed_time(b) / 1e3 for a, b in times]
    n = len(times)
    tps = tok / wall
    n_matmul = ARGS.n_matmul
    rec = {
        "setting": name, "tokens_per_s": round(tps, 1), "padded_tokens_per_s": round(proc / wall, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        # what the caching allocator held: the honest peak under CUDA graphs, whose replays
        # use their pool's memory without allocating (so peak_gib misses it)
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device.type == "cuda" else None,
        "mfu": round(tps * 4 * n_matmul / PEAK_DATASHEET, 4),
        "mfu_measured": round(tps * 4 * n_matmul / PEAK_MEASURED, 4),
        "s_per_step": round(wall / n, 4), "s_per_step_median": round(statistics.median(times), 4),
        "steps_timed": n, "warmup_steps": warmup, "first_step_s": round(first_step_s, 2),
        "warmup_s": round(warmup_s, 2), "tokens_timed": tok, "truncated": truncated,
        "loss_first_steps": [round(x, 6) for x in losses], "grad_norm_first_steps": [round(x, 6) for x in norms],
        **extra,
    }
    return rec


def profile_step(name: str, step_fn, examples, device, top: int = 30) -> dict:
    """One more optimizer step under torch.profiler: where the GPU time goes, and how busy the GPU is."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step_fn(examples)
        sync(device)
    wall = time.perf_counter() - t0
    # kernels only (device-side events), grouped by name
    kern: dict[str, list[float]] = {}
    for ev in prof.events():
        if getattr(ev, "device_type", None) is not None and ev.device_type.name == "CUDA":
            d = kern.setdefault(ev.name, [0, 0.0])
            d[0] += 1
            d[1] += ev.time_range.elapsed_us()
    busy_ms = sum(v[1] for v in kern.values()) / 1e3
    rows = sorted(kern.items(), key=lambda kv: -kv[1][1])[:top]
    lines = [f"profile {name}: step wall {wall * 1e3:.0f} ms (under the profiler), kernels {busy_ms:.0f} ms "
             f"({100 * busy_ms / (wall * 1e3):.0f}% of wall), {sum(v[0] for v in kern.values())} launches",
             "| kernel | calls | ms | % of kernel time |", "|---|---|---|---|"]
    for k, (n, t) in rows:
        lines.append(f"| {k[:90]} | {n} | {t / 1e3:.1f} | {100 * t / 1e3 / max(busy_ms, 1e-9):.1f} |")
    # the host side: which operators and CUDA runtime calls the step's wall time went to
    cpu = {}
    for ev in prof.key_averages():
        if ev.self_cpu_time_total > 0:
            cpu[ev.key] = (ev.count, ev.self_cpu_time_total / 1e3)
    lines += [f"host side: {sum(v[1] for v in cpu.values()):.0f} ms self CPU time in operators and runtime calls",
              "| host op / runtime call | calls | self CPU ms |", "|---|---|---|"]
    for k, (n, t) in sorted(cpu.items(), key=lambda kv: -kv[1][1])[:15]:
        lines.append(f"| {k[:90]} | {n} | {t:.1f} |")
    text = "\n".join(lines)
    with PRINT_LOCK:
        print(text, flush=True)
    if ARGS.out_dir:
        (Path(ARGS.out_dir) / f"profile_{name.replace(':', '_').replace('+', '_')}.txt").write_text(text + "\n")
    return {"wall_ms": round(wall * 1e3, 1), "kernel_ms": round(busy_ms, 1),
            "launches": sum(v[0] for v in kern.values())}


def tok_processed(examples, packed: bool) -> int:
    return sum(len(e) for e in examples) if packed else padded_tokens(examples)


# --------------------------------------------------------------------------- settings

def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_checkpointing(model, on: bool):
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        try:
            model.gradient_checkpointing_disable()
        except Exception as e:  # noqa: BLE001
            log(f"gradient_checkpointing_disable: {e}")
        try:
            model.disable_input_require_grads()
        except Exception as e:  # noqa: BLE001
            log(f"disable_input_require_grads: {e}")


def remove_our_lora(model):
    for name, m in list(lora_modules(model)):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.base)


def dynamo_info() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                "graph_breaks": sum(counters["graph_break"].values()),
                "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else None}
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}


def run_markerlab(name, model, switches, ckpt, steps_data, device, pad_id):
    compiled = "compile" in switches and not ckpt
    attn = model.config._attn_implementation
    try:
        inject_lora(model, r=16, alpha=32, dropout=0.05, target_modules=TARGETS,
                    generator=torch.Generator().manual_seed(ARGS.seed + 1), dtype=torch.float32)
        masks = DropoutMasks(model, torch.Generator(device).manual_seed(ARGS.seed + 2))
        use_packed_attention(model)
        set_checkpointing(model, ckpt)
        model.train()
        if compiled:
            import torch._dynamo as dynamo
            import torch._dynamo.utils as dynamo_utils

            dynamo.reset()
            dynamo_utils.counters.clear()
            compile_layers(model)
        graphs = None
        if "cuda_graphs" in switches:
            longest = sorted((len(e) for s in steps_data for e in s), reverse=True)[:MICRO]
            graphs = GraphedMicroBatches(model, masks, pad_id, device, max_tokens=sum(longest),
                                         log=lambda m: log(f"note: {m}"))
        params = trainable_parameters(model)
        opt = torch.optim.AdamW(params, lr=ARGS.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                fused=device.type == "cuda" or None)

        def step(examples):
            out = forward_backward(model, examples, MICRO, device, masks, graphs)
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
            opt.step()
            opt.zero_grad(set_to_none=graphs is None)
            return out["loss"].item(), norm.item()

        extra = {"stack": "markerlab", "switches": list(switches), "gradient_checkpointing": ckpt}
        if graphs is not None:
            # capture every shape the timed steps will meet before timing (a real run has after
            # its first steps); nothing trains here (no dropout draw, gradients + 0)
            tc = time.perf_counter()
            for examples in steps_data:
                for i in range(0, len(examples), MICRO):
                    graphs.prepare(model, pack(examples[i:i + MICRO]).to(device))
            sync(device)
            extra.update(capture_s=round(time.perf_counter() - tc, 1), graphs=len(graphs.static),
                         graphs_captured=graphs.n_captured)
            log(f"{name}: captured {graphs.n_captured} graphs in {extra['capture_s']}s")
        rec = measure(name, step, steps_data, device, ARGS.warmup, ARGS.steps, True, extra)
        if name in ARGS.profile:
            rec["profile"] = profile_step(name, step, steps_data[-1], device)
        if compiled:
            rec["compile_info"] = dynamo_info()
        return rec
    finally:
        for layer in decoder_layers(model):  # undo compile_layers
            layer._compiled_call_impl = None
        model.config._attn_implementation = attn
        remove_our_lora(model)
        set_checkpointing(model, False)
        if compiled:
            try:
                import torch._dynamo as dynamo

                dynamo.reset()
            except Exception:  # noqa: BLE001
                pass


def target_linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGETS}


def restore_linears(model, originals: dict) -> None:
    """Put the base model's own nn.Linear objects back where PEFT wrapped them (PEFT's wrappers hold them)."""
    for n, m in originals.items():
        parent, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent), attr, m)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            try:
                delattr(model, attr)
            except Exception:  # noqa: BLE001
                pass
    set_checkpointing(model, False)
    model.requires_grad_(False)


def run_peft(name, model, ckpt, steps_data, device, pad_id):
    from peft import LoraConfig, get_peft_model

    originals = target_linears(model)
    try:
        torch.manual_seed(ARGS.seed + 3)
        if ckpt:  # as a plain HF + PEFT script does: checkpointing on the base, then wrap
            set_checkpointing(model, True)
        pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                              bias="none", task_type="CAUSAL_LM"))
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=ARGS.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

        def step(examples):
            total = torch.zeros((), device=device)
            for i in range(0, len(examples), MICRO):
                b = collate(examples[i:i + MICRO], pad_id).to(device)
                out = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
                (out.loss / ACCUM).backward()
                total += out.loss.detach() / ACCUM
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return total.item(), norm.item()

        extra = {"stack": "transformers+peft", "gradient_checkpointing": ckpt,
                 "lora_dtype": str(params[0].dtype), "n_trainable": sum(p.numel() for p in params)}
        return measure(name, step, steps_data, device, ARGS.warmup, ARGS.steps, False, extra)
    finally:
        restore_linears(model, originals)


def run_trl(name, model, steps_data, device, pad_id):
    """TRL's SFTTrainer + PEFT (gradient checkpointing, bf16), best effort; None if TRL is missing."""
    try:
        import trl  # noqa: F401
        from datasets import Dataset  # noqa: F401
    except Exception as e:  # noqa: BLE001
        emit({"setting": name, "skipped": f"trl not importable ({type(e).__name__}: {e})"})
        return None
    import tempfile

    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    try:
        from markerlab.models import build_qwen_tokenizer

        tokenizer = build_qwen_tokenizer()
    except Exception as e:  # noqa: BLE001
        emit({"setting": name, "skipped": f"no tokenizer for SFTTrainer ({type(e).__name__}: {e})"})
        return None
    originals = target_linears(model)
    examples = [e for s in steps_data for e in s]
    # pre-tokenized, labels -100 off the loss mask (the `completion` mask, as the other settings)
    rows = [{"input_ids": e.input_ids, "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]}
            for e in examples]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            times.append(time.perf_counter() - self.t)

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(output_dir=tmp, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
                             max_steps=len(steps_data), learning_rate=ARGS.lr, lr_scheduler_type="constant",
                             warmup_steps=0, logging_steps=1000, report_to=[], bf16=device.type == "cuda",
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                             max_length=1024, packing=False, save_strategy="no",
                             dataloader_num_workers=0, seed=ARGS.seed,
                             dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                             disable_tqdm=True)
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer,
                                 peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                        target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"),
                                 callbacks=[Timer()])
            trainer.train()
        timed = times[ARGS.warmup:]
        avg_tok = sum(len(e) for e in examples) / len(examples)
        tps = MICRO * ACCUM * avg_tok / statistics.mean(timed)
        return {"setting": name, "stack": "trl SFTTrainer + peft", "gradient_checkpointing": True,
                "tokens_per_s": round(tps, 1), "padded_tokens_per_s": None,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                "mfu": round(tps * 4 * ARGS.n_matmul / PEAK_DATASHEET, 4),
                "mfu_measured": round(tps * 4 * ARGS.n_matmul / PEAK_MEASURED, 4),
                "s_per_step": round(statistics.mean(timed), 4), "s_per_step_median": round(statistics.median(timed), 4),
                "steps_timed": len(timed), "warmup_steps": ARGS.warmup,
                "note": "tokens/s = 16 x mean example length / mean step time (the trainer shuffles)"}
    finally:
        restore_linears(model, originals)


# --------------------------------------------------------------------------- report

def compare_losses():
    """Per-step loss / grad-norm differences of each markerlab setting vs the reference."""
    ref = next((r for r in RESULTS if r.get("setting") == REFERENCE and "loss_first_steps" in r), None)
    out = {}
    if ref is None:
        return out
    for r in RESULTS:
        if r.get("stack") != "markerlab" or "loss_first_steps" not in r:
            continue
        a, b = r["loss_first_steps"], ref["loss_first_steps"]
        ga, gb = r["grad_norm_first_steps"], ref["grad_norm_first_steps"]
        k = min(len(a), len(b))
        out[r["setting"]] = {
            "max_abs_loss_diff": max(abs(x - y) for x, y in zip(a[:k], b[:k])),
            "first_step_loss_diff": abs(a[0] - b[0]),
            "max_rel_grad_norm_diff": max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(ga[:k], gb[:k])),
        }
    return out


def print_table(card: str, final: bool = True):
    cmp = compare_losses()
    base = next((r for r in RESULTS if r.get("setting") == BASELINE and "tokens_per_s" in r), None)
    lines = [f"\n### {card}: training throughput ({'final' if final else 'partial'}, "
             f"{elapsed():.0f}s after start)\n",
             "| setting | tokens/s | processed tok/s | s/step | peak GiB alloc / reserved | MFU (989T) | MFU (790T) "
             f"| vs {BASELINE} | max abs loss diff vs {REFERENCE} | max rel grad-norm diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS:
        if "loss_check" in r.get("setting", ""):
            continue
        if "tokens_per_s" not in r:
            why = r.get("skipped") or r.get("error", "?")
            lines.append(f"| {r.get('setting')} | - | - | - | - | - | - | - | {str(why)[:60]} | |")
            continue
        sp = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        c = cmp.get(r["setting"], {})
        dl = f"{c['max_abs_loss_diff']:.2e}" if c else "-"
        dg = f"{c['max_rel_grad_norm_diff']:.2e}" if c else "-"
        pt = r.get("padded_tokens_per_s")
        pt = "-" if pt is None else f"{pt:,.0f}"
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f} / {r.get('peak_reserved_gib') or 0:.1f}"
        label = r["setting"] + (" (throw-away)" if r["setting"] == "warmup" else "")
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {pt} | {r['s_per_step']:.3f} | {peak} | "
                     f"{r['mfu']:.3f} | {r['mfu_measured']:.3f} | {sp} | {dl} | {dg} |")
    with PRINT_LOCK:
        print("\n".join(lines), flush=True)
        if cmp:
            print("loss_check " + json.dumps({k: {kk: float(f"{vv:.3g}") for kk, vv in v.items()}
                                              for k, v in cmp.items()}), flush=True)
    if ARGS is not None and ARGS.out_dir:
        (Path(ARGS.out_dir) / "train_throughput_table.md").write_text("\n".join(lines) + "\n")


def watchdog(card_ref: list):
    limit = ARGS.deadline_s + ARGS.grace_s
    while elapsed() < limit:
        time.sleep(1.0)
    log(f"WATCHDOG: {limit:.0f}s passed; printing what was measured and exiting")
    try:
        print_table(card_ref[0], final=False)
    finally:
        os._exit(0)


# --------------------------------------------------------------------------- main

def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen2 (2 layers, hidden 128): a smoke test")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--settings", default=",".join(DEFAULT_ORDER), help="comma-separated, run in this order")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up optimizer steps per setting (>= 2)")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per setting")
    ap.add_argument("--lengths", default="195,645", help="min,max example length in tokens (--tiny: 100,160)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=420.0,
                    help="start no setting (and no timed step past the second) after this many seconds")
    ap.add_argument("--grace-s", type=float, default=90.0, help="the watchdog exits at deadline + grace")
    ap.add_argument("--compile-estimate-s", type=float, default=150.0,
                    help="a compile setting is skipped unless this much time is left before the deadline")
    ap.add_argument("--profile", default="", help="comma-separated settings to profile one extra step of")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", ""), help="also write JSONL + table here ($OUT)")
    ARGS = ap.parse_args()
    ARGS.warmup = max(ARGS.warmup, 2)
    ARGS.profile = {x.strip() for x in ARGS.profile.split(",") if x.strip()}
    if ARGS.out_dir:
        Path(ARGS.out_dir).mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if (ARGS.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu")
    if ARGS.device == "cuda" and device.type != "cuda":
        sys.exit("--device cuda: no CUDA device visible")
    dtype = getattr(torch, ARGS.dtype)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    card_ref = [card]
    threading.Thread(target=watchdog, args=(card_ref,), daemon=True).start()

    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for mod in ("peft", "triton", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            versions[mod] = f"missing ({type(e).__name__})"
    try:
        import importlib.util

        versions["torch.nn.attention.varlen"] = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except Exception:  # noqa: BLE001
        versions["torch.nn.attention.varlen"] = False
    log(f"device {device} ({card}), dtype {ARGS.dtype}, {json.dumps(versions)}")

    # ---- model (once) and data
    config = model_config(ARGS.tiny)
    t0 = time.time()
    model = build_model(config, device, dtype, ARGS.seed)
    sync(device)
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    ARGS.n_matmul = N_MATMUL_7B if not ARGS.tiny else n_matmul
    log(f"model built in {time.time() - t0:.1f}s: {n_matmul / 1e9:.3f}e9 matmul parameters "
        f"(MFU uses {ARGS.n_matmul:.3g}), "
        f"{torch.cuda.memory_allocated() / 2**30 if device.type == 'cuda' else 0:.1f} GiB on the GPU")
    n_steps = ARGS.warmup + ARGS.steps
    lo, hi = map(int, ("100,160" if ARGS.tiny and ARGS.lengths == "195,645" else ARGS.lengths).split(","))
    if not 50 <= lo <= hi:
        sys.exit("--lengths: expected 50 <= min <= max")
    pool = synth_examples(n_steps * MICRO * ACCUM, ARGS.seed, lo, hi)
    steps_data = [pool[k * MICRO * ACCUM:(k + 1) * MICRO * ACCUM] for k in range(n_steps)]
    real = sum(len(e) for e in pool)
    pad = padded_tokens(pool)
    log(f"{len(pool)} examples, lengths {min(map(len, pool))}-{max(map(len, pool))} "
        f"(mean {real / len(pool):.0f}), {real} tokens; padded micro-batches of {MICRO} hold {pad} "
        f"({100 * (1 - real / pad):.1f}% padding)")
    pad_id = config.pad_token_id

    # ---- settings, most important first
    durations, compile_durations = [], []
    for name in [s.strip() for s in ARGS.settings.split(",") if s.strip()]:
        if name.startswith("ml:"):  # an ad-hoc combination, e.g. ml:compile+cuda_graphs (+ckpt)
            parts = name[3:].split("+")
            SETTINGS[name] = ("ml", tuple(p for p in parts if p in SWITCHES), "ckpt" in parts)
        if name not in SETTINGS:
            emit({"setting": name, "error": f"unknown setting (known: {', '.join(SETTINGS)})"})
            continue
        stack, switches, ckpt = SETTINGS[name]
        is_compile = "compile" in switches
        if is_compile:
            need = max(compile_durations) if compile_durations else ARGS.compile_estimate_s
        else:
            need = max(durations) if durations else 30.0
        if elapsed() + need > ARGS.deadline_s:
            emit({"setting": name, "skipped": f"deadline: {elapsed():.0f}s elapsed, ~{need:.0f}s needed, "
                                              f"--deadline-s {ARGS.deadline_s:.0f}"})
            continue
        log(f"--- {name}: {stack}, switches {list(switches)}, gradient checkpointing {ckpt}")
        ts = time.time()
        rec = None
        try:
            if stack == "ml":
                rec = run_markerlab(name, model, switches, ckpt, steps_data, device, pad_id)
            elif stack == "peft":
                rec = run_peft(name, model, ckpt, steps_data, device, pad_id)
            else:
                rec = run_trl(name, model, steps_data, device, pad_id)
        except torch.cuda.OutOfMemoryError as e:
            rec = {"setting": name, "error": f"OOM: {str(e).splitlines()[0][:200]}"}
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc()
            log(tb[-1500:])
            rec = {"setting": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if rec is not None:
            rec["card"] = card
            rec["setting_wall_s"] = round(time.time() - ts, 1)
            emit(rec)
        cleanup(device)
        (compile_durations if is_compile else durations).append(time.time() - ts)
        log(f"{name} done in {time.time() - ts:.1f}s")

    print_table(card)
    log("done")


if __name__ == "__main__":
    main()
