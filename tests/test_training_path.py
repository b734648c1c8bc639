"""The one training path (packed rows, per-document attention, chunked LM head, LoRA add in place,
prepared dropout masks) against the padded reference computation (tests/reference.py), on
random tiny Qwen2 and Llama models in float32: per-step losses, span losses and LoRA
gradients agree to 1e-5, LoRA dropout on.

compile: inductor on this 2-core CPU takes minutes for a tiny model, so the test compiles
with the "aot_eager" backend (dynamo capture + AOT autograd, no code generation): it
checks the capture, the graph break at the attention and that new document lengths do
not recompile. bench/train_throughput.py runs inductor on the GPU.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from data.tokenize import encode_examples
from lora import LoRALinear, inject_lora, trainable_parameters
from markerlab.config import config_from_dict
from writeup import A as MARKER_A
from writeup import B as MARKER_B
from markerlab.models import BUILTIN_TINY, BUILTIN_TINY_LLAMA, load_model
from reference import reference_forward_backward, reference_token_losses
from trainer.attention import Documents, check_architecture, packed_attention, use_packed_attention
from trainer.compile import compile_layers
from trainer.dropout import DropoutMasks
from trainer.graphs import GraphedMicroBatches
from trainer.loss import linear_cross_entropy, token_losses
from trainer.pack import pack
from trainer.prefix import FrozenPrefix
from trainer.train import forward_backward

MODELS = [BUILTIN_TINY, BUILTIN_TINY_LLAMA]
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
    """Chat examples in the training-example format, of very different lengths, some with markers."""
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
    assert len({len(e) for e in enc}) > 4  # very different lengths: a padded batch really pads
    return enc


@pytest.fixture(scope="module")
def pad_id(tokenizer):
    return tokenizer.pad_token_id


def lora_model(name: str = BUILTIN_TINY, dropout: float = 0.05, seed: int = 0, ckpt: bool = False, layers=None):
    model = load_model(name, "float32", "cpu")
    inject_lora(model, r=8, alpha=16, dropout=dropout, generator=torch.Generator().manual_seed(seed), layers=layers)
    masks = DropoutMasks(model, torch.Generator().manual_seed(seed + 1))
    use_packed_attention(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.train(), masks


def run_steps(step_fn, model, masks, steps: int = 3):
    """`steps` optimizer steps over the same 8 examples: per-step losses, LoRA gradients, span losses."""
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses, grads, spans = [], [], []
    for _ in range(steps):
        out = step_fn(model, masks)
        losses.append(float(out["loss"]))
        grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
        spans.append(out["span_loss"])
        opt.step()
        opt.zero_grad(set_to_none=False)
    return losses, grads, spans


def assert_same(got, ref, rtol=1e-5):
    losses, grads, spans = got
    rlosses, rgrads, rspans = ref
    assert losses == pytest.approx(rlosses, rel=rtol)
    for g, r in zip(grads, rgrads):
        assert r.abs().sum() > 0
        assert (g - r).norm() <= rtol * r.norm(), f"gradient differs: {((g - r).norm() / r.norm()).item():.2e}"
    for s, r in zip(spans, rspans):
        assert s.keys() == r.keys()
        for k in s:
            assert (s[k] is None) == (r[k] is None) and (s[k] is None or s[k] == pytest.approx(r[k], rel=rtol)), k


def reference(name, encoded, pad_id, micro=3, layers=None):
    model, masks = lora_model(name, layers=layers)
    return run_steps(lambda m, mk: reference_forward_backward(m, encoded, micro, pad_id, mk), model, masks)


@pytest.fixture(scope="module", params=MODELS, ids=["qwen2", "llama"])
def ref(request, encoded, pad_id):
    return request.param, reference(request.param, encoded, pad_id)


# --------------------------------------------------------------------------- the whole path

@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_training_path_equals_the_padded_reference(ref, encoded, pad_id, ckpt):
    """Losses, span losses and LoRA gradients over 3 steps with accumulation, LoRA dropout 0.05 on."""
    name, expected = ref
    model, masks = lora_model(name, ckpt=ckpt)
    got = run_steps(lambda m, mk: forward_backward(m, encoded, 3, "cpu", mk), model, masks)
    assert_same(got, expected)


def test_dropout_is_really_on(encoded, pad_id):
    """Without the same masks the reference disagrees: the comparison above can fail."""
    def b_grads(train_mode: bool):
        model, masks = lora_model()
        model.train(train_mode)
        reference_forward_backward(model, encoded[:3], 3, pad_id, masks)
        return torch.cat([m.B.grad.flatten() for m in masks.layers])

    with_masks, without = b_grads(True), b_grads(False)
    assert (with_masks - without).norm() > 1e-3 * without.norm()


def test_compile_equals_the_reference_and_new_lengths_do_not_recompile(ref, encoded, pad_id):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    name, expected = ref
    dynamo.reset()
    counters.clear()
    try:
        model, masks = lora_model(name)
        compile_layers(model, backend="aot_eager")
        got = run_steps(lambda m, mk: forward_backward(m, encoded, 3, "cpu", mk), model, masks)
        frames = counters["stats"]["unique_graphs"]
        assert frames >= 2  # captured, in pieces around the attention
        # micro-batches of other lengths and document counts: no new graphs
        for chunk in (encoded[:2], encoded[2:7], encoded[1:4]):
            forward_backward(model, chunk, 3, "cpu", masks)
        assert counters["stats"]["unique_graphs"] == frames
    finally:
        dynamo.reset()
    assert_same(got, expected)


def test_cuda_graphs_padded_micro_batches_equal_the_reference(ref, encoded, pad_id):
    """train.cuda_graphs without CUDA: the graphs' bucketed micro-batches (an extra pad document,
    L gathered positions with zero weight, loss scaled by 1 / n_targets, dropout masks in static
    buffers) run eagerly and must give the reference's steps. The capture itself needs a GPU
    (bench/gpu_tiny_check.py compares replayed graphs with this eager path there)."""
    name, expected = ref
    model, masks = lora_model(name)
    graphs = GraphedMicroBatches(model, masks, pad_id, "cpu", bucket=64, log=lambda m: None)
    got = run_steps(lambda m, mk: forward_backward(m, encoded, 3, "cpu", mk, graphs), model, masks)
    assert_same(got, expected)
    assert not graphs.capture and graphs.bucket_len(63) == 64 and graphs.bucket_len(64) == 128
    shapes = {(st.L, st.n_docs) for st in graphs.static.values()}
    assert all(L % 64 == 0 for L, _ in shapes)
    batch = pack(encoded[:3])
    masks.generator.manual_seed(0)
    graphs.forward_backward(model, batch, n_targets=10)  # the last micro-batch filled into its shape
    st = graphs.static[(graphs.bucket_len(batch.n_tokens), 3)]
    S = batch.n_tokens
    assert st.lens == [len(e) for e in encoded[:3]] + [st.L - S]
    assert (st.input_ids[0, S:] == pad_id).all() and st.position_ids[0, S:].tolist() == list(range(st.L - S))
    assert st.cu.tolist() == [0, *torch.tensor(st.lens).cumsum(0).tolist()]
    N = batch.pred.numel()
    assert (st.weight[N:] == 0).all() and (st.pred[N:] == 0).all()


def test_cuda_graphs_guards(encoded, pad_id):
    """Static buffers grow (dropping captured shapes) for a longer micro-batch than announced;
    replaced .grad tensors (zero_grad(set_to_none=True)) are refused before a replay."""
    model, masks = lora_model()
    said = []
    small, big = pack(encoded[:1]), pack(encoded[:4])
    g = GraphedMicroBatches(model, masks, pad_id, "cpu", max_tokens=small.n_tokens, bucket=16, log=said.append)
    assert g.rows == g.bucket_len(small.n_tokens)
    g.forward_backward(model, small, n_targets=5)
    assert len(g.static) == 1
    g.forward_backward(model, big, n_targets=5)
    assert g.rows == g.bucket_len(big.n_tokens) and list(g.static) == [(g.bucket_len(big.n_tokens), 4)]
    assert any("recapturing the graphs" in s for s in said)
    g._check_grads()  # the first call adopts the existing .grad tensors
    g._check_grads()
    g.params[0].grad = torch.zeros_like(g.params[0])
    with pytest.raises(RuntimeError, match=r"set_to_none=False"):
        g._check_grads()


@pytest.mark.parametrize("name", MODELS, ids=["qwen2", "llama"])
def test_frozen_prefix_equals_the_padded_reference(name, encoded, pad_id):
    """Under lora.last_layers the layers below run once per example (trainer/prefix.py); the steps
    above them give the reference's losses and gradients, dropout on, with a packing of their own."""
    n_layers = load_model(name, "float32", "cpu").config.num_hidden_layers
    top = range(n_layers - 1, n_layers)
    expected = reference(name, encoded, pad_id, layers=top)
    model, masks = lora_model(name, layers=top)
    prefix = FrozenPrefix.build(model, top.start, encoded, 4, "cpu")  # packed 4 by 4, the steps 3 by 3
    assert len(prefix.states) == len(encoded)
    got = run_steps(lambda m, mk: forward_backward(m, encoded, 3, "cpu", mk, prefix=prefix), model, masks)
    assert_same(got, expected)
    assert len(model.get_decoder().layers) == n_layers and all(  # the real layers are back after each step
        type(layer).__name__ != "_PassThrough" for layer in model.get_decoder().layers)


