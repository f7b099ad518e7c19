"""The Idefics3 family (SmolVLM): Idefics2's chat format, a tower called with keywords (so it runs without grad a
few pages at a time, and the feature cache serves it), and a connector that is a pixel shuffle and one projection,
which none of docvlm's connector patches fit."""

from __future__ import annotations

from docvlm.families.base import Family


class Idefics3(Family):
    name = "Idefics3 / SmolVLM"
    model_types = ("idefics3", "smolvlm")
    processor_classes = ("Idefics3Processor", "SmolVLMProcessor")
    end_of_turn = "<end_of_utterance>"
    why_not = (
        "its connector is a pixel shuffle and one projection, not Idefics2's perceiver resampler, and its processor "
        "sizes pages in its own way"
    )
    processor_options = frozenset({"do_image_splitting"})
    frozen_tower = True
    tower_in_chunks = True
    feature_cache = True

    def configure_processor(self, processor, model_args) -> None:
        processor.image_processor.do_image_splitting = model_args.do_image_splitting


IDEFICS3 = Idefics3()
