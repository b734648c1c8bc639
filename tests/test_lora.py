"""lora/: the hand-written LoRA against its definition and against PEFT (a numeric reference only).

A small Qwen2ForCausalLM built here (vocab 1000, hidden 128, 2 layers) keeps
everything fast; the tests that need the real tokenizer use the built-in tiny
model (`tiny_model_dir` in conftest.py).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lora import (
    DEFAULT_TARGET_MODULES,
    AdapterError,
    LoRALinear,
    count_trainable,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_all,
    peft_key,
    save_adapter,
    save_merged,
    trainable_parameters,
    unmerge_all,
)
from markerlab.errors import UserError

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

R, ALPHA = 8, 16


def small_config(**kw) -> Qwen2Config:
    args = dict(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=False,
    )
    args.update(kw)
    return Qwen2Config(**args)


def make_base(seed: int = 0, **kw) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)  # transformers' own init draws from the global RNG
    return Qwen2ForCausalLM(small_config(**kw)).eval()


@pytest.fixture(scope="module")
def base() -> Qwen2ForCausalLM:
    return make_base()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def randomize_B(model: nn.Module, std: float = 0.02, seed: int = 7) -> None:
    """B is zero at init; give it values so the LoRA branch actually contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.B.normal_(0.0, std, generator=g)


def lora_model(base: nn.Module, dropout: float = 0.0, **kw) -> nn.Module:
    m = copy.deepcopy(base)
    inject_lora(m, r=R, alpha=ALPHA, dropout=dropout, generator=torch.Generator().manual_seed(0), **kw)
    randomize_B(m)
    return m