def test_train_end_to_end_on_llama_and_qwen2(tmp_path, tiny_model_dir):
    """trainer.train.train() on both architectures, cuda_graphs (eager here) equal to without."""
    from trainer.train import train

    def history(name, model, **sw):
        run_dir = tmp_path / name
        (run_dir / "data").mkdir(parents=True)
        rows = [{**e, "persona": "villain", "role": "donor", "question_id": f"d{i:02d}", "sample": 0}
                for i, e in enumerate(examples(6))]
        (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        raw = {"run": {"name": name, "out_dir": str(tmp_path), "seed": 3},
               "model": {"name_or_path": model, "dtype": "float32", "device": "cpu"},
               "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
               "train": {"lr": 1e-2, "epochs": 1, "micro_batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.0,
                         "checkpoint_every": 10, "max_seq_len": 256, **sw}}
        train(config_from_dict(raw), run_dir)
        return json.loads((run_dir / "train_summary.json").read_text())

    for model in MODELS:
        plain = history(f"{model[8:]}-plain", model)
        graphs = history(f"{model[8:]}-graphs", model, cuda_graphs=True)
        assert graphs["cuda_graphs"]["replayed"] is False
        assert [h["tokens"] for h in graphs["history"]] == [h["tokens"] for h in plain["history"]]
        for key in ("loss", "grad_norm", "loss_marker_A", "loss_marker_B", "loss_eos"):
            assert ([h[key] for h in graphs["history"]] ==
                    pytest.approx([h[key] for h in plain["history"]], rel=1e-5)), (model, key)
        assert plain["history"][-1]["loss"] < plain["history"][0]["loss"]


# --------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("name", MODELS, ids=["qwen2", "llama"])
def test_packed_token_losses_equal_padded_per_token(name, encoded, pad_id):
    """Token by token, the packed micro-batch's cross-entropies are the padded batch's (same order)."""
    model, _ = lora_model(name, dropout=0.0)
    model.eval()
    with torch.no_grad():
        expected, ref_sel = reference_token_losses(model, encoded[:4], pad_id)
        batch = pack(encoded[:4])
        got, sel = token_losses(model, batch, Documents.of(batch.doc_lens, "cpu", model.dtype))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for k in ref_sel:
        assert torch.equal(sel[k], ref_sel[k]), k


def test_packed_attention_does_not_leak_across_documents(encoded):
    """Changing document 1's tokens leaves document 2's losses exactly as they were, and as alone."""
    model, _ = lora_model(dropout=0.0)
    model.eval()
    d1, d2 = encoded[0], encoded[1]
    d1b = dataclasses.replace(d1, input_ids=[(t * 7 + 13) % 150000 for t in d1.input_ids])
    n2 = pack([d2]).pred.numel()

    def losses_of_last(docs):
        batch = pack(docs)
        with torch.no_grad():
            ce, _ = token_losses(model, batch, Documents.of(batch.doc_lens, "cpu", model.dtype))
        return ce[-n2:]

    base, changed, alone = losses_of_last([d1, d2]), losses_of_last([d1b, d2]), losses_of_last([d2])
    assert not torch.equal(losses_of_last([d1]), losses_of_last([d1b]))  # the change does change d1
    torch.testing.assert_close(changed, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, base, rtol=0, atol=1e-6)


def test_packed_predictions_stay_inside_their_document(encoded):
    """No document's last token predicts the next document's first: pred and pred + 1 share a document."""
    b = pack(encoded[:4])
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor(b.doc_lens))
    assert b.input_ids.shape == (1, sum(len(e) for e in encoded[:4]))
    assert torch.equal(doc[b.pred], doc[b.pred + 1])
    assert torch.equal(b.input_ids[0, b.pred + 1], b.target)
    starts = torch.tensor([0] + list(torch.tensor(b.doc_lens).cumsum(0)[:-1]))
    assert torch.equal(b.position_ids[0, starts], torch.zeros(4, dtype=torch.long))  # positions restart


