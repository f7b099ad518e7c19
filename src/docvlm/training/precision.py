"""The dtypes of a run: a recipe's dtype names, the training precision's compute dtype, autocast around a forward."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from docvlm.errors import UserError
from docvlm.recipe.schema import TrainConfig

DTYPES = {  # the dtype names a recipe may use
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def _precision_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def training_dtype(training_args: TrainConfig) -> torch.dtype:
    return _precision_dtype(training_args.bf16, training_args.fp16)


def inference_dtype() -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU: what precision 'auto' trains in."""
    from docvlm.recipe.schema import resolve_precision

    return _precision_dtype(*resolve_precision("auto"))


def resolve_dtype(name: str | None, auto: torch.dtype) -> torch.dtype:
    """A recipe dtype ('auto', 'bfloat16', 'fp16'...) as a torch dtype; 'auto' means `auto`."""
    if name in (None, "auto"):
        return auto
    if name not in DTYPES:
        raise UserError(f"Unknown dtype '{name}'; use auto, bfloat16, float16 or float32.")
    return DTYPES[name]


def autocast_for(model):
    """Autocast to the base weights' half precision on a GPU, for use outside the Trainer.

    Trainable weights are fp32 (see keep_trainable_fp32) while the base is bf16/fp16: the Trainer runs under
    autocast, but generation and plain forward calls need it too, or matmuls mix dtypes."""
    device = next(model.parameters()).device
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16 if torch.float16 in dtypes else None
    if device.type != "cuda" or half is None:
        return nullcontext()
    return torch.autocast("cuda", dtype=half)
