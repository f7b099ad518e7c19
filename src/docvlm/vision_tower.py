"""The frozen vision tower without an autograd graph, a few pages at a time: a memory and speed switch that applies
to every family whose tower docvlm can find (docvlm.families says which families allow it)."""

from __future__ import annotations

from contextlib import contextmanager

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


class TowerOffload:
    """The frozen tower's weights in CPU memory while the feature cache holds every training page (recipe switch
    `vision_tower_offload`): the tower does not run then, so its weights (0.78 GiB for the 8B flagship, in bf16)
    only take GPU memory the connector's recompute could use. A page the cache misses brings them back
    (bring_back_for)."""

    ATTRIBUTE = "docvlm_offload"  # where the tower's forward finds it

    def __init__(self, tower: torch.nn.Module):
        if any(not p.is_floating_point() for p in tower.parameters()):
            raise UserError(
                "vision_tower_offload moves a half-precision tower, but this one is quantized: keep it out of "
                "4-bit with bnb_4bit_skip_modules (e.g. [model.vision_model]), or set vision_tower_offload: false."
            )
        self.tower, self.home = tower, None
        setattr(tower, self.ATTRIBUTE, self)

    @property
    def offloaded(self) -> bool:
        return self.home is not None

    def offload(self) -> int:
        """Move the weights to CPU memory and give their GPU memory back; returns the bytes moved."""
        weights = list(self.tower.parameters()) + list(self.tower.buffers())
        self.home = weights[0].device
        self.tower.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return sum(t.numel() * t.element_size() for t in weights)

    def restore(self) -> None:
        if self.home is not None:
            self.tower.to(self.home)
            self.home = None


def bring_back_for(tower: torch.nn.Module, pixel_values) -> None:
    """Before an offloaded tower computes: its weights back where they were, said once (the page was not cached)."""
    offload = getattr(tower, TowerOffload.ATTRIBUTE, None)
    if offload is None or not offload.offloaded or not isinstance(pixel_values, torch.Tensor):
        return
    print(
        "vision_tower_offload: the vision tower has pages to compute that the feature cache does not hold (a page "
        f"it missed, or an evaluation), so it is back on {offload.home} for the rest of training.",
        flush=True,
    )
    offload.restore()


def offload_tower_while_cached(model, cache):
    """A TrainerCallback that offloads the frozen tower once training starts (after accelerate has placed the
    model) when the cache holds every training page, and brings it back when training ends, before evaluation
    generates from pages the cache never saw."""
    from transformers import TrainerCallback

    tower = vision_tower(model)
    offload = TowerOffload(tower)

    class OffloadCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if cache.not_stored:
                print(
                    f"vision_tower_offload: {cache.not_stored} pages did not fit the feature cache "
                    "(vision_feature_cache_max_gb), so the vision tower stays on the GPU to compute them.",
                    flush=True,
                )
                return
            moved = offload.offload()
            print(f"vision_tower_offload: the vision tower ({moved / 2**30:.2f} GiB) waits in CPU memory.", flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            offload.restore()

    return OffloadCallback()
