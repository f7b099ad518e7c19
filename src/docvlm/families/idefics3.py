"""The Idefics3 family (SmolVLM, Granite-Docling): Idefics2's image format, a tower called with keywords (so it
runs without grad a few pages at a time, and the feature cache serves it), and a connector that is a pixel shuffle and
one projection, which none of docvlm's connector patches fit. SmolVLM closes a turn with <end_of_utterance>,
Granite-Docling with Granite's <|end_of_text|>: the model's chat template tells which."""

from __future__ import annotations

from docvlm.families.base import Family
from docvlm.families.sized_memory import SIZED_MEMORY_MODEL


class Idefics3(Family):
    name = "Idefics3 / SmolVLM"
    memory_model = SIZED_MEMORY_MODEL  # counted from the architecture's sizes
    model_types = ("idefics3", "smolvlm")
    processor_classes = ("Idefics3Processor", "SmolVLMProcessor")
    end_of_turn = (
        "<end_of_utterance>",
        "<|end_of_text|>",
    )  # SmolVLM's; Granite-Docling's template closes with Granite's
    why_not = (
        "its connector is a pixel shuffle and one projection, not Idefics2's perceiver resampler, and its processor "
        "sizes pages in its own way"
    )
    processor_options = frozenset({"do_image_splitting", "image_longest_edge"})
    smaller_pages = "lower image_longest_edge"
    frozen_tower = True
    tower_in_chunks = True
    feature_cache = True

    def configure_processor(self, processor, model_args) -> None:
        """Pages split into crops or not; with splitting, the recipe's longest edge bounds how many crops a page makes
        (the processor rounds it up to whole crops)."""
        image_processor = processor.image_processor
        image_processor.do_image_splitting = model_args.do_image_splitting
        if model_args.image_longest_edge is not None:
            image_processor.size = {**dict(image_processor.size), "longest_edge": model_args.image_longest_edge}


IDEFICS3 = Idefics3()
