"""The parts of a model the switches find by name, whatever its family: its vision tower."""

from __future__ import annotations

import torch

VISION_TOWER_NAMES = ("vision_model", "vision_tower", "visual")  # what transformers' VLMs call their encoder


def vision_tower(model):
    """The model's vision encoder (`model.vision_model`, `model.vision_tower`, `model.visual`), or None."""
    for owner in (getattr(model, "model", None), model):
        for name in VISION_TOWER_NAMES:
            tower = getattr(owner, name, None)
            if isinstance(tower, torch.nn.Module):
                return tower
    return None
