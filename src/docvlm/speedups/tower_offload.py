"""`vision_tower_offload`: the frozen tower's weights in CPU memory while the feature cache serves every training
page, for the connector's recompute to use their GPU memory."""

from __future__ import annotations

import torch

from docvlm.errors import UserError
from docvlm.modes import DDP, FSDP, ZERO2, ZERO3
from docvlm.speedups.base import LOADED, WITH_TRAINER, Setting, Switch
from docvlm.speedups.model_parts import vision_tower


class TowerOffload:
    """The frozen tower's weights in CPU memory while the feature cache holds every training page (recipe switch
    `vision_tower_offload`): the tower does not run then, so its weights only take GPU memory the connector's
    recompute could use. A page the cache misses brings them back (bring_back_for)."""

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


def offload_tower_while_cached(offload: TowerOffload, cache):
    """A TrainerCallback that offloads the frozen tower once training starts (after accelerate has placed the
    model) when the cache holds every training page, and brings it back when training ends, before evaluation
    generates from pages the cache never saw."""
    from transformers import TrainerCallback

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


def _check_tower(run) -> bool:
    """Made on the loaded model, so that a tower it cannot move is refused before the cache is filled."""
    tower = vision_tower(run.model)
    if run.cache is None or tower is None:
        return False
    TowerOffload(tower)
    return True


def _offload_once_trained(run) -> bool:
    offload = getattr(vision_tower(run.model), TowerOffload.ATTRIBUTE)
    run.callbacks.append(offload_tower_while_cached(offload, run.cache))
    return True


def _plan(terms) -> None:
    terms.tower_on_gpu = False  # its weights wait in CPU memory while the cache serves every page


EVERY_WEIGHT = "{mode} needs every weight of the model on the GPU"
SWITCH = Switch(
    settings=(
        Setting(
            "vision_tower_offload",
            bool,
            False,
            "While the vision feature cache holds every training page, keep the frozen tower's weights in CPU memory "
            "(their GPU memory goes to the connector's recompute); a page the cache misses brings them "
            "back. Needs vision_feature_cache; turned off, with a line that says so, on the CPU and when several "
            "processes train.",
        ),
    ),
    is_on=lambda args: bool(args.vision_tower_offload),
    lacks="vision feature cache to wait for",
    after=("vision_feature_cache",),  # it moves the tower once the cache is filled
    requires=("vision_feature_cache", "the tower can wait in CPU memory only while the cache gives every page"),
    turned_off_in={DDP: EVERY_WEIGHT, ZERO2: EVERY_WEIGHT, ZERO3: EVERY_WEIGHT, FSDP: EVERY_WEIGHT},
    without_gpu=(False, "it has nothing to move"),
    apply={LOADED: _check_tower, WITH_TRAINER: _offload_once_trained},
    plan=_plan,
)
