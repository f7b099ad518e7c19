"""What a launch needs from a recipe, settled before the data and the model load so that users never have to know:
ZeRO-3's storage dtype for 4-bit weights and its saving, FSDP's refusal of 4-bit models, ZeRO's precision, one GPU
per process, a Hub push that can happen. The speed switches say for themselves what they do in each launch mode
and without a GPU (docvlm.speedups)."""

from __future__ import annotations

import os

from docvlm import speedups
from docvlm.errors import UserError
from docvlm.modes import FSDP, WEIGHT_SHARDING, ZERO2, ZERO3, _on, _zero_config_in


def settle_for_launch(mode: str, recipe) -> list[str]:
    """Set or refuse what launch `mode` and this machine decide in the recipe (docvlm.modes); returns one line per
    change, said at the start of the run."""
    _, model_args, training_args, eval_args = recipe
    changes = prepare_recipe_for(mode, model_args, training_args)
    refuse_unsupported_settings(mode, training_args)
    changes += speedups.settle(mode, training_args, training_args.device.type)
    refuse_scores_without_whole_model(mode, training_args, eval_args)
    check_one_gpu_per_process()
    check_push(training_args)
    training_args.do_train = True  # recipe.yaml records the run as it is: transformers' flag is never read here
    return changes


def check_one_gpu_per_process() -> None:
    """One process that sees several GPUs makes Trainer fall back to nn.DataParallel, which TRL refuses only once the
    model has loaded (minutes, for an 8B model); say what to do before anything loads."""
    import torch
    from accelerate import PartialState

    gpus = torch.cuda.device_count()
    if gpus > 1 and PartialState().num_processes == 1:
        raise UserError(
            f"{gpus} GPUs are visible to this single process. Train on all of them with `accelerate launch "
            f"--config_file accelerate_configs/multi_gpu.yaml --num_processes {gpus} -m docvlm.train ...` (or `make "
            f"train ACCELERATE_CONFIG=multi_gpu NUM_GPUS={gpus}`), or on one with CUDA_VISIBLE_DEVICES=0."
        )


def check_push(training_args) -> None:
    """Fail before training, not after, when a Hub push is asked for but cannot happen."""
    if not training_args.push_to_hub:
        return
    from huggingface_hub import get_token

    if not training_args.hub_model_id:
        raise UserError("push_to_hub is true but hub_model_id is not set: name the repo, e.g. you/docvqa-adapter.")
    if get_token() is None:
        raise UserError("push_to_hub is true but no Hub token was found: set HF_TOKEN or run `hf auth login`.")


def refuse_scores_without_whole_model(mode: str, training_args, eval_args) -> None:
    """Answering held-out questions during training needs the whole model on each process, which ZeRO-3 and FSDP
    shard; the evaluation after training reloads it whole instead."""
    if mode in WEIGHT_SHARDING and training_args.eval_strategy != "no" and eval_args.eval_anls_samples > 0:
        raise UserError(
            f"eval_anls_samples is {eval_args.eval_anls_samples} with eval_strategy {training_args.eval_strategy}, "
            f"but under {mode} no process holds the whole model to answer with during training. Set "
            "eval_anls_samples: 0 (the held-out loss only; the evaluation after training still reports ANLS), or "
            "launch with accelerate_configs/multi_gpu.yaml."
        )


def prepare_recipe_for(mode: str, model_args, training_args) -> list[str]:
    """Set what `mode` needs on the parsed recipe, or refuse what cannot work in it; returns one line per change.

    Under ZeRO-3 the 4-bit weights are split across processes like any other tensor: their storage dtype must be
    the compute dtype, because DeepSpeed casts and flattens parameters to it (uint8 storage cannot be flattened
    with the rest).
    """
    changes = []
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if mode == FSDP and quantized:
        # FSDP2 trains the 4-bit flagship model without an error, but not the model it loaded, and the adapter it
        # saves does not reproduce the trained model (docs/distributed.md): worse than a refusal.
        raise UserError(
            "FSDP with a 4-bit model (load_in_4bit) is refused: on two GPUs it trained without an error but computed "
            "a different loss from DDP and ZeRO on the same batch, and its saved adapter did not reproduce the "
            "trained model (docs/distributed.md). Use accelerate_configs/deepspeed_zero3.yaml to split the 4-bit "
            "weights across GPUs, or multi_gpu.yaml (fastest) when the model fits one GPU."
        )
    if mode in WEIGHT_SHARDING and model_args.load_in_8bit:
        raise UserError(f"load_in_8bit is not supported under {mode}: use load_in_4bit (QLoRA) or multi_gpu.yaml.")
    if mode in WEIGHT_SHARDING and quantized:
        from docvlm.training.precision import DTYPES, training_dtype

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


def refuse_unsupported_settings(mode: str, training_args) -> None:
    """Stop at start-up when the recipe's precision or checkpointing cannot work under `mode` (the speed switches
    refuse for themselves: docvlm.speedups)."""
    if mode in (ZERO2, ZERO3) and not training_args.bf16:
        precision = "fp16" if training_args.fp16 else "fp32"
        raise UserError(
            f"precision is {precision} (the recipe's `precision`, resolved for this GPU), but docvlm verified "
            f"{mode} with QLoRA in bf16 only. Use a GPU with bf16 (A100, H100, L4, RTX 30xx and newer) with "
            "precision: bf16, or accelerate_configs/multi_gpu.yaml, which supports every precision."
        )
    if mode == FSDP and _on("FSDP_ACTIVATION_CHECKPOINTING") and training_args.gradient_checkpointing:
        raise UserError(
            "gradient_checkpointing is true and the FSDP config also sets fsdp_activation_checkpointing: both "
            "would recompute the same layers. Set fsdp_activation_checkpointing: false (accelerate_configs/"
            "fsdp_qlora.yaml does) and keep the recipe's gradient_checkpointing."
        )
