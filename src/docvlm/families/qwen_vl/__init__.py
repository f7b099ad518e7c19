"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ChatML turns closed by <|im_end|>, pages at their own
resolution within a pixel budget (each 28 x 28 px, 32 x 32 for Qwen3-VL, is one image token), M-RoPE positions
computed by the model's own code from the processor's `image_grid_thw`. Its tower takes every patch of the batch with
its grid at once, positionally: it runs without grad, but whole, and the feature cache (keyed on whole pages of one
size) does not serve it. It has no separate connector module for docvlm's connector patches."""

from __future__ import annotations

from docvlm.families.base import Family
from docvlm.families.qwen_vl.processor import STOCK_PROCESSORS, load_processor
from docvlm.families.sized_memory import SIZED_MEMORY_MODEL

# The stock processor class of each model type (what an image-only twin is named after, docvlm.families.qwen_vl.
# processor).
PROCESSOR_OF = dict(zip(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), STOCK_PROCESSORS, strict=True))


class QwenVL(Family):
    name = "Qwen-VL"
    memory_model = SIZED_MEMORY_MODEL  # counted from the architecture's sizes
    model_types = tuple(PROCESSOR_OF)
    processor_classes = STOCK_PROCESSORS
    end_of_turn = "<|im_end|>"
    why_not = (
        "its vision tower takes all patches with their grid at once and it has no separate connector; its processor "
        "sizes pages by pixel count (image_min_pixels / image_max_pixels), not by edge"
    )
    processor_options = frozenset({"image_min_pixels", "image_max_pixels"})
    smaller_pages = "lower image_max_pixels"
    frozen_tower = True

    def load_processor(self, path: str, revision: str | None, model_type: str):
        return load_processor(path, revision, PROCESSOR_OF[model_type])

    def configure_processor(self, processor, model_args) -> None:
        """The recipe's page budget in pixels: the processor keeps each page's aspect ratio and resizes it to a
        multiple of its patch grid with an area between the two (its own bounds where the recipe has none)."""
        image_processor = processor.image_processor
        size = dict(image_processor.size)
        if model_args.image_min_pixels is not None:
            size["shortest_edge"] = model_args.image_min_pixels  # transformers' name for the minimum area
        if model_args.image_max_pixels is not None:
            size["longest_edge"] = model_args.image_max_pixels  # and for the maximum area
        image_processor.size = size
        for bound, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if getattr(image_processor, bound, None) is not None:  # processors that also keep the bounds as these
                setattr(image_processor, bound, size[key])


QWEN_VL = QwenVL()
