import re

import pytest
import torch

from docvlm.errors import UserError
from docvlm.recipe.parse import parse_recipe
from docvlm.recipe.schema import ModelArguments
from docvlm.training.modeling import keep_trainable_fp32, load_model, lora_config, quantization_config

SEED_REGEX = (
    r".*(text_model|modality_projection|perceiver_resampler)"
    r".*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
)


def test_quantization_config_follows_precision():
    args = ModelArguments(load_in_4bit=True, use_bnb_nested_quant=True, bnb_4bit_skip_modules=["lm_head"])
    q = quantization_config(args, torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.llm_int8_skip_modules == ["lm_head"]
    # naming other modules keeps transformers' default of leaving the output head unquantized
    vision = ModelArguments(load_in_4bit=True, bnb_4bit_skip_modules=["model.vision_model"])
    assert quantization_config(vision, torch.float32).llm_int8_skip_modules == ["model.vision_model", "lm_head"]
    assert quantization_config(args, torch.float16).bnb_4bit_compute_dtype == torch.float16
    fixed = ModelArguments(load_in_4bit=True, bnb_4bit_compute_dtype="float32", bnb_4bit_quant_storage="bfloat16")
    q = quantization_config(fixed, torch.bfloat16)
    assert q.bnb_4bit_compute_dtype == torch.float32 and q.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(ModelArguments(), torch.float32) is None
    with pytest.raises(UserError, match="8 bit and 4 bit"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--load_in_8bit", "true"])


def test_lora_targets_text_connector_and_resampler_only(tiny_model_path):
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    config = lora_config(ModelArguments(use_peft=True, lora_r=8, lora_alpha=8, lora_target_regex=SEED_REGEX))
    assert config.init_lora_weights == "gaussian"
    peft_model = get_peft_model(model, config)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert adapted and all(re.match(SEED_REGEX, name) for name in adapted)
    assert any("text_model" in n for n in adapted) and any("perceiver_resampler" in n for n in adapted)
    assert any("modality_projection" in n for n in adapted)
    assert not any("vision_model" in n for n in adapted)
    assert lora_config(ModelArguments(use_peft=False)) is None


def test_tiny_model_loads_in_4bit_on_cpu(tiny_model_path):
    import bitsandbytes as bnb

    args = ModelArguments(load_in_4bit=True)
    model = load_model(args, torch.float32, tiny_model_path)
    assert model.is_loaded_in_4bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_a_4bit_model_on_the_cpu_trains_and_answers_the_same_after_an_evaluation():
    """On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first no-grad forward in eval mode,
    for a bf16 kernel that has no backward (docvlm.training.modeling.keep_4bit_cpu_math_in_compute_dtype). After an
    evaluation the model must still answer and train as before it. Other CPUs never repack: there only the
    switch being off is checked."""
    import bitsandbytes as bnb

    from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch

    model, batch = peft_tiny_model_and_batch(2)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # read, not getattr with a default: a bitsandbytes that renames the switch fails here on any CPU
    assert layers and all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    trained_before = loss_and_grads(model, batch)
    with torch.no_grad():
        training_logits = model(**batch).logits
    model.eval()
    with torch.no_grad():
        evaluation_logits = model(**batch).logits
    model.train()
    torch.testing.assert_close(evaluation_logits, training_logits)
    assert_same(trained_before, loss_and_grads(model, batch))


def test_keep_trainable_fp32_undoes_the_bf16_cast():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model.to(torch.bfloat16)
    assert keep_trainable_fp32(model) == 4  # weight + bias of the norm and the head
    assert model[1].weight.dtype == model[2].weight.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16  # frozen weights keep their dtype
    # A small update survives in fp32 but vanishes in bf16: why trainable weights must stay fp32.
    one = torch.ones((), dtype=torch.float32)
    assert (one + 1e-4) != one and (one.bfloat16() + 1e-4) == one.bfloat16()


def test_connector_checkpoint_pages_must_be_positive():
    with pytest.raises(UserError, match="connector_checkpoint_pages must be at least 1"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--connector_checkpoint_pages", "0"])
    with pytest.raises(UserError, match="connector_perceiver_pages must be at least 1 or null"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--connector_perceiver_pages", "0"])
    tiny = ["--config", "recipes/tiny_docvqa.yaml", "--connector_checkpointing", "true"]
    with pytest.raises(UserError, match=r"connector_perceiver_pages \(2\) is below connector_checkpoint_pages \(3\)"):
        parse_recipe([*tiny, "--connector_checkpoint_pages", "3", "--connector_perceiver_pages", "2"])
    with pytest.raises(UserError, match="connector_perceiver_pages is set, but connector_checkpointing is false"):
        parse_recipe([*tiny, "--connector_checkpointing", "false", "--connector_perceiver_pages", "8"])
    assert parse_recipe([*tiny, "--connector_perceiver_pages", "8"])[2].connector_perceiver_pages == 8
    with pytest.raises(UserError, match="vision_tower_pages must be 0"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--vision_tower_pages", "-1"])


def test_trust_remote_code_is_off_unless_asked_and_then_warned_about(tiny_model_path, capsys, monkeypatch):
    import transformers

    from docvlm.recipe.parse import parse_recipe
    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import load_model

    assert parse_recipe(["--config", "recipes/docvqa_qlora.yaml"])[2].trust_remote_code is False
    seen = {}

    def record(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", record)
    for trusted in (False, True):
        with pytest.raises(RuntimeError, match="stop here"):
            load_model(ModelArguments(), torch.float32, tiny_model_path, trust_remote_code=trusted, quantize=False)
        assert seen["trust_remote_code"] is trusted and seen["use_safetensors"] is True
        warned = "trust_remote_code is true: Python code that ships with" in capsys.readouterr().err
        assert warned is trusted
