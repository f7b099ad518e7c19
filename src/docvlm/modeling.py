"""Load the processor and the (4-bit) base model, describe the LoRA adapter, keep trainable weights fp32, and the
memory and speed switches that patch a loaded model (frozen vision tower, connector) or set up CUDA."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from docvlm import tiny
from docvlm.config import ModelArguments, TrainConfig, UserError
from docvlm.hub import check_source

DTYPES = {  # the dtype names a recipe may use
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
    if name not in DTYPES:
        raise UserError(f"Unknown dtype '{name}'; use auto, bfloat16, float16 or float32.")
    return DTYPES[name]


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


def frozen_vision_without_grad(model, pages_per_chunk: int = 0) -> bool:
    """Run the vision tower under no_grad whenever none of its weights is trainable, `pages_per_chunk` pages at a
    time (0: all at once); returns whether the model has a vision tower to patch.

    Gradient checkpointing makes transformers call `enable_input_require_grads`, which marks the output of every
    input-embedding layer as requiring grad, the vision tower's patch embeddings included. A frozen tower then
    builds a full autograd graph: its layers are checkpointed, recomputed and back-propagated in every step
    (~3x its forward FLOPs on ~3,800 patches a page) to produce gradients that no trainable weight receives.
    The LoRA gradients are the same either way. A recipe that adapts the tower (its LoRA targets reach into
    it) is left alone, since the check runs at every call.

    Pages never interact in the tower, so running it a few pages at a time changes no output; it bounds the
    tower's short-lived activations (~2 GB for 16 pages on Idefics2-8B), which otherwise stay cached by the CUDA
    allocator in blocks that later, differently sized tensors cannot reuse.
    """
    tower = vision_tower(model)
    if tower is None:
        return False
    original = tower.forward

    def in_chunks(pixel_values=None, patch_attention_mask=None, **kwargs):
        pages = 0 if pixel_values is None else pixel_values.shape[0]
        whole = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")  # outputs kept as they are
        if not pages_per_chunk or pages <= pages_per_chunk or whole:
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
        if torch.is_grad_enabled() and not any(p.requires_grad for p in tower.parameters()):
            with torch.no_grad():
                if args:  # positional calls are passed through whole
                    return original(*args, **kwargs)
                return in_chunks(**kwargs)
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


def disable_cudnn_attention() -> bool:
    """Keep scaled_dot_product_attention off cuDNN's backend; returns whether there was a GPU to set it for.

    On H100s PyTorch prefers cuDNN's attention, which builds and caches an execution plan for each new set of
    shapes. Document batches change length every step (questions and answers vary), and each plan costs
    milliseconds of CPU time in every layer that meets it, while the GPU waits: on Idefics2-8B this showed as
    cuDNN attention taking ~6 ms of CPU a call (docs/benchmarks.md). FlashAttention and the memory-efficient
    kernel need no plans. The switch is process-wide, as torch offers it, so evaluation after training uses it too.
    """
    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


class _RMSNormKeepingHalfInput(torch.autograd.Function):
    """Idefics2's RMSNorm (statistics in fp32, output cast back, then scaled) that saves its half-precision input and
    one fp32 scale a row for the backward pass, where autograd would save an fp32 copy of the whole input.

    Written by hand because no library offers it for these modules: the perceiver normalises the ~3,800-patch context
    of every page in each of its 3 layers, and those fp32 copies are ~180 MB a page on Idefics2-8B. What is saved
    instead is the half-precision context, one tensor the three layers share (~30 MB a page). The forward pass is
    the module's own, op for op.
    """

    @staticmethod
    def forward(ctx, hidden, weight, eps):
        full = hidden.float()
        scale = torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(hidden, weight, scale)
        return weight * (full * scale).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, scale = ctx.saved_tensors
        normed = hidden.float() * scale
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).float()
            grad_hidden = scale * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            grad_hidden = grad_hidden.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(hidden.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_hidden, grad_weight, None


class _SiluTimes(torch.autograd.Function):
    """silu(gate) * up that saves gate and up for the backward pass and recomputes silu(gate) there, instead of also
    keeping silu(gate): one 14,336-wide activation (~100 MB) a page less in Idefics2's connector MLP. The same
    kernels run, so forward and gradients are bit for bit autograd's."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


SILU_MODULES = ("SiLU", "SiLUActivation")  # torch's, and transformers' own (its ACT2FN["silu"] since 5.x)


def lean_connector_activations(model) -> bool:
    """Make an Idefics2-style connector keep fewer activations for the backward pass (~0.28 GB a page less on
    Idefics2-8B, a fifth of what it keeps); returns whether the model has such a connector.

    Its RMSNorms keep their half-precision input instead of an fp32 copy, and its MLP keeps gate and up but not
    silu(gate) (see the two functions above). Less memory a page is what lets the connector be recomputed several
    pages at a time in the same memory. Only instance forwards are replaced: module names and weights are unchanged.
    """
    connector = getattr(getattr(model, "model", None), "connector", None)
    if connector is None:
        return False
    for module in connector.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = _lean_rms_norm(module)
    mlp = getattr(connector, "modality_projection", None)
    if mlp is not None and type(getattr(mlp, "act_fn", None)).__name__ in SILU_MODULES:
        mlp.forward = _lean_gated_mlp(mlp)
    return True


def _when_training(module, lean):
    """`module`'s forward, replaced by `lean` where autograd will keep activations; inference runs the original."""
    original = module.forward
    return lambda hidden: lean(hidden) if torch.is_grad_enabled() else original(hidden)


def _lean_rms_norm(norm):
    eps = norm.variance_epsilon
    return _when_training(norm, lambda hidden: _RMSNormKeepingHalfInput.apply(hidden, norm.weight, eps))


def _lean_gated_mlp(mlp):
    def forward(hidden):
        # gate before up, as the module does, so that LoRA dropout draws its masks in the same order
        gate = mlp.gate_proj(hidden)
        return mlp.down_proj(_SiluTimes.apply(gate, mlp.up_proj(hidden)))

    return _when_training(mlp, forward)


def checkpoint_connector(model, pages_per_chunk: int = 1) -> bool:
    """Recompute an Idefics2-style connector in the backward pass, `pages_per_chunk` pages at a time, instead of
    keeping its activations; returns whether the model has a connector to patch.

    The connector (modality projection + perceiver resampler) carries LoRA and runs on every patch of a page
    (~3,800 on Idefics2-8B, through a 14,336-wide MLP), so it keeps ~1.3 GB of activations a page (~1 GB lean), and HF's
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


def check_lora_targets(args: ModelArguments, path: str, trust_remote_code: bool = False) -> None:
    """Refuse, before any weight loads, LoRA targets that match no linear layer: peft finds out only after the
    (4-bit) model has loaded, and names target_modules even when the recipe set lora_target_regex. The module
    names come from the model built on the meta device from its config (no weights, a few seconds), outside
    ZeRO-3's partitioning, which cannot place meta tensors."""
    import re

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from docvlm.distributed import whole_model_loading

    if not args.use_peft:
        return
    targets = args.lora_target_regex or args.lora_target_modules
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return
    config = AutoConfig.from_pretrained(path, revision=args.model_revision, trust_remote_code=trust_remote_code)
    with whole_model_loading(), init_empty_weights():
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
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