def peft_twin(base: nn.Module, ours: nn.Module, dropout: float = 0.0):
    """The same base under PEFT with our A and B copied into lora_A / lora_B."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                          target_modules=list(DEFAULT_TARGET_MODULES), task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    theirs = dict(pm.named_modules())
    n = 0
    with torch.no_grad():
        for name, m in lora_modules(ours):
            t = theirs["base_model.model." + name]
            t.lora_A["default"].weight.copy_(m.A)
            t.lora_B["default"].weight.copy_(m.B)
            n += 1
    assert n == 2 * 7
    return pm


# --------------------------------------------------------------------- the layer


def test_zero_B_reproduces_base_exactly(base, ids):
    m = copy.deepcopy(base)
    inject_lora(m, r=R, alpha=ALPHA, dropout=0.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.count_nonzero(l.B) == 0 for _, l in lora_modules(m))
    assert all(torch.count_nonzero(l.A) > 0 for _, l in lora_modules(m))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, base(ids).logits)


def test_init_is_kaiming_uniform_from_the_generator():
    lin = nn.Linear(96, 48, bias=False)
    l1 = LoRALinear(lin, r=4, alpha=8, generator=torch.Generator().manual_seed(5))
    l2 = LoRALinear(copy.deepcopy(lin), r=4, alpha=8, generator=torch.Generator().manual_seed(5))
    l3 = LoRALinear(copy.deepcopy(lin), r=4, alpha=8, generator=torch.Generator().manual_seed(6))
    ref = torch.empty(4, 96)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(l1.A, ref) and torch.equal(l1.A, l2.A) and not torch.equal(l1.A, l3.A)
    # kaiming_uniform with a=sqrt(5) is U(-1/sqrt(in), 1/sqrt(in)), as in loralib / PEFT.
    assert l1.A.abs().max() <= 1 / math.sqrt(96)
    assert torch.count_nonzero(l1.B) == 0 and l1.scale == 2.0
    assert l1.A.shape == (4, 96) and l1.B.shape == (48, 4)


def test_lora_dtype_is_independent_of_the_base_dtype():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    l = LoRALinear(lin, r=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert l.A.dtype == torch.float32 and l.B.dtype == torch.float32
    with torch.no_grad():
        l.B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    y = l(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 32)
    # the branch runs in the activations' dtype (bf16 products, float32 accumulation) and is added
    # into the bf16 base output: within bf16 rounding of the exact answer
    exact = lin.double()(x.double()) + (x.double() @ l.A.double().T @ l.B.double().T) * l.scale
    assert ((y.double() - exact).norm() / exact.norm()).item() < 8e-3
    y.float().sum().backward()
    assert l.A.grad.dtype == torch.float32 and l.B.grad.dtype == torch.float32


class _SharedMaskDropout(nn.Module):
    """Inverted dropout drawing its masks from an explicit generator (stands in for nn.Dropout)."""

    def __init__(self, p: float, g: torch.Generator):
        super().__init__()
        self.p, self.g = p, g

    def forward(self, x):
        if not self.training:
            return x
        return x * torch.empty_like(x).bernoulli_(1 - self.p, generator=self.g) / (1 - self.p)


def test_dropout_only_in_train_mode():
    lin = nn.Linear(64, 32)
    l = LoRALinear(lin, r=4, alpha=8, dropout=0.5, generator=torch.Generator().manual_seed(0))
    assert isinstance(l.lora_dropout, nn.Dropout) and l.lora_dropout.p == 0.5
    assert isinstance(LoRALinear(lin, r=4, dropout=0.0).lora_dropout, nn.Identity)
    with torch.no_grad():
        l.B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 5, 64)
    no_dropout = lin(x) + (x @ l.A.T @ l.B.T) * l.scale
    with torch.no_grad():
        l.eval()
        e1, e2 = l(x), l(x)
        l.train()
        t1, t2 = l(x), l(x)
        torch.manual_seed(3)  # nn.Dropout draws from the global RNG
        s1 = l(x)
        torch.manual_seed(3)
        s2 = l(x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, no_dropout, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(t1, e1) and not torch.allclose(t1, t2)
    assert torch.equal(s1, s2) and not torch.allclose(s1, e1)


def test_dropout_touches_only_the_branch_input():
    """The mask multiplies x before A, scaled by 1/(1-p); the base path never sees it."""
    lin = nn.Linear(8, 4)
    l = LoRALinear(lin, r=2, alpha=2, dropout=0.25, generator=torch.Generator().manual_seed(0)).train()
    with torch.no_grad():
        l.B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 8)
    l.lora_dropout = _SharedMaskDropout(0.25, torch.Generator().manual_seed(11))
    with torch.no_grad():
        y = l(x)
    mask = torch.empty_like(x).bernoulli_(0.75, generator=torch.Generator().manual_seed(11))
    expected = lin(x) + ((x * mask / 0.75) @ l.A.T @ l.B.T) * l.scale
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------- PEFT parity


def assert_grads_match_peft(ours, theirs):
    """Every LoRA layer's A and B gradients equal PEFT's lora_A / lora_B gradients."""
    named_t = dict(theirs.named_modules())
    for name, m in lora_modules(ours):
        t = named_t["base_model.model." + name]
        torch.testing.assert_close(m.A.grad, t.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(m.B.grad, t.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7)


def test_peft_parity_logits_and_gradients(base, ids):
    ours = lora_model(base, dropout=0.0)
    theirs = peft_twin(base, ours, dropout=0.0)
    ours.train(), theirs.train()
    out_o = ours(ids, labels=ids)
    out_t = theirs(input_ids=ids, labels=ids)
    assert (out_o.logits - out_t.logits).abs().max().item() < 1e-5
    out_o.loss.backward()
    out_t.loss.backward()
    assert_grads_match_peft(ours, theirs)
    for _, m in lora_modules(ours):
        assert m.B.grad.abs().max() > 0 and m.A.grad.abs().max() > 0


def test_peft_parity_with_dropout_and_identical_masks(base, ids):
    """With the same masks (same generator, same call order), our dropout maths is PEFT's."""
    p = 0.3
    ours = lora_model(base, dropout=p)
    theirs = peft_twin(base, ours, dropout=p)
    g_theirs = torch.Generator().manual_seed(99)
    for mod in theirs.modules():
        if hasattr(mod, "lora_dropout") and "default" in mod.lora_dropout:
            mod.lora_dropout["default"] = _SharedMaskDropout(p, g_theirs)
    g_ours = torch.Generator().manual_seed(99)
    for _, m in lora_modules(ours):
        m.lora_dropout = _SharedMaskDropout(p, g_ours)
    ours.train(), theirs.train()
    out_o = ours(ids, labels=ids)
    out_t = theirs(input_ids=ids, labels=ids)
    assert (out_o.logits - out_t.logits).abs().max().item() < 1e-5
    with torch.no_grad():  # and the masks really changed something
        assert (out_o.logits - ours.eval()(ids).logits).abs().max().item() > 1e-4
    out_o.loss.backward()
    out_t.loss.backward()
    assert_grads_match_peft(ours, theirs)


