"""The Gemma 3 family (PaliGemma's successor for documents): chat turns closed by <end_of_turn>, each page resized to
one fixed square and pooled to a fixed number of tokens (256 for the real model), so there is no page budget to set.
Its processor marks the image tokens (token_type_ids), which the model attends to both ways in training. Its tower
is called with the whole batch at once (run without grad, but whole); its projector is not Idefics2's connector."""

from __future__ import annotations

from docvlm.families.base import Family
from docvlm.families.sized_memory import SIZED_MEMORY_MODEL


class Gemma3(Family):
    name = "Gemma 3"
    memory_model = SIZED_MEMORY_MODEL  # counted from the architecture's sizes
    model_types = ("gemma3",)
    processor_classes = ("Gemma3Processor",)
    end_of_turn = "<end_of_turn>"
    why_not = (
        "its tower is called with the whole batch at once (run without grad, but whole), its projector is not "
        "Idefics2's connector, and its processor resizes every page to one fixed square"
    )
    frozen_tower = True


GEMMA3 = Gemma3()
