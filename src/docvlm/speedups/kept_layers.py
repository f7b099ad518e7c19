"""`decoder_layers_kept`: with gradient checkpointing, the decoder's last layers keep their activations instead of
recomputing them in the backward pass: fewer FLOPs a step for the memory those layers hold, between checkpointing
every layer (least memory) and none (`gradient_checkpointing: false`, fastest). transformers 5.25's `every_n_layers`
keeps every other layer or more at once and 5.17 has none, hence this switch."""

from __future__ import annotations

from docvlm.errors import UserError
from docvlm.speedups.base import WITH_TRAINER, Setting, Switch
from docvlm.speedups.model_parts import decoder_layers


def keep_last_layers(model, count: int):
    """A TrainerCallback that turns checkpointing off on the decoder's last `count` layers when training starts,
    after the Trainer has turned it on everywhere; raises UserError where the decoder has fewer layers."""
    from transformers import TrainerCallback

    layers = decoder_layers(model)
    if count > len(layers):
        raise UserError(
            f"decoder_layers_kept is {count}, but this model's decoder has {len(layers)} layers: set it to at most "
            f"{len(layers)}, or gradient_checkpointing: false to keep them all."
        )

    class KeepLastLayers(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            for layer in layers[len(layers) - count :]:
                layer.gradient_checkpointing = False

    return KeepLastLayers()


def _check(args, model_args) -> None:
    if args.decoder_layers_kept < 0:
        raise ValueError(f"decoder_layers_kept must be 0 or more, got {args.decoder_layers_kept}.")
    if args.decoder_layers_kept and not args.gradient_checkpointing:
        raise ValueError(
            "decoder_layers_kept is set, but gradient_checkpointing is false: every layer keeps its activations "
            "already. Set gradient_checkpointing: true, or decoder_layers_kept: 0."
        )


def _apply(run) -> bool:
    if not decoder_layers(run.trainer.model):
        return False
    run.callbacks.append(keep_last_layers(run.trainer.model, run.args.decoder_layers_kept))
    return True


def _plan(terms) -> None:
    terms.kept_decoder_layers = terms.args.decoder_layers_kept


SWITCH = Switch(
    settings=(
        Setting(
            "decoder_layers_kept",
            int,
            0,
            "With gradient_checkpointing, the decoder's last N layers keep their activations instead of being "
            "recomputed: faster steps for the memory they hold. Same gradients.",
        ),
    ),
    is_on=lambda args: bool(args.decoder_layers_kept),
    off="0",
    lacks="decoder layers to find",
    check=_check,
    apply={WITH_TRAINER: _apply},
    plan=_plan,
)