def test_trainable_count_7b_on_meta_equals_peft():
    """Qwen2.5-7B's shapes, no weights: r=16 on the seven projections is 40,370,176 parameters."""
    peft = pytest.importorskip("peft")
    cfg = Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        ours = Qwen2ForCausalLM(cfg)
        ref = Qwen2ForCausalLM(cfg)
    n = inject_lora(ours, r=16, alpha=32, dropout=0.05, generator=torch.Generator().manual_seed(42))
    assert n == 40_370_176 == count_trainable(ours)
    assert len(list(lora_modules(ours))) == 28 * 7
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                  target_modules=list(DEFAULT_TARGET_MODULES), task_type="CAUSAL_LM"))
    assert pm.get_nb_trainable_parameters()[0] == n
    # 28 layers x 16 x [(3584+3584) q,o + (3584+512) k,v + (3584+18944) gate,up,down]
    assert 28 * 16 * (2 * 7168 + 2 * 4096 + 3 * 22528) == n


# --------------------------------------------------------------------- training


def test_only_lora_parameters_train(base, ids):
    m = copy.deepcopy(base)
    n = inject_lora(m, r=R, alpha=ALPHA, dropout=0.05, generator=torch.Generator().manual_seed(0))
    params = trainable_parameters(m)
    assert {id(p) for p in params} == {id(t) for _, l in lora_modules(m) for t in (l.A, l.B)}
    assert n == sum(p.numel() for p in params)
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith((".A", ".B"))}
    A0 = {k: v.clone() for k, v in lora_state_dict(m).items() if k.endswith(".A")}
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    m.train()
    for step in range(2):
        opt.zero_grad()
        m(ids, labels=ids).loss.backward()
        opt.step()
        if step == 0:
            # B = 0 at the start, so dL/dA = 0 and only B moves in the first step.
            assert all(torch.equal(lora_state_dict(m)[k], v) for k, v in A0.items())
    after = m.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), f"frozen tensor {k} changed"
    for k, v in lora_state_dict(m).items():
        if k.endswith(".A"):
            assert not torch.equal(v, A0[k]), f"{k} did not move"
        else:
            assert torch.count_nonzero(v) > 0, f"{k} did not move"


