"""The other architectures `make bench` builds, on the CPU: their sizes, and their baseline's collator."""

import pytest
import torch
from PIL import Image

from benchmarks import architectures, bench


def test_qwen2_5_vl_7b_architecture_has_8_3b_parameters():
    import transformers

    from docvlm.fixtures.qwen_vl import qwen_tokenizer, token_ids

    spec = architectures.QWEN2_5_VL_7B
    config = transformers.Qwen2_5_VLConfig(
        text_config=spec["text"], vision_config=spec["vision"], **token_ids(qwen_tokenizer())
    )
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.29  # Qwen2.5-VL-7B-Instruct's count


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
