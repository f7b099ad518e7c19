"""The launch mode accelerate set up (one process, DDP, DeepSpeed ZeRO or FSDP) and what each mode needs from a
recipe, settled before the model loads so that users never have to know.

`accelerate launch` describes the mode to the processes in environment variables (the same ones transformers'
TrainingArguments reads), so the mode is known before any model or Trainer exists.
"""

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


def prepare_recipe_for(mode: str, model_args, training_args) -> list[str]:
    """Set what `mode` needs on the parsed recipe, or refuse what cannot work in it; returns one line per change.

    Under ZeRO-3 the 4-bit weights are split across processes like any other tensor: their storage dtype must be
    the compute dtype, because DeepSpeed casts and flattens parameters to it (uint8 storage cannot be flattened
    with the rest).
    """
    changes = []
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if mode == FSDP and quantized:
        # Measured on two GPUs (docs/distributed.md): FSDP2 trains the 4-bit flagship model without an error, but
        # not the model it loaded (a different first loss from DDP and ZeRO on the same batch), and the adapter it
        # saves does not reproduce the trained model. A run that looks fine and is not is worse than a refusal.
        raise UserError(
            "FSDP with a 4-bit model (load_in_4bit) is refused: on two GPUs it trained without an error but computed "
            "a different loss from DDP and ZeRO on the same batch, and its saved adapter did not reproduce the "
            "trained model (docs/distributed.md). Use accelerate_configs/deepspeed_zero3.yaml to split the 4-bit "
            "weights across GPUs, or multi_gpu.yaml (fastest) when the model fits one GPU."
        )
    if mode in WEIGHT_SHARDING and model_args.load_in_8bit:
        raise UserError(f"load_in_8bit is not supported under {mode}: use load_in_4bit (QLoRA) or multi_gpu.yaml.")
    if mode in WEIGHT_SHARDING and quantized:
        from docvlm.modeling import DTYPES, training_dtype

        compute_dtype = training_dtype(training_args)
        compute = str(compute_dtype).removeprefix("torch.")
        storage = model_args.bnb_4bit_quant_storage
        if storage in (None, "auto"):
            model_args.bnb_4bit_quant_storage = compute
            changes.append(f"bnb_4bit_quant_storage: {compute} ({mode} splits the 4-bit weights in the compute dtype)")
        elif DTYPES.get(storage) != compute_dtype:
            raise UserError(
                f"bnb_4bit_quant_storage is {storage}, but under {mode} the 4-bit weights must be stored in the "
                f"training dtype ({compute}): remove the key from the recipe (docvlm sets it) or set it to {compute}."
            )
    if mode in WEIGHT_SHARDING and training_args.vision_feature_cache != "off":
        # no process holds the whole tower, so none can name (hash) the tower that computed a cached page; the
        # shipped recipes keep the cache on for one GPU and DDP, so it is turned off here, and said
        training_args.vision_feature_cache = "off"
        changes.append(f"vision_feature_cache: off ({mode} splits the vision tower's weights across processes)")
    if mode != SINGLE and training_args.vision_tower_offload:
        # DDP refuses a model on two kinds of device and broadcasts its buffers from the GPU; the sharding modes
        # have no cache to offload for. The shipped recipes offload on one GPU, so it is turned off here, and said.
        training_args.vision_tower_offload = False
        changes.append(f"vision_tower_offload: false ({mode} needs every weight of the model on the GPU)")
    if mode in (ZERO3, FSDP) and training_args.lora_lean_forward:
        training_args.lora_lean_forward = False
        changes.append(f"lora_lean_forward: false (not tested under {mode}, whose hooks gather the adapter's shards)")
    if mode in (ZERO3, FSDP) and training_args.fused_rms_norms:
        training_args.fused_rms_norms = False
        changes.append(f"fused_rms_norms: false (not tested under {mode}, whose hooks gather the norms' shards)")
    if mode == ZERO3:
        # without it the Trainer saves DeepSpeed's shards instead, and the run folder holds no adapter
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if config_file not in ("", "none"):
            if not _zero_config_in(config_file).get("stage3_gather_16bit_weights_on_model_save", False):
                raise UserError(
                    f"The DeepSpeed config {config_file} runs ZeRO-3 without "
                    '"stage3_gather_16bit_weights_on_model_save": true in zero_optimization, so it would save no '
                    "adapter: add it."
                )
        elif not _on("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"):
            raise UserError(
                "DeepSpeed ZeRO-3 without zero3_save_16bit_model: true would save no adapter. Use "
                "accelerate_configs/deepspeed_zero3.yaml, or set zero3_save_16bit_model: true in your config."
            )
    return changes


def refuse_unsupported_switches(mode: str, training_args) -> None:
    """Stop at start-up when a recipe switch cannot do what it says under `mode`.

    docvlm's own switches (vision_tower_no_grad and _pages, connector_checkpointing, connector_lean_activations,
    loss_logits) were measured to give the same losses on or off under DDP, ZeRO-2 and ZeRO-3 (tests/
    test_distributed.py) and under FSDP (docs/distributed.md); what remains are combinations with the modes' own
    settings."""
    if mode in (ZERO2, ZERO3) and not training_args.bf16:
        precision = "fp16" if training_args.fp16 else "fp32"
        raise UserError(
            f"precision is {precision} (the recipe's `precision`, resolved for this GPU), but docvlm verified "
            f"{mode} with QLoRA in bf16 only. Use a GPU with bf16 (A100, H100, L4, RTX 30xx and newer) with "
            "precision: bf16, or accelerate_configs/multi_gpu.yaml, which supports every precision."
        )
    if mode != SINGLE and training_args.compile_text_layers:
        raise UserError(
            f"compile_text_layers is true, but docvlm measured it in one process only, not under {mode} (whose "
            "hooks gather, shard or reduce the weights the compiled layers read). Set compile_text_layers: false, "
            "or launch one process."
        )
    if mode == FSDP and _on("FSDP_ACTIVATION_CHECKPOINTING") and training_args.gradient_checkpointing:
        raise UserError(
            "gradient_checkpointing is true and the FSDP config also sets fsdp_activation_checkpointing: both "
            "would recompute the same layers. Set fsdp_activation_checkpointing: false (accelerate_configs/"
            "fsdp_qlora.yaml does) and keep the recipe's gradient_checkpointing."
        )


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
