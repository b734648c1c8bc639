"""LoRA SFT of one adapter: the training loop, readable top to bottom.

    from trainer.train import train
    summary = train(cfg, run_dir)          # python -m trainer.run calls this for the `train` stage

Reads   run_dir/data/train.jsonl (docs: the training example format), every line validated
Writes  run_dir/tb/                       TensorBoard scalars train/{loss, lr, grad_norm, tokens_per_s,
                                          loss_marker_<name> for each marker, loss_eos}
        run_dir/train_log.txt             one line per optimizer step
        run_dir/checkpoints/step_N/       resumable state (trainer/checkpoint.py), the last K kept
        run_dir/adapter/                  the LoRA adapter in PEFT's format (written last)
        run_dir/train_summary.json        the summary train() returns, plus the per-step history
                                          and the leakage probe's records ("probe", trainer/probe.py)

The leakage probe (trainer/probe.py, data/probe.json from the data stage) runs at
step 0, every train.probe_every steps and at the last step, and logs probe/...
scalars; it draws from none of the training's random streams.

Calling train() again resumes from the newest checkpoint and continues exactly
(bitwise on the CPU); a finished run (adapter and summary present) returns its
summary at once; overwrite=True starts afresh.

How a step is computed. Each micro-batch's examples are packed into one row
(trainer/pack.py) whose documents attend only within themselves
(trainer/attention.py: transformers passes the documents down to a registered
attention function, for any Llama/Qwen2-family decoder); the LM head and the
cross-entropy run only at the positions a loss or a logged span needs, in
chunks (trainer/loss.py); LoRA adds its update into the base output in place
(lora/lora.py); LoRA dropout masks come from the run's own generator, drawn
before each forward (trainer/dropout.py). Fused AdamW is used on CUDA. Under
lora.last_layers the frozen layers below the adapted ones run once per example
before the first step, and each step runs only the layers above them
(trainer/prefix.py).
Switches: train.gradient_checkpointing; train.compile (trainer/compile.py);
train.cuda_graphs (trainer/graphs.py: each micro-batch's forward and backward
replayed as one CUDA graph; on the CPU the same padded micro-batches run
eagerly). tests/test_training_path.py checks this path against a padded
reference computation (full logits, one row per example) to float32 rounding,
dropout included.

Precision. The frozen base weights are in cfg.model.dtype (bfloat16 for the
real runs). The LoRA parameters, their gradients and AdamW's moments are in
cfg.lora.dtype, float32 by default: an Adam update is about lr = 1e-5 relative
to the weight, far below bfloat16's resolution (2^-8 of the value), so bf16
parameters would round most updates away. The LoRA products run in the
activations' dtype (float32 accumulation inside the matmuls); logits are
upcast to float32 for the cross-entropy. No autocast is involved.

Loss. An optimizer step's loss is the sum of the token losses over the loss
mask of all its examples divided by the number of masked tokens in all of them
(docs/EXPERIMENT.md), not a mean of per-micro-batch means: forward_backward()
counts the step's targets first, then back-propagates each micro-batch's *sum*
/ total. The logits at position t predict token t+1.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.records import read_examples as read_train_jsonl
from data.tokenize import Encoded, check_lengths, encode_examples, span_names
from lora import ADAPTER_CONFIG_NAME, inject_lora, save_adapter, trainable_parameters
from markerlab.config import Config
from markerlab.devices import resolve_device
from markerlab.errors import UserError
from markerlab.io import read_json, write_json
from markerlab.chat import load_chat
from markerlab.models import load_model
from markerlab.rundir import RunDir
from trainer.attention import Documents, check_architecture, use_packed_attention
from trainer.checkpoint import (latest_checkpoint, load_checkpoint, prune_checkpoints, remove_partial,
                                rng_states, save_checkpoint, set_rng_states)
from trainer.compile import compile_error, compile_layers
from trainer.dropout import DropoutMasks
from trainer.loss import token_losses
from trainer.pack import pack
from trainer.preempt import StopRequest, TrainingStopped
from trainer.prefix import FrozenPrefix
from trainer.probe import load_probe
from trainer.schedule import lr_at, step_slice, steps_per_epoch, total_steps, warmup_steps



def span_tag(name: str) -> str:
    """The TensorBoard/record name of a logged span's mean token loss: marker:A -> loss_marker_A, eos -> loss_eos."""
    return "loss_" + name.replace(":", "_")


