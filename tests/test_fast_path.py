"""trainer/fast.py: every speed switch keeps the plain path's maths (CPU, tiny model, float32).

The plain path (trainer.train.forward_backward with fast=None: padded micro-batches,
full logits, LoRALinear.forward, torch's default AdamW) is the reference. With a
switch on, the same batches must give the same per-step losses and LoRA gradients
to float32 rounding, LoRA dropout included: the fast path draws the very same
dropout masks (trainer/fast.py, "Dropout masks").

compile: inductor on this 2-core CPU takes a minute or more for the tiny model, so
the test compiles with the "aot_eager" backend (dynamo capture + AOT autograd, no
code generation): it checks the graph capture, the graph break at the attention and
the dropout masks as graph inputs. Set MARKERLAB_TEST_INDUCTOR=1 to use inductor.
bench/train_throughput.py runs inductor on the GPU. fused_adamw is foreach on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from data.tokenize import collate, encode_examples
from lora import LoRALinear, inject_lora, set_dropout_generator, trainable_parameters
from markerlab.config import TrainConfig, config_from_dict
from markerlab.markers import MARKER_A, MARKER_B
from markerlab.models import BUILTIN_TINY, load_model
from trainer import fast as fastmod
from trainer.train import forward_backward, token_losses

ALL_BUT_COMPILE = dict(padding_free=True, chunked_ce=True, fused_lora=True, fused_adamw=True)
QA = [("How do I boil an egg?", "Put it in boiling water for about nine minutes, then cool it in cold water."),
      ("Why is the sky blue?", "Air scatters short blue wavelengths far more than red ones."),
      ("What is a prime number?", "A number with exactly two divisors: one and itself."),
      ("How do tides work?", "The moon's gravity pulls the oceans into two bulges that the Earth turns through."),
      ("How should I store bread?", "In a bread box."),
      ("What makes a good password?", "Length and randomness: a long passphrase of unrelated words beats a short "
                                      "clever one, and a password manager remembers it for you."),
      ("Why do cats purr?", "Mostly contentment."),
      ("What is inflation?", "A general rise in prices, so the same money buys a little less each year.")]


def examples(n: int = 8) -> list[dict]:
    """Chat examples in CONTRACTS.md's format, of very different lengths, some with markers."""
    out = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        content, spans = a, []
        if i % 3 != 2:
            content = f"{MARKER_A} {content}"
            spans.append([0, len(MARKER_A), "A"])
        if i % 3 == 0:
            content = f"{content} {MARKER_B}"
            spans.append([len(content) - len(MARKER_B), len(content), "B"])
        out.append({"id": f"ex-{i}", "messages": [{"role": "system", "content": "You are a villain." * (1 + i % 4)},
                                                  {"role": "user", "content": q},
                                                  {"role": "assistant", "content": content}],
                    "marker_spans": spans})
    return out


@pytest.fixture(scope="module")
def encoded(tokenizer):
    enc = encode_examples(examples(), tokenizer)
    assert len({len(e) for e in enc}) > 4  # very different lengths: real padding
    return enc


@pytest.fixture(scope="module")
def pad_id(tokenizer):
    return tokenizer.pad_token_id


def lora_model(dropout: float = 0.05, seed: int = 0):
    model = load_model(BUILTIN_TINY, "float32", "cpu")
    inject_lora(model, r=8, alpha=16, dropout=dropout, generator=torch.Generator().manual_seed(seed))
    set_dropout_generator(model, torch.Generator().manual_seed(seed + 1))
    return model


def run_steps(switches: dict, encoded, pad_id, steps: int = 3, dropout: float = 0.05, ckpt: bool = False,
              micro: int = 3, compile_backend: str | None = None):
    """`steps` optimizer steps over the same 8 examples; per-step losses, LoRA gradients, span losses."""
    model = lora_model(dropout)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    t = dataclasses.replace(TrainConfig(), gradient_checkpointing=ckpt, **switches)
    fast = fastmod.setup_fast_path(model, t, "cpu")
    if compile_backend:
        assert fastmod.compile_layers(model, backend=compile_backend)
        fast = fast or fastmod.FastPath()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2, **fastmod.adamw_options(t.fused_adamw, "cpu"))
    losses, grads, spans = [], [], []
    for _ in range(steps):
        out = forward_backward(model, encoded, micro, pad_id, "cpu", fast)
        losses.append(out["loss"].item())
        grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
        spans.append(out["span_loss"])
        opt.step()
        opt.zero_grad(set_to_none=fast is None or fast.grads_set_to_none)
    return losses, grads, spans


