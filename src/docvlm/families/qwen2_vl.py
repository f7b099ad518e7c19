"""The Qwen2-VL family (Qwen2-VL, Qwen2.5-VL): its tower is called positionally with a grid of patches per image, so
it runs without grad but whole; it has no separate connector."""

from __future__ import annotations

from docvlm.families.base import Family


class Qwen2VL(Family):
    name = "Qwen2-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    processor_classes = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
    end_of_turn = "<|im_end|>"
    why_not = (
        "its vision tower takes all patches with their grid at once and it has no separate connector; its processor "
        "sizes pages by pixel count (min_pixels / max_pixels), not by edge"
    )
    frozen_tower = True


QWEN2_VL = Qwen2VL()
