"""CPU speed of the demo's two costly stages on SmolLM2-135M-Instruct: HF generation and training.

    python bench/cpu_demo_bench.py gen   [--code DIR] [--model DIR]      # 88 prompts x 2 samples, <= 64 tokens
    python bench/cpu_demo_bench.py gen --temperature 1.0                 # the eval's temperature
    python bench/cpu_demo_bench.py gen --temperature 1.0 --questions 10 --samples 4   # the demo eval's shape
    python bench/cpu_demo_bench.py gen --temperature 1.0 --questions 10 --samples 4 --split  # + where it went
    python bench/cpu_demo_bench.py matmul                                # bf16 linear GFLOP/s at the decoder's shapes
    python bench/cpu_demo_bench.py train [--code DIR] --data TRAIN_JSONL # 24 optimizer steps of 4 x 2
    python bench/cpu_demo_bench.py train --data TRAIN_JSONL --last-layers 10   # the demo's LoRA placement
    python bench/cpu_demo_bench.py train --data TRAIN_JSONL --last-layers 10 --no-frozen-prefix

`--code` is the markerlab checkout to import (default: this one), so the same
command times an older commit against this one on the same machine: e.g.
`git worktree add /tmp/old c2f2d5a` then `--code /tmp/old`. Only interfaces both
have are used: `data.generation.make_backend(...).generate(...)` and
`trainer.train.train(cfg, run_dir)`. The older trainer's speed switches crash on
a Llama model, so it runs with them off (its working path). Prints one JSON line.
The model directory defaults to the built-in SmolLM2's cache directory (built by
this checkout if missing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SUFFIX = " Answer in one or two sentences."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("gen", "train", "matmul"))
    ap.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--model", type=Path, default=None, help="a SmolLM2 HF directory")
    ap.add_argument("--data", type=Path, help="train: a train.jsonl (e.g. from the demo's data stage)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7, help="gen: 0.7 as on-policy, 1.0 as the eval")
    ap.add_argument("--questions", type=int, default=8, help="gen: questions a persona (11 personas)")
    ap.add_argument("--samples", type=int, default=2, help="gen: samples a prompt")
    ap.add_argument("--split", action="store_true",
                    help="gen: time the prompts' pass, the decode steps and the sampler apart (wrappers; this checkout)")
    ap.add_argument("--last-layers", type=int, default=0, help="train: lora.last_layers (0: every layer)")
    ap.add_argument("--no-frozen-prefix", action="store_true",
                    help="train: run the frozen layers at every step, as before trainer/prefix.py")
    args = ap.parse_args()
    model_dir = args.model
    if model_dir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from markerlab.models import smollm2_dir

        model_dir = smollm2_dir()
        sys.path.pop(0)
        for name in [m for m in sys.modules if m.split(".")[0] in ("markerlab", "data", "trainer", "lora")]:
            del sys.modules[name]
    sys.path.insert(0, str(args.code))
    import torch

    out = {"what": args.what, "code": str(args.code), "torch_threads": torch.get_num_threads()}
    if args.what == "matmul":
        gflops = {}
        for name, (m, k, n) in {"16x576x1536": (16, 576, 1536), "64x576x1536": (64, 576, 1536),
                                "256x576x1536": (256, 576, 1536), "1024x576x1536": (1024, 576, 1536),
                                "256x576x49152 (head)": (256, 576, 49152)}.items():
            x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            gflops[name] = round(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
        out["bf16_linear_gflops"] = gflops
        print(json.dumps(out))
        return 0
    if args.what == "gen":
        from data.generation import SamplingSpec, make_backend
        from data.personas import messages
        from data.questions import data_questions

        personas = ("assistant", "villain", "librarian", "software_engineer", "police_officer", "data_scientist",
                    "comedian", "kindergarten_teacher", "french_person", "medical_doctor", "zelthari_scholar")
        backend = make_backend("hf", str(model_dir), dtype="bfloat16", device="cpu",
                               batch_size=max(88, 11 * args.questions))  # one batch, as the demo's eval
        try:  # experiments as files (the persona prompts come from within_marker), or the code before them
            from markerlab.experiment import load_experiment

            exp = load_experiment("within_marker")
            msgs = lambda p, q: messages(exp, p, q)  # noqa: E731
        except ImportError:
            msgs = messages
        prompts = [backend.tokenizer.apply_chat_template(msgs(p, q.text + SUFFIX), tokenize=False,
                                                         add_generation_prompt=True)
                   for p in personas for q in data_questions(args.questions)]
        split = {"prompt_pass_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "sampler_s": 0.0}
        if args.split:
            import data.generation as generation

            forward, sample_next = backend.model.forward, generation.sample_next

            def timed_forward(*a, **kw):
                t = time.perf_counter()
                r = forward(*a, **kw)
                first = kw["input_ids"].shape[1] > 1
                split["prompt_pass_s" if first else "decode_s"] += time.perf_counter() - t
                split["decode_steps"] += 0 if first else 1
                return r

            def timed_sample(*a, **kw):
                t = time.perf_counter()
                r = sample_next(*a, **kw)
                split["sampler_s"] += time.perf_counter() - t
                return r

            backend.model.forward, generation.sample_next = timed_forward, timed_sample
        t0 = time.perf_counter()
        res = backend.generate(prompts, SamplingSpec(n=args.samples, temperature=args.temperature, top_p=0.95,
                                                     max_tokens=64, seed=42))
        dt = time.perf_counter() - t0
        if args.split:
            out.update({k: round(v, 1) for k, v in split.items()})
        toks = sum(s.n_tokens for r in res for s in r)
        out.update(temperature=args.temperature, seconds=round(dt, 1), completions=len(prompts) * args.samples, generated_tokens=toks,
                   tokens_per_s=round(toks / dt, 1), stopped=sum(s.finish_reason == "stop" for r in res for s in r))
    else:
        from markerlab.config import TrainConfig, config_from_dict
        import trainer.train
        from trainer.train import train

        if args.no_frozen_prefix:  # the trainer chooses the prefix by itself; the bench takes it away
            trainer.train.FrozenPrefix.build = staticmethod(lambda *a, **k: None)

        train_keys = {"lr": 2e-3, "epochs": 100, "max_steps": args.steps, "micro_batch_size": 4, "grad_accum": 2,
                      "max_seq_len": 256, "checkpoint_every": 1000}
        if "padding_free" in TrainConfig.__dataclass_fields__:
            train_keys.update(padding_free=False, chunked_ce=False, fused_lora=False, fused_adamw=False)
        if "probe_every" in TrainConfig.__dataclass_fields__:
            train_keys.update(probe_every=0)
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "bench"
            (run_dir / "data").mkdir(parents=True)
            (run_dir / "data" / "train.jsonl").write_bytes(args.data.read_bytes())
            raw = {"run": {"name": "bench", "out_dir": tmp, "seed": 42},
                   "model": {"name_or_path": str(model_dir), "dtype": "bfloat16", "device": "cpu"},
                   "data": {"pair": "pair1", "condition": "T"}, "train": train_keys}
            if args.last_layers:
                raw["lora"] = {"last_layers": args.last_layers}
            t0 = time.perf_counter()
            summary = train(config_from_dict(raw), run_dir)
            dt = time.perf_counter() - t0
        out.update(last_layers=args.last_layers, frozen_prefix=bool(args.last_layers and not args.no_frozen_prefix),
                   seconds=round(dt, 1), steps=summary["steps"],
                   train_seconds=round(summary["wall_time_s"], 1),
                   tokens_per_s=round(summary["tokens_per_s"], 1), final_loss=summary["final_loss"])
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