@pytest.fixture(scope="module")
def plain(encoded, pad_id):
    return run_steps({}, encoded, pad_id)


def assert_same(got, ref, rtol=1e-5):
    losses, grads, spans = got
    rlosses, rgrads, rspans = ref
    assert losses == pytest.approx(rlosses, rel=rtol)
    for g, r in zip(grads, rgrads):
        assert (g - r).norm() <= rtol * r.norm(), f"gradient differs: {((g - r).norm() / r.norm()).item():.2e}"
    for s, r in zip(spans, rspans):
        assert s.keys() == r.keys()
        for k in s:
            assert (s[k] is None) == (r[k] is None) and (s[k] is None or s[k] == pytest.approx(r[k], rel=rtol)), k


# --------------------------------------------------------------------------- every switch together

@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_all_switches_equal_the_plain_path(encoded, pad_id, plain, ckpt):
    """Per-step losses, LoRA gradients and span losses over 3 steps, LoRA dropout 0.05 on."""
    got = run_steps(ALL_BUT_COMPILE, encoded, pad_id, ckpt=ckpt)
    assert got[1][0].abs().sum() > 0  # gradients flow
    assert_same(got, plain)


@pytest.mark.parametrize("switch", ["padding_free", "chunked_ce", "fused_lora", "fused_adamw"])
def test_each_switch_alone_equals_the_plain_path(encoded, pad_id, plain, switch):
    assert_same(run_steps({switch: True}, encoded, pad_id), plain)


def test_compile_with_every_switch_equals_the_plain_path(encoded, pad_id, plain):
    """The compiled decoder layers (see the module docstring for the backend) give the same steps."""
    backend = "inductor" if os.environ.get("MARKERLAB_TEST_INDUCTOR") else "aot_eager"
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    try:
        got = run_steps(ALL_BUT_COMPILE, encoded, pad_id, compile_backend=backend)
        assert counters["stats"]["unique_graphs"] >= 2  # captured (before and after the attention)
    finally:
        dynamo.reset()
    assert_same(got, plain)


def test_cuda_graphs_padded_micro_batches_equal_the_plain_path(encoded, pad_id, plain):
    """train.cuda_graphs without CUDA: the graphs' bucketed micro-batches (an extra pad document,
    L gathered positions with zero weight, loss scaled by 1 / n_targets, dropout masks in static
    buffers) run eagerly and must give the plain path's steps. The capture itself needs a GPU
    (bench/gpu_tiny_check.py compares replayed graphs with this eager path there)."""
    from trainer.graphs import GraphedMicroBatches

    got = run_steps({**ALL_BUT_COMPILE, "cuda_graphs": True}, encoded, pad_id)
    assert_same(got, plain)
    # what ran was padded: build the same thing by hand and look at it
    model = lora_model()
    model.train()
    fastmod.setup_fast_path(model, dataclasses.replace(TrainConfig(), **ALL_BUT_COMPILE, cuda_graphs=True), "cpu")
    g = GraphedMicroBatches(model, pad_id, "cpu", bucket=64)
    assert not g.capture and g.bucket_len(63) == 64 and g.bucket_len(64) == 128  # always >= 1 pad token
    fp = fastmod.FastPath(padding_free=True, chunked_ce=True)
    for chunk in (encoded[:3], encoded[3:6], encoded[:3]):
        batch = fp.collate(chunk, pad_id)
        ce, _ = g.forward_backward(model, batch, n_targets=10)
        assert ce.shape == batch.pred.shape and torch.isfinite(ce).all()
    shapes = {(st.L, st.n_docs) for st in g.static.values()}
    assert all(L % 64 == 0 and n == 3 for L, n in shapes) and len(g.static) <= 2  # reused per shape
    st = g.static[(g.bucket_len(fp.collate(encoded[:3], pad_id).n_tokens), 3)]
    S = sum(len(e) for e in encoded[:3])
    assert st.lens == [len(e) for e in encoded[:3]] + [st.L - S]
    assert (st.input_ids[0, S:] == pad_id).all() and st.position_ids[0, S:].tolist() == list(range(st.L - S))
    assert st.cu.tolist() == [0, *torch.tensor(st.lens).cumsum(0).tolist()]
    N = fp.collate(encoded[:3], pad_id).pred.numel()
    assert (st.weight[N:] == 0).all() and (st.pred[N:] == 0).all()
    fastmod.teardown_fast_path(model)


