"""`cudnn_attention`: whether scaled_dot_product_attention may use cuDNN's kernel; process-wide. Turned off, the
switch acts: FlashAttention or the memory-efficient kernel, which need no plan for each new sequence length."""

from __future__ import annotations

from docvlm.speedups.base import BEFORE_LOADING, Setting, Switch


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


SWITCH = Switch(
    settings=(
        Setting(
            "cudnn_attention",
            bool,
            True,
            "Let scaled_dot_product_attention use cuDNN, which plans each new sequence length (host time, with "
            "batches of varying length); false: FlashAttention. Same math.",
        ),
    ),
    is_on=lambda args: not args.cudnn_attention,  # the switch acts when cuDNN is turned away
    off="true",
    without_gpu=(False, None),  # no cuDNN off a GPU: recipe.yaml records it off, without a word
    apply={BEFORE_LOADING: lambda run: disable_cudnn_attention() or True},
)