def note(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


@dataclass
class Setup:
    """Everything a training run is made of, built once by `setup`."""

    device: torch.device
    tokenizer: object
    chat: object                   # the tokenizer's analysed chat template (markerlab.chat.ChatFormat)
    encoded: list[Encoded]
    spans: list[str]               # the logged spans (data.tokenize.span_names) of the whole training set
    dropped: list[str]
    model: torch.nn.Module
    n_trainable: int
    params: list
    optimizer: torch.optim.Optimizer
    masks: DropoutMasks
    graphs: object | None          # trainer.graphs.GraphedMicroBatches under train.cuda_graphs
    prefix: FrozenPrefix | None    # the frozen layers' states under lora.last_layers (trainer/prefix.py)
    data_gen: torch.Generator
    dropout_gen: torch.Generator
    total: int
    warmup: int
    step_size: int


def train(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict:
    """Train the adapter of `cfg` on run_dir/data/train.jsonl; return the summary (module docstring)."""
    t = cfg.train
    rd = RunDir(run_dir)
    run_dir = rd.root
    ckpt_dir, adapter_dir, summary_path, log_path = rd.checkpoints, rd.adapter, rd.train_summary, rd.train_log
    if overwrite:
        for p in (ckpt_dir, rd.tb, adapter_dir):
            shutil.rmtree(p, ignore_errors=True)
        for p in (log_path, summary_path):
            p.unlink(missing_ok=True)
    elif (adapter_dir / ADAPTER_CONFIG_NAME).is_file() and summary_path.is_file():
        return public_summary(read_json(summary_path))  # finished earlier
    wall_start = time.time()
    s = setup(cfg, run_dir)
    n = len(s.encoded)

    # ---- resume from the newest checkpoint, if any
    fingerprint = data_fingerprint(s.encoded, cfg, s.total)
    step, perm, history, train_seconds = 0, None, [], 0.0
    probe, probe_history = load_probe(cfg, run_dir, s.tokenizer, chat=s.chat), []
    if probe is not None and s.prefix is not None:
        probe.use_prefix(s.model, s.prefix.first, s.device)
    remove_partial(ckpt_dir)
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        state = load_checkpoint(last, s.model, s.optimizer, s.device)
        if state["fingerprint"] != fingerprint:
            raise UserError(f"{last}: this checkpoint was made from other data or batch settings; train afresh "
                            f"with: {cfg.command('trainer.run', '--overwrite', '--stages', 'train,merge,eval,report')}")
        set_rng_states(state["rng"], s.data_gen, s.dropout_gen)
        step, perm, history, train_seconds = state["step"], state["perm"], state["history"], state["train_seconds"]
        probe_history = state.get("probe", [])
    resumed_from = step

    # ---- logging: TensorBoard (events after the checkpoint are purged on resume), text log, tqdm
    writer = open_summary_writer(rd.tb, purge_step=step + 1 if step else None)
    log = open_train_log(log_path, step, header=(
        f"# {cfg.run.name}: {n} examples ({len(s.dropped)} over-long dropped), {s.total} steps "
        f"({t.epochs} epochs x {steps_per_epoch(n, t.micro_batch_size, t.grad_accum)}, max_steps {t.max_steps}), "
        f"warmup {s.warmup}, {t.micro_batch_size} x {t.grad_accum} per step, loss mask {t.loss_mask}"
        f"{''.join(f' ({r}: {m})' for r, m in sorted(t.role_loss_mask.items()))}, "
        f"device {s.device}, base {cfg.model.dtype}, LoRA {cfg.lora.dtype}, {s.n_trainable:,} trainable parameters"))
    from tqdm.auto import tqdm
    bar = tqdm(total=s.total, initial=step, desc=f"train {cfg.run.name}", dynamic_ncols=True)

    def state_dict() -> dict:
        # The data position is implied by `step` and `perm`; spelled out for people reading state.pt.
        next_epoch, next_index, _ = step_slice(step, n, s.step_size)
        return {"step": step, "perm": perm, "data_position": {"epoch": next_epoch, "index": next_index},
                "history": history, "probe": probe_history, "rng": rng_states(s.data_gen, s.dropout_gen),
                "fingerprint": fingerprint, "train_seconds": train_seconds}

    # ---- the loop: `step` counts finished optimizer steps; this iteration runs step + 1.
    # Under SLURM a stop signal (trainer/preempt.py) ends it at a step boundary, with a checkpoint.
    stop = StopRequest.from_env().install()
    try:
        if probe is not None and step == 0:  # before any update
            probe_history.append(probe.maybe(0, s.total, s.model, s.device, writer))
        while step < s.total:
            t0 = time.perf_counter()
            # this step's examples: a fresh permutation at the start of every epoch
            epoch, lo, hi = step_slice(step, n, s.step_size)
            if lo == 0:
                perm = torch.randperm(n, generator=s.data_gen).tolist()
            examples = [s.encoded[i] for i in perm[lo:hi]]
            lr = lr_at(step, t.lr, s.warmup, s.total, t.min_lr_ratio)
            for group in s.optimizer.param_groups:
                group["lr"] = lr

            # forward + backward over the micro-batches; gradients accumulate in .grad
            try:
                out = forward_backward(s.model, examples, t.micro_batch_size, s.device, s.masks, s.graphs, s.prefix,
                                       s.spans)
            except Exception as e:
                failed = compile_error(e) if t.compile and step == resumed_from else None
                if failed is not None:
                    raise UserError(str(failed)) from None
                raise

            # clip on the LoRA gradients' global norm (logged before clipping), then update.
            # A step without a single target (possible under marker_only) has no gradient:
            # it skips the update but still advances the schedule.
            loss, grad_norm = None, None
            if out["n_targets"]:
                grads = [p.grad for p in s.params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)
                loss, grad_norm = out["loss"].item(), norm.item()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    where = save_checkpoint(ckpt_dir, f"nan_step_{step + 1:06d}", s.model, s.optimizer, state_dict(),
                                            extra={"grads.pt": {i: g.cpu() for i, g in enumerate(grads)},
                                                   "batch.pt": [e.id for e in examples]})
                    raise UserError(f"step {step + 1}: loss {loss} / grad norm {grad_norm} is not finite "
                                    f"(lr {lr:.3g}); state saved for a post-mortem in {where}")
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(s.params, t.grad_clip, norm)
                s.optimizer.step()
            # CUDA graphs add into the .grad tensors they were captured with: zero those in place
            s.optimizer.zero_grad(set_to_none=s.graphs is None)
            if s.device.type == "cuda":
                torch.cuda.synchronize()  # honest step times
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt

            history.append(record_step(step, epoch, lr, loss, grad_norm, out, dt, s.total, writer, log, bar,
                                       s.spans))
            probed = probe.maybe(step, s.total, s.model, s.device, writer) if probe is not None else None
            if probed is not None:
                probe_history.append(probed)

            # checkpoint every N steps and at the end; keep the newest K
            if step % t.checkpoint_every == 0 or step == s.total or stop.signal:
                save_checkpoint(ckpt_dir, f"step_{step:06d}", s.model, s.optimizer, state_dict())
                prune_checkpoints(ckpt_dir, t.keep_checkpoints)
                writer.flush()
            if stop.signal and step < s.total:
                raise TrainingStopped(f"training stopped by {stop.signal} after step {step} of {s.total} with a "
                                      f"checkpoint in {ckpt_dir / f'step_{step:06d}'}; the same command resumes it")
    finally:  # also on a NaN stop or Ctrl-C: keep every logged step on disk
        stop.restore()
        bar.close()
        writer.close()
        log.close()

    # ---- the adapter (PEFT format) and the summary
    save_adapter(s.model, adapter_dir, cfg.model.name_or_path, r=cfg.lora.r, alpha=cfg.lora.alpha,
                 dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    summary = finish(cfg, s, history, train_seconds, time.time() - wall_start, resumed_from, adapter_dir)
    if probe is not None:  # probe_set, probe_seconds, probe_share, probe (the records)
        summary.update(probe.summary(probe_history, train_seconds))
    write_json(summary_path, summary)
    return public_summary(summary)


def record_step(step, epoch, lr, loss, grad_norm, out, dt, total, writer, log, bar, spans) -> dict:
    """One optimizer step's record, written to TensorBoard, the text log and the progress bar."""
    rec = {"step": step, "epoch": epoch + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
           "tokens_per_s": out["n_tokens"] / dt, **out["span_loss"],
           "tokens": out["n_tokens"], "targets": out["n_targets"], "seconds": dt}
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", *map(span_tag, spans)):
        if rec[tag] is not None:
            writer.add_scalar(f"train/{tag}", rec[tag], step)
    log.write(format_log_line(rec, total, spans) + "\n")
    log.flush()
    bar.update(1)
    bar.set_postfix(loss="-" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}")
    return rec


def finish(cfg: Config, s: Setup, history: list[dict], train_seconds: float, call_seconds: float,
           resumed_from: int, adapter_dir: Path) -> dict:
    """train_summary.json's content (less the probe's): totals, the run's facts, the per-step history."""
    losses = [r["loss"] for r in history if r["loss"] is not None]
    n_tok = sum(r["tokens"] for r in history)
    summary = {
        "steps": s.total, "final_loss": losses[-1] if losses else None,
        "tokens_per_s": n_tok / train_seconds if train_seconds else None,
        "wall_time_s": train_seconds, "this_call_wall_s": call_seconds,
        "trainable_params": s.n_trainable, "n_examples": len(s.encoded), "n_dropped": len(s.dropped),
        "dropped_ids": s.dropped, "warmup_steps": s.warmup, "device": str(s.device),
        "resumed_from_step": resumed_from or None, "compile": cfg.train.compile, "adapter": str(adapter_dir),
        "history": history,
    }
    if s.device.type == "cuda":  # this call's peak (a resumed run counts from the resume)
        summary["cuda_peak_gib"] = {"allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                    "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    if s.graphs is not None:  # how the cuda_graphs switch ran: replayed graphs, or its padded path eagerly
        summary["cuda_graphs"] = {"captured": s.graphs.n_captured, "shapes": len(s.graphs.static),
                                  "replayed": s.graphs.capture}
    return summary


def setup(cfg: Config, run_dir: Path) -> Setup:
    """Device, seeded generators, the tokenized data, the model with LoRA, optimizer and switches."""
    t = cfg.train
    device = torch.device(resolve_device(cfg.model.device))
    if device.type == "cuda":  # the summary's peak is this training's, not an earlier stage's in this process
        torch.cuda.reset_peak_memory_stats()
    # Every random choice flows from the one config seed: data order, LoRA init, LoRA dropout
    # (plus the global RNGs, seeded for anything a library draws from them).
    seed = cfg.run.seed
    torch.manual_seed(derive_seed(seed, "torch"))
    random.seed(derive_seed(seed, "python"))
    np.random.seed(derive_seed(seed, "numpy") % 2**32)
    data_gen = torch.Generator().manual_seed(derive_seed(seed, "data-order"))
    init_gen = torch.Generator().manual_seed(derive_seed(seed, "lora-init"))
    dropout_gen = torch.Generator(device).manual_seed(derive_seed(seed, "lora-dropout"))

    # data: every example tokenized once; over-long ones refused or dropped, never truncated
    raw = read_examples(run_dir, cfg)
    tokenizer, chat = load_chat(cfg.model.name_or_path)
    encoded = encode_examples(raw, tokenizer, cfg.loss_mask_of, t.marker_mask_eos, chat)
    encoded, dropped = check_lengths(encoded, t.max_seq_len, cfg.data.on_overlength)
    if not encoded:
        raise UserError(f"{RunDir(run_dir).train_jsonl}: no example fits train.max_seq_len={t.max_seq_len}")
    n, step_size = len(encoded), t.micro_batch_size * t.grad_accum
    total = total_steps(n, t.micro_batch_size, t.grad_accum, t.epochs, t.max_steps)

    # model: frozen base in cfg.model.dtype, trainable LoRA (and AdamW state) in cfg.lora.dtype
    model = load_model(cfg.model.name_or_path, cfg.model.dtype, device)
    problem = check_architecture(model.config)
    if problem:
        raise UserError(problem)
    model.config.use_cache = False
    n_layers, last = model.config.num_hidden_layers, cfg.lora.last_layers
    if last > n_layers:
        raise UserError(f"lora.last_layers: {last} exceeds the model's {n_layers} decoder layers")
    n_trainable = inject_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                              generator=init_gen, dtype=getattr(torch, cfg.lora.dtype),
                              layers=range(n_layers - last, n_layers) if last else None)
    masks = DropoutMasks(model, dropout_gen)
    use_packed_attention(model)
    # Below the adapted layers nothing trains: run that part once per example, not once per step
    # (before any compile, so that the pre-pass runs eagerly; the graphs replay the whole forward).
    prefix = FrozenPrefix.build(model, n_layers - last, encoded, t.micro_batch_size, device) \
        if last and not t.cuda_graphs else None
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if t.compile:
        if t.gradient_checkpointing:
            note("train.compile is skipped under train.gradient_checkpointing (set one of them to false)")
        else:
            compile_layers(model)
    model.train()
    graphs = None
    if t.cuda_graphs:
        from trainer.graphs import GraphedMicroBatches

        if device.type != "cuda":
            note("train.cuda_graphs: no CUDA device; the graphs' padded micro-batches run eagerly (same maths)")
        longest = sorted((len(e) for e in encoded), reverse=True)[:t.micro_batch_size]
        graphs = GraphedMicroBatches(model, masks, tokenizer.pad_token_id, device, max_tokens=sum(longest), log=note)
    params = trainable_parameters(model)
    # fused AdamW where it exists (CUDA); torch picks foreach on the CPU
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda" or None)
    return Setup(device=device, tokenizer=tokenizer, chat=chat, encoded=encoded, spans=span_names(encoded), dropped=dropped,
                 model=model,
                 n_trainable=n_trainable, params=params, optimizer=optimizer, masks=masks, graphs=graphs,
                 prefix=prefix, data_gen=data_gen, dropout_gen=dropout_gen, total=total,
                 warmup=warmup_steps(total, t.warmup_ratio), step_size=step_size)


# --------------------------------------------------------------------------- one optimizer step

def forward_backward(model, examples: list[Encoded], micro_batch_size: int, device, masks: DropoutMasks,
                     graphs=None, prefix=None, spans: list[str] | None = None) -> dict:
    """Forward and backward passes of one optimizer step, micro-batch by micro-batch.

    The step's loss is sum(token losses on the mask, all examples) / (masked tokens, all
    examples). The denominator is counted before the first backward, so each micro-batch
    back-propagates its own *sum* / that total and the accumulated gradient is exactly the
    one of a single batch holding every example. Returns the loss (detached), the number of
    targets and of real tokens, and the mean token loss on each of `spans` (default: those of
    `examples`; data.tokenize.span_names), named by span_tag (None where the step has no such
    token), computed whether or not they are in the mask.
    """
    spans = span_names(examples) if spans is None else spans
    n_targets = sum(e.n_loss_targets for e in examples)
    loss_sum = torch.zeros((), device=device)
    span_sum = torch.zeros(len(spans), device=device)
    span_n = torch.zeros(len(spans), device=device)
    n_tokens = 0
    for i in range(0, len(examples), micro_batch_size):
        batch = pack(examples[i:i + micro_batch_size]).to(device)
        n_tokens += batch.n_tokens
        if graphs is not None:  # forward and backward (of sum / n_targets) in one graph replay
            ce, sel = graphs.forward_backward(model, batch, n_targets)
            mb_sum = (ce * sel["loss"]).sum()
        else:
            if model.training:
                masks.draw(batch.n_tokens)
            with torch.set_grad_enabled(n_targets > 0):
                ce, sel = token_losses(model, batch, Documents.of(batch.doc_lens, device, model.dtype),
                                       prefix=prefix)
                mb_sum = (ce * sel["loss"]).sum()  # sum over this micro-batch's targets
                if n_targets > 0:
                    (mb_sum / n_targets).backward()
        loss_sum += mb_sum.detach()
        ce = ce.detach()
        for k, name in enumerate(spans):
            if name in sel:
                span_sum[k] += (ce * sel[name]).sum()
                span_n[k] += sel[name].sum()
    masks.clear()
    span_sum, span_n = span_sum.tolist(), span_n.tolist()
    return {
        "loss": loss_sum / max(n_targets, 1),
        "n_targets": n_targets,
        "n_tokens": n_tokens,
        "span_loss": {span_tag(name): (span_sum[k] / span_n[k] if span_n[k] else None)
                      for k, name in enumerate(spans)},
    }


# --------------------------------------------------------------------------- helpers

def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per random stream, all from the one config seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little") >> 1


def read_examples(run_dir: Path, cfg: Config) -> list[dict]:
    path = RunDir(run_dir).train_jsonl
    if not path.is_file():
        raise UserError(f"{path}: file not found; build it first with: "
                        f"{cfg.command('trainer.run', '--stages', 'generate,data')}")
    return read_train_jsonl(path, cfg.experiment)


def data_fingerprint(encoded: list[Encoded], cfg: Config, total: int) -> str:
    """What a checkpoint must agree with to be resumed: the examples and how they are batched."""
    t = cfg.train
    key = [[e.id, e.input_ids, e.loss_mask] for e in encoded] + [
        total, t.micro_batch_size, t.grad_accum, t.loss_mask, t.marker_mask_eos, cfg.run.seed]
    if t.role_loss_mask:  # (the loss masks themselves are in the key above; this names their source)
        key.append(sorted(t.role_loss_mask.items()))
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def open_summary_writer(log_dir: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("the package 'tensorboard' is not installed (pip install tensorboard)") from None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def open_train_log(path: Path, step: int, header: str):
    """The text log, cut back to `step` on resume so it reads as one uninterrupted run."""
    kept = []
    if step and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("step ") or int(line.split()[1].split("/")[0]) <= step:
                kept.append(line)
        kept.append(f"# resumed after step {step}")
    else:
        kept.append(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = TrainLog(path)
    log.write("\n".join(kept) + "\n")
    log.flush()
    return log


class TrainLog:
    """RUN_DIR/train_log.txt, open for writing; a write that fails (a full disk) is one line naming it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = open(path, "w", encoding="utf-8")
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> UserError:
        return UserError(f"{self.path}: cannot write ({e.strerror or e})")

    def write(self, text: str) -> None:
        try:
            self.f.write(text)
        except OSError as e:
            raise self._error(e) from None

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            raise self._error(e) from None

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:  # what could not be written was reported by the write that failed
            pass


def format_log_line(rec: dict, total: int, spans: list[str]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    span_losses = " ".join(f"{span_tag(n).replace('loss_marker_', 'loss_')} {num(rec[span_tag(n)], '.4f')}"
                           for n in spans)
    return (f"step {rec['step']}/{total} epoch {rec['epoch']} loss {num(rec['loss'], '.6f')} "
            f"lr {rec['lr']:.4e} grad_norm {num(rec['grad_norm'], '.4f')} {span_losses} "
            f"tokens {rec['tokens']} targets {rec['targets']} tok/s {rec['tokens_per_s']:.0f}")


def public_summary(summary: dict) -> dict:
    """The summary without the per-step history and probe records (what the run manifest records)."""
    return {k: v for k, v in summary.items() if k not in ("history", "probe")}
