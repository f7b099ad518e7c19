"""The launch mode accelerate set up (one process, DDP, DeepSpeed ZeRO or FSDP), from the variables `accelerate
launch` exports (the same ones transformers' TrainingArguments reads), so that it is known before any model or
Trainer exists; and building a model whole in a process where ZeRO-3 would partition it."""

from __future__ import annotations

import os
from contextlib import contextmanager

from docvlm.errors import UserError

SINGLE, DDP, ZERO2, ZERO3, FSDP = "one process", "DDP", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3", "FSDP"
WEIGHT_SHARDING = (ZERO3, FSDP)  # modes that split the (4-bit) weights across processes


def _on(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launch_mode() -> str:
    """The mode this process was launched in, from the variables `accelerate launch` exports."""
    if _on("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") not in ("", "none"):
            stage = str(_zero_stage_in(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]))
        return ZERO3 if stage == "3" else ZERO2
    if _on("ACCELERATE_USE_FSDP"):
        return FSDP
    return DDP if int(os.environ.get("WORLD_SIZE", "1")) > 1 else SINGLE


def _zero_config_in(path: str) -> dict:
    """The `zero_optimization` section of a DeepSpeed JSON config (accelerate's deepspeed_config_file)."""
    import json

    try:
        return dict(json.loads(open(path).read()).get("zero_optimization", {}))
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read the DeepSpeed config {path}: {err}") from None


def _zero_stage_in(path: str) -> int:
    return int(_zero_config_in(path).get("stage", 0))


@contextmanager
def whole_model_loading():
    """Build or load a model whole in this process although ZeRO-3 is on: for the offline fixture (built once,
    then loaded like any checkpoint) and for the evaluation after training, when every process loads the saved
    adapter on its own GPU.

    transformers partitions every model created while a ZeRO-3 config is registered (deepspeed.zero.Init), and
    offers no switch to build one model outside it, so the registration is set aside for the duration.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered
