"""Each family allows the switches and processor options that apply to it and refuses the others at start-up,
naming the switch and the family (docvlm.families)."""

import pytest
import transformers

from docvlm.errors import UserError
from docvlm.families import (
    FAMILIES,
    IDEFICS2,
    LLAVA,
    QWEN_VL,
    family_at,
    family_of,
    family_of_processor,
    refuse_processor_options,
)
from docvlm.recipe.parse import parse_recipe


def refuse_what_does_not_apply(family, model_args, training_args) -> None:
    """What start-up refuses for a family: its speed switches, then its processor options."""
    from docvlm import speedups

    speedups.refuse_what_does_not_apply(family, training_args)
    refuse_processor_options(family, model_args)


def recipe(*extra):
    """docvqa_qlora without its feature cache (tests/speedups/test_feature_cache.py covers that switch) and with its
    connector recomputed in one kind of chunk (so that `extra` may turn connector checkpointing off), then `extra`."""
    argv = ["--config", "recipes/docvqa_qlora.yaml", "--vision_feature_cache", "off", "--connector_perceiver_pages"]
    argv += ["null", "--vision_tower_offload", "false", *extra]
    _, model_args, training_args, _ = parse_recipe(argv)
    return model_args, training_args


@pytest.mark.parametrize(
    "config, switch, family",
    [
        ("Idefics3Config", "connector_checkpointing", "Idefics3 / SmolVLM"),  # its connector takes one tensor
        ("SmolVLMConfig", "connector_lean_activations", "Idefics3 / SmolVLM"),
        ("Qwen2VLConfig", "vision_tower_pages", "Qwen-VL"),  # its tower takes a grid, positionally
        ("LlavaConfig", "connector_checkpointing", "LLaVA"),
        ("PaliGemmaConfig", "vision_tower_pages", "PaliGemma"),
    ],
)
def test_a_switch_that_does_not_apply_to_the_family_is_refused_naming_both(config, switch, family):
    model_type = getattr(transformers, config)().model_type
    off = ["--connector_checkpointing", "false", "--connector_lean_activations", "false", "--vision_tower_pages", "0"]
    off += ["--fused_rms_norms", "false", "--connector_in_compute_dtype", "false"]
    model_args, training_args = recipe(*off, "--image_longest_edge", "null")
    refuse_what_does_not_apply(family_of(model_type), model_args, training_args)  # all off: accepted
    model_args, training_args = recipe(*off, f"--{switch}", "4" if switch == "vision_tower_pages" else "true")
    with pytest.raises(UserError, match=rf"{switch} is on in the recipe, but it does not apply to {family} models"):
        refuse_what_does_not_apply(family_of(model_type), model_args, training_args)


@pytest.mark.parametrize(
    "model_type, option, value, family",
    [
        ("qwen2_vl", "image_longest_edge", "980", "Qwen-VL"),  # its processor would read an edge as an area
        ("qwen3_vl", "image_longest_edge", "980", "Qwen-VL"),
        ("idefics2", "image_max_pixels", "1003520", "Idefics2"),  # and Idefics2's an area as an edge
        ("llava", "image_max_pixels", "1003520", "LLaVA"),  # a fixed-size page has no budget
    ],
)
def test_a_page_budget_in_the_other_familys_units_is_refused(model_type, option, value, family):
    off = ["--connector_checkpointing", "false", "--connector_lean_activations", "false", "--vision_tower_pages", "0"]
    off += ["--fused_rms_norms", "false", "--connector_in_compute_dtype", "false", "--image_longest_edge", "null"]
    model_args, training_args = recipe(*off, f"--{option}", value)
    with pytest.raises(UserError, match=f"{option} is set in the recipe, but it does not apply to {family}"):
        refuse_processor_options(family_of(model_type), model_args)


def test_idefics2_takes_every_switch_and_an_unknown_family_none(tiny_model_path):
    assert family_at(tiny_model_path) is IDEFICS2
    model_args, training_args = recipe("--image_longest_edge", "980", "--do_image_splitting", "true")
    refuse_what_does_not_apply(IDEFICS2, model_args, training_args)  # the flagship recipe, every switch on
    with pytest.raises(UserError, match=r"connector_lean_activations is on .*\(not one docvlm knows\)"):
        refuse_what_does_not_apply(family_of("blip-2"), model_args, training_args)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_family_names_processor_classes_that_exist_and_is_found_from_them(family):
    for name in family.processor_classes:
        assert hasattr(transformers, name), f"transformers has no {name}"
        assert family_of_processor(type(name, (), {})()) is family


def test_the_end_of_turn_comes_from_the_family_and_a_tokenizer_without_it_is_refused(processor):
    tokenizer = processor.tokenizer
    assert family_of_processor(processor) is IDEFICS2
    assert IDEFICS2.end_of_turn_id(tokenizer) == 32002 and IDEFICS2.stop_ids(tokenizer) == [32002, 2]
    assert LLAVA.end_of_turn_id(tokenizer) == tokenizer.eos_token_id  # LLaVA closes an answer with </s>
    with pytest.raises(UserError, match=r"no <\|im_end\|> token, which closes an answer in Qwen-VL models"):
        QWEN_VL.end_of_turn_id(tokenizer)
    unknown = family_of_processor(object())
    assert "not one docvlm knows" in unknown.name and unknown.stop_ids(tokenizer) == [2]


def test_llava_answers_are_closed_by_the_end_of_sequence_its_template_does_not_write(processor):
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "42"}, {"type": "text", "text": "units"}]},
    ]
    closed = LLAVA.training_turns(turns, processor.tokenizer)
    assert closed[1]["content"] == [{"type": "text", "text": "42"}, {"type": "text", "text": "units</s>"}]
    assert closed[0] == turns[0] and turns[1]["content"][1]["text"] == "units"  # the row itself is left alone
    assert IDEFICS2.training_turns(turns, processor.tokenizer) is turns  # its template closes turns itself


def test_a_switch_whose_modules_are_missing_is_an_error_never_silently_off():
    import torch

    from docvlm import speedups
    from docvlm.families import Family

    def apply_switches(family, model, training_args):
        speedups.apply(speedups.LOADED, speedups.SwitchContext(training_args, family, model=model))

    anything = Family("Test family", ("test",), frozen_tower=True)  # a tower to skip, no connector patch
    off = ["--vision_tower_no_grad", "false", "--connector_checkpointing", "false"]
    _, training_args = recipe(*off, "--connector_lean_activations", "true")
    with pytest.raises(UserError, match="connector_lean_activations is true, but this Test family model has no"):
        apply_switches(anything, torch.nn.Linear(2, 2), training_args)
    connector_off = ["--connector_lean_activations", "false", "--connector_checkpointing", "false"]
    _, training_args = recipe(*connector_off, "--connector_in_compute_dtype", "false")
    with pytest.raises(UserError, match="vision_tower_no_grad is true, but this Test family model has no vision"):
        apply_switches(anything, torch.nn.Linear(2, 2), training_args)
    with pytest.raises(UserError, match="connector_checkpointing is true, but this Idefics2 model has no connector"):
        apply_switches(IDEFICS2, torch.nn.Linear(2, 2), recipe(*off[:2], "--connector_lean_activations", "false")[1])
