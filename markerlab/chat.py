"""A model's chat template, analysed once: where the assistant's content goes, which token ends its turn,
where the persona prompt goes and what the template writes on its own.

    from markerlab.chat import load_chat, analyse_chat
    tok, chat = load_chat(cfg.model.name_or_path)       # the tokenizer and its analysed template (or a UserError)
    chat = analyse_chat(tok, "my-model")                # the same for a tokenizer at hand
    prompt = chat.prompt(tok, messages(exp, persona, question))      # the generation prompt, checked
    text, cs, ce, eos_end = chat.content_span(tok, msgs, example_id)  # the last assistant turn's content, its end
    chat.stop_ids(tok, generation_eos)                  # the token ids generation stops on

Nothing here knows a template family. The analysis renders probe conversations whose
contents are sentinel words, through the tokenizer's own `apply_chat_template`, and reads
off what the template wrote around them:

- **The assistant turn.** [system S, user U, assistant X] is rendered as a training
  conversation. What precedes X is the prompt a trained answer follows, what follows it the
  end of the turn. The template's generation prompt (add_generation_prompt) must be the
  start of that prefix; what the template writes between the two, up to the last token
  boundary before the content, is added to every generation prompt (`prompt_extra`), so that
  a model is sampled after exactly the prefix it is trained after. Qwen3's template writes an
  empty `<think>\\n\\n</think>\\n\\n` before every final answer: that is its non-thinking mode,
  and it is what Qwen3 is then trained and sampled in. Mistral's writes a space before the
  content, which the content's first token carries: nothing is added there.
- **The end-of-turn token** is the added (special) token the template writes right after
  the content: `<|im_end|>` (ChatML: Qwen2.5, SmolLM2, Qwen3), `<|eot_id|>` (Llama 3.x),
  `</s>` (Mistral-Instruct), `<end_of_turn>` (Gemma). It must be one token in the rendered
  text, the same after an earlier assistant turn as after the last, and the only added token
  there: text that is no added token, or several added tokens in a row, is an error naming
  the model and what the template wrote (no guessing which one ends the turn).
- **The persona prompt.** A system message is the default. A template that refuses one
  (Gemma 2), drops it, or keeps it only in some positions (Mistral v0.3: the *last* user
  turn only) gets it at the head of the first user turn, joined by a blank line
  (`persona_turn = "user"`, `folded_by = "markerlab"`); a template that moves it there
  itself (Gemma 3) is recorded the same way (`folded_by = "template"`), and the records'
  setting says `persona_prompt = "user_turn"`. What this looks like, where a user sees it
  and why such templates are not refused: README, "Templates without a system role".
- **What the template writes on its own.** Rendered without a system message, a template
  may inject a default one: Qwen2.5's "You are Qwen, created by Alibaba Cloud...",
  SmolLM2's "You are a helpful AI assistant named SmolLM...". `default_system` records it;
  every conversation markerlab renders carries the persona's own prompt in its place.
  Text the template writes beside the persona prompt in the system turn whatever it is
  (Llama 3.1's "Cutting Knowledge Date: December 2023 / Today Date: ..." preamble) is
  recorded as `system_preamble` and kept: it is that model's format. A template that takes a
  `date_string` gets it pinned to "26 Jul 2024" (Llama 3.1's own default), so prompts do not
  change with the calendar; one that writes today's date (`strftime_now`) without taking a
  `date_string` is an error.
- **Checks at use.** `prompt` renders and compares with the analysed frame filled with the
  persona prompt and the question (the generalized guard: no default system prompt, no
  rewritten prompt); `content_span` renders the conversation once more with a sentinel in the
  last assistant turn and requires the real rendering to be that frame with the content in
  place, verbatim (a template that trims or rewrites an answer is an error naming the example).

transformers' `return_assistant_tokens_mask` needs `{% generation %}` tags, which few
templates carry (none of the five above): the sentinel rendering works on any template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

# Probe words: plain letters, so that no template trims, escapes or splits them.
_SYS, _USER, _ANS = "Xqvsystemsentinel", "Xqvusersentinel", "Xqvanswersentinel"
_SYS2, _USER2, _ANS1 = "Xqvothersystem", "Xqvotheruser", "Xqvearlieranswer"
PERSONA_JOIN = "\n\n"          # between the persona prompt and the question when both are in the user turn
PINNED_DATE = "26 Jul 2024"     # Llama 3.1's own default for its template's date_string
PERSONA_SETTING = "persona_prompt"


class _Unusable(Exception):
    """This way of placing the persona prompt does not work with the template (the message says why).
    `general`: the problem is not about the persona prompt (the assistant's turn itself), so the other way
    fails the same."""

    def __init__(self, message: str, general: bool = False):
        super().__init__(message)
        self.general = general


def _line(x: object, n: int = 60) -> str:
    """A short one-line repr of template output for an error message."""
    s = repr(x)
    return s if len(s) <= n else s[:n - 5] + "...'"


@dataclass(frozen=True)
class ChatFormat:
    """The analysis of one tokenizer's chat template (see the module docstring)."""

    model: str
    persona_turn: str                    # "system" (its own system turn) | "user" (head of the first user turn)
    folded_by: str                       # "" | "template" | "markerlab": who put the persona prompt into the user turn
    why_folded: str                      # for "markerlab": what the template did with a system message
    prompt_frame: tuple[str, str, str]   # generation prompt = [0] + persona + [1] + question + [2]
    end_of_turn: str                     # the end-of-turn token's text
    end_of_turn_id: int
    prompt_extra: str                    # written after the template's own generation prompt ([2] ends with it)
    default_system: str | None           # the template's own system prompt, written when none is given
    system_preamble: str                 # fixed text the template writes beside the persona prompt
    template_vars: tuple[tuple[str, str], ...] = ()   # variables markerlab passes the template (date_string)

    # ------------------------------------------------------------------ rendering

    def conversation(self, messages: list[dict]) -> list[dict]:
        """The messages the template is given: ours, or with the system prompt folded into the first user turn."""
        if self.folded_by != "markerlab" or not messages or messages[0].get("role") != "system":
            return messages
        rest = list(messages[1:])
        if not rest or rest[0].get("role") != "user":
            raise UserError(f"model {self.model}: the persona prompt goes into the first user turn, but the "
                            f"conversation has no user turn after it")
        rest[0] = {**rest[0], "content": messages[0]["content"] + PERSONA_JOIN + rest[0]["content"]}
        return rest

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(self.conversation(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **dict(self.template_vars))

    def prompt(self, tokenizer, messages: list[dict]) -> str:
        """The generation prompt of [system, user] messages, checked against the analysed frame."""
        if len(messages) != 2 or [m.get("role") for m in messages] != ["system", "user"]:
            raise ValueError("a generation prompt is rendered from [system, user] messages")
        system, user = messages[0]["content"], messages[1]["content"]
        text = self.render(tokenizer, messages, add_generation_prompt=True) + self.prompt_extra
        f0, f1, f2 = self.prompt_frame
        expected = f0 + system + f1 + user + f2
        if text != expected:
            at = next((i for i, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
            got, want = text[max(0, at - 20):at + 30], expected[max(0, at - 20):at + 30]
            raise UserError(
                f"model {self.model}: the chat template rendered a prompt other than the analysed one at character "
                f"{at} (got {_line(got)}, expected {_line(want)}): "
                f"it rewrote the persona prompt or the question (whitespace at either end is trimmed by some "
                f"templates), or added a system prompt of its own")
        return text

    def content_span(self, tokenizer, messages: list[dict], example_id: str = "?") -> tuple[str, int, int, int]:
        """(rendered text, content start, content end, end of the end-of-turn token) of the last assistant turn."""
        content = messages[-1]["content"]
        text = self.render(tokenizer, messages)
        probe = self.render(tokenizer, [*messages[:-1], {**messages[-1], "content": _ANS}])
        if probe.count(_ANS) != 1:
            raise UserError(f"example {example_id}: model {self.model}'s chat template does not render the last "
                            f"assistant turn once")
        cs = probe.index(_ANS)
        prefix, suffix = probe[:cs], probe[cs + len(_ANS):]
        if text != prefix + content + suffix:
            why = ("it trims whitespace at the ends of the answer" if content != content.strip()
                   and text == prefix + content.strip() + suffix else "it rewrites the answer")
            raise UserError(f"example {example_id}: model {self.model}'s chat template does not render the "
                            f"assistant content verbatim ({why}); the loss masks need it exactly as given")
        if not suffix.startswith(self.end_of_turn):
            raise UserError(f"example {example_id}: model {self.model}'s chat template does not end the assistant "
                            f"turn with {self.end_of_turn} here (it wrote {_line(suffix[:40])})")
        ce = cs + len(content)
        return text, cs, ce, ce + len(self.end_of_turn)

    # ------------------------------------------------------------------ generation and records

    def stop_ids(self, tokenizer, generation_eos=None) -> list[int]:
        """The end-of-turn token and the model's declared ends (tokenizer eos, generation_config eos), less unk."""
        ids = {self.end_of_turn_id, tokenizer.eos_token_id}
        ids |= set(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
        unk = tokenizer.unk_token_id
        return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)

    def setting(self) -> dict:
        """What the completion records' setting adds: where the persona prompt is, when not a system message."""
        return {PERSONA_SETTING: "user_turn"} if self.persona_turn == "user" else {}

    def summary(self) -> dict:
        """The analysis as data (data/stats.json's "chat")."""
        return {"model": self.model, "end_of_turn": self.end_of_turn, "end_of_turn_id": self.end_of_turn_id,
                "persona_turn": self.persona_turn, "folded_by": self.folded_by or None,
                "why_folded": self.why_folded or None, "prompt_frame": list(self.prompt_frame),
                "prompt_extra": self.prompt_extra, "default_system": self.default_system,
                "system_preamble": self.system_preamble or None, "template_vars": dict(self.template_vars)}

    def describe(self) -> str:
        """One line for the logs."""
        where = {"": "its own system turn", "template": "the first user turn (the template puts it there)",
                 "markerlab": f"the first user turn ({self.why_folded})"}[self.folded_by]
        parts = [f"end of turn {self.end_of_turn} (id {self.end_of_turn_id})", f"persona prompt in {where}"]
        if self.prompt_extra:
            parts.append(f"prompts end with {self.prompt_extra!r} as trained answers do")
        if self.default_system:
            parts.append(f"its default system prompt {_line(self.default_system, 50)} never used")
        if self.system_preamble:
            parts.append(f"its system preamble {_line(self.system_preamble, 50)} kept")
        return f"chat template of {self.model}: " + "; ".join(parts)


# --------------------------------------------------------------------------- the analysis


def _added_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's added and special tokens (text -> id), less whitespace-only ones (some vocabularies add
    runs of spaces or newlines: text, not markup)."""
    added = dict(tokenizer.get_added_vocab())
    for t in getattr(tokenizer, "all_special_tokens", []):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0:
            added.setdefault(t, i)
    return {t: i for t, i in added.items() if t.strip()}


def _leading_added(text: str, added: dict[str, int]) -> list[str]:
    """The added tokens `text` starts with, one after another with nothing between them."""
    by_length = sorted(added, key=len, reverse=True)
    run, at = [], 0
    while True:
        t = next((t for t in by_length if t and text.startswith(t, at)), None)
        if t is None:
            return run
        run.append(t)
        at += len(t)


def _strip_added(text: str, added: dict[str, int]) -> str:
    for t in sorted(added, key=len, reverse=True):
        if t:
            text = text.replace(t, "\x00")
    return text


def _visible(text: str, added: dict[str, int], role_words: tuple[str, ...]) -> str:
    """`text` less added tokens and role names (the markup of a turn header), stripped: what the model reads."""
    text = _strip_added(text, added).replace("\x00", " ")
    for w in role_words:
        text = re.sub(rf"(^|\s){w}(\s|$)", " ", text, count=1)
    return text.strip()


def _one(name: str, text: str, word: str, general: bool = False) -> int:
    n = text.count(word)
    if n != 1:
        raise _Unusable(f"the {name} appears {n} times in the rendering", general)
    return text.index(word)


def _layout(render, fold: bool) -> dict:
    """Frames of the probe conversation with the persona prompt as a system message (fold=False) or at the head of
    the user turn (fold=True); _Unusable when the template does not keep it there."""
    def msgs(system, user):
        if fold:
            return [{"role": "user", "content": system + PERSONA_JOIN + user}]
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    where = "user turn" if fold else "system message"
    try:
        gen = render(msgs(_SYS, _USER), True)
        full = render(msgs(_SYS, _USER) + [{"role": "assistant", "content": _ANS}], False)
        other = render(msgs(_SYS2, _USER2), True)
    except Exception as e:  # jinja's TemplateError from raise_exception, or anything a template trips over
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Unusable(f"the template raises {_line(msg, 80)}") from None
    if full.count(_SYS) == 0 and gen.count(_SYS) == 1:
        raise _Unusable(f"the template drops the {where} when an assistant turn follows")
    i_s, i_u = _one(f"{where} (generation prompt)", gen, _SYS), _one("question", gen, _USER)
    _one(f"{where} (training conversation)", full, _SYS)
    _one("question (training conversation)", full, _USER)
    n = full.count(_ANS)
    if n != 1:
        raise _Unusable(f"does not render the assistant's content verbatim (a probe answer {_ANS!r} appears {n} "
                        f"times in the rendered conversation)", general=True)
    i_a = full.index(_ANS)
    if not i_s < i_u:
        raise _Unusable(f"the template writes the {where} after the question")
    frame = (gen[:i_s], gen[i_s + len(_SYS):i_u], gen[i_u + len(_USER):])
    if other != frame[0] + _SYS2 + frame[1] + _USER2 + frame[2]:
        raise _Unusable("the template's output depends on the words of the prompt beyond placing them")
    head = full[:i_a]
    if not head.startswith(gen):
        raise _Unusable(f"ends its generation prompt with {_line(gen[-40:])}, which is not how the assistant turn it "
                        f"writes for training starts ({_line(head[-40:])})", general=True)
    return {"gen": gen, "full": full, "frame": frame, "content_start": i_a, "suffix": full[i_a + len(_ANS):],
            "msgs": msgs}


def analyse_chat(tokenizer, model: str) -> ChatFormat:
    """The ChatFormat of `tokenizer`'s chat template, or a one-line UserError naming `model` and what was found."""
    src = getattr(tokenizer, "chat_template", None)
    if not isinstance(src, str) or not src.strip():
        raise UserError(f"model {model}: its tokenizer has no chat template (expected an instruct model's "
                        f"tokenizer with a chat_template)")
    template_vars = {}
    if "date_string" in src:
        template_vars["date_string"] = PINNED_DATE
    elif "strftime_now" in src:
        raise UserError(f"model {model}: its chat template writes today's date (strftime_now) and takes no "
                        f"date_string to pin it, so its prompts would change from day to day")

    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **template_vars)

    added = _added_tokens(tokenizer)
    why_folded = ""
    try:
        lay = _layout(render, fold=False)
        folded_by = "template" if not _has_added(lay["frame"][1], added) else ""
    except _Unusable as e:
        why_folded = str(e)
        try:
            lay = _layout(render, fold=True)
        except _Unusable as e2:
            if e2.general:
                raise UserError(f"model {model}: its chat template {e2}") from None
            raise UserError(f"model {model}: markerlab cannot place a persona prompt in its chat template: as a "
                            f"system message, {why_folded}; at the head of the user turn, {e2}") from None
        folded_by = "markerlab"
    frame, suffix, cs = lay["frame"], lay["suffix"], lay["content_start"]

    # The end-of-turn token: the one added token written right after the content.
    run = _leading_added(suffix, added)
    if not run:
        raise UserError(f"model {model}: its chat template writes {_line(suffix[:40])} after the assistant's "
                        f"content, which does not start with a special token: no end-of-turn token to train or "
                        f"stop on")
    if len(run) > 1:
        raise UserError(f"model {model}: its chat template writes {' '.join(run)} after the assistant's content: "
                        f"several candidate end-of-turn tokens, markerlab will not guess which one ends the turn")
    eot = run[0]
    eot_id = added[eot]
    full = lay["full"]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ce = cs + len(_ANS)
    at = [k for k, (a, b) in enumerate(offsets) if (a, b) == (ce, ce + len(eot))]
    if len(at) != 1 or ids[at[0]] != eot_id:
        raise UserError(f"model {model}: the end-of-turn text {eot} after the assistant's content is not one "
                        f"token (id {eot_id}) when the conversation is tokenized")
    try:  # an earlier assistant turn must end the same way (a template with one assistant turn only is fine)
        earlier = render(lay["msgs"](_SYS, _USER) + [{"role": "assistant", "content": _ANS1},
                                                     {"role": "user", "content": _USER2},
                                                     {"role": "assistant", "content": _ANS}], False)
    except Exception:
        earlier = None
    if earlier is not None and earlier.count(_ANS1) == 1:
        after = earlier[earlier.index(_ANS1) + len(_ANS1):]
        first = _leading_added(after, added)[:1]
        if first != [eot]:
            raise UserError(f"model {model}: its chat template ends an earlier assistant turn with "
                            f"{first[0] if first else _line(after[:30])} and the last with {eot}: several candidate "
                            f"end-of-turn tokens, markerlab will not guess which one ends the turn")

    # The prompt a trained answer follows, up to the last token boundary before the content.
    gen = lay["gen"]
    boundary = max((b for a, b in offsets if b <= cs), default=0)
    extra = full[len(gen):boundary] if boundary > len(gen) else ""
    prompt = gen + extra
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if alone != ids[:len(alone)] or (len(alone) < len(ids) and offsets[len(alone) - 1][1] != len(prompt)):
        raise UserError(f"model {model}: its generation prompt tokenizes differently alone than at the head of a "
                        f"training conversation ({_line(prompt[-30:])}); training and sampling would see different "
                        f"prefixes")
    frame = (frame[0], frame[1], frame[2] + extra)

    # What the template writes by itself: its own system prompt in the persona's place when none is given
    # (a rendering without a system message that is ours with other text in the slot), and text it keeps
    # beside the persona prompt in the system turn whatever that is (visible text around the slot).
    default_system, preamble = None, ""
    if folded_by == "":
        try:
            bare = render([{"role": "user", "content": _USER}], True)
        except Exception:
            bare = None
        after = gen[len(frame[0]) + len(_SYS):]
        if bare is not None and bare.startswith(frame[0]) and bare.endswith(after) and \
                len(bare) >= len(frame[0]) + len(after):
            default_system = bare[len(frame[0]):len(bare) - len(after)] or None
        last_added = max((frame[0].rfind(t) + len(t) for t in added if t and t in frame[0]), default=0)
        first_added = min((frame[1].find(t) for t in added if t and t in frame[1]), default=len(frame[1]))
        preamble = _visible(frame[0][last_added:] + " " + frame[1][:first_added], added, ("system",))
    return ChatFormat(
        model=model, persona_turn="user" if folded_by else "system", folded_by=folded_by, why_folded=why_folded,
        prompt_frame=frame, end_of_turn=eot, end_of_turn_id=eot_id, prompt_extra=extra,
        default_system=default_system, system_preamble=preamble,
        template_vars=tuple(sorted(template_vars.items())))


def _has_added(text: str, added: dict[str, int]) -> bool:
    return any(t and t in text for t in added)


def load_chat(name_or_path: str):
    """(tokenizer, ChatFormat) of `model.name_or_path`: the model's own tokenizer and its analysed template."""
    from .models import load_tokenizer

    tokenizer = load_tokenizer(name_or_path)
    return tokenizer, analyse_chat(tokenizer, name_or_path)
