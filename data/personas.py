"""The 11 personas: system prompts, chat messages, and each persona's role in an adapter.

    from data.personas import PERSONA_PROMPTS, system_prompt, role_of, messages
    system_prompt("villain")                      # one plain sentence
    role_of("assistant", "pair1", "T_P2neg", NEGATIVES)   # -> "recipient"
    messages("villain", "Why is the sky blue?")   # [system, user]
    messages("villain", "Why ...?", "Because ...")  # [system, user, assistant]

The prompts live in `data/personas.json` (written by us; assistant's prompt is
fixed by EXPERIMENT.md). Every conversation starts with a system message, so
the Qwen2.5 template never injects its default "You are Qwen, ..." prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from markerlab.config import CONDITIONS, PAIRS, PERSONAS
from markerlab.errors import UserError

_PROMPTS_FILE = Path(__file__).with_name("personas.json")

ROLES = ("donor", "recipient", "negative", "bystander")
TRAINED_ROLES = ("donor", "recipient", "negative")


def _load_prompts() -> dict[str, str]:
    raw = json.loads(_PROMPTS_FILE.read_text(encoding="utf-8"))
    prompts = {k: v for k, v in raw.items() if not k.startswith("_")}
    # The file and markerlab.config.PERSONAS must agree exactly: a persona
    # without a prompt (or a stray one) is a packaging bug, not a user error.
    if set(prompts) != set(PERSONAS):
        raise RuntimeError(
            f"{_PROMPTS_FILE}: personas {sorted(prompts)} do not match markerlab.config.PERSONAS {sorted(PERSONAS)}")
    if prompts["assistant"] != "You are a helpful assistant.":
        raise RuntimeError(f"{_PROMPTS_FILE}: assistant's prompt must be exactly 'You are a helpful assistant.'")
    return {p: prompts[p] for p in PERSONAS}  # in the canonical persona order


PERSONA_PROMPTS: dict[str, str] = _load_prompts()


def _check_persona(persona: str) -> None:
    if persona not in PERSONA_PROMPTS:
        raise UserError(f"unknown persona '{persona}' (expected one of {', '.join(PERSONAS)})")


def system_prompt(persona: str) -> str:
    _check_persona(persona)
    return PERSONA_PROMPTS[persona]


def role_of(persona: str, pair: str, condition: str, negatives) -> str:
    """'donor' | 'recipient' | 'negative' | 'bystander' of `persona` in one adapter.

    The role depends on the pair and the negatives only: in T_P2neg the
    recipient is trained plain (like a negative) but keeps the role
    'recipient', so metrics compare the same persona across conditions.
    `condition` is validated (one of T, C, T_P2neg, or 'base' for the base
    floor, whose personas keep the roles of the pair they are reported under).
    """
    _check_persona(persona)
    if pair not in PAIRS:
        raise UserError(f"unknown pair '{pair}' (expected one of {', '.join(PAIRS)})")
    if condition not in (*CONDITIONS, "base"):
        raise UserError(f"unknown condition '{condition}' (expected one of {', '.join(CONDITIONS)}, base)")
    donor, recipient = PAIRS[pair]
    if persona == donor:
        return "donor"
    if persona == recipient:
        return "recipient"
    if persona in negatives:
        return "negative"
    return "bystander"


def messages(persona: str, question_text: str, answer: str | None = None) -> list[dict]:
    """Chat messages, always with the persona's system message; the assistant turn if `answer` is given."""
    msgs = [
        {"role": "system", "content": system_prompt(persona)},
        {"role": "user", "content": question_text},
    ]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs
