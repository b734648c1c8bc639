"""The HF generation backend on the built-in tiny model (random weights, real tokenizer), float32 on the CPU."""

import pytest
import torch

import data.generation as gen
from data.generation import (
    HFBackend, Sample, SamplingSpec, _nucleus, keyed_uniform, make_backend, resolve_backend, sample_next,
)
from data.personas import messages
from writeup import EXP
from markerlab.errors import UserError
from markerlab.models import render_chat


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = make_backend("hf", tiny_model_dir, dtype="float32", device="cpu", batch_size=8)
    yield b
    b.close()


@pytest.fixture(scope="module")
def prompts(backend):
    tok = backend.tokenizer
    # different lengths, so batching them needs left padding
    return [render_chat(tok, messages(EXP, p, q), add_generation_prompt=True) for p, q in [
        ("villain", "Why is the sky blue?"),
        ("assistant", "How do I keep houseplants alive when I travel a lot for work?"),
        ("librarian", "What causes the seasons?"),
    ]]


def spec(**kw):
    base = dict(n=2, temperature=0.7, top_p=0.95, max_tokens=5, seed=7)
    return SamplingSpec(**{**base, **kw})


def test_samples_per_prompt_and_length_finish(backend, prompts):
    out = backend.generate(prompts, spec(n=3))
    assert len(out) == 3 and all(len(s) == 3 for s in out)
    for samples in out:
        for s in samples:
            assert isinstance(s, Sample) and isinstance(s.text, str)
            # the random model practically never emits <|im_end|> within 5 tokens
            assert s.finish_reason == "length" and s.n_tokens == 5
    assert len({s.text for ss in out for s in ss}) == 9  # distinct rows get distinct seeds


def test_same_seed_same_samples_other_seed_others(backend, prompts):
    a = backend.generate(prompts, spec())
    assert backend.generate(prompts, spec()) == a
    assert backend.generate(prompts, spec(seed=8)) != a


def test_prompt_samples_do_not_depend_on_the_batch(backend, prompts):
    together = backend.generate(prompts, spec())
    alone = [backend.generate([p], spec())[0] for p in prompts]
    assert together == alone
    # another batch size and order as well
    small = HFBackend.__new__(HFBackend)
    small.__dict__.update(backend.__dict__, batch_size=1)
    assert small.generate(prompts[::-1], spec())[::-1] == together


