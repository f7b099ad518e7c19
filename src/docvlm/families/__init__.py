"""Model families: what docvlm knows about each VLM family, selected from the model config's `model_type` (or,
where only a processor is at hand, from the processor's class).

A family names the token that closes an assistant turn (trained as the answer's last label, and where generation
stops), and lists the recipe switches and processor options that apply to it. A recipe that turns on one that
does not apply stops at start-up, naming the switch and the family, instead of the switch silently doing nothing
or failing at the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from docvlm.errors import UserError
from docvlm.families import idefics2

# Recipe switches that reach into a family's modules (docvlm.vision_tower and the family modules), with the
# recipe value that turns each on.
MODULE_SWITCHES = {
    "vision_tower_no_grad": lambda args: bool(args.vision_tower_no_grad),
    "vision_tower_pages": lambda args: bool(args.vision_tower_no_grad and args.vision_tower_pages),
    "connector_checkpointing": lambda args: bool(args.connector_checkpointing),
    "connector_lean_activations": lambda args: bool(args.connector_lean_activations),
    "vision_feature_cache": lambda args: args.vision_feature_cache != "off",
    "compile_text_layers": lambda args: bool(args.compile_text_layers),
    "fused_rms_norms": lambda args: bool(args.fused_rms_norms),
    "connector_in_compute_dtype": lambda args: bool(args.connector_in_compute_dtype),
}
OFF = {"vision_tower_pages": "0", "vision_feature_cache": "off"}  # the recipe value that turns a switch off
# Processor options a recipe can set (ModelArguments), with the value that means "set".
PROCESSOR_OPTIONS = {
    "do_image_splitting": lambda args: bool(args.do_image_splitting),
    "image_longest_edge": lambda args: args.image_longest_edge is not None,
    "image_shortest_edge": lambda args: args.image_shortest_edge is not None,
}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    switches: frozenset[str] = field(default_factory=frozenset)
    processor_options: frozenset[str] = field(default_factory=frozenset)
    why_not: str = ""  # said when a switch or option is refused
    processor_classes: tuple[str, ...] = ()
    # The token that closes an assistant turn in the family's chat template; None: the tokenizer's end of sequence.
    end_of_turn: str | None = None
    # Whether the chat template writes that token after an answer. LLaVA-1.5's writes "ASSISTANT: <answer> " and
    # leaves </s> to the training code, so docvlm appends it to every answer it trains on.
    template_ends_turns: bool = True
    # PaliGemma is trained on a prefix (pages, then the question) and a suffix (the answer and the end of sequence),
    # not on chat turns: its processor builds the labels and the token types that mark the prefix.
    prefix_prompts: bool = False
    # The family's own connector patches (model, ...) -> whether the model had the modules; None: not offered.
    lean_connector: Callable | None = None
    checkpoint_connector: Callable | None = None
    connector_in_compute_dtype: Callable | None = None
    compile_text_layers: Callable | None = None
    fuse_rms_norms: Callable | None = None  # (model) -> how many norms were fused
    # (config, batch shapes, tower_runs) -> model FLOPs of a training micro-batch; None: not counted (bench, plan)
    training_flops: Callable | None = None
    # `docvlm plan`'s memory and speed model, measured with `make bench`; None: plan predicts neither
    plan_calibration: dict | None = None

    def end_of_turn_id(self, tokenizer) -> int:
        """The id that closes an assistant turn, checked against the tokenizer."""
        if self.end_of_turn is None:
            if tokenizer.eos_token_id is None:
                raise UserError(f"The tokenizer has no end-of-sequence token, which closes a {self.name} answer.")
            return tokenizer.eos_token_id
        token_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UserError(
                f"The tokenizer has no {self.end_of_turn} token, which closes an answer in {self.name} models: "
                "is the processor the model's own?"
            )
        return token_id

    def training_turns(self, turns: list[dict], tokenizer) -> list[dict]:
        """The turns as training renders them: each answer closed by the end-of-turn token where the family's
        template does not write it (a model never taught to say it would never stop)."""
        if self.template_ends_turns:
            return turns
        end = tokenizer.convert_ids_to_tokens(self.end_of_turn_id(tokenizer))
        closed = []
        for turn in turns:
            if turn["role"] == "assistant":
                parts = list(turn["content"])
                last = max(i for i, part in enumerate(parts) if part["type"] == "text")
                parts[last] = {"type": "text", "text": parts[last]["text"] + end}
                turn = {**turn, "content": parts}
            closed.append(turn)
        return closed

    def prefix_text(self, instruction: str, question: str, pages: int, image_token: str) -> str:
        """A prefix-prompted family's prompt: one image token a page, then the instruction and the question (its
        processor adds the begin-of-sequence token after the images and a newline at the end)."""
        return image_token * pages + " ".join(part for part in (instruction.strip(), question.strip()) if part)

    def stop_ids(self, tokenizer) -> list[int]:
        """Where generation stops: the end of a turn, and the end of the sequence."""
        ids = [self.end_of_turn_id(tokenizer), tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))


IDEFICS2 = Family(
    "Idefics2",
    ("idefics2",),
    switches=frozenset(MODULE_SWITCHES),
    processor_options=frozenset(PROCESSOR_OPTIONS),
    processor_classes=("Idefics2Processor",),
    end_of_turn="<end_of_utterance>",
    lean_connector=idefics2.lean_connector_activations,
    checkpoint_connector=idefics2.checkpoint_connector,
    connector_in_compute_dtype=idefics2.run_connector_in_compute_dtype,
    compile_text_layers=idefics2.compile_text_layers,
    fuse_rms_norms=idefics2.fuse_rms_norms,
    training_flops=idefics2.training_flops,
    plan_calibration=idefics2.PLAN_CALIBRATION,
)
IDEFICS3 = Family(
    "Idefics3 / SmolVLM",
    ("idefics3", "smolvlm"),
    # its tower is called with keywords, as docvlm's chunking expects; its connector is a pixel shuffle and one
    # projection taking a single tensor, not Idefics2's perceiver
    switches=frozenset({"vision_tower_no_grad", "vision_tower_pages", "vision_feature_cache"}),
    processor_options=frozenset({"do_image_splitting"}),
    why_not="its connector is a pixel shuffle and one projection, not Idefics2's perceiver resampler, and its "
    "processor sizes pages in its own way",
    processor_classes=("Idefics3Processor", "SmolVLMProcessor"),
    end_of_turn="<end_of_utterance>",
)
QWEN2_VL = Family(
    "Qwen2-VL",
    ("qwen2_vl", "qwen2_5_vl"),
    # the tower is called positionally with a grid of patches per image: it runs without grad, but whole
    switches=frozenset({"vision_tower_no_grad"}),
    why_not="its vision tower takes all patches with their grid at once and it has no separate connector; its "
    "processor sizes pages by pixel count (min_pixels / max_pixels), not by edge",
    processor_classes=("Qwen2VLProcessor", "Qwen2_5_VLProcessor"),
    end_of_turn="<|im_end|>",
)
# LLaVA and PaliGemma: a tower called positionally (run without grad, but whole) and a projector, not a connector
POSITIONAL_TOWER = {
    "switches": frozenset({"vision_tower_no_grad"}),
    "why_not": "its vision tower is called positionally (run without grad, but whole) and its projector is not "
    "Idefics2's connector",
}
LLAVA = Family(
    "LLaVA",
    ("llava", "llava_next"),
    processor_classes=("LlavaProcessor", "LlavaNextProcessor"),
    template_ends_turns=False,
    **POSITIONAL_TOWER,
)
PALIGEMMA = Family(
    "PaliGemma", ("paligemma",), processor_classes=("PaliGemmaProcessor",), prefix_prompts=True, **POSITIONAL_TOWER
)
FAMILIES = (IDEFICS2, IDEFICS3, QWEN2_VL, LLAVA, PALIGEMMA)


def family_of(model_type: str) -> Family:
    """The family of a config's model_type; an unknown one gets no family switch or processor option."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return Family(
        f"{model_type} (not one docvlm knows)",
        (model_type,),
        why_not="docvlm has no family module for it: only switches that do not reach into the model apply",
    )


