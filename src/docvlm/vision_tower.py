"""The frozen vision tower without an autograd graph, a few pages at a time: a memory and speed switch that applies
to every family whose tower docvlm can find (docvlm.families says which families allow it)."""

from __future__ import annotations

import torch

from docvlm.errors import UserError
from docvlm.vision_cache import cached_features, store_features

VISION_TOWER_NAMES = ("vision_model", "vision_tower", "visual")  # what transformers' VLMs call their encoder


def vision_tower(model):
    """The model's vision encoder (`model.vision_model`, `model.vision_tower`, `model.visual`), or None."""
    for owner in (getattr(model, "model", None), model):
        for name in VISION_TOWER_NAMES:
            tower = getattr(owner, name, None)
            if isinstance(tower, torch.nn.Module):
                return tower
    return None


def keeps_all_outputs(kwargs: dict) -> bool:
    """Whether a tower call asks for its hidden states or attentions too: such calls are passed through whole."""
    return bool(kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))


def frozen_vision_without_grad(model, pages_per_chunk: int = 0, cache=None) -> bool:
    """Run the vision tower under no_grad whenever none of its weights is trainable, `pages_per_chunk` pages at a
    time (0: all at once), or, with a `cache` (docvlm.vision_cache), read each page's features from it; returns
    whether the model has a vision tower to patch. A trained tower with a cache is refused at its first call.

    Gradient checkpointing makes transformers call `enable_input_require_grads`, which marks the output of every
    input-embedding layer as requiring grad, the vision tower's patch embeddings included. A frozen tower then
    builds a full autograd graph: its layers are checkpointed, recomputed and back-propagated in every step
    (~3x its forward FLOPs on ~3,800 patches a page) to produce gradients that no trainable weight receives.
    The LoRA gradients are the same either way. A recipe that adapts the tower (its LoRA targets reach into
    it) is left alone, since the check runs at every call.

    Pages never interact in the tower, so running it a few pages at a time changes no output; it bounds the
    tower's short-lived activations (docs/benchmarks.md), which otherwise stay cached by the CUDA
    allocator in blocks that later, differently sized tensors cannot reuse.
    """
    tower = vision_tower(model)
    if tower is None:
        return False
    original = tower.forward
    patch_size = getattr(getattr(tower, "config", None), "patch_size", None)

    def in_chunks(pixel_values=None, patch_attention_mask=None, **kwargs):
        pages = 0 if pixel_values is None else pixel_values.shape[0]
        if not pages_per_chunk or pages <= pages_per_chunk or keeps_all_outputs(kwargs):
            return original(pixel_values=pixel_values, patch_attention_mask=patch_attention_mask, **kwargs)
        outputs = [
            original(
                pixel_values=pixel_values[start : start + pages_per_chunk],
                patch_attention_mask=None
                if patch_attention_mask is None
                else patch_attention_mask[start : start + pages_per_chunk],
                **kwargs,
            )
            for start in range(0, pages, pages_per_chunk)
        ]
        output = outputs[0]
        output.last_hidden_state = torch.cat([chunk.last_hidden_state for chunk in outputs])
        return output

    def forward(*args, **kwargs):
        frozen = not any(p.requires_grad for p in tower.parameters())
        if cache is not None and (torch.is_grad_enabled() or cache.filling):
            if not frozen:
                raise UserError(
                    "vision_feature_cache is on, but the vision tower is trained (its LoRA targets or "
                    "modules_to_save reach into it): its features change every step. Keep the tower out of "
                    "lora_target_regex / lora_target_modules, or set vision_feature_cache: off."
                )
            if not args and not keeps_all_outputs(kwargs):
                use = store_features if cache.filling else cached_features
                with torch.no_grad():
                    return use(in_chunks, cache, patch_size=patch_size, **kwargs)
        if torch.is_grad_enabled() and frozen:
            with torch.no_grad():
                if args:  # positional calls are passed through whole
                    return original(*args, **kwargs)
                return in_chunks(**kwargs)
        return original(*args, **kwargs)

    tower.forward = forward
    return True