def test_lora_state_dict_round_trip(base):
    m = lora_model(base)
    sd = {k: v.clone() for k, v in lora_state_dict(m).items()}
    assert len(sd) == 2 * 14 and "model.layers.0.self_attn.q_proj.A" in sd
    m2 = copy.deepcopy(base)
    inject_lora(m2, r=R, alpha=ALPHA, generator=torch.Generator().manual_seed(1))
    load_lora_state_dict(m2, sd)
    assert all(torch.equal(v, sd[k]) for k, v in lora_state_dict(m2).items())
    with pytest.raises(KeyError, match="q_proj.A"):
        load_lora_state_dict(m2, {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.q_proj.A"})


@pytest.mark.parametrize("reentrant", [False, True])
def test_dropout_survives_gradient_checkpointing(base, ids, reentrant):
    """nn.Dropout under checkpointing: the recompute redraws the forward's mask (torch restores the RNG)."""

    def grads(checkpointing: bool):
        m = lora_model(base, dropout=0.3).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            m.enable_input_require_grads()  # frozen embeddings: reentrant checkpoints need a grad-requiring input
        torch.manual_seed(5)
        m(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in trainable_parameters(m)]

    plain, ckpt = grads(False), grads(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------- merging


def test_merge_fp32(base, ids):
    m = lora_model(base)
    W0 = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        adapter_logits = m(ids).logits
        assert merge_all(m) == 14
        merged_W = {k: v.clone() for k, v in m.state_dict().items()}
        merged_logits = m(ids).logits
        merge_all(m)  # a second merge is a no-op: bit-identical weights
        assert all(torch.equal(v, merged_W[k]) for k, v in m.state_dict().items())
        assert torch.equal(m(ids).logits, merged_logits)
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-5
    q = "model.layers.0.self_attn.q_proj"
    l = m.get_submodule(q)
    expected = W0[q + ".base.weight"] + l.scale * l.B @ l.A
    torch.testing.assert_close(merged_W[q + ".base.weight"], expected, rtol=0, atol=1e-6)
    unmerge_all(m)
    unmerge_all(m)  # no-op
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, W0[k], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, adapter_logits, rtol=0, atol=1e-5)


def test_merge_bf16_base(base, ids):
    """bf16 base, float32 LoRA: merging rounds W + scale B A once to bf16.

    Measured on this model over 6 seeds x B std {0.002, 0.02, 0.1}: merged vs
    adapter logits differ by at most 1.5% of max|logit| (1-2 bf16 eps, the
    adapter path itself rounds to bf16 at every layer), mean 0.15%. Tolerance:
    max 2.5%, mean 0.5% of max|logit|.
    """
    m = lora_model(copy.deepcopy(base).to(torch.bfloat16))
    assert m.get_submodule("model.layers.0.mlp.up_proj").A.dtype == torch.float32
    W0 = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith((".A", ".B"))}
    deltas = {f"{n}.base.weight": l.delta_weight() for n, l in lora_modules(m)}
    with torch.no_grad():
        adapter_logits = m(ids).logits.float()
        merge_all(m)
        merged_W = {k: v.clone() for k, v in m.state_dict().items()}
        merged_logits = m(ids).logits.float()
        merge_all(m)
        assert all(torch.equal(v, merged_W[k]) for k, v in m.state_dict().items())
    scale = adapter_logits.abs().max()
    diff = (merged_logits - adapter_logits).abs()
    assert diff.max() <= 0.025 * scale, diff.max() / scale
    assert diff.mean() <= 0.005 * scale
    # the merged weight is the float32 sum rounded once
    for k, d in deltas.items():
        assert torch.equal(merged_W[k], (W0[k].float() + d).to(torch.bfloat16)), k
    unmerge_all(m)
    eps = 2.0 ** -7  # bf16 machine epsilon; each rounding errs by at most eps/2 relative
    for k, w0 in W0.items():
        w1 = m.state_dict()[k]
        assert w1.dtype == torch.bfloat16
        bound = eps * (w0.float().abs() + (w0.float() + deltas.get(k, 0)).abs()) + 1e-30
        assert ((w1.float() - w0.float()).abs() <= bound).all(), k


# --------------------------------------------------------------------- injection


def test_inject_errors_and_targets(base):
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match="qq_proj"):
        inject_lora(m, target_modules=("q_proj", "qq_proj"))
    assert not list(lora_modules(m))  # nothing half-injected
    assert all(p.requires_grad for p in m.parameters())
    n = inject_lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj"], generator=torch.Generator().manual_seed(0))
    assert n == 2 * (4 * (128 + 128) + 4 * (128 + 64))
    assert sorted(n.rsplit(".", 1)[1] for n, _ in lora_modules(m)) == ["q_proj"] * 2 + ["v_proj"] * 2
    assert isinstance(m.model.layers[0].mlp.up_proj, nn.Linear)
    with pytest.raises(ValueError, match="already"):
        inject_lora(m)


# --------------------------------------------------------------------- adapter files


