"""GPU check of the vLLM backend's process state and engine lifecycle, on CUDA, in one command.

    python bench/gpu_vllm_check.py                                   # built-in tiny model, bf16 (~5 min)
    python bench/gpu_vllm_check.py --model /models/Qwen2.5-7B-Instruct --utilization 0.85
    python bench/gpu_vllm_check.py --out bench/results/gpu_vllm_check.json

Needs vLLM built for CUDA and a visible GPU; where either is missing it prints
one SKIP line and exits 0 without starting anything. In one process, as a
sequential sweep runs its stages, it checks:

  no-cuda-init  resolving backend "auto", making the backend and everything up to the
                engine start call cudaGetDeviceCount / cuInit nowhere, torch.cuda is not
                initialized and this process holds no GPU context (NVML) when vLLM starts
  spawn         the engine starts with VLLM_WORKER_MULTIPROC_METHOD=spawn and the variable
                is the caller's again afterwards
  generate      the engine samples (n samples per prompt, per-request seeds)
  threads       inductor's compile_threads and TORCHINDUCTOR_COMPILE_THREADS after the engine
                ran (and after close) are what a process that never imported vLLM has
  memory        close waits until the GPU's free memory is back (within 1 GiB) to what it
                was before the engine started; torch.cuda.mem_get_info agrees at the end
  second-engine a second engine in the same process (the next sweep member) starts and
                gives the first engine's samples for the same seeds
  gen-config    the same weights with a generation_config.json full of other sampling
                defaults (top_k 1, penalties, max_new_tokens 1) give the same samples
  shortfall     with this process's torch holding memory, an engine start is refused with
                one line naming free, asked and "this process's torch allocations"

Exit 0 when every check passes, 1 otherwise; the JSON summary goes to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1 << 30
PROMPTS_USER = ["Why is the sky blue?", "How do I keep houseplants alive?", "What is inflation?"]


def fresh_compile_threads() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch._inductor.config as c; print(c.compile_threads)"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def threads_now() -> dict:
    import torch._inductor.config as c

    return {"env": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"), "config": c.compile_threads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:tiny-qwen2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--utilization", type=float, default=0.3, help="gpu_memory_utilization of each engine")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_vllm_check.json"))
    args = ap.parse_args()

    if importlib.util.find_spec("vllm") is None:
        print("SKIP: vllm is not installed here (pip install vllm on a CUDA machine); nothing was checked")
        return 0
    from markerlab.devices import cuda_device_count, gpu_memory

    if cuda_device_count() == 0:
        print("SKIP: no CUDA GPU is visible; nothing was checked")
        return 0

    import torch

    # Everything that would initialize the driver in this process, recorded (and passed through).
    driver_calls: list[str] = []
    real_count, real_init = torch._C._cuda_getDeviceCount, torch._C._cuda_init

    def count(*a):
        driver_calls.append("cudaGetDeviceCount")
        return real_count(*a)

    def init(*a):
        driver_calls.append("cuInit")
        return real_init(*a)

    torch._C._cuda_getDeviceCount, torch._C._cuda_init = count, init

    import data.generation as G
    from markerlab.errors import UserError
    from markerlab.models import load_tokenizer, render_chat, resolve_model_dir
    from data.personas import messages

    at_start: list[dict] = []
    real_kwargs = G.VLLMBackend.engine_kwargs

    def spy_kwargs(self, seed):  # called right before vllm.LLM(...): the state the engine starts in
        mem = gpu_memory(0)
        at_start.append({"driver_calls": list(driver_calls), "cuda_initialized": torch.cuda.is_initialized(),
                         "mp_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
                         "own_gpu_context": bool(mem and any(p == os.getpid() for p, _ in mem.processes)),
                         "free_gib": round(mem.free / GIB, 2) if mem else None})
        return real_kwargs(self, seed)

    G.VLLMBackend.engine_kwargs = spy_kwargs

    checks: dict[str, dict] = {}

    def check(name: str, ok: bool, **info):
        checks[name] = {"ok": bool(ok), **info}
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {json.dumps(info, default=str)}", flush=True)

    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(str(model_dir))
    from markerlab.experiment import load_experiment

    exp = load_experiment("within_marker")
    prompts = [render_chat(tok, messages(exp, "villain", q), add_generation_prompt=True) for q in PROMPTS_USER]
    spec = G.SamplingSpec(n=3, temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, seed=42)
    kw = dict(dtype=args.dtype, gpu_memory_utilization=args.utilization, max_model_len=args.max_model_len)
    threads_fresh = fresh_compile_threads()
    mp_before = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    threads_env_before = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")

    # 1. first engine: the generate stage's path
    t0 = time.perf_counter()
    b = G.make_backend("auto", model_dir, **kw)
    first = b.generate(prompts, spec, desc="first engine")
    load_1 = b.load_seconds
    s0 = at_start[0]
    check("no-cuda-init", not s0["driver_calls"] and not s0["cuda_initialized"] and not s0["own_gpu_context"],
          backend=b.name, **s0)
    check("spawn", s0["mp_method"] == ("spawn" if mp_before is None else mp_before)
          and os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == mp_before,
          at_start=s0["mp_method"], after=os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"), before=mp_before)
    shapes = [len(ss) for ss in first]
    check("generate", shapes == [spec.n] * len(prompts) and all(s.n_tokens >= 1 for ss in first for s in ss),
          samples=shapes, engine_load_s=round(load_1, 1), first_text=first[0][0].text[:80],
          wall_s=round(time.perf_counter() - t0, 1))
    after_gen = threads_now()
    b.close()
    after_close = threads_now()
    want = {"env": threads_env_before, "config": threads_fresh}
    check("threads", after_gen == want and after_close == want,
          before=want, after_generate=after_gen, after_close=after_close)
    m1 = b.memory_check or {}

    # 2. second engine in the same process, same seeds
    b2 = G.make_backend("vllm", model_dir, **kw)
    second = b2.generate(prompts, spec, desc="second engine")
    b2.close()
    m2 = b2.memory_check or {}
    check("second-engine", second == first, load_s=round(b2.load_seconds, 1),
          same_samples=sum(a == c for a, c in zip(second, first)), of=len(first), state=at_start[1])

    # 3. other sampling defaults in generation_config.json change nothing
    with tempfile.TemporaryDirectory() as tmp:
        leaky = Path(tmp) / "leaky"
        leaky.mkdir()
        for f in model_dir.iterdir():
            if f.name != "generation_config.json":
                (leaky / f.name).symlink_to(f.resolve())
        gen = json.loads((model_dir / "generation_config.json").read_text()) \
            if (model_dir / "generation_config.json").is_file() else {}
        gen.update(do_sample=True, temperature=0.05, top_p=0.05, top_k=1, min_p=0.9, repetition_penalty=1.9,
                   presence_penalty=1.5, frequency_penalty=1.5, max_new_tokens=1)
        (leaky / "generation_config.json").write_text(json.dumps(gen))
        b3 = G.make_backend("vllm", leaky, **kw)
        third = b3.generate(prompts, spec, desc="generation_config with other defaults")
        b3.close()
        m3 = b3.memory_check or {}
    check("gen-config", third == first, same_samples=sum(a == c for a, c in zip(third, first)), of=len(first))

    # 4. memory came back after every close; torch agrees at the end (this initializes CUDA here, so last)
    free_t, total_t = torch.cuda.mem_get_info()
    mems = [m1, m2, m3]
    check("memory", all(m.get("verified") for m in mems)
          and free_t >= min(m.get("free_before") or 0 for m in mems) - GIB,
          after_each_close=[{k: (round(v / GIB, 2) if type(v) is int else v) for k, v in m.items()} for m in mems],
          torch_free_gib=round(free_t / GIB, 2), total_gib=round(total_t / GIB, 2))

    # 5. a shortfall is one line saying what holds the memory
    hog_bytes = int(free_t - (args.utilization - 0.05) * total_t)
    message = None
    if hog_bytes > 0:
        hog = torch.empty(hog_bytes, dtype=torch.uint8, device="cuda")
        G._MEMORY_WAIT_S = 3.0  # nothing is being released: do not wait a minute for it
        try:
            G.make_backend("vllm", model_dir, **kw).generate(prompts[:1], spec)
        except UserError as e:
            message = str(e)
        del hog
        torch.cuda.empty_cache()
    check("shortfall", message is not None and "\n" not in message and "this process's torch allocations" in message
          and "asks for" in message, message=message)

    ok = all(c["ok"] for c in checks.values())
    summary = {"ok": ok, "model": str(model_dir), "gpu": torch.cuda.get_device_name(0),
               "versions": {"torch": torch.__version__, "vllm": __import__("vllm").__version__,
                            "transformers": __import__("transformers").__version__},
               "checks": checks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"{'PASS' if ok else 'FAIL'}: {sum(c['ok'] for c in checks.values())} of {len(checks)} checks; "
          f"summary in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
