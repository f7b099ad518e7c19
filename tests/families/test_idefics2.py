"""Idefics2's connector patches (docvlm.families.idefics2): the same loss and gradients, less memory."""

import pytest
import torch

from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch


def test_connector_checkpointing_keeps_loss_and_gradients(tiny_model_path, tiny_dataset_path):
    """Recomputing the connector page by page, or a few pages at a time, changes no loss and no LoRA gradient."""
    from docvlm.families.idefics2.connector import checkpoint_connector

    model, batch = peft_tiny_model_and_batch(size=4)
    calls = []
    connector = model.get_base_model().model.connector
    connector.modality_projection.register_forward_hook(lambda *_: calls.append(1))
    original = connector.forward
    plain = loss_and_grads(model, batch)
    assert len(calls) == 1  # the whole batch at once
    assert any("connector" in name for name in plain[1])
    assert checkpoint_connector(model.get_base_model())
    page_by_page = loss_and_grads(model, batch)
    assert len(calls) == 1 + 4 + 4  # page by page, then again page by page in the backward pass
    assert_same(plain, page_by_page)

    connector.forward = original
    assert checkpoint_connector(model.get_base_model(), pages_per_chunk=3)
    chunked = loss_and_grads(model, batch)
    assert len(calls) == 9 + 2 + 2  # pages 1-3 and 4, forward and recompute
    assert_same(plain, chunked)
    assert not checkpoint_connector(torch.nn.Linear(2, 2))  # no connector: nothing to patch

    # the projection page by page and the perceiver all 4 pages at once: the same loss and gradients
    projected, perceived, layer_calls = [], [], []
    connector.modality_projection.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[0]))
    connector.perceiver_resampler.register_forward_pre_hook(
        lambda module, args, kwargs: perceived.append(kwargs["context"].shape[0]), with_kwargs=True
    )
    for layer in connector.perceiver_resampler.layers:  # a module inside: a recompute calls the layer's forward
        layer.self_attn.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    connector.forward = original
    assert checkpoint_connector(model.get_base_model(), pages_per_chunk=1, perceiver_pages=4)
    split = loss_and_grads(model, batch)
    # the projection forward, then recomputed in the backward pass (pre-hooks: a recompute stops once it has what
    # it needs); the perceiver runs once, and each of its layers is recomputed by itself
    assert projected == [1] * 8 and perceived == [4]
    assert len(layer_calls) == 2 * len(connector.perceiver_resampler.layers)
    assert_same(plain, split)
    connector.forward = original


