"""What a memory or speed switch declares, once: its recipe fields with their help, the family capability it needs,
what it refuses or turns off (and says so) in other launch modes or off the GPU, how it is applied, and its term in
`docvlm plan`. docvlm.speedups collects the declarations into the recipe's fields and applies them in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# When a switch is applied, in this order (each stage's switches in their registry order):
BEFORE_LOADING = "before the model loads"  # process-wide settings
LOADED = "on the loaded model"  # patches of its modules
WITH_TRAINER = "with the trainer"  # the peft model, the trainer's callbacks and collator


@dataclass(frozen=True)
class Setting:
    """One recipe field a switch owns: the switch itself first, then its own parameters."""

    name: str
    type: Any
    default: Any
    help: str


@dataclass
class SwitchContext:
    """What the switches are applied to, stage by stage: the recipe's training arguments, the family, the loaded
    model, the trainer (which holds the peft model), and what the switches hand to each other."""

    args: Any
    family: Any = None
    model: Any = None
    trainer: Any = None
    processor: Any = None
    cache: Any = None  # the vision feature cache, when its switch is on
    features_rounded_to: Any = None  # the dtype the connector rounds the tower's features to, if a switch does
    callbacks: list = field(default_factory=list)  # added to the trainer


@dataclass
class PlanTerms:
    """What `docvlm plan` predicts a micro-batch from: the recipe's training arguments, the sampled rows' sizes (p95
    tokens, pages a row, the largest page's patches), the family's calibration, and what the switches that are on
    change in it (each switch's `plan`). The family's memory model reads them (Family.memory_model)."""

    args: Any
    batch: int  # rows a micro-batch
    pages_a_row: int
    largest_page_patches: int  # pages are padded to the largest in a batch
    tokens: list[int]  # each sampled row's tokens
    answer_tokens: list[int]
    patches: list[int]  # each sampled row's real patches
    p95_tokens: int
    p95_answer_tokens: int
    nested_quant: bool
    calibration: dict
    pages: int = 0  # a micro-batch's pages (set from batch and pages_a_row)
    connector_pages: int = 0  # pages whose connector activations are alive at once (default: all)
    perceiver_pages: int = 0  # pages the perceiver runs at once (default: connector_pages)
    connector_recomputed: bool = False  # recomputed in the backward pass, after the decoder's activations are freed
    kept_decoder_layers: int = 0  # checkpointed decoder layers that keep their activations
    perceiver_own_chunks: str | None = None  # the setting that recomputes the perceiver in chunks of its own
    connector_share: float = 1.0  # of the connector's calibrated activations (half-precision features keep less)
    feature_value_bytes: int = 4  # a tower feature as the connector takes it (2 where it rounds them to half)
    tower_on_gpu: bool = True  # the vision tower's weights on the GPU while training
    tower_runs: bool = True  # the vision tower computes a step's pages (no feature cache serves them)
    config: Any = None  # the model's config
    rows: int = 0  # training rows
    lines: list[str] = field(default_factory=list)  # what the switches have to say in the plan

    def __post_init__(self):
        self.pages = self.batch * self.pages_a_row
        self.connector_pages = self.perceiver_pages = self.pages


@dataclass(frozen=True)
class Switch:
    """A recipe switch.

    `is_on(args)`: whether the recipe turns it on; `off`: the value that turns it off, as a refusal says it.
    `family_hook`: the Family attribute it needs (None: any model). `check(args, model_args)`: raises ValueError for
    settings it cannot take, when the recipe is read. `requires`: (another switch that must be on, why).
    `turned_off_in`: launch modes where it is turned off, with why (said at start-up); `refused_in`: launch modes
    where it is refused, with why. `without_gpu`: (the value it takes without a CUDA device, why, or None to take
    it quietly). `apply`: {stage: function of a SwitchContext} returning whether the model had what the switch needs.
    `lacks`: what a model that the switch cannot be applied to has none of, as the refusal says it.
    `memory_advice`: how it makes a run fit, as `docvlm plan` says it to a run that will not. `after`: the switches
    whose patches it wraps or reads, which must be applied first.
    `plan(terms)`: its term in `docvlm plan`'s memory model (PlanTerms). `in_evaluation`: its LOADED step is also
    applied to a model loaded for evaluation alone (`docvlm eval`), so that it answers as the trained model did and
    its pages are served as training's were."""

    settings: tuple[Setting, ...]
    is_on: Callable[[Any], bool]
    off: str = "false"
    family_hook: str | None = None
    check: Callable[[Any, Any], None] | None = None
    requires: tuple[str, str] | None = None
    turned_off_in: dict[str, str] = field(default_factory=dict)
    refused_in: dict[str, str] = field(default_factory=dict)
    without_gpu: tuple[Any, str | None] | None = None
    apply: dict[str, Callable[[SwitchContext], bool]] = field(default_factory=dict)
    plan: Callable[[Any], None] | None = None
    lacks: str = "module it applies to"
    after: tuple[str, ...] = ()  # switches it must be applied after, where both are on (docvlm.speedups checks)
    memory_advice: str | None = None  # what `docvlm plan` advises of it when a run will not fit
    in_evaluation: bool = False

    @property
    def name(self) -> str:
        return self.settings[0].name
