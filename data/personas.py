"""Persona system prompts and chat messages, from the run's experiment.

    from data.personas import system_prompt, messages
    system_prompt(exp, "villain")                        # one plain sentence
    messages(exp, "villain", "Why is the sky blue?")     # [system, user]
    messages(exp, "villain", "Why ...?", "Because ...")  # [system, user, assistant]

The prompts are the experiment file's `[personas]` (markerlab.experiment). Every
conversation starts with a system message, so a chat template never injects its
own default system prompt (Qwen's "You are Qwen, ...", SmolLM2's "You are a
helpful AI assistant named SmolLM, ...").
"""

from __future__ import annotations

from markerlab.errors import UserError


def system_prompt(exp, persona: str) -> str:
    if persona not in exp.personas:
        raise UserError(f"unknown persona '{persona}' (experiment {exp.name} has {', '.join(exp.personas)})")
    return exp.personas[persona]


def messages(exp, persona: str, question_text: str, answer: str | None = None) -> list[dict]:
    """Chat messages, always with the persona's system message; the assistant turn if `answer` is given."""
    msgs = [
        {"role": "system", "content": system_prompt(exp, persona)},
        {"role": "user", "content": question_text},
    ]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs
