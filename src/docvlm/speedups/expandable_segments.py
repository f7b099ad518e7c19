"""`cuda_expandable_segments`: the CUDA allocator grows its memory segments in place, so that batches of varying
shapes leave no reserved-but-unused gaps; process-wide, set before the model takes its memory."""

from __future__ import annotations

import os

from docvlm.speedups.base import BEFORE_LOADING, Setting, Switch


def use_expandable_segments() -> bool:
    """Let PyTorch's CUDA caching allocator grow memory segments in place; returns whether it was switched on.

    With fixed-size segments, batches whose shapes vary (questions of different lengths, pages of different sizes)
    leave reserved-but-unused gaps, enough to decide whether a small card fits (docs/benchmarks.md). The usual
    switch, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, must be set before CUDA starts, which happens before
    a recipe is read (precision checks query the GPU), so it is set here at run time, as torch allows, before the
    model is loaded. A setting the user made in the environment wins.
    """
    import torch

    if not torch.cuda.is_available():
        return False
    configured = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments" in configured:
        return "expandable_segments:true" in configured.replace(" ", "").lower()
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; older: the cuda one
    (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    return True


SWITCH = Switch(
    settings=(
        Setting(
            "cuda_expandable_segments",
            bool,
            False,
            "Let the CUDA allocator grow memory segments in place, so that batches of varying shapes leave no "
            "reserved-but-unused gaps. Off the GPU: no effect.",
        ),
    ),
    is_on=lambda args: bool(args.cuda_expandable_segments),
    apply={BEFORE_LOADING: lambda run: use_expandable_segments() or True},
)
