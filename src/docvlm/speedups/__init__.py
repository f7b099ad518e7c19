"""docvlm's memory and speed switches, each declared once in its own module (docvlm.speedups.base.Switch), and
what is done with the declarations: the recipe's fields, the checks when a recipe is read, what a launch mode or
a machine without a GPU changes (said at start-up), the refusals for a family, the application in order, and the
terms of `docvlm plan`.

The order below is the order of application within a stage; each switch names those it must follow (Switch.after),
and an order that breaks one is refused when this module loads.
"""

from __future__ import annotations

import dataclasses

from docvlm.errors import UserError
from docvlm.speedups import (
    attention_kernels,
    compile_layers,
    connector_dtype,
    connector_lean,
    connector_recompute,
    expandable_segments,
    feature_cache,
    frozen_tower,
    fused_norms,
    kept_layers,
    lean_lora,
    row_packing,
    tower_offload,
)
from docvlm.speedups.base import BEFORE_LOADING, LOADED, WITH_TRAINER, PlanTerms, Switch, SwitchContext

SWITCHES: tuple[Switch, ...] = (
    expandable_segments.SWITCH,
    attention_kernels.SWITCH,
    connector_lean.SWITCH,
    connector_recompute.SWITCH,
    connector_dtype.SWITCH,
    row_packing.SWITCH,
    feature_cache.SWITCH,
    frozen_tower.SWITCH,
    frozen_tower.IN_CHUNKS,
    fused_norms.SWITCH,
    compile_layers.SWITCH,
    kept_layers.SWITCH,
    lean_lora.SWITCH,
    tower_offload.SWITCH,
)
BY_NAME = {switch.name: switch for switch in SWITCHES}


def _check_order(switches: tuple[Switch, ...]) -> None:
    """Every switch comes after the switches it names in `after`."""
    seen: set[str] = set()
    for switch in switches:
        missing = [name for name in switch.after if name not in seen]
        if missing:
            raise RuntimeError(f"{switch.name} must come after {', '.join(missing)} in docvlm.speedups.SWITCHES.")
        seen.add(switch.name)


_check_order(SWITCHES)
STAGES = (BEFORE_LOADING, LOADED, WITH_TRAINER)

__all__ = [
    "BEFORE_LOADING",
    "LOADED",
    "SWITCHES",
    "WITH_TRAINER",
    "PlanTerms",
    "SwitchContext",
    "apply",
    "apply_for_evaluation",
    "check",
    "fields",
    "plan_terms",
    "refuse_what_does_not_apply",
    "settle",
]


def fields() -> list[tuple[str, object, dataclasses.Field]]:
    """Every switch's recipe fields, for make_dataclass: (name, type, field with its default and help)."""
    return [
        (setting.name, setting.type, dataclasses.field(default=setting.default, metadata={"help": setting.help}))
        for switch in SWITCHES
        for setting in switch.settings
    ]


def check(args, model_args) -> None:
    """The switches' own checks and what each needs of another, when a recipe is read (ValueError, as the
    recipe's other checks)."""
    for switch in SWITCHES:
        if switch.check:
            switch.check(args, model_args)
        if switch.requires and switch.is_on(args) and not BY_NAME[switch.requires[0]].is_on(args):
            needed = BY_NAME[switch.requires[0]]
            raise ValueError(
                f"{_stated(switch, args)} but {_stated(needed, args)}: {switch.requires[1]}. Turn {needed.name} on, "
                f"or set {switch.name}: {switch.off}."
            )


def _stated(switch: Switch, args) -> str:
    """'name is value', as the recipe has it."""
    value = getattr(args, switch.name)
    return f"{switch.name} is {str(value).lower() if isinstance(value, bool) else value}"


def settle(mode: str, args, device: str) -> list[str]:
    """Refuse what cannot work in launch `mode`, turn off what does not apply there or off the GPU (`device`: the
    training device's type, "cuda" or "cpu"), and return one line per change, for the start of the run."""
    changes = []
    for switch in SWITCHES:
        on = switch.is_on(args)
        if on and mode in switch.refused_in:
            raise UserError(
                f"{_stated(switch, args)}, but {switch.refused_in[mode].format(mode=mode)}. Set {switch.name}: "
                f"{switch.off}, or launch one process."
            )
        if on and mode in switch.turned_off_in:
            setattr(args, switch.name, _off_value(switch))
            changes.append(f"{switch.name}: {switch.off} ({switch.turned_off_in[mode].format(mode=mode)})")
        elif switch.without_gpu and device != "cuda" and getattr(args, switch.name) != switch.without_gpu[0]:
            value, why = switch.without_gpu
            setattr(args, switch.name, value)  # recipe.yaml records what was in effect
            if why:
                changes.append(f"{switch.name}: {str(value).lower()} (on the {device} {why})")
    return changes


def _off_value(switch: Switch):
    """The field's value that turns the switch off, typed as the field is."""
    return {"false": False, "true": True}.get(switch.off, switch.off)


def refuse_what_does_not_apply(family, args) -> None:
    """Stop at start-up when the recipe turns on a switch the model's family does not offer."""
    for switch in SWITCHES:
        if switch.is_on(args) and switch.family_hook and not getattr(family, switch.family_hook, None):
            raise UserError(
                f"{switch.name} is on in the recipe, but it does not apply to {family.name} models: {family.why_not}. "
                f"Set {switch.name}: {switch.off}."
            )


def apply(stage: str, run: SwitchContext) -> SwitchContext:
    """Apply the switches that are on at `stage`, in order. A model without what a switch needs is refused, never
    trained with the switch silently off."""
    for switch in SWITCHES:
        step = switch.apply.get(stage)
        offered = not switch.family_hook or getattr(run.family, switch.family_hook, None)
        if step and switch.is_on(run.args) and not (offered and step(run)):
            what = f"this {run.family.name} model" if run.family else "the model"
            raise UserError(f"{_stated(switch, run.args)}, but {what} has no {switch.lacks}.")
    return run


def apply_for_evaluation(run: SwitchContext) -> SwitchContext:
    """Apply, to a model loaded for evaluation alone, the LOADED steps of the switches that are on and serve
    evaluation too (Switch.in_evaluation), with apply's refusals."""
    for switch in SWITCHES:
        step = switch.apply.get(LOADED)
        offered = not switch.family_hook or getattr(run.family, switch.family_hook, None)
        if step and switch.in_evaluation and switch.is_on(run.args) and not (offered and step(run)):
            what = f"this {run.family.name} model" if run.family else "the model"
            raise UserError(f"{_stated(switch, run.args)}, but {what} has no {switch.lacks}.")
    return run


def plan_terms(terms) -> None:
    """Each switch that is on adjusts `docvlm plan`'s terms (PlanTerms)."""
    for switch in SWITCHES:
        if switch.plan and switch.is_on(terms.args):
            switch.plan(terms)