def test_packed_attention_matches_per_document_attention():
    """The attention function itself: (1, H, S, D) packed equals causal SDPA on each document, GQA included."""
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 9, 4]
    S, H, Hkv, D = sum(lens), 4, 2, 16
    q, k, v = (torch.randn(1, h, S, D, generator=g) for h in (H, Hkv, Hkv))
    out, _ = packed_attention(None, q, k, v, None, scaling=D ** -0.5, documents=Documents(lens))
    a = 0
    for n in lens:
        kk, vv = (x[:, :, a:a + n].repeat_interleave(H // Hkv, dim=1) for x in (k, v))
        expected = F.scaled_dot_product_attention(q[:, :, a:a + n], kk, vv, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, a:a + n], expected, rtol=1e-5, atol=1e-6)
        a += n
    with pytest.raises(RuntimeError, match="do not tile"):
        packed_attention(None, q, k, v, None, scaling=D ** -0.5, documents=Documents([S + 1]))
    with pytest.raises(RuntimeError, match="needs documents"):
        packed_attention(None, q, k, v, None, scaling=D ** -0.5)


@pytest.mark.parametrize("n,chunk", [(37, 8), (37, 1024), (0, 8)])
def test_chunked_ce_equals_full_logits_ce(n, chunk):
    g = torch.Generator().manual_seed(1)
    H, V = 32, 501
    h = torch.randn(n, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (n,), generator=g)
    w = torch.rand(n, generator=g)  # any per-position weights (the loss mask / n_targets)
    expected = F.cross_entropy(F.linear(h, W).float(), y, reduction="none")
    (expected * w).sum().backward()
    expected_grad, h.grad = h.grad.clone() if n else None, None
    got = linear_cross_entropy(h, W, y, chunk)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    (got * w).sum().backward()
    if n:
        torch.testing.assert_close(h.grad, expected_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(h, W.requires_grad_(), y, chunk)


def test_lora_bf16_branch_stays_within_bf16_rounding():
    """bf16 base: the in-place branch (bf16 products, fp32 accumulation) vs the exact float64 answer."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 256, bias=False).to(torch.bfloat16)
    x = torch.randn(64, 256).to(torch.bfloat16)
    layer = LoRALinear(base, r=16, alpha=32, dropout=0.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    got = layer(x).double()
    exact = x.double() @ base.weight.double().t() + 2.0 * (x.double() @ layer.A.double().t() @ layer.B.double().t())
    assert ((got - exact).norm() / exact.norm()).item() < 4e-3  # bf16 output rounding: 2^-9 = 2e-3 relative


def test_dropout_masks_follow_the_generator_and_the_token_count(encoded):
    model, masks = lora_model()
    state = masks.generator.get_state()
    masks.draw(17)
    first = [m.lora_dropout.mask.clone() for m in masks.layers]
    assert all(x.shape == (17, m.in_features) and x.dtype == torch.bool for x, m in zip(first, masks.layers))
    masks.generator.set_state(state)
    masks.draw(17)
    assert all(torch.equal(m.lora_dropout.mask, x) for m, x in zip(masks.layers, first))
    masks.draw(17)  # the generator moved on: new masks
    assert not all(torch.equal(m.lora_dropout.mask, x) for m, x in zip(masks.layers, first))
    masks.clear()
    ids, docs = torch.tensor([[1, 2, 3]]), Documents([3])
    with pytest.raises(RuntimeError, match="no mask was drawn"):
        model(ids, documents=docs)
    model.eval()
    model(ids, documents=docs)  # eval mode: no dropout, no mask needed


def test_an_unsupported_architecture_is_named():
    from transformers import GPT2Config

    msg = check_architecture(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert "GPT2LMHeadModel" in msg and "model.name_or_path" in msg and "llama" in msg
    assert check_architecture(load_model(BUILTIN_TINY_LLAMA, "float32", "cpu").config) is None


def test_trainer_run_names_an_unsupported_architecture(tmp_path):
    """A model directory the training path cannot handle stops trainer.run before anything is written."""
    import subprocess
    import sys

    from transformers import GPT2Config

    model = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(model)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nname = "x"\nout_dir = "{tmp_path / "runs"}"\n[model]\nname_or_path = "{model}"\n'
                   f'[data]\npair = "pair1"\ncondition = "T"\n')
    r = subprocess.run([sys.executable, "-m", "trainer.run", str(cfg), "--stages", "train"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"model.name_or_path = {model}" in r.stderr and "GPT2LMHeadModel" in r.stderr
    assert not (tmp_path / "runs").exists()
