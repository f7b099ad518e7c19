"""Model cards: what was trained on what, and evaluation numbers labelled with the weights they were measured on."""

import json

from docvlm.evaluation.card import adapter_card, hub_id, merged_card
from docvlm.recipe.schema import DataArguments, ModelArguments

REPORT = {
    "count": 100,
    "split": "test",
    "systems": {"before": {"anls": 0.0, "exact_match": 0.0}, "after": {"anls": 0.7312, "exact_match": 0.7}},
}


def args(model="HuggingFaceM4/idefics2-8b", dataset="nielsr/docvqa_1200_examples"):
    return ModelArguments(model_name_or_path=model, load_in_4bit=True, lora_r=8, lora_alpha=8), DataArguments(
        dataset_name=dataset
    )


def test_hub_ids_are_told_from_paths_and_fixtures():
    assert hub_id("HuggingFaceM4/idefics2-8b") == "HuggingFaceM4/idefics2-8b"
    for local in ("/data/idefics2", "./model", "docvlm:tiny-idefics2", "a/b/c", None, "~/x/y"):
        assert hub_id(local) is None


def test_adapter_card_names_the_base_and_the_adapters_numbers(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    card = adapter_card(*args(), tmp_path)
    assert "base_model: HuggingFaceM4/idefics2-8b" in card and "datasets: [nielsr/docvqa_1200_examples]" in card
    assert "library_name: peft" in card and "pipeline_tag: image-text-to-text" in card
    assert "| base + this adapter | 0.731 | 0.700 |" in card and "100 held-out questions" in card
    # TRL's template text, which described a text model with no name
    for boilerplate in ("[None]", "licence", "text-generation", "time machine"):
        assert boilerplate not in card


def test_adapter_card_before_evaluation_says_how_to_evaluate(tmp_path):
    card = adapter_card(*args("docvlm:tiny-idefics2", "docvlm:tiny-docs"), tmp_path)
    assert "Not evaluated yet" in card and "base_model:" not in card and "datasets:" not in card


def test_merged_card_says_whose_numbers_it_shows(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    dequantized = merged_card(*args(), tmp_path, "bfloat16", "dequantized")
    original = merged_card(*args(), tmp_path, "bfloat16", "original")
    for card in (dequantized, original):
        assert "library_name: transformers" in card and "merged" in card
        assert "measured on the 4-bit base + adapter before merging, not on this folder's weights" in card
    assert "dequantization of the 4-bit base it was trained on" in dequantized
    assert "its answers differ from the adapter's" in original and "--base dequantized" in original
