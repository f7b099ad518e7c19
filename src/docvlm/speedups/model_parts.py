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


TEXT_MODEL_NAMES = ("text_model", "language_model")  # what transformers' VLMs call their decoder


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's layers, in order (`model.model.text_model.layers`, `...language_model.layers`), through a peft
    wrapper; empty where there are none to find."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner in (getattr(model, "model", None), model):
        for name in TEXT_MODEL_NAMES:
            layers = getattr(getattr(owner, name, None), "layers", None)
            if isinstance(layers, torch.nn.ModuleList):
                return list(layers)
    return []
