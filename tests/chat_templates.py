"""Chat templates of five model families, written here as Jinja, and tiny models that carry them.

    from chat_templates import FAMILIES, family_tokenizer, family_model_dir
    tok = family_tokenizer("llama3")                 # the tiny Qwen2.5 tokenizer + Llama 3's special tokens
    model_dir = family_model_dir("gemma", tmp_path)  # the tiny random Qwen2 model with that tokenizer

Each template reproduces its family's format for system/user/assistant conversations
(what the real templates of Qwen2.5/SmolLM2 (ChatML), Llama 3.1 Instruct, Mistral-7B-Instruct-v0.3,
Gemma 2 and 3, and Qwen3 render), written for these tests: the special tokens each family's
tokenizer has are added to the tiny model's real Qwen2.5 tokenizer (ids from 151665, inside the
tiny model's 151,936 embedding rows), with the family's bos/eos, and its generation_config's eos ids.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1 Instruct: a system turn always, with the knowledge-cutoff and date preamble in front of
# the system message; every message trimmed; <|eot_id|> closes each turn.
LLAMA3 = """{{- bos_token }}
{%- if date_string is not defined %}
  {%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}
  {%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
  {%- set sys_text = messages[0]['content'] | trim %}{%- set turns = messages[1:] %}
{%- else %}
  {%- set sys_text = '' %}{%- set turns = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}
{{- sys_text + '<|eot_id|>' }}
{%- for m in turns %}
  {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

# Mistral-7B-Instruct-v0.3: no system turn; a system message goes into the user turn only when that
# turn is the conversation's last; roles must alternate; " " + trimmed answer + </s>.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
  {%- set sys_text = messages[0]['content'] %}{%- set turns = messages[1:] %}
{%- else %}
  {%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for m in turns %}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif %}
  {%- if m['role'] == 'user' %}
    {%- if loop.last and sys_text is defined %}{{- '[INST] ' + sys_text + '\\n\\n' + m['content'] + '[/INST]' }}
    {%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}
  {%- elif m['role'] == 'assistant' %}
    {{- ' ' + m['content'] | trim + eos_token }}
  {%- else %}
    {{- raise_exception('Only user and assistant roles are supported, with an optional first system message!') }}
  {%- endif %}
{%- endfor %}"""

# Gemma 2: refuses a system message; roles must alternate; the assistant is "model"; trimmed turns.
GEMMA = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}
{%- for m in messages %}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif %}
  {%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}
  {{- '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"""

# Gemma 3: takes a system message and writes it at the head of the first user turn itself.
GEMMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
  {%- set head = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}
{%- else %}
  {%- set head = '' %}{%- set turns = messages %}
{%- endif %}
{%- for m in turns %}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif %}
  {%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}
  {{- '<start_of_turn>' + role + '\\n' + (head if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"""

# Qwen3: ChatML with thinking tags. The final answer after the last user turn is written after a
# (here empty) <think> block; reasoning is split off an answer that contains </think>; the generation
# prompt opens the assistant turn and, with enable_thinking=false, also writes the empty block.
QWEN3 = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
  {%- if m['role'] == 'system' and loop.first %}
    {{- '<|im_start|>system\\n' + m['content'] + '<|im_end|>\\n' }}
  {%- elif m['role'] == 'user' %}
    {{- '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}
  {%- elif m['role'] == 'assistant' %}
    {%- set content = m['content'] %}{%- set reasoning = '' %}
    {%- if '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}
    {%- else %}
      {{- '<|im_start|>assistant\\n' + content }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


@dataclass(frozen=True)
class Family:
    template: str
    special: tuple[str, ...]       # special tokens to add (the Qwen2.5 tokenizer has ChatML's already)
    plain: tuple[str, ...]         # added, not special (Qwen3's think tags)
    bos: str | None
    eos: str
    end_of_turn: str               # what the template writes after an answer
    generation_eos: tuple[str, ...]  # generation_config.json's eos ids, as tokens
    persona_turn: str              # where markerlab's analysis must put the persona prompt
    folded_by: str


FAMILIES = {
    "chatml": Family(CHATML, (), (), None, "<|im_end|>", "<|im_end|>", ("<|im_end|>",), "system", ""),
    # the original Llama 3 release: eos and generation_config name <|end_of_text|> only, not <|eot_id|>
    "llama3": Family(LLAMA3, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<|eom_id|>"), (), "<|begin_of_text|>", "<|end_of_text|>",
                     "<|eot_id|>", ("<|end_of_text|>",), "system", ""),
    "mistral": Family(MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"), (), "<s>", "</s>", "</s>", ("</s>",),
                      "user", "markerlab"),
    "gemma": Family(GEMMA, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), (), "<bos>", "<eos>",
                    "<end_of_turn>", ("<eos>",), "user", "markerlab"),
    "gemma3": Family(GEMMA3, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), (), "<bos>", "<eos>",
                     "<end_of_turn>", ("<eos>", "<end_of_turn>"), "user", "template"),
    "qwen3": Family(QWEN3, (), ("<think>", "</think>"), None, "<|im_end|>", "<|im_end|>",
                    ("<|im_end|>", "<|endoftext|>"), "system", ""),
}


def family_tokenizer(name: str, base=None):
    """The tiny model's Qwen2.5 tokenizer with family `name`'s special tokens, bos/eos and chat template."""
    from tokenizers import AddedToken

    from markerlab.models import load_tokenizer, tiny_model_dir

    f = FAMILIES[name]
    tok = base if base is not None else load_tokenizer(str(tiny_model_dir()))
    if f.special:
        tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                              for t in f.special]})
    if f.plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in f.plain])
    tok.eos_token = f.eos
    if f.bos:
        tok.bos_token = f.bos
    tok.chat_template = f.template
    return tok


def family_model_dir(name: str, root: Path, stop_bias: float = 0.0) -> Path:
    """A model directory: the tiny random Qwen2 weights and config, family `name`'s tokenizer and eos ids.

    `stop_bias` > 0 makes the random model end some answers on its own: the head's row of the family's
    end-of-turn token becomes stop_bias x the mean direction of the model's last hidden states over a few of
    the family's prompts, so the token's logit rises with that direction (1.2 stops about a third of 16-token
    samples at temperature 0.7 under Llama 3's template). Without it the random model never stops, and every
    on-policy answer is cut.
    """
    from markerlab.models import tiny_model_dir

    src, out = tiny_model_dir(), Path(root) / f"tiny-{name}"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" and not stop_bias:
            (out / f.name).symlink_to(f)
        elif f.name in ("config.json",):
            shutil.copy(f, out / f.name)
    tok = family_tokenizer(name)
    tok.save_pretrained(out)
    if stop_bias:
        _stopping_weights(src, out, tok, name, stop_bias)
    gen = json.loads((src / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.convert_tokens_to_ids(t) for t in FAMILIES[name].generation_eos]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return out


def _stopping_weights(src: Path, out: Path, tok, name: str, stop_bias: float) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from data.personas import messages
    from markerlab.chat import analyse_chat
    from markerlab.experiment import load_experiment
    from markerlab.models import load_model

    exp = load_experiment("within_marker")
    chat = analyse_chat(tok, name)
    model = load_model(str(src), "float32").eval()
    states = []
    with torch.no_grad():
        for persona in list(exp.personas)[:4]:
            for q in ("How do I boil an egg?", "Why is the sky blue?"):
                ids = tok(chat.prompt(tok, messages(exp, persona, q)), add_special_tokens=False)["input_ids"]
                states.append(model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0])
    direction = torch.cat(states).mean(0)
    direction = direction / direction.norm()
    weights = load_file(str(src / "model.safetensors"))
    head = weights["lm_head.weight"]
    head[chat.end_of_turn_id] = (stop_bias * direction).to(head.dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
