"""`compile_text_layers`: torch.compile on each decoder layer (the family's patch, Family.compile_text_layers), and
the garbage collector kept off what compiling leaves alive."""

from __future__ import annotations

from docvlm.modes import DDP, FSDP, ZERO2, ZERO3
from docvlm.speedups.base import LOADED, WITH_TRAINER, Setting, Switch


def freeze_garbage_after_first_step():
    """A TrainerCallback that puts every object alive after the first optimizer step out of the garbage
    collector's reach (gc.freeze). torch.compile leaves hundreds of thousands of long-lived objects (graphs,
    guards, kernels) from that step; without this, each full collection walks them all again and stalls a step by
    a second or two on an 8B model. Later garbage is collected as usual."""
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


def _freeze_garbage(run) -> bool:
    run.callbacks.append(freeze_garbage_after_first_step())
    return True


ONE_PROCESS = (
    "docvlm measured it in one process only, not under {mode} (whose hooks gather, shard or reduce the weights the "
    "compiled layers read)"
)
SWITCH = Switch(
    settings=(
        Setting(
            "compile_text_layers",
            bool,
            False,
            "torch.compile each decoder layer: fewer, fused kernels around the 4-bit matmuls, where the host cannot "
            "launch small kernels as fast as the GPU runs them. The first two steps compile (~50 s on an 8B model), "
            "so it pays on long runs only. Refused by families without it.",
        ),
    ),
    is_on=lambda args: bool(args.compile_text_layers),
    lacks="decoder layers",
    family_hook="compile_decoder_layers",
    refused_in={DDP: ONE_PROCESS, ZERO2: ONE_PROCESS, ZERO3: ONE_PROCESS, FSDP: ONE_PROCESS},
    apply={LOADED: lambda run: run.family.compile_decoder_layers(run.model), WITH_TRAINER: _freeze_garbage},
)