def test_a_prompt_is_read_once_for_all_its_samples(backend, prompts):
    """The n samples of a prompt share one pass over it (its cache and first logits copied to each of
    its rows): the same draws as reading the prompt once per sample, each row with its own seed."""
    reads = []
    handle = backend.model.register_forward_pre_hook(
        lambda module, args, kwargs: reads.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        shared = backend.generate(prompts, spec(n=3, max_tokens=6))
    finally:
        handle.remove()
    assert reads[0][0] == len(prompts) and all(r == (3 * len(prompts), 1) for r in reads[1:2])
    one = spec(n=1, max_tokens=6)
    for p, prompt in enumerate(prompts):
        ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for s in range(3):
            alone = backend._generate_rows([ids], [gen._seed_from(7, prompt, s)], one)
            assert alone == [shared[p][s]], (p, s)


def test_greedy_is_argmax_decoding(backend, prompts):
    out = backend.generate(prompts[:2], spec(temperature=0.0, n=1, max_tokens=6))
    tok, model = backend.tokenizer, backend.model
    for prompt, (sample,) in zip(prompts, out):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        new = []
        with torch.inference_mode():
            for _ in range(6):  # no cache, no padding: the plain definition
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                new.append(int(nxt))
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert sample.text == tok.decode(new, skip_special_tokens=True)
        assert sample.finish_reason == "length" and sample.n_tokens == 6


def test_tiny_top_p_is_greedy(backend, prompts):
    greedy = backend.generate(prompts, spec(temperature=0.0, n=1))
    nucleus_of_one = backend.generate(prompts, spec(top_p=1e-9, n=1))
    assert [s[0].text for s in greedy] == [s[0].text for s in nucleus_of_one]


@pytest.mark.parametrize("stop_token", ["<|im_end|>", "<|endoftext|>"])
def test_stop_token_ends_the_sample(backend, prompts, stop_token):
    """Force the stop token at the 3rd generated position: finish 'stop', n_tokens counts it, text omits it."""
    stop_id = backend.tokenizer.convert_tokens_to_ids(stop_token)
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output[..., stop_id] += 1e4
        return output

    handle = backend.model.lm_head.register_forward_hook(hook)
    try:
        (sample,), = backend.generate(prompts[:1], spec(n=1, max_tokens=8))
    finally:
        handle.remove()
    calls["n"] = 10**9  # the same two tokens without the hook, cut at 2
    (plain,), = backend.generate(prompts[:1], spec(n=1, max_tokens=2))
    assert sample.finish_reason == "stop" and sample.n_tokens == 3
    assert sample.text == plain.text and stop_token not in sample.text


def test_nucleus_among_candidates_equals_the_full_vocabulary(monkeypatch):
    """The top-k stages keep exactly the canonical nucleus; rows whose nucleus is wider fall back."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * 3
    logits[1] = logits[1].to(torch.bfloat16).float()   # bf16 logits: many exact ties
    logits[2] = 0.0                                     # all tied: the nucleus is half the vocabulary
    logits[3] *= 8                                      # peaked: a nucleus of a few tokens
    seeds = torch.arange(6, dtype=torch.long) * 1000003
    for top_p in (1e-9, 0.3, 0.9, 0.95):
        sp = SamplingSpec(n=1, temperature=0.8, top_p=top_p, max_tokens=1, seed=0)
        for step in range(5):
            fast = sample_next(logits, seeds, step, sp)
            monkeypatch.setattr(gen, "NUCLEUS_CANDIDATES", (5000,))  # the whole vocabulary at once
            full = sample_next(logits, seeds, step, sp)
            monkeypatch.setattr(gen, "NUCLEUS_CANDIDATES", (8,))  # one narrow stage, then the fallback
            narrow = sample_next(logits, seeds, step, sp)
            monkeypatch.undo()
            assert torch.equal(fast, full) and torch.equal(narrow, full), (top_p, step)
            keep = _nucleus(torch.softmax(logits / 0.8, dim=-1), top_p)
            assert bool(keep.gather(-1, fast[:, None]).all())  # always a nucleus token
    # all tied: the lowest ids win, about top_p * V of them (float sums decide the last one)
    kept = _nucleus(torch.softmax(logits, dim=-1), 0.5)[2].nonzero().flatten().tolist()
    assert kept == list(range(len(kept))) and len(kept) in (2500, 2501)


def test_keyed_uniform_is_splitmix64_modulo_2_64():
    """The int64 arithmetic wraps exactly as the unsigned 64-bit reference (pure Python) does."""
    M = (1 << 64) - 1

    def mix(z):
        z = (z + 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    seeds = [0, 1, 12345678901234567, (1 << 62) - 1]
    steps = [0, 7, 599]
    toks = [0, 1, 151645, 49151]
    for step in steps:
        got = keyed_uniform(torch.tensor(seeds), step, torch.tensor([toks] * len(seeds)))
        for i, sd in enumerate(seeds):
            key = mix(mix(sd) ^ step)
            expected = [(mix(key ^ t) >> 11) * 2.0 ** -53 for t in toks]
            assert got[i].tolist() == expected
    u = keyed_uniform(torch.arange(200), 3, torch.arange(500).expand(200, 500))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


def test_backend_choice(monkeypatch, tiny_model_dir):
    import markerlab.devices

    assert resolve_backend("hf") == "hf" and resolve_backend("vllm") == "vllm"
    monkeypatch.setattr(markerlab.devices, "cuda_device_count", lambda: 0)
    assert resolve_backend("auto") == "hf"
    with pytest.raises(UserError, match="expected one of auto, hf, vllm"):
        resolve_backend("tgi")
    monkeypatch.setattr(gen, "_vllm_importable", lambda: False)
    with pytest.raises(UserError, match="vllm package is not installed"):
        make_backend("vllm", tiny_model_dir)


def test_sampling_spec_validation():
    with pytest.raises(UserError, match="top_p"):
        SamplingSpec(n=1, temperature=1.0, top_p=0.0, max_tokens=1, seed=0)
    with pytest.raises(UserError, match="n:"):
        SamplingSpec(n=0, temperature=1.0, top_p=1.0, max_tokens=1, seed=0)


def test_sampler_draws_from_the_tempered_nucleus():
    """Frequencies over many rows match softmax(logits / T) renormalized over the top-p set."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20000
    seeds = torch.arange(rows, dtype=torch.long)
    sp = SamplingSpec(n=1, temperature=0.7, top_p=0.9, max_tokens=1, seed=0)
    picks = sample_next(logits.expand(rows, -1).clone(), seeds, 0, sp)
    freq = torch.bincount(picks, minlength=6).float() / rows
    p = torch.softmax(logits / 0.7, dim=-1)
    n_keep = int((torch.cumsum(p, 0) < 0.9).sum()) + 1
    expected = torch.zeros(6)
    expected[:n_keep] = p[:n_keep] / p[:n_keep].sum()
    assert freq[n_keep:].sum() == 0
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_rows_that_stop_leave_the_batch_without_disturbing_the_others(backend, prompts):
    """Force <|im_end|> on the first row at step 3: it stops there, it and its cache rows leave the
    batch, and every other row continues exactly as in a batch where nobody stopped."""
    stop_id = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output[0, ..., stop_id] += 1e4  # row 0 of the full batch, before anyone left
        return output

    sp = spec(n=2, max_tokens=8)
    plain = backend.generate(prompts, sp)
    handle = backend.model.lm_head.register_forward_hook(hook)
    try:
        forced = backend.generate(prompts, sp)
    finally:
        handle.remove()
    # the batch is ordered by prompt length: find the row that was first
    order = sorted(range(len(prompts)), key=lambda i: (len(backend.tokenizer(prompts[i])["input_ids"]), i))
    first = order[0]
    assert forced[first][0].finish_reason == "stop" and forced[first][0].n_tokens == 3
    for p in range(len(prompts)):
        for s in range(2):
            if (p, s) != (first, 0):
                assert forced[p][s] == plain[p][s], (p, s)