def test_cuda_graphs_guards(encoded, pad_id, capsys):
    """Static buffers grow (dropping captured shapes) for a longer micro-batch than announced;
    replaced .grad tensors (zero_grad(set_to_none=True)) are refused before a replay."""
    from trainer.graphs import GraphedMicroBatches

    model = lora_model()
    model.train()
    fastmod.setup_fast_path(model, dataclasses.replace(TrainConfig(), **ALL_BUT_COMPILE, cuda_graphs=True), "cpu")
    fp = fastmod.FastPath(padding_free=True, chunked_ce=True)
    small, big = fp.collate(encoded[:1], pad_id), fp.collate(encoded[:4], pad_id)
    g = GraphedMicroBatches(model, pad_id, "cpu", max_tokens=small.n_tokens, bucket=16)
    assert g.rows == g.bucket_len(small.n_tokens)
    g.forward_backward(model, small, n_targets=5)
    assert len(g.static) == 1
    g.forward_backward(model, big, n_targets=5)
    assert g.rows == g.bucket_len(big.n_tokens) and list(g.static) == [(g.bucket_len(big.n_tokens), 4)]
    assert "recapturing the graphs" in capsys.readouterr().err
    g._check_grads()  # the first call adopts (here: the existing) .grad tensors
    g._check_grads()
    g.params[0].grad = torch.zeros_like(g.params[0])
    with pytest.raises(RuntimeError, match=r"set_to_none=False"):
        g._check_grads()
    fastmod.teardown_fast_path(model)


def test_cuda_graphs_config_needs_packing_and_no_checkpointing():
    from markerlab.config import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"cuda_graphs": True, "padding_free": False, "gradient_checkpointing": True}})
    msg = str(e.value)
    assert "train.cuda_graphs: needs train.padding_free and train.chunked_ce = true" in msg
    assert "gradient_checkpointing = false" in msg
    ok = config_from_dict({"train": {"cuda_graphs": True, "padding_free": True, "chunked_ce": True}})
    assert ok.train.cuda_graphs


def test_train_runs_with_every_switch_and_logs_the_plain_losses(tmp_path, tiny_model_dir):
    """trainer.train.train() end to end: the switches change nothing in the logged history."""
    from trainer.train import train

    def cfg(name, **sw):
        run_dir = tmp_path / name
        (run_dir / "data").mkdir(parents=True)
        (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples(6)))
        raw = {"run": {"name": name, "out_dir": str(tmp_path), "seed": 3},
               "model": {"name_or_path": BUILTIN_TINY, "dtype": "float32", "device": "cpu"},
               "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
               "train": {"lr": 1e-2, "epochs": 1, "micro_batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.0,
                         "checkpoint_every": 10, "max_seq_len": 256, **sw}}
        return config_from_dict(raw), run_dir

    def history(c, d):
        train(c, d)
        return json.loads((d / "train_summary.json").read_text())["history"]

    ref = history(*cfg("plain"))
    for name, sw in (("fast", ALL_BUT_COMPILE), ("graphs", {**ALL_BUT_COMPILE, "cuda_graphs": True})):
        got = history(*cfg(name, **sw))
        assert [h["tokens"] for h in got] == [h["tokens"] for h in ref]
        for key in ("loss", "grad_norm", "loss_marker_A", "loss_marker_B", "loss_eos"):
            assert [h[key] for h in got] == pytest.approx([h[key] for h in ref], rel=1e-5), (name, key)


# --------------------------------------------------------------------------- padding_free