def family_of_processor(processor) -> Family:
    """The family a processor belongs to, by its class; an unknown one closes answers with its end of sequence."""
    name = type(processor).__name__
    for family in FAMILIES:
        if name in family.processor_classes:
            return family
    return family_of(name)


def family_at(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Family:
    """The family of the model at `path` (a folder or a Hub id), from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return family_of(config.model_type)


def refuse_what_does_not_apply(family: Family, model_args, training_args) -> None:
    """Stop at start-up when the recipe turns on a switch or a processor option the family does not have."""
    for name, is_on in MODULE_SWITCHES.items():
        if is_on(training_args) and name not in family.switches:
            raise UserError(
                f"{name} is on in the recipe, but it does not apply to {family.name} models: {family.why_not}. "
                f"Set {name}: {OFF.get(name, 'false')}."
            )
    for name, is_set in PROCESSOR_OPTIONS.items():
        if is_set(model_args) and name not in family.processor_options:
            raise UserError(
                f"{name} is set in the recipe, but it does not apply to {family.name} models: {family.why_not}. "
                f"Remove it (null)."
            )


def apply_switches(family: Family, model, training_args):
    """Patch a loaded model with the recipe's memory and speed switches (allowed by refuse_what_does_not_apply), and
    return the vision feature cache (None when off). A model whose modules are not where its family keeps them is
    refused, never trained with a switch silently off."""
    from docvlm.vision_tower import frozen_vision_without_grad, vision_tower

    args = training_args
    cache = None
    if args.vision_feature_cache != "off" and vision_tower(model) is not None:
        from docvlm import tiny
        from docvlm.vision_cache import FeatureCache, tower_identity

        folder = args.vision_feature_cache_dir or Path(tiny.cache_root()) / "vision-features"
        limit = int(args.vision_feature_cache_max_gb * 1e9)  # GB, as its name and `docvlm plan` say
        cache = FeatureCache(args.vision_feature_cache, folder, tower_identity(vision_tower(model)), limit)
    if args.vision_tower_no_grad and not frozen_vision_without_grad(model, args.vision_tower_pages, cache):
        raise UserError(f"vision_tower_no_grad is true, but this {family.name} model has no vision tower to skip.")
    if args.connector_lean_activations and not (family.lean_connector and family.lean_connector(model)):
        raise UserError(f"connector_lean_activations is true, but this {family.name} model has no connector.")
    checkpoint = family.checkpoint_connector
    pages, perceiver = args.connector_checkpoint_pages, args.connector_perceiver_pages
    if args.connector_checkpointing and not (checkpoint and checkpoint(model, pages, perceiver)):
        raise UserError(f"connector_checkpointing is true, but this {family.name} model has no connector.")
    # after connector_checkpointing, so that the features are rounded once, not in every recomputed chunk
    in_compute_dtype = family.connector_in_compute_dtype
    if args.connector_in_compute_dtype and not (in_compute_dtype and in_compute_dtype(model)):
        raise UserError(f"connector_in_compute_dtype is true, but this {family.name} model has no connector.")
    # after connector_lean_activations, whose norms these replace: the fused ones keep as little
    if args.fused_rms_norms and not (family.fuse_rms_norms and family.fuse_rms_norms(model)):
        raise UserError(f"fused_rms_norms is true, but this {family.name} model has no RMSNorm to fuse.")
    if args.compile_text_layers and not (family.compile_text_layers and family.compile_text_layers(model)):
        raise UserError(f"compile_text_layers is true, but this {family.name} model has no decoder layers.")
    return cache
