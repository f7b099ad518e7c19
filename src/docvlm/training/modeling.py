"""Load the processor and the (4-bit) base model, describe the LoRA adapter, keep trainable weights fp32, and check
LoRA targets before anything loads. Nothing here is specific to one model family: the switches that patch a loaded
model are in docvlm.speedups, what they patch in the family modules (docvlm.families)."""

from __future__ import annotations

import torch

from docvlm.errors import UserError
from docvlm.families import family_of
from docvlm.fixtures import resolve
from docvlm.hub import check_source
from docvlm.recipe.schema import ModelArguments
from docvlm.training.precision import resolve_dtype


def model_path(args: ModelArguments) -> str:
    """The model to load: a Hub id or a local path (fixtures resolved); checked before anything heavy loads."""
    path = resolve(args.model_name_or_path)
    if not path:
        raise UserError("No model: set model_name_or_path in the recipe (a Hub id or a local path).")
    check_source(path, "model", "model_name_or_path", revision=args.model_revision)
    return path


def load_processor(args: ModelArguments, path: str, model_type: str):
    """The processor saved at `path` for a model of `model_type`, loaded by the model's family, with the recipe's
    processor options set by it (which refuses those it does not have, docvlm.families.refuse_processor_options)
    and a padding token."""
    family = family_of(model_type)
    processor = family.load_processor(path, args.model_revision, model_type)
    family.configure_processor(processor, args)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token
    return processor


def model_type_at(path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """The model type in the config at `path` (a folder or a Hub id)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code).model_type


def quantization_config(args: ModelArguments, compute_dtype: torch.dtype):
    """BitsAndBytesConfig for NF4 (or 8-bit) loading, or None to load in full precision.

    `compute_dtype` is the training (or inference) precision; the recipe's 'auto' dtypes follow it."""
    from transformers import BitsAndBytesConfig

    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    storage = resolve_dtype(args.bnb_4bit_quant_storage, torch.uint8)
    skip = args.bnb_4bit_skip_modules
    if skip and "lm_head" not in skip:
        # transformers keeps the output head out of 4-bit only when no skip list is given; keep that default.
        skip = [*skip, "lm_head"]
    return BitsAndBytesConfig(
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=resolve_dtype(args.bnb_4bit_compute_dtype, compute_dtype),
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip,
    )


def load_model(
    args: ModelArguments,
    compute_dtype: torch.dtype,
    path: str,
    trust_remote_code: bool = False,
    quantize: bool = True,
    place: bool = True,
):
    """The base model as the recipe describes it (4-bit unless `quantize` is False), weights from safetensors.

    `place`: put the weights on this process's GPU while loading; False under ZeRO-3 and FSDP, which place the
    shards themselves (bitsandbytes still quantizes on the current GPU)."""
    from accelerate import PartialState
    from transformers import AutoModelForImageTextToText

    quant = quantization_config(args, compute_dtype) if quantize else None
    if trust_remote_code and PartialState().is_main_process:
        import sys

        print(
            f"docvlm: warning: trust_remote_code is true: Python code that ships with {path} runs on this machine. "
            "Keep it only for repositories you trust, pinned with model_revision.",
            file=sys.stderr,
        )
    kwargs = {
        "revision": args.model_revision,
        "dtype": resolve_dtype(args.dtype, compute_dtype),
        "quantization_config": quant,
        "attn_implementation": args.attn_implementation,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if place and quant is not None and torch.cuda.is_available():
        # bitsandbytes needs the weights placed at load time; each process takes its own GPU.
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if place and quant is None and torch.cuda.is_available() and not PartialState().use_distributed:
        model.to("cuda")
    if quant is not None:
        keep_4bit_cpu_math_in_compute_dtype(model)
    return model


def keep_4bit_cpu_math_in_compute_dtype(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for its bf16 CPU kernel; returns how many layers it applies to.

    On a CPU with AVX512-BF16, the first forward of a 4-bit layer in eval mode without grad repacks its weights
    for a kernel that computes in bf16, whatever the compute dtype, and that has no backward. A training step
    after any evaluation (an eval loss, a generation) then gets wrong LoRA gradients, and answers differ from
    the same model's on another CPU. Without the repacking, bitsandbytes dequantizes to the compute dtype, as in
    training. The switch is bitsandbytes' own attribute of each layer."""
    layers = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            layers += 1
    return layers


def lora_config(args: ModelArguments):
    """The adapter, from the recipe's lora_* fields; None when use_peft is false (full fine-tuning)."""
    from peft import LoraConfig

    if not args.use_peft:
        return None
    init = {"true": True, "false": False}.get(str(args.lora_init).lower(), args.lora_init)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_regex or args.lora_target_modules,
        modules_to_save=args.lora_modules_to_save,
        init_lora_weights=init,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        task_type=args.lora_task_type,
    )


def keep_trainable_fp32(model) -> int:
    """Return trainable parameters to fp32 after SFTTrainer cast them to bf16; returns how many were cast.

    TRL casts a quantized model's trainable parameters to bf16. That breaks fp16 training (the GradScaler refuses
    half-precision gradients, trl#4901) and, under bf16, swallows updates smaller than bf16's resolution to
    trainable norms and heads. fp32 master weights under autocast are what both precisions need; LoRA weights
    are small, so the memory cost is a few tens of MB on the 8B model.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def check_lora_targets(args: ModelArguments, path: str, trust_remote_code: bool = False, config=None):
    """Refuse, before any weight loads, LoRA targets that match no linear layer: peft finds out only after the
    (4-bit) model has loaded, and names target_modules even when the recipe set lora_target_regex. The module
    names come from the model built on the meta device from its config (`config`, or read from `path`; no
    weights, a few seconds), outside ZeRO-3's partitioning, which cannot place meta tensors. Returns that model
    (`docvlm plan` counts its parameters), or None where there was nothing to check."""
    import re

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from docvlm.modes import whole_model_loading

    if not args.use_peft:
        return None
    targets = args.lora_target_regex or args.lora_target_modules
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return None
    if config is None:
        config = AutoConfig.from_pretrained(path, revision=args.model_revision, trust_remote_code=trust_remote_code)
    with whole_model_loading(), init_empty_weights():
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # built on empty weights, tied embeddings are two tensors until tied
    linear = [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]
    key = "lora_target_regex" if args.lora_target_regex else "lora_target_modules"
    if isinstance(targets, str):  # peft reads a string as a regex over the full module name
        matched = [n for n in linear if re.fullmatch(targets, n)]
    else:  # a list names modules by their last part(s)
        matched = [n for n in linear if any(n == t or n.endswith(f".{t}") for t in targets)]
    if not matched:
        examples = ", ".join(linear[:: max(1, len(linear) // 8)][:8])
        raise UserError(
            f"{key} matches no linear layer of {path}: {targets!r}. Its linear layers are named like: {examples}."
        )
    return skeleton