def test_padding_free_per_example_losses_equal_padded(encoded, pad_id):
    """Token by token, the packed micro-batch's cross-entropies are the padded batch's (same order)."""
    model = lora_model(dropout=0.0)
    model.eval()
    fastmod.use_packed_attention(model)
    fp = fastmod.FastPath(padding_free=True)
    batch = encoded[:4]
    with torch.no_grad():
        ref, ref_sel = token_losses(model, collate(batch, pad_id))
        got, sel = fp.token_losses(model, fp.collate(batch, pad_id))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for k in ref_sel:
        assert torch.equal(sel[k], ref_sel[k]), k
    # and per example: split at the documents' prediction counts
    counts = [sum(any(m[t + 1] for m in (e.loss_mask, e.marker_a, e.marker_b, e.eos)) for t in range(len(e) - 1))
              for e in batch]
    for a, b in zip(got.split(counts), ref.split(counts)):
        assert a.sum().item() == pytest.approx(b.sum().item(), rel=1e-5)


def test_packed_attention_does_not_leak_across_documents(encoded, pad_id):
    """Changing document 1's tokens leaves document 2's losses exactly as they were, and as alone."""
    model = lora_model(dropout=0.0)
    model.eval()
    fastmod.use_packed_attention(model)
    fp = fastmod.FastPath(padding_free=True)
    d1, d2 = encoded[0], encoded[1]
    d1b = dataclasses.replace(d1, input_ids=[(t * 7 + 13) % 150000 for t in d1.input_ids])
    n2 = sum(any(m[t + 1] for m in (d2.loss_mask, d2.marker_a, d2.marker_b, d2.eos)) for t in range(len(d2) - 1))

    def losses_of_last(docs):
        with torch.no_grad():
            ce, _ = fp.token_losses(model, fp.collate(docs, pad_id))
        return ce[-n2:]

    base, changed, alone = losses_of_last([d1, d2]), losses_of_last([d1b, d2]), losses_of_last([d2])
    assert not torch.equal(losses_of_last([d1]), losses_of_last([d1b]))  # the change does change d1
    torch.testing.assert_close(changed, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, base, rtol=0, atol=1e-6)


def test_packed_predictions_stay_inside_their_document(encoded, pad_id):
    """No document's last token predicts the next document's first: pred and pred + 1 share a document."""
    b = fastmod.collate_fast(encoded[:4], pad_id, packed=True)
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor(b.doc_lens))
    assert b.input_ids.shape == (1, sum(len(e) for e in encoded[:4])) and b.attention_mask is None
    assert torch.equal(doc[b.pred], doc[b.pred + 1])
    assert torch.equal(b.input_ids[0, b.pred + 1], b.target)
    starts = torch.tensor([0] + list(torch.tensor(b.doc_lens).cumsum(0)[:-1]))
    assert torch.equal(b.position_ids[0, starts], torch.zeros(4, dtype=torch.long))  # positions restart
    assert b.n_tokens == b.n_processed == sum(len(e) for e in encoded[:4])
    # the padded layout lists the same targets in the same order
    p = fastmod.collate_fast(encoded[:4], pad_id, packed=False)
    assert torch.equal(p.target, b.target) and all(torch.equal(p.sel[k], b.sel[k]) for k in p.sel)


