"""Model families as plug-ins: one module a family (docvlm.families.base.Family), found by the model config's
`model_type` or, where only a processor is at hand, by the processor's class. A recipe option that a family does not
offer stops at start-up, naming it and the family, instead of doing nothing or failing at the first step."""

from __future__ import annotations

from docvlm.errors import UserError
from docvlm.families.base import Family
from docvlm.families.gemma3 import GEMMA3
from docvlm.families.idefics2 import IDEFICS2
from docvlm.families.idefics3 import IDEFICS3
from docvlm.families.llava import LLAVA
from docvlm.families.paligemma import PALIGEMMA
from docvlm.families.qwen_vl import QWEN_VL
from docvlm.prompts import Prompt

FAMILIES: tuple[Family, ...] = (IDEFICS2, IDEFICS3, QWEN_VL, GEMMA3, LLAVA, PALIGEMMA)
# Processor options a recipe can set (ModelArguments), with the value that means "set".
PROCESSOR_OPTIONS = {
    "do_image_splitting": lambda args: bool(args.do_image_splitting),
    "image_longest_edge": lambda args: args.image_longest_edge is not None,
    "image_shortest_edge": lambda args: args.image_shortest_edge is not None,
    "image_min_pixels": lambda args: args.image_min_pixels is not None,
    "image_max_pixels": lambda args: args.image_max_pixels is not None,
}

__all__ = ["FAMILIES", "Family", "family_at", "family_of", "family_of_processor", "prompt_text"]


def family_of(model_type: str) -> Family:
    """The family of a config's model_type; an unknown one is a family with none of docvlm's patches."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return Family(f"{model_type} (not one docvlm knows)", (model_type,))


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


def refuse_processor_options(family: Family, model_args) -> None:
    """Stop at start-up when the recipe sets a processor option the family does not have."""
    for name, is_set in PROCESSOR_OPTIONS.items():
        if is_set(model_args) and name not in family.processor_options:
            raise UserError(
                f"{name} is set in the recipe, but it does not apply to {family.name} models: {family.why_not}. "
                f"Remove it (null)."
            )


def prompt_text(processor, prompt: Prompt | str, row: dict | str, pages: int = 1) -> str:
    """The text the model sees before it answers a row (or one question about one page), in the family's format."""
    prompt = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
    row = {"question": row} if isinstance(row, str) else row
    return family_of_processor(processor).prompt_text(processor, prompt, row, pages)
