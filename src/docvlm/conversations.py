"""Answers and conversations as rows hold them: accepted answers as text, and chat `messages` checked and reduced to
text and image parts, with their last exchange (what evaluation asks and expects).
"""

from __future__ import annotations

import json

from docvlm.errors import UserError

ROLES = ("system", "user", "assistant")


def as_answers(value) -> list[str]:
    """Accepted answers as non-empty strings: a string, a number (converted: 42 -> '42', 3.5 -> '3.5'), or a list
    of them; None, booleans and blanks are not answers."""
    values = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in values:
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, float):
            item = str(int(item)) if item.is_integer() else repr(item)  # 42.0 -> '42', never '1.23457e+06'
        elif isinstance(item, int):
            item = str(item)
        if isinstance(item, str) and item.strip():
            out.append(item.strip())
    return out


def normalize_messages(messages, where: str) -> list[dict]:
    """A conversation in the HF chat format, checked and reduced to {role, content: [text and image parts]}.

    Content may be a string or a list of parts; Arrow gives every part every key (`text: None` on an image part),
    so parts are rebuilt from their type. The last turn must be an assistant's: a trailing user turn would
    teach nothing and would be asked in evaluation with no gold answer."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: messages are not valid JSON ({error.msg}).") from None
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} turns.")
    turns = []
    for n, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise UserError(f"{where}: turn {n} must be {{role, content}} with role one of {', '.join(ROLES)}.")
        content = turn.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise UserError(
                f"{where}: turn {n} content must be text or a list of parts, got {type(content).__name__} "
                f"{json.dumps(content, default=str)[:80]}."
            )
        clean = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                clean.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                clean.append({"type": "text", "text": part["text"]})
            else:
                raise UserError(f"{where}: turn {n} has a part that is neither text nor image: {part!r}.")
        if turn["role"] != "user" and any(p["type"] == "image" for p in clean):
            raise UserError(f"{where}: turn {n} ({turn['role']}) holds an image; only user turns may.")
        if turn["role"] == "assistant" and not "".join(p["text"] for p in clean).strip():
            raise UserError(f"{where}: turn {n} is an empty assistant turn; there is nothing to train on.")
        turns.append({"role": turn["role"], "content": clean})
    if turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation ends with a {turns[-1]['role']} turn; end it with the answer.")
    return turns


def last_exchange(messages: list[dict]) -> tuple[str, str]:
    """(last user text, last assistant text): what a conversation's evaluation asks and expects."""

    def text(turn):
        return " ".join(p["text"] for p in turn["content"] if p["type"] == "text").strip()

    users = [turn for turn in messages if turn["role"] == "user"]
    return (text(users[-1]) if users else ""), text(messages[-1])