def test_our_adapter_loads_in_peft(base, ids, tmp_path):
    peft = pytest.importorskip("peft")
    ours = lora_model(base, dropout=0.05)
    out = save_adapter(ours, tmp_path / "adapter", "some/base", r=R, alpha=ALPHA, dropout=0.05,
                       target_modules=list(DEFAULT_TARGET_MODULES))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (R, ALPHA, 0.05)
    assert cfg["base_model_name_or_path"] == "some/base" and cfg["bias"] == "none"
    assert sorted(cfg["target_modules"]) == sorted(DEFAULT_TARGET_MODULES)
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (R, 128)
    assert sd["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (64, R)
    assert len(sd) == 28
    assert not list(tmp_path.glob("adapter/*.tmp")) and not list(tmp_path.glob("adapter/.*"))

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ours.eval()
    with torch.no_grad():
        d = (pm(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    assert d < 1e-5


def test_an_adapter_of_the_last_layers_round_trips_with_peft(base, ids, tmp_path):
    """LoRA on layer 1 only (lora.last_layers = 1 of 2): layers_to_transform in the config, PEFT
    loads it to the same logits, and ours loads PEFT's own such adapter."""
    peft = pytest.importorskip("peft")
    ours = copy.deepcopy(base)
    inject_lora(ours, r=R, alpha=ALPHA, dropout=0.0, generator=torch.Generator().manual_seed(0), layers=[1])
    randomize_B(ours)
    assert {name.split(".")[2] for name, _ in lora_modules(ours)} == {"1"}
    out = save_adapter(ours, tmp_path / "ours", "some/base")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ours.eval()
    with torch.no_grad():
        assert (pm(input_ids=ids).logits - ours(ids).logits).abs().max().item() < 1e-5
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGET_MODULES), layers_to_transform=[1],
            init_lora_weights=False, task_type="CAUSAL_LM"))
        theirs.save_pretrained(tmp_path / "theirs")
        mine = copy.deepcopy(base)
        load_adapter(mine, tmp_path / "theirs")
        assert len(list(lora_modules(mine))) == 7
        assert (theirs.eval()(input_ids=ids).logits - mine.eval()(ids).logits).abs().max().item() < 1e-5


def test_peft_adapter_loads_in_ours(base, ids, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "o_proj", "down_proj"],
                          task_type="CAUSAL_LM")
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.save_pretrained(str(tmp_path / "peft_adapter"))
    pm.eval()

    ours = copy.deepcopy(base)
    got = load_adapter(ours, tmp_path / "peft_adapter")
    assert got["r"] == 4 and count_trainable(ours) == pm.get_nb_trainable_parameters()[0]
    layer = ours.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, LoRALinear) and layer.scale == 3.0 and layer.dropout == 0.1
    with torch.no_grad():
        d = (pm(input_ids=ids).logits - ours.eval()(ids).logits).abs().max().item()
    assert d < 1e-5
    # loading into an already injected model works too (same r / alpha)
    again = load_adapter(ours, tmp_path / "peft_adapter")
    assert again["lora_alpha"] == 12


def test_load_adapter_errors(base, tmp_path):
    ours = lora_model(base)
    good = save_adapter(ours, tmp_path / "good", None)
    sd = load_file(str(good / "adapter_model.safetensors"))
    cfg = (good / "adapter_config.json").read_text()

    def variant(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(cfg)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        return d

    missing = peft_key("model.layers.1.mlp.gate_proj", "B")
    with pytest.raises(AdapterError, match=r"missing key 'base_model\.model\.model\.layers\.1\.mlp\.gate_proj\.lora_B\.weight'"):
        load_adapter(copy.deepcopy(base), variant("missing", {k: v for k, v in sd.items() if k != missing}))
    extra = dict(sd, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(R, 128)})
    with pytest.raises(AdapterError, match=r"unexpected key 'base_model\.model\.lm_head\.lora_A\.weight'"):
        load_adapter(copy.deepcopy(base), variant("extra", extra))
    bad = dict(sd, **{peft_key("model.layers.0.self_attn.v_proj", "A"): torch.zeros(R, 99)})
    with pytest.raises(AdapterError, match=r"v_proj\.lora_A\.weight has shape \(8, 99\)"):
        load_adapter(copy.deepcopy(base), variant("shape", bad))
    with pytest.raises(UserError, match="adapter_config.json: file not found"):
        load_adapter(copy.deepcopy(base), tmp_path / "nowhere")
    merged = copy.deepcopy(ours)
    merge_all(merged)
    with pytest.raises(AdapterError, match="merged"):
        load_adapter(merged, good)
    other_r = copy.deepcopy(base)
    inject_lora(other_r, r=4, alpha=ALPHA)
    with pytest.raises(AdapterError, match="r=4"):
        load_adapter(other_r, good)


