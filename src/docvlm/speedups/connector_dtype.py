"""`connector_in_compute_dtype`: the connector takes the vision tower's features rounded to autocast's dtype, so that
it computes and keeps half-precision activations (the family's patch, Family.connector_in_compute_dtype). Applied
after connector checkpointing, so that the features are rounded once, not in every recomputed chunk."""

from __future__ import annotations

import torch

from docvlm.speedups.base import LOADED, Setting, Switch


def _plan(terms) -> None:
    if terms.args.precision != "fp32":  # nothing to round in fp32 training
        terms.connector_share *= terms.calibration.get("half_precision_connector_share", 1.0)
        terms.feature_value_bytes = 2


def _apply(run) -> bool:
    """The family's patch; the dtype it rounds to is handed on (the feature cache keeps features in it)."""
    if not run.family.half_precision_connector_input(run.model):
        return False
    args = run.args
    run.features_rounded_to = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return True


SWITCH = Switch(
    settings=(
        Setting(
            "connector_in_compute_dtype",
            bool,
            False,
            "Round the vision tower's features to the half-precision compute dtype (bf16 / fp16) as the connector "
            "takes them. Under autocast the tower's last norm gives fp32 and 4-bit layers return their input's dtype, "
            "so otherwise the whole connector computes and keeps fp32 activations: half the memory and faster steps. "
            "The 4-bit matmuls see the same input; LoRA's dropout takes the rounded one. Nothing to round in fp32 "
            "training. Refused by families without it.",
        ),
    ),
    is_on=lambda args: bool(args.connector_in_compute_dtype),
    lacks="connector",
    family_hook="half_precision_connector_input",
    after=("connector_checkpointing",),  # the features rounded once, outside the recomputed chunks
    apply={LOADED: _apply},
    in_evaluation=True,
    plan=_plan,
)
