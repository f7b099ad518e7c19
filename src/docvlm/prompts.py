"""The turns a model sees before it answers, built one way for training and inference: an optional system turn,
then the user turn of the instruction, the page(s) and the question, or a conversation's turns up to its last answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from docvlm.conversations import normalize_messages
from docvlm.errors import UserError


@dataclass(frozen=True)
class Prompt:
    """What the recipe wraps every question in: an instruction before the page(s), and an optional system turn."""

    instruction: str = ""
    system: str | None = None

    @classmethod
    def of(cls, data_args) -> Prompt:
        return cls(data_args.instruction, data_args.system_prompt)


def user_message(instruction: str, question: str, pages: int = 1) -> dict:
    """The user turn, in the seed's order: instruction, page(s), question."""
    content = [{"type": "image"} for _ in range(pages)] + [{"type": "text", "text": question}]
    if instruction:
        content.insert(0, {"type": "text", "text": instruction})
    return {"role": "user", "content": content}


def text_message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def question_of(row: dict, where: str) -> str:
    """A question row's question, checked: non-empty text."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: the question is empty or not text. Check question_column.")
    return question


def prompt_messages(row: dict, prompt: Prompt, pages: int) -> list[dict]:
    """The turns the model sees before it answers (generation ends here); shared by training and inference.

    A question row becomes [system], user(instruction, pages, question). A conversation keeps its turns up to its
    last answer, with the instruction put first in its first user turn and the system text first."""
    if row.get("messages") is not None:
        turns = [dict(turn) for turn in normalize_messages(row["messages"], "Row")[:-1]]
        first_user = next((i for i, turn in enumerate(turns) if turn["role"] == "user"), None)
        if prompt.instruction and first_user is not None:
            turns[first_user] = {
                "role": "user",
                "content": [{"type": "text", "text": prompt.instruction}, *turns[first_user]["content"]],
            }
    else:
        turns = [user_message(prompt.instruction, row["question"], pages)]
    if prompt.system and turns[0]["role"] != "system":
        turns.insert(0, text_message("system", prompt.system))
    return turns


def special_tokens_for(tokenizer, texts: list[str]) -> dict:
    """Tokenizer arguments for chat-template texts: where the template already wrote the tokenizer's begin-of-sequence
    token (some families' templates do), none is added again, so that a text starts with one, as in the model's
    training."""
    bos = tokenizer.bos_token
    if bos and texts and all(text.startswith(bos) for text in texts):
        return {"add_special_tokens": False}
    return {}
