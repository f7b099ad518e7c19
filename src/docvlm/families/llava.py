"""The LLaVA family (LLaVA-1.5, LLaVA-NeXT): a tower called positionally (run without grad, but whole) and a projector;
its chat template leaves the answer's end of sequence to the training code."""

from __future__ import annotations

from docvlm.families.base import Family
from docvlm.families.sized_memory import SIZED_MEMORY_MODEL

POSITIONAL_TOWER = (
    "its vision tower is called positionally (run without grad, but whole) and its projector is not Idefics2's "
    "connector"
)


class Llava(Family):
    name = "LLaVA"
    memory_model = SIZED_MEMORY_MODEL  # counted from the architecture's sizes
    model_types = ("llava", "llava_next")
    processor_classes = ("LlavaProcessor", "LlavaNextProcessor")
    why_not = POSITIONAL_TOWER
    frozen_tower = True

    def training_turns(self, turns: list[dict], tokenizer) -> list[dict]:
        """Each answer closed by the end of sequence, which LLaVA-1.5's template does not write ("ASSISTANT: <answer>
        "): a model never taught to say it would never stop."""
        end = tokenizer.convert_ids_to_tokens(self.end_of_turn_id(tokenizer))
        closed = []
        for turn in turns:
            if turn["role"] == "assistant":
                parts = list(turn["content"])
                last = max(i for i, part in enumerate(parts) if part["type"] == "text")
                parts[last] = {"type": "text", "text": parts[last]["text"] + end}
                turn = {**turn, "content": parts}
            closed.append(turn)
        return closed


LLAVA = Llava()
