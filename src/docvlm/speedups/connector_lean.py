"""`connector_lean_activations`: the connector keeps fewer activations for the backward pass (the family's patch,
Family.lean_connector)."""

from __future__ import annotations

from docvlm.speedups.base import LOADED, Setting, Switch

SWITCH = Switch(
    settings=(
        Setting(
            "connector_lean_activations",
            bool,
            True,
            "Keep fewer connector activations for the backward pass (no fp32 norm copies, no silu(gate)). Same "
            "outputs and gradients. A family without a perceiver connector refuses it: set it false there.",
        ),
    ),
    is_on=lambda args: bool(args.connector_lean_activations),
    lacks="connector",
    family_hook="lean_connector",
    apply={LOADED: lambda run: run.family.lean_connector(run.model)},
)
