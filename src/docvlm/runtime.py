"""Process-wide settings of docvlm's entry points: how idle CPU threads wait, which third-party messages that no
user can act on are muted, and the CUDA allocator and attention-backend switches. Nothing here imports torch at
import time (the thread setting must come before torch loads)."""

from __future__ import annotations

import logging
import os
import warnings


def prefer_passive_cpu_threads() -> None:
    """Let OpenMP threads sleep as soon as they are idle, on machines without an NVIDIA GPU.

    By default torch's OpenMP threads spin at every barrier. Beside one other busy process on a 2-core machine the
    spinning threads take turns with it and 40 tiny training steps ran 2.2-2.6x slower; with PASSIVE they ran
    1.4x slower, and as fast as before on an idle machine (docs/cpu_threads.md). libgomp reads the variable when
    it loads, so this must run before torch is imported; a value set by the user wins. GPU machines keep the
    default: their CPU threads feed the GPU and should wake without delay."""
    if not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party_noise() -> None:
    """Mute library messages that say nothing a docvlm user can act on. Called by the entry points only, so that
    importing docvlm as a library changes no one's warnings. Each one is named, never a whole category:
    - bitsandbytes, on CPUs with AVX512-BF16, tries to fetch an optional kernel from the Hub at import and logs
      "Failed to load CPU gemm_4bit_forward from kernels-community" when it can't; it falls back to its own
      kernel, which is what runs anyway on a machine without Hub access.
    - peft reads `model.is_gradient_checkpointing`, which newer transformers deprecates with a FutureWarning;
      the call is inside peft.
    - transformers warns "The modules are dequantized in <dtype>" whenever a 4-bit model is dequantized, which is
      what `docvlm merge` asks for.
    """
    for name, prefix in (
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
        ("transformers.integrations.bitsandbytes", "The modules are dequantized in"),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def use_expandable_segments() -> bool:
    """Let PyTorch's CUDA caching allocator grow memory segments in place; returns whether it was switched on.

    With fixed-size segments, batches whose shapes vary (questions of different lengths, pages of different sizes)
    leave reserved-but-unused gaps, enough to decide whether a 12 GB card fits (docs/benchmarks.md). The usual
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


def disable_cudnn_attention() -> bool:
    """Keep scaled_dot_product_attention off cuDNN's backend; returns whether there was a GPU to set it for.

    On H100s PyTorch prefers cuDNN's attention, which builds and caches an execution plan for each new set of
    shapes. Document batches change length every step (questions and answers vary), and each plan costs
    milliseconds of CPU time in every layer that meets it, while the GPU waits (docs/benchmarks.md). FlashAttention
    and the memory-efficient kernel need no plans. The switch is process-wide, as torch offers it, so evaluation
    after training uses it too.
    """
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def freeze_garbage_after_first_step():
    """A TrainerCallback that puts every object alive after the first optimizer step out of the garbage
    collector's reach (gc.freeze). torch.compile leaves hundreds of thousands of long-lived objects (graphs,
    guards, kernels) from that step; without this, each full collection walks them all again and stalls a step by
    ~1-2 s on an 8B model (docs/benchmarks.md). Later garbage is collected as usual."""
    import gc

    from transformers import TrainerCallback

    class FreezeGarbage(TrainerCallback):
        frozen = False

        def on_step_end(self, args, state, control, **kwargs):
            if not self.frozen:  # the first step of this process (also after a resume)
                gc.collect()
                gc.freeze()
                self.frozen = True

    return FreezeGarbage()
