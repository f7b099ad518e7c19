"""The lean LoRA forward (docvlm.speedups.lean_lora): peft's loss and gradients in fewer kernel launches, and peft's
own forward wherever the lean one does not apply."""

import pytest
import torch

from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch


def lora_model_and_batch(dropout="0.0"):
    torch.manual_seed(0)  # the same LoRA initialisation every time
    return peft_tiny_model_and_batch(4, "recipes/tiny_docvqa.yaml", "--lora_dropout", dropout)


def test_the_lean_forward_gives_peft_s_loss_and_gradients_on_4bit_layers():
    from peft.tuners.lora import LoraLayer

    from docvlm.speedups.lean_lora import lean_lora_forward

    model, batch = lora_model_and_batch()
    assert any("4bit" in type(m).__name__ for m in model.modules() if isinstance(m, LoraLayer))
    before = loss_and_grads(model, batch)
    patched = lean_lora_forward(model)
    assert patched == sum(1 for m in model.modules() if isinstance(m, LoraLayer)) > 0
    assert_same(before, loss_and_grads(model, batch))


@pytest.mark.parametrize("reentrant", [True, False])  # the 8B recipes' form, and the other families'
def test_the_lean_forward_with_dropout_draws_the_same_mask_under_gradient_checkpointing(reentrant):
    from docvlm.speedups.lean_lora import lean_lora_forward

    model, batch = lora_model_and_batch("0.1")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    torch.manual_seed(1)
    before = loss_and_grads(model, batch)
    lean_lora_forward(model)
    torch.manual_seed(1)
    assert_same(before, loss_and_grads(model, batch))


def launches(model, batch) -> int:
    """Operators that compute (a kernel each on a GPU) in one forward and backward pass, under bf16 autocast."""
    from torch.profiler import ProfilerActivity, profile

    # views, and casts (under autocast, the same casts in both forwards)
    no_kernel = set(
        "view reshape transpose permute unsqueeze squeeze slice select expand as_strided detach empty alias split t "
        "_unsafe_view flatten unflatten item _local_scalar_dense is_nonzero lift_fresh resolve_conj resolve_neg to "
        "_to_copy contiguous result_type size".split()
    )
    with profile(activities=[ProfilerActivity.CPU]) as run, torch.autocast("cpu", dtype=torch.bfloat16):
        loss_and_grads(model, batch)
    top = [e for e in run.events() if e.name.startswith("aten::")]
    top = [e for e in top if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return sum(1 for e in top if e.name.removeprefix("aten::") not in no_kernel)


def test_the_lean_forward_launches_three_kernels_fewer_a_layer_call():
    from peft.tuners.lora import LoraLayer

    from docvlm.speedups.lean_lora import lean_lora_forward

    model, batch = lora_model_and_batch()
    calls = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.register_forward_hook(lambda *_: calls.append(1))
    peft_launches = launches(model, batch)
    layer_calls = len(calls)
    lean_lora_forward(model)
    # peft clones, scales and adds (and scales again in the backward pass); the lean forward adds once
    assert peft_launches - launches(model, batch) >= 3 * layer_calls > 0


def make_adapter_visible(model) -> None:
    """Non-zero LoRA B matrices, so that the model with and without its adapter differ."""
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)


def test_disabled_merged_or_mixed_adapters_take_peft_s_forward():
    from docvlm.speedups.lean_lora import lean_lora_forward

    model, batch = lora_model_and_batch()
    make_adapter_visible(model)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        lean_lora_forward(model)
        torch.testing.assert_close(model(**batch).logits, adapted)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, base)
        mixed = model(**batch, adapter_names=["__base__"] * len(batch["input_ids"])).logits
        torch.testing.assert_close(mixed, base)
    assert not torch.allclose(adapted, base)


def test_a_recipe_without_lora_refuses_it():
    from docvlm.errors import UserError
    from docvlm.recipe.parse import parse_recipe

    with pytest.raises(UserError, match="lora_lean_forward is true, but use_peft is false"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--use_peft", "false", "--lora_lean_forward", "true"])
    assert parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--lora_lean_forward", "true"])[2].lora_lean_forward


def test_a_merged_adapter_takes_peft_s_forward_and_is_not_added_twice():
    """After merge_adapter() the update is in the weights: the lean forward must leave it to peft, or it would add
    it again. Unquantized weights, so that merging is exact."""
    from docvlm.speedups.lean_lora import lean_lora_forward

    torch.manual_seed(0)
    model, batch = peft_tiny_model_and_batch(4, "recipes/tiny_docvqa.yaml", "--load_in_4bit", "false")
    make_adapter_visible(model)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        lean_lora_forward(model)
        model.merge_adapter()
        merged = model(**batch).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapted, base, atol=1e-2)  # an update added twice would be far off
