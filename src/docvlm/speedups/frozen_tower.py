"""`vision_tower_no_grad` (with `vision_tower_pages`): the frozen vision tower run without an autograd graph, a few
pages at a time, for every family whose tower docvlm can find; the feature cache reads and stores pages through the
same patched forward (docvlm.speedups.feature_cache)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from docvlm.errors import UserError
from docvlm.speedups.base import LOADED, Setting, Switch
from docvlm.speedups.feature_store import cached_features, store_features
from docvlm.speedups.model_parts import vision_tower
from docvlm.speedups.tower_offload import bring_back_for

# A tower whose features change every step cannot be served from a cache (said when the cache meets one).
TRAINED_TOWER = (
    "{setting}, but the vision tower is trained (its LoRA targets or modules_to_save reach into it): its features "
    "change every step. Keep the tower out of lora_target_regex / lora_target_modules, or turn the cache off."
)


def keeps_all_outputs(kwargs: dict) -> bool:
    """Whether a tower call asks for its hidden states or attentions too: such calls are passed through whole."""
    return bool(kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))


def frozen_vision_without_grad(model, pages_per_chunk: int = 0, cache=None) -> bool:
    """Run the vision tower under no_grad whenever none of its weights is trainable, `pages_per_chunk` pages at a
    time (0: all at once), or, with a `cache` (docvlm.speedups.feature_cache), read each page's features from it;
    returns whether the model has a vision tower to patch. A trained tower with a cache is refused at its first call.

    Gradient checkpointing makes transformers call `enable_input_require_grads`, which marks the output of every
    input-embedding layer as requiring grad, the vision tower's patch embeddings included. A frozen tower then
    builds a full autograd graph: its layers are checkpointed, recomputed and back-propagated in every step (about
    three times its forward pass, on every patch of every page) to produce gradients that no trainable weight
    receives.
    The LoRA gradients are the same either way. A recipe that adapts the tower (its LoRA targets reach into
    it) is left alone, since the check runs at every call.

    Pages never interact in the tower, so running it a few pages at a time changes no output; it bounds the
    tower's short-lived activations (docs/benchmarks.md), which otherwise stay cached by the CUDA
    allocator in blocks that later, differently sized tensors cannot reuse.
    """
    tower = vision_tower(model)
    if tower is None:
        return False
    tower_forward = tower.forward
    patch_size = getattr(getattr(tower, "config", None), "patch_size", None)

    def original(*args, **kwargs):  # every path that runs the tower: an offloaded one comes back first
        bring_back_for(tower, args[0] if args else kwargs.get("pixel_values"))
        if torch.is_grad_enabled():
            return tower_forward(*args, **kwargs)
        with checkpointing_paused(tower):
            return tower_forward(*args, **kwargs)

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
        if cache is not None and (torch.is_grad_enabled() or cache.filling or cache.serving):
            if not frozen and not cache.serving:  # generation trains nothing: its weights are the key's
                raise UserError(TRAINED_TOWER.format(setting="the feature cache is on"))
            if not args and not keeps_all_outputs(kwargs):
                use = store_features if cache.filling else cached_features
                with torch.no_grad():
                    return use(in_chunks, cache, patch_size=patch_size, **kwargs)
        if frozen or not torch.is_grad_enabled():  # generation's pages too: a few at a time
            with torch.no_grad():
                if args:  # positional calls are passed through whole
                    return original(*args, **kwargs)
                return in_chunks(**kwargs)
        return original(*args, **kwargs)

    tower.forward = forward
    return True


@contextmanager
def checkpointing_paused(module: torch.nn.Module):
    """Run `module` without gradient checkpointing in its layers, restored on exit.

    Without grad there is nothing to recompute, but transformers 5.17 still checkpoints a layer in training mode
    (5.24 no longer does): reentrant checkpointing, the 8B recipes' form, then warns that no input requires grad
    and gradients will be None, which for a frozen tower is true and harmless."""
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def _check(args, model_args) -> None:
    if args.vision_tower_pages < 0:
        raise ValueError(f"vision_tower_pages must be 0 (all at once) or more, got {args.vision_tower_pages}.")


SWITCH = Switch(
    settings=(
        Setting(
            "vision_tower_no_grad",
            bool,
            True,
            "Run a frozen vision tower without an autograd graph, which gradient checkpointing would otherwise "
            "recompute and back-propagate through for nothing. Same gradients.",
        ),
    ),
    is_on=lambda args: bool(args.vision_tower_no_grad),
    lacks="vision tower to skip",
    family_hook="frozen_tower",
    after=("vision_feature_cache",),  # its forward reads the cache, made first
    apply={LOADED: lambda run: frozen_vision_without_grad(run.model, run.args.vision_tower_pages, run.cache)},
    in_evaluation=True,
)
# A few pages at a time: a setting of the frozen tower's forward, offered only where the tower takes its pages by
# keyword (a positional call is run whole).
IN_CHUNKS = Switch(
    settings=(
        Setting(
            "vision_tower_pages",
            int,
            0,
            "With vision_tower_no_grad, run the frozen tower this many pages at a time (0: all at once): bounds its "
            "short-lived activations. Same outputs.",
        ),
    ),
    is_on=lambda args: bool(args.vision_tower_no_grad and args.vision_tower_pages),
    off="0",
    family_hook="tower_in_chunks",
    check=_check,
)
