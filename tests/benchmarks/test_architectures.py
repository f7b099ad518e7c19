"""The other architectures `make bench` builds, on the CPU: their sizes, and their baseline's collator."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import architectures, bench


@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_each_architecture_has_its_published_parameter_count(name):
    import transformers

    architecture = architectures.ARCHITECTURES[name]
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(architectures.real_config(architecture))
    billions = sum(p.numel() for p in model.parameters()) / 1e9  # tied embeddings count once
    assert billions == pytest.approx(architecture.parameters, rel=0.005)


# Image tokens of one 1700 x 2200 page at each model's recipe's page size: a page split into 4 x 4 crops and the
# whole page (Idefics3), one fixed-size image, or Qwen's 28 (32) px tokens within the recipe's budget
PAGE_TOKENS = {
    "qwen2.5-vl-7b": 1240,
    "qwen2-vl-2b": 1240,
    "qwen3-vl-4b": 945,
    "gemma3-4b": 256,
    "paligemma-3b-448": 1024,
    "llava-1.5-7b": 576,
    "smolvlm-2b": 17 * 81,
    "granite-docling-258m": 17 * 64,
}


@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_each_architecture_with_its_recipe_makes_the_real_models_image_tokens_a_page(name, tmp_path):
    import dataclasses

    import yaml

    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import load_processor

    architecture = architectures.ARCHITECTURES[name]
    config = architectures.real_config(architecture)
    config.save_pretrained(tmp_path)
    architectures.real_processor(architecture).save_pretrained(tmp_path)
    recipe = yaml.safe_load(Path(f"recipes/{architecture.recipe}.yaml").read_text())
    options = {f.name: recipe[f.name] for f in dataclasses.fields(ModelArguments) if f.name in recipe}
    processor = load_processor(ModelArguments(**options), str(tmp_path), config.model_type)  # as the recipe does
    page = Image.new("RGB", (1700, 2200), "white")
    if config.model_type == "paligemma":
        text = "What is the date?"  # PaliGemma's processor puts the image tokens before the prompt itself
    else:
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the date?"}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
    batch = processor(text=[text], images=[[page]], return_tensors="pt")
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    assert (batch["input_ids"] == image_token).sum().item() == PAGE_TOKENS[name]


def test_the_trl_style_baseline_trains_on_the_whole_chat_less_padding_and_image_tokens():
    from docvlm.fixtures import resolve
    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import load_processor, model_type_at

    path = resolve("docvlm:tiny-qwen2.5-vl")
    processor = load_processor(ModelArguments(), path, model_type_at(path))
    rows = [
        {"image": Image.new("RGB", (300, 400), "white"), "query": {"en": "What is the date?"}, "answers": ["1996"]},
        {
            "image": Image.new("RGB", (200, 300), "white"),
            "query": {"en": "Who signed the long letter?"},
            "answers": ["A"],
        },
    ]
    batch = architectures.TrlStyleCollator(processor, "Answer briefly.")(rows)
    labels, ids = batch["labels"], batch["input_ids"]
    image_or_pad = (ids == processor.image_token_id) | (ids == processor.tokenizer.pad_token_id)
    assert (labels[image_or_pad] == -100).all() and image_or_pad.any()
    assert ((labels == ids) | image_or_pad).all()  # every other token is trained on, the prompt included
    text = processor.tokenizer.decode(ids[0][labels[0] != -100])
    assert "What is the date?" in text and "1996" in text


def test_another_architectures_bench_without_a_gpu_says_what_to_do(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--model", "qwen2.5-vl-7b", "--setups", "baseline"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.main(["--model", "qwen2.5-vl-7b", "--setups", "baseline-masked"]) == 2
    assert "baseline-masked' is the Idefics2 notebook's" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an architecture it does not have is refused by the parser
        bench.main(["--model", "qwen9-vl"])


# Peak reserved GiB of each family recipe on its real architecture, `make bench FAMILIES=1` on one H100 (run BH,
# docs/benchmarks.md): 16 pages of 1700 x 2200, batch and pages as the recipes ship them.
MEASURED_PEAK_RESERVED_GIB = {
    "granite-docling-258m": 3.03,
    "qwen2-vl-2b": 4.31,
    "smolvlm-2b": 4.77,
    "paligemma-3b-448": 4.58,
    "gemma3-4b": 4.84,
    "qwen3-vl-4b": 5.91,
    "llava-1.5-7b": 6.41,
    "qwen2.5-vl-7b": 9.02,
}


@pytest.fixture(scope="module")
def bench_pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    bench.build_pages(folder, 8, (1700, 2200))
    return str(folder)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(MEASURED_PEAK_RESERVED_GIB))
def test_plan_predicts_each_family_recipes_measured_peak_within_15_percent(name, bench_pages, tmp_path, capsys):
    import re

    from docvlm import plan

    arch = architectures.ARCHITECTURES[name]
    architectures.real_config(arch).save_pretrained(tmp_path)
    architectures.real_processor(arch).save_pretrained(tmp_path)
    argv = ["--config", f"recipes/{arch.recipe}.yaml", "--model_name_or_path", str(tmp_path)]
    assert plan.main([*argv, "--dataset_name", bench_pages, "--sample", "4", "--group_column", "null"]) == 0
    predicted = float(re.search(r"peak reserved ~([\d.]+) GiB", capsys.readouterr().out).group(1))
    measured = MEASURED_PEAK_RESERVED_GIB[name]
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)
