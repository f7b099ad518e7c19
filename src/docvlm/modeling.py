"""Load the processor and the (4-bit) base model, describe the LoRA adapter, and keep trainable weights fp32."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from docvlm import tiny
from docvlm.config import ModelArguments, TrainConfig, UserError
from docvlm.hub import check_source

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def model_path(args: ModelArguments) -> str:
    """The model to load: a Hub id or a local path (fixtures resolved); checked before anything heavy loads."""
    path = tiny.resolve(args.model_name_or_path)
    if not path:
        raise UserError("No model: set model_name_or_path in the recipe (a Hub id or a local path).")
    check_source(path, "model", "model_name_or_path", revision=args.model_revision)
    return path


def _precision_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def training_dtype(training_args: TrainConfig) -> torch.dtype:
    return _precision_dtype(training_args.bf16, training_args.fp16)


def inference_dtype() -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU: what precision 'auto' trains in."""
    from docvlm.config import resolve_precision

    return _precision_dtype(*resolve_precision("auto"))


def resolve_dtype(name: str | None, auto: torch.dtype) -> torch.dtype:
    """A recipe dtype ('auto', 'bfloat16', 'fp16'...) as a torch dtype; 'auto' means `auto`."""
    if name in (None, "auto"):
        return auto
    if name not in _DTYPES:
        raise UserError(f"Unknown dtype '{name}'; use auto, bfloat16, float16 or float32.")
    return _DTYPES[name]


def load_processor(args: ModelArguments, path: str):
    from transformers import AutoProcessor

    kwargs = {"do_image_splitting": args.do_image_splitting}
    processor = AutoProcessor.from_pretrained(path, revision=args.model_revision, **kwargs)
    image_processor = processor.image_processor
    if args.image_longest_edge or args.image_shortest_edge:
        size = dict(image_processor.size)
        size["longest_edge"] = args.image_longest_edge or size["longest_edge"]
        size["shortest_edge"] = args.image_shortest_edge or size["shortest_edge"]
        image_processor.size = size
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token
    return processor


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
    args: ModelArguments, compute_dtype: torch.dtype, path: str, trust_remote_code: bool = False, quantize: bool = True
):
    """The base model as the recipe describes it (4-bit unless `quantize` is False), weights from safetensors."""
    from accelerate import PartialState
    from transformers import AutoModelForImageTextToText

    quant = quantization_config(args, compute_dtype) if quantize else None
    kwargs = {
        "revision": args.model_revision,
        "dtype": resolve_dtype(args.dtype, compute_dtype),
        "quantization_config": quant,
        "attn_implementation": args.attn_implementation,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if quant is not None and torch.cuda.is_available():
        # bitsandbytes needs the weights placed at load time; each process takes its own GPU.
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if quant is None and torch.cuda.is_available() and not PartialState().use_distributed:
        model.to("cuda")
    return model


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


VISION_TOWER_NAMES = ("vision_model", "vision_tower", "visual")  # Idefics2/Idefics3/SmolVLM, LLaVA, Qwen2-VL


def vision_tower(model):
    """The model's vision encoder (Idefics2's `model.vision_model` and its kin), or None."""
    for owner in (getattr(model, "model", None), model):
        for name in VISION_TOWER_NAMES:
            tower = getattr(owner, name, None)
            if isinstance(tower, torch.nn.Module):
                return tower
    return None


def frozen_vision_without_grad(model) -> bool:
    """Run the vision tower under no_grad whenever none of its weights is trainable; returns whether the model
    has a vision tower to patch.

    Gradient checkpointing makes transformers call `enable_input_require_grads`, which marks the output of every
    input-embedding layer as requiring grad, the vision tower's patch embeddings included. A frozen tower then
    builds a full autograd graph: its layers are checkpointed, recomputed and back-propagated in every step
    (~3x its forward FLOPs on ~3,800 patches a page) to produce gradients that no trainable weight receives.
    The LoRA gradients are the same either way. A recipe that adapts the tower (its LoRA targets reach into
    it) is left alone, since the check runs at every call.
    """
    tower = vision_tower(model)
    if tower is None:
        return False
    original = tower.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled() and not any(p.requires_grad for p in tower.parameters()):
            with torch.no_grad():
                return original(*args, **kwargs)
        return original(*args, **kwargs)

    tower.forward = forward
    return True


def use_expandable_segments() -> bool:
    """Let PyTorch's CUDA caching allocator grow memory segments in place; returns whether it was switched on.

    With fixed-size segments, batches whose shapes vary (questions of different lengths, pages of different sizes)
    leave reserved-but-unused gaps: 1-2 GiB on Idefics2-8B, which decides whether a 12 GB card fits. The usual
    switch, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, must be set before CUDA starts, which happens before
    a recipe is read (precision checks query the GPU), so it is set here at run time, as torch allows, before the
    model is loaded. A setting the user made in the environment wins.
    """
    import os

    if not torch.cuda.is_available():
        return False
    configured = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments" in configured:
        return "expandable_segments:true" in configured.replace(" ", "").lower()
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; older: the cuda one
    (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    return True


def checkpoint_connector(model, pages_per_chunk: int = 1) -> bool:
    """Recompute an Idefics2-style connector in the backward pass, `pages_per_chunk` pages at a time, instead of
    keeping its activations; returns whether the model has a connector to patch.

    The connector (modality projection + perceiver resampler) carries LoRA and runs on every patch of a page
    (~3,800 on Idefics2-8B, through a 14,336-wide MLP), so it keeps ~1.3 GB of activations a page, and HF's
    gradient checkpointing does not cover it. Checkpointed, it keeps only its input (~9 MB a page) and
    recomputes one chunk at a time: larger chunks mean fewer, larger kernels and more memory at the recompute.
    The math is unchanged: pages never interact in the connector. The module tree is left as it is (only the
    instance's forward is wrapped), so adapter weights keep their usual names.
    """
    from torch.utils.checkpoint import checkpoint

    connector = getattr(getattr(model, "model", None), "connector", None)
    if connector is None:
        return False
    original = connector.forward

    def forward(image_hidden_states, attention_mask=None):
        if not (connector.training and torch.is_grad_enabled()):
            return original(image_hidden_states, attention_mask)
        chunks = [
            checkpoint(
                original,
                image_hidden_states[i : i + pages_per_chunk],
                None if attention_mask is None else attention_mask[i : i + pages_per_chunk],
                use_reentrant=False,
            )
            for i in range(0, image_hidden_states.shape[0], pages_per_chunk)
        ]
        return torch.cat(chunks)

    connector.forward = forward
    return True