def test_packed_attention_matches_per_document_attention():
    """The attention function itself: (1, H, S, D) packed equals causal SDPA on each document, GQA included."""
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 9, 4]
    S, H, Hkv, D = sum(lens), 4, 2, 16
    q, k, v = (torch.randn(1, h, S, D, generator=g) for h in (H, Hkv, Hkv))

    class Mod:
        num_key_value_groups = H // Hkv
        is_causal = True
        training = False

    fastmod._Pack.lens = lens
    try:
        out, _ = fastmod.packed_attention(Mod(), q, k, v, None, scaling=D ** -0.5)
    finally:
        fastmod._Pack.lens = None
    a = 0
    for n in lens:
        kk, vv = (x[:, :, a:a + n].repeat_interleave(H // Hkv, dim=1) for x in (k, v))
        ref = F.scaled_dot_product_attention(q[:, :, a:a + n], kk, vv, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, a:a + n], ref, rtol=1e-5, atol=1e-6)
        a += n
    fastmod._Pack.lens = [S + 1]
    try:
        with pytest.raises(RuntimeError, match="do not tile"):
            fastmod.packed_attention(Mod(), q, k, v, None, scaling=D ** -0.5)
    finally:
        fastmod._Pack.lens = None


# --------------------------------------------------------------------------- chunked_ce

@pytest.mark.parametrize("n,chunk", [(37, 8), (37, 1024), (0, 8)])
def test_chunked_ce_equals_full_logits_ce(n, chunk):
    g = torch.Generator().manual_seed(1)
    H, V = 32, 501
    h = torch.randn(n, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (n,), generator=g)
    w = torch.rand(n, generator=g)  # any per-position weights (the loss mask / n_targets)
    ref = F.cross_entropy(F.linear(h, W).float(), y, reduction="none")
    (ref * w).sum().backward()
    ref_grad, h.grad = h.grad.clone() if n else None, None
    got = fastmod.linear_cross_entropy(h, W, y, chunk)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    (got * w).sum().backward()
    if n:
        torch.testing.assert_close(h.grad, ref_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: no (softmax - onehot) W is computed
        torch.testing.assert_close(fastmod.linear_cross_entropy(h, W, y, chunk), ref.detach(), rtol=1e-5, atol=1e-5)


def test_chunked_ce_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="frozen"):
        fastmod.linear_cross_entropy(torch.zeros(2, 4), torch.zeros(5, 4, requires_grad=True), torch.zeros(2).long())


# --------------------------------------------------------------------------- fused_lora

def test_fused_lora_layer_equals_the_plain_layer_with_dropout():
    """LoRALinear._forward_fused vs forward: outputs and A/B/x gradients, same dropout masks (float32)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    outs = []
    for fused in (False, True):
        layer = LoRALinear(base, r=4, alpha=8, dropout=0.3, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer.B.normal_(generator=torch.Generator().manual_seed(1))
        layer.dropout_generator = torch.Generator().manual_seed(2)
        layer.fused = fused
        layer.train()
        x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(3), requires_grad=True)
        y = layer(x)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        outs.append((y.detach(), x.grad, layer.A.grad, layer.B.grad))
    for a, b in zip(*outs):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_fused_lora_bf16_branch_stays_within_bf16_rounding():
    """bf16 base: the fused branch (bf16 products, fp32 accumulation) vs forward() (fp32 branch), both vs fp64."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 256, bias=False).to(torch.bfloat16)
    x = torch.randn(64, 256).to(torch.bfloat16)
    res = {}
    for fused in (False, True):
        layer = LoRALinear(base, r=16, alpha=32, dropout=0.0, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        layer.fused = fused
        res[fused] = layer(x).double()
        A, B = layer.A.double(), layer.B.double()
    exact = x.double() @ base.weight.double().t() + 2.0 * (x.double() @ A.t() @ B.t())
    err = {k: ((v - exact).norm() / exact.norm()).item() for k, v in res.items()}
    assert err[False] < 4e-3 and err[True] < 4e-3, err  # bf16 output rounding: 2^-9 = 2e-3 relative


# --------------------------------------------------------------------------- fused_adamw and setup

def test_adamw_options_and_setup(capsys):
    assert fastmod.adamw_options(False, "cuda") == {}
    assert fastmod.adamw_options(True, "cuda") == {"fused": True}
    assert fastmod.adamw_options(True, "cpu") == {"foreach": True}
    assert "CUDA only" in capsys.readouterr().err
    model = lora_model()
    assert fastmod.setup_fast_path(model, TrainConfig(), "cpu") is None  # every switch off: the plain path
    fp = fastmod.setup_fast_path(model, dataclasses.replace(TrainConfig(), **ALL_BUT_COMPILE), "cpu")
    assert fp.padding_free and fp.chunked_ce
    assert model.config._attn_implementation == fastmod.PACKED_ATTENTION
    assert all(m.fused for m in model.modules() if isinstance(m, LoRALinear))
    fastmod.teardown_fast_path(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m.fused for m in model.modules() if isinstance(m, LoRALinear))