def test_without_grad_the_connector_runs_in_its_chunks_with_the_same_output(tiny_model_path):
    """Generation (no grad) runs a checkpointed connector in the recipe's chunks, projection and perceiver each in
    their own, which bounds evaluation's memory at larger batches; the output is the whole batch's."""
    from transformers import AutoConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    from docvlm.families.idefics2.connector import checkpoint_connector

    config = AutoConfig.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    holder.model.connector = connector = Idefics2Connector(config).eval()
    context = torch.randn(5, 40, config.vision_config.hidden_size)
    mask = torch.ones(5, 40, dtype=torch.bool)
    mask[4, 30:] = False  # a smaller page, padded
    with torch.no_grad():
        whole = connector(context, attention_mask=mask)
    projected, perceived = [], []
    connector.modality_projection.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[0]))
    connector.perceiver_resampler.register_forward_pre_hook(
        lambda module, args, kwargs: perceived.append(kwargs["context"].shape[0]), with_kwargs=True
    )
    assert checkpoint_connector(holder, pages_per_chunk=2, perceiver_pages=4)
    with torch.no_grad():
        chunked = connector(context, attention_mask=mask)
    assert projected == [2, 2, 1] and perceived == [4, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_the_perceiver_recomputes_each_layer_just_before_its_own_backward_pass(tiny_model_path):
    """With the perceiver a few pages at a time, a layer is recomputed only when the backward pass reaches it (the
    last layer first), so that one layer's activations are alive at a time; loss and gradients are unchanged."""
    from transformers import AutoConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    from docvlm.families.idefics2.connector import checkpoint_connector

    config = AutoConfig.from_pretrained(tiny_model_path)
    config.perceiver_config.resampler_depth = 3
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    holder.model.connector = connector = Idefics2Connector(config).train()
    context = torch.randn(4, 40, config.vision_config.hidden_size)
    mask = torch.ones(4, 40, dtype=torch.bool)

    def grads():
        connector.zero_grad()
        connector(context, attention_mask=mask).square().mean().backward()
        return {name: param.grad.clone() for name, param in connector.named_parameters() if param.grad is not None}

    plain = grads()
    assert checkpoint_connector(holder, pages_per_chunk=2, perceiver_pages=4)
    order, backward_reached = [], []
    for index, layer in enumerate(connector.perceiver_resampler.layers):
        layer.self_attn.register_forward_pre_hook(lambda *_, index=index: order.append(index))
        layer.register_full_backward_hook(lambda *_, index=index: backward_reached.append((index, len(order))))
    recomputed = grads()
    assert order == [0, 1, 2, 2, 1, 0]  # forward, then each layer as the backward pass reaches it
    assert backward_reached == [(2, 4), (1, 5), (0, 6)]  # each one's backward right after its own recompute
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


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
    from docvlm.families.idefics2.connector import lean_connector_activations

    model, batch = peft_tiny_model_and_batch(size=4)
    plain = loss_and_grads(model, batch)
    assert lean_connector_activations(model.get_base_model())
    lean = loss_and_grads(model, batch)
    assert_same(plain, lean)
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


class _LinearReturningInputDtype(torch.nn.Linear):
    """A linear layer that returns its input's dtype under autocast, as bitsandbytes' 4-bit layers do."""

    def forward(self, hidden):
        return super().forward(hidden).to(hidden.dtype)


def test_the_connector_in_compute_dtype_takes_rounded_features_and_keeps_half_the_activations(tiny_model_path):
    """Under autocast, fp32 features from the tower reach the connector rounded to autocast's dtype, so that layers
    which return their input's dtype (4-bit ones) no longer keep fp32 activations; without autocast nothing
    changes."""
    from transformers import AutoConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    from docvlm.families.idefics2.connector import half_precision_connector_input

    config = AutoConfig.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    # weights in bf16, as the 8B model's non-quantized ones: autocast then makes no copies of them
    holder.model.connector = connector = Idefics2Connector(config).to(torch.bfloat16).train()
    for module in [connector.modality_projection, *connector.perceiver_resampler.layers]:
        for name, child in list(module.named_modules()):
            if isinstance(child, torch.nn.Linear) and name:
                quantized_like = _LinearReturningInputDtype(child.in_features, child.out_features, bias=False)
                quantized_like.weight = child.weight
                parent, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(parent), leaf, quantized_like)
    context = torch.randn(3, 40, config.vision_config.hidden_size, requires_grad=True)  # as the tower gives it
    mask = torch.ones(3, 40, dtype=torch.bool)
    taken = []
    connector.modality_projection.register_forward_pre_hook(lambda module, args: taken.append(args[0].dtype))

    def saved_bytes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _saved_activation_bytes(connector, context, attention_mask=mask)

    plain = saved_bytes()
    assert half_precision_connector_input(holder)
    rounded = saved_bytes()
    assert taken == [torch.float32, torch.bfloat16]
    # the linear layers keep bf16 copies of their inputs either way; the rest became bf16 instead of fp32
    assert rounded < 0.85 * plain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = connector(context, attention_mask=mask)
    assert output.dtype == torch.bfloat16
    output.float().square().mean().backward()  # gradients still reach the features through the rounding
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert not half_precision_connector_input(torch.nn.Linear(2, 2))  # no connector: nothing to patch

    # without autocast (fp32 training) there is nothing to round: the same outputs, in fp32
    holder.model.connector = fp32_connector = Idefics2Connector(config).train()
    fp32_output = fp32_connector(context, attention_mask=mask)
    assert half_precision_connector_input(holder)
    assert torch.equal(fp32_connector(context, attention_mask=mask), fp32_output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_and_gated_product_match_autograd(dtype):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2RMSNorm

    from docvlm.families.idefics2.connector import _lean_rms_norm, _SiluTimes

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


def test_fused_rms_norm_rounds_once_and_differs_from_the_module_by_at_most_a_half_precision_step():
    """The fused norm is the module's math rounded once, after the scale; its gradients are the module's."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from docvlm.families.idefics2.connector import _fused_rms_norm

    torch.manual_seed(0)
    norm = MistralRMSNorm(256, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    fused = _fused_rms_norm(norm)
    hidden = torch.randn(4, 9, 256, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4, 9, 256, dtype=torch.bfloat16)
    got = fused(hidden)
    full = hidden.detach().float()
    once = (full * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, once)
    module = norm(hidden)
    assert not torch.equal(got, module)  # the module rounds twice: a check that would pass unfused means nothing
    torch.testing.assert_close(got, module, rtol=2**-7, atol=1e-6)  # at most one bf16 step apart

    # gradients against the module's own in fp32: within half precision's noise
    reference = MistralRMSNorm(256, eps=1e-5)
    reference.weight.data.copy_(norm.weight.float())
    expected = torch.autograd.grad(reference(full.requires_grad_()), [full, reference.weight], grad.float())
    got_grads = torch.autograd.grad(fused(hidden), [hidden, norm.weight], grad)
    for name, a, b in zip(["hidden", "weight"], got_grads, expected, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2, msg=name)

    # a weight in another dtype than the input: the module's forward, whose output takes the wider dtype
    norm.float()
    assert torch.equal(fused(hidden), norm(hidden)) and fused(hidden).dtype == torch.float32


def test_fuse_rms_norms_changes_the_decoders_and_the_connectors_norms_only(tiny_model_path):
    from transformers import AutoModelForImageTextToText

    from docvlm.families.idefics2.connector import fuse_rms_norms

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    norms = {name: module for name, module in model.named_modules() if type(module).__name__.endswith("RMSNorm")}
    fused = fuse_rms_norms(model)
    patched = {name for name, module in norms.items() if "forward" in vars(module)}
    assert fused == len(patched) and patched == {n for n in norms if ".text_model." in n or ".connector." in n}
    assert any(".connector." in name for name in patched) and any(".text_model." in name for name in patched)
    assert fuse_rms_norms(torch.nn.Linear(2, 2)) == 0  # nothing to fuse


@pytest.fixture(scope="module")
def idefics2_8b_config():
    from docvlm.families.idefics2 import IDEFICS2_8B
    from docvlm.fixtures.models import idefics2_config

    return idefics2_config(IDEFICS2_8B)


def shapes(tokens=0, causal_pairs=0, pages=0, patches=0, patch_pairs=0):
    return dict(tokens=tokens, causal_pairs=causal_pairs, pages=pages, patches=patches, patch_pairs=patch_pairs)


def test_the_decoders_flops_are_what_torch_counts_on_the_8b_architecture(idefics2_8b_config):
    """The decoder on meta tensors (no memory, no compute): torch's FLOP counter sees its matmuls and full
    attention forward; training is one more matmul a linear layer (input gradients only) and two an attention."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    from docvlm.families.idefics2 import training_flops

    with torch.device("meta"):
        decoder = AutoModel.from_config(idefics2_8b_config.text_config, dtype=torch.bfloat16)
    length = 96
    with FlopCounterMode(display=False) as counter:
        decoder(inputs_embeds=torch.zeros(1, length, 4096, device="meta", dtype=torch.bfloat16))
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    linear, attention = counts.pop("aten.mm"), counts.pop("aten.bmm")
    assert not counts
    # the counter counts the whole square of attention pairs: compare at that many pairs
    counted = training_flops(idefics2_8b_config, shapes(tokens=length, causal_pairs=length**2), tower_runs=False)
    assert counted == 2 * linear + 3 * attention


def test_the_tower_and_connector_flops_are_what_torch_counts(idefics2_8b_config):
    """A page of 6 x 5 patches through the 8B tower and connector (uninitialised CPU weights: only shapes count).
    Torch's counter does not see attention on the CPU; attention is under 1% at this size."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Idefics2Model

    from docvlm.families.idefics2 import training_flops

    with torch.device("meta"):
        model = Idefics2Model(idefics2_8b_config)
    tower, connector = model.vision_model.to_empty(device="cpu"), model.connector.to_empty(device="cpu")
    rows, cols = 6, 5
    mask = torch.ones(1, rows, cols, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        features = tower(pixel_values=torch.zeros(1, 3, rows * 14, cols * 14), patch_attention_mask=mask)
        connector(features.last_hidden_state, attention_mask=mask.view(1, -1))
    counts = counter.get_flop_counts()
    tower_ops = sum(counts["Idefics2VisionTransformer"].values())
    connector_ops = sum(counts["Idefics2Connector"].values())
    page = shapes(pages=1, patches=rows * cols, patch_pairs=(rows * cols) ** 2)
    cached = training_flops(idefics2_8b_config, page, tower_runs=False)
    with_tower = training_flops(idefics2_8b_config, page, tower_runs=True)
    assert cached / 2 == pytest.approx(connector_ops, rel=0.01)  # forward + input-gradient backward
    assert with_tower - cached == pytest.approx(tower_ops, rel=0.01)  # forward only