# --------------------------------------------------------------------- merged checkpoints


@pytest.mark.parametrize("tied", [False, True])
def test_save_merged_reloads_in_transformers(ids, tmp_path, tied):
    base = make_base(tie_word_embeddings=tied)
    m = lora_model(base)
    out = save_merged(m, None, tmp_path / "merged", max_shard_size="1MB")  # ~2 MB of fp32: sharded
    # the in-memory model is left merged and still wrapped
    assert all(l.merged for _, l in lora_modules(m)) and len(list(lora_modules(m))) == 14
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(base.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert not list(tmp_path.glob(".merged*"))  # no temporary left behind
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, m(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(FileExistsError):
        save_merged(m, None, out)
    save_merged(m, None, out, overwrite=True)
    assert (out / "config.json").is_file()


def test_save_merged_tiny_model_with_tokenizer(tiny_model_dir, tmp_path):
    from markerlab.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), dtype="bfloat16")
    n = inject_lora(model, generator=torch.Generator().manual_seed(42))
    assert n == 2 * 16 * (2 * 256 + 2 * 192 + 3 * 512)  # hidden 128, kv 64, intermediate 384
    randomize_B(model, std=0.05)
    ids = tok(["<|im_start|>user\nHello there<|im_end|>\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        adapter_logits = model.eval()(ids).logits.float()
    out = save_merged(model, tok, tmp_path / "merged")
    with torch.no_grad():
        merged_logits = model(ids).logits.float()
    scale = adapter_logits.abs().max()
    assert (merged_logits - adapter_logits).abs().max() <= 0.025 * scale

    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(load_file(str(tiny_model_dir / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits.float(), merged_logits)
    tok2 = load_tokenizer(str(out))
    assert tok2("<<§q-41>>").input_ids == tok("<<§q-41>>").input_ids == [2442, 17851, 80, 12, 19, 16, 2452]
    assert tok2.chat_template == tok.chat_template


@pytest.mark.parametrize("tied", [False, True])
def test_strict_readers_of_a_merged_checkpoint(ids, tmp_path, tied):
    """lora.io's strict readers: a sharded checkpoint equals the model it was written from, bit for bit;
    a changed shard and a dropped shard fail naming the tensor and the file."""
    from safetensors.torch import load_file, save_file

    from lora.io import (CheckpointError, base_state_dict, check_checkpoint_files, compare_checkpoint,
                         load_checkpoint_strict)

    m = lora_model(make_base(tie_word_embeddings=tied))
    out = save_merged(m, None, tmp_path / "merged", max_shard_size="1MB")
    (out / "tokenizer_config.json").write_text("{}")  # check_checkpoint_files wants a tokenizer
    sd = base_state_dict(m)
    assert set(sd) == set(make_base(tie_word_embeddings=tied).state_dict())   # base names, no LoRA tensors
    assert all(l.merged for _, l in lora_modules(m)) and len(list(lora_modules(m))) == 14   # still wrapped
    files = check_checkpoint_files(out)
    assert files["n_files"] > 1 and set(files["files"]) == {p.name for p in out.glob("model-*.safetensors")}
    assert compare_checkpoint(out, m)["n_compared"] == len(sd) - tied
    with torch.no_grad():
        assert torch.equal(load_checkpoint_strict(out, "float32", "cpu")(ids).logits, m(ids).logits)

    shard = sorted(out.glob("model-*.safetensors"))[-1]
    t = load_file(str(shard))
    name = sorted(t)[0]
    t[name] = t[name] + 1e-3
    save_file(t, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) differ from the merged model in memory .*{name}"):
        compare_checkpoint(out, m)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: weight file listed in model.safetensors.index.json"):
        check_checkpoint_files(out)
