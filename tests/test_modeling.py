import re

import pytest
import torch

from docvlm.config import ModelArguments, UserError, parse_recipe
from docvlm.modeling import keep_trainable_fp32, load_model, lora_config, quantization_config

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


def _peft_tiny_model_and_batch(size=4):
    from peft import get_peft_model

    from docvlm.collator import DocVQACollator
    from docvlm.data import load_splits
    from docvlm.modeling import load_processor, model_path

    data_args, model_args, _, _ = parse_recipe(["--config", "recipes/tiny_docvqa.yaml"])
    path = model_path(model_args)
    model = get_peft_model(load_model(model_args, torch.float32, path), lora_config(model_args))
    keep_trainable_fp32(model)
    train_rows, _ = load_splits(data_args, need_eval=False)
    collator = DocVQACollator(load_processor(model_args, path), data_args.instruction, 256, "first")
    model.train()
    return model, collator([train_rows[i] for i in range(size)])


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(first, second):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_connector_checkpointing_keeps_loss_and_gradients(tiny_model_path, tiny_dataset_path):
    """Recomputing the connector page by page, or a few pages at a time, changes no loss and no LoRA gradient."""
    from docvlm.modeling import checkpoint_connector

    model, batch = _peft_tiny_model_and_batch(size=4)
    calls = []
    connector = model.get_base_model().model.connector
    connector.modality_projection.register_forward_hook(lambda *_: calls.append(1))
    original = connector.forward
    plain = _loss_and_grads(model, batch)
    assert len(calls) == 1  # the whole batch at once
    assert any("connector" in name for name in plain[1])
    assert checkpoint_connector(model.get_base_model())
    page_by_page = _loss_and_grads(model, batch)
    assert len(calls) == 1 + 4 + 4  # page by page, then again page by page in the backward pass
    _assert_same(plain, page_by_page)

    connector.forward = original
    assert checkpoint_connector(model.get_base_model(), pages_per_chunk=3)
    chunked = _loss_and_grads(model, batch)
    assert len(calls) == 9 + 2 + 2  # pages 1-3 and 4, forward and recompute
    _assert_same(plain, chunked)
    assert not checkpoint_connector(torch.nn.Linear(2, 2))  # no connector: nothing to patch


def _saved_activation_bytes(module, *inputs, **kwargs) -> int:
    """Bytes of the activations autograd keeps for the backward pass of `module(...)`, each counted once (weights,
    which are kept anyway, are not counted)."""
    weights = {param.data_ptr() for param in module.parameters()}
    seen = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            seen[(tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*inputs, **kwargs)
    return sum(seen.values())


def test_lean_connector_keeps_loss_and_gradients_and_saves_less(tiny_model_path, tiny_dataset_path):
    """The connector's RMSNorms and gated MLP keep fewer activations; the loss and LoRA gradients do not change."""
    from docvlm.modeling import lean_connector_activations

    model, batch = _peft_tiny_model_and_batch(size=4)
    plain = _loss_and_grads(model, batch)
    assert lean_connector_activations(model.get_base_model())
    lean = _loss_and_grads(model, batch)
    _assert_same(plain, lean)
    assert any("connector" in name for name in lean[1])
    assert not lean_connector_activations(torch.nn.Linear(2, 2))  # no connector: nothing to change

    # What it saves shows in half precision, as on a GPU: the tiny connector in bf16, on 3 pages of 40 patches.
    from transformers import AutoConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    config = AutoConfig.from_pretrained(tiny_model_path)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    holder.model.connector = Idefics2Connector(config).to(torch.bfloat16).requires_grad_(False)
    context = torch.randn(3, 40, config.vision_config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(3, 40, dtype=torch.bool)
    connector = holder.model.connector
    plain_bytes = _saved_activation_bytes(connector, context, attention_mask=mask)
    assert lean_connector_activations(holder)
    assert _saved_activation_bytes(connector, context, attention_mask=mask) < 0.8 * plain_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_and_gated_product_match_autograd(dtype):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2RMSNorm

    from docvlm.modeling import _lean_rms_norm, _SiluTimes

    torch.manual_seed(0)
    norm = Idefics2RMSNorm(64, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)  # trainable here, so its gradient is checked too
    lean = _lean_rms_norm(norm)
    hidden = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 7, 64, dtype=dtype)
    expected = norm(hidden)
    expected_grads = torch.autograd.grad(expected, [hidden, norm.weight], grad)
    got = lean(hidden)
    got_grads = torch.autograd.grad(got, [hidden, norm.weight], grad)
    assert torch.equal(got, expected)  # the forward pass is the module's own, op for op
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for name, a, b in zip(["hidden", "weight"], got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **tolerance, msg=name)

    gate = torch.randn(5, 32, dtype=dtype, requires_grad=True)
    up = torch.randn(5, 32, dtype=dtype, requires_grad=True)
    grad = torch.randn(5, 32, dtype=dtype)
    expected = torch.nn.functional.silu(gate) * up
    expected_grads = torch.autograd.grad(expected, [gate, up], grad)
    got = _SiluTimes.apply(gate, up)
    assert torch.equal(got, expected)
    for a, b in zip(torch.autograd.grad(got, [gate, up], grad), expected_grads, strict=True):
        assert torch.equal(a, b)  # the same kernels as autograd's, bit for bit


def test_connector_checkpoint_pages_must_be_positive():
    with pytest.raises(UserError, match="connector_checkpoint_pages must be at least 1"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--connector_checkpoint_pages", "0"])
    with pytest.raises(UserError, match="vision_tower_pages must be 0"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--vision_tower_pages", "-1"])


def test_frozen_vision_tower_builds_no_graph(tiny_model_path, tiny_dataset_path):
    """Gradient checkpointing marks every input-embedding output as requiring grad, the vision tower's too, so the
    frozen tower would be back-propagated for nothing; without its graph the loss and LoRA gradients are the same."""
    from docvlm.modeling import frozen_vision_without_grad, vision_tower

    model, batch = _peft_tiny_model_and_batch(size=2)
    model.enable_input_require_grads()  # what gradient_checkpointing_enable() and TRL do for adapters
    tower = vision_tower(model.get_base_model())
    assert tower is model.get_base_model().model.vision_model
    tracked = []
    tower.register_forward_hook(lambda _m, _i, out: tracked.append(out.last_hidden_state.requires_grad))
    with_graph = _loss_and_grads(model, batch)
    assert tracked == [True]  # the problem: a graph through a tower nothing in it can learn from
    original_forward = tower.forward
    assert frozen_vision_without_grad(model.get_base_model())
    without_graph = _loss_and_grads(model, batch)
    assert tracked == [True, False]
    _assert_same(with_graph, without_graph)

    # A page at a time: the same outputs, so the same loss and gradients.
    pages_per_call = []

    def counting(**kwargs):
        pages_per_call.append(kwargs["pixel_values"].shape[0])
        return original_forward(**kwargs)

    tower.forward = counting
    assert frozen_vision_without_grad(model.get_base_model(), pages_per_chunk=1)
    one_by_one = _loss_and_grads(model, batch)
    assert pages_per_call == [1, 1] and tracked == [True, False, False]
    _assert_same(with_graph, one_by_one)

    next(tower.parameters()).requires_grad_(True)  # a recipe that trains part of the tower keeps its graph
    _loss_and_grads(model, batch)
    assert tracked == [True, False, False, True] and pages_per_call == [1, 1, 2]
    assert not frozen_vision_without_grad(torch.nn.Linear(2, 2))


def test_expandable_segments_are_set_at_run_time_unless_the_environment_says(monkeypatch):
    from docvlm import modeling

    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.use_expandable_segments() is False and calls == []  # no GPU: nothing to set

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.use_expandable_segments() is True
    assert calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:False")
    assert modeling.use_expandable_segments() is False  # the user's own setting wins
    assert calls == ["expandable_segments:True"]


def test_cudnn_attention_switch_turns_cudnn_sdpa_off_on_a_gpu_only(monkeypatch):
    from docvlm import modeling

    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert modeling.disable_cudnn_attention() is False and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert modeling.disable_cudnn_attention() is True and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def test_trust_remote_code_is_off_unless_asked_and_then_warned_about(tiny_model_path, capsys, monkeypatch):
    import transformers

    from docvlm.config import ModelArguments, parse_recipe
    from docvlm.modeling import load_model

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
