"""The Qwen-VL family's processor: the image-only twin where torchvision does not import, the stock one where it
does, the same pages either way; and the recipe's page budget in pixels."""

import json

import pytest
from PIL import Image

from docvlm.families.qwen_vl.processor import image_only, torchvision_imports
from docvlm.fixtures import resolve
from docvlm.recipe.schema import ModelArguments
from docvlm.training.modeling import load_processor, model_type_at

QWEN_FIXTURES = ["docvlm:tiny-qwen2-vl", "docvlm:tiny-qwen2.5-vl", "docvlm:tiny-qwen3-vl"]
PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Total?<|im_end|>\n"


def pages():
    return [[Image.new("RGB", (300, 400), "white")], [Image.linear_gradient("L").convert("RGB").resize((520, 380))]]


@pytest.mark.parametrize("fixture", QWEN_FIXTURES)
def test_docvlm_loads_a_processor_that_keeps_the_stock_name_and_sizes_pages_by_the_recipes_budget(fixture, tmp_path):
    path = resolve(fixture)
    processor = load_processor(ModelArguments(), path, model_type_at(path))
    stock_name = type(processor).__name__
    assert stock_name.startswith("Qwen") and stock_name.endswith("Processor")
    # without torchvision the image-only twin, which saves itself under the stock name for users who have it
    assert getattr(processor, "image_only", False) is not torchvision_imports()
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == stock_name
    tokens = []
    for budget in (None, 25088, 12544):  # the fixture's own is 64 image tokens
        budgeted = load_processor(ModelArguments(image_max_pixels=budget), path, model_type_at(path))
        grid = budgeted(text=[PROMPT] * 2, images=pages(), return_tensors="pt", padding=True)["image_grid_thw"]
        tokens.append(int(grid.prod(dim=1).sum()) // 4)  # 2 x 2 patches make one image token
        if budget is not None:  # every page within the budget: its patches cover at most that many pixels
            patch = budgeted.image_processor.patch_size
            assert all(int(h * w) * patch * patch <= budget for _, h, w in grid.tolist())
    assert tokens[0] > tokens[1] > tokens[2] > 0, tokens


@pytest.mark.parametrize("fixture", QWEN_FIXTURES)
def test_the_image_only_processor_gives_the_stock_processors_tokens_and_pixels(fixture):
    if not torchvision_imports():
        pytest.skip(
            "torchvision does not import here, so the stock Qwen-VL processor cannot be built to compare with; this "
            "runs where it does (the GPU machines)"
        )
    from transformers import AutoProcessor, Qwen2VLImageProcessorPil

    path = resolve(fixture)
    stock = AutoProcessor.from_pretrained(path)
    twin = image_only(type(stock).__name__)(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),  # the CPU machines' image processor
        tokenizer=stock.tokenizer,
        chat_template=stock.chat_template,
    )
    got, want = (p(text=[PROMPT] * 2, images=pages(), return_tensors="pt", padding=True) for p in (twin, stock))
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    difference = (got["pixel_values"] - want["pixel_values"]).abs().max().item()
    print(f"{fixture}: largest pixel value difference, PIL against torchvision resizing: {difference:.4f}")
    assert difference < 0.05  # normalized units: under 1% of the [-1.8, 2.1] range
