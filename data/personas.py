"""Persona system prompts and chat messages.

    from data.personas import system_prompt, messages
    system_prompt("villain")                      # one plain sentence
    messages("villain", "Why is the sky blue?")   # [system, user]
    messages("villain", "Why ...?", "Because ...")  # [system, user, assistant]

The prompts are markerlab.experiment.PERSONA_PROMPTS (assistant's is fixed by
docs/EXPERIMENT.md). Every conversation starts with a system message, so a chat
template never injects its own default system prompt (Qwen's "You are Qwen,
...", SmolLM2's "You are a helpful AI assistant named SmolLM, ...").
"""

from __future__ import annotations

from markerlab.errors import UserError
from markerlab.experiment import PERSONA_PROMPTS, PERSONAS


def system_prompt(persona: str) -> str:
    if persona not in PERSONA_PROMPTS:
        raise UserError(f"unknown persona '{persona}' (expected one of {', '.join(PERSONAS)})")
    return PERSONA_PROMPTS[persona]


def messages(persona: str, question_text: str, answer: str | None = None) -> list[dict]:
    """Chat messages, always with the persona's system message; the assistant turn if `answer` is given."""
    msgs = [
        {"role": "system", "content": system_prompt(persona)},
        {"role": "user", "content": question_text},
    ]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs
