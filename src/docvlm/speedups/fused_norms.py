"""`fused_rms_norms`: the decoder's and the connector's RMSNorms as one fused kernel each way (the family's patch,
Family.fuse_rms_norms). Applied after the lean connector's norms, which these replace."""

from __future__ import annotations

from docvlm.modes import FSDP, ZERO3
from docvlm.speedups.base import LOADED, Setting, Switch

SHARDED_NORMS = "not tested under {mode}, whose hooks gather the norms' shards"
SWITCH = Switch(
    settings=(
        Setting(
            "fused_rms_norms",
            bool,
            False,
            "Run the decoder's and the connector's RMSNorms as one fused kernel forward and one backward (torch's, on "
            "CUDA), instead of eight and sixteen: ~2,700 fewer kernel launches a step on the 8B flagship. The output "
            "is rounded once, after the scale, so it can differ from the module's by one half-precision step. Refused "
            "by families without it.",
        ),
    ),
    is_on=lambda args: bool(args.fused_rms_norms),
    lacks="RMSNorm to fuse",
    family_hook="fuse_rms_norms",
    after=("connector_lean_activations",),  # the fused norms replace the lean ones
    turned_off_in={ZERO3: SHARDED_NORMS, FSDP: SHARDED_NORMS},
    apply={LOADED: lambda run: bool(run.family.fuse_rms_norms(run.model))},
)
