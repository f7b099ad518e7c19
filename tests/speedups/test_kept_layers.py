"""`decoder_layers_kept`: the decoder's last layers keep their activations under gradient checkpointing. Same loss
and gradients; those layers run once a step instead of twice; planned as more memory; refused where it means
nothing (the plan: tests/test_plan.py)."""

import pytest

from docvlm.errors import UserError
from docvlm.recipe.parse import parse_recipe
from docvlm.speedups.kept_layers import keep_last_layers
from docvlm.speedups.model_parts import decoder_layers
from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch


def test_kept_layers_run_once_and_give_the_same_loss_and_gradients():
    model, batch = peft_tiny_model_and_batch(size=3)
    layers = decoder_layers(model)
    assert len(layers) >= 2
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    every = loss_and_grads(model, batch)
    assert calls == [2] * len(layers)  # forward, then recomputed in the backward pass
    calls[:] = [0] * len(layers)
    keep_last_layers(model, 1).on_train_begin(None, None, None)
    kept = loss_and_grads(model, batch)
    assert calls == [2] * (len(layers) - 1) + [1]  # the last layer kept its activations
    assert_same(every, kept)


def test_more_layers_than_the_decoder_has_are_refused_with_the_count():
    model, _ = peft_tiny_model_and_batch(size=1)
    layers = len(decoder_layers(model))
    with pytest.raises(UserError, match=f"decoder has {layers} layers"):
        keep_last_layers(model, layers + 1)


def test_a_recipe_without_checkpointing_is_refused():
    argv = ["--config", "recipes/tiny_docvqa.yaml", "--gradient_checkpointing", "false", "--decoder_layers_kept", "1"]
    with pytest.raises(UserError, match="gradient_checkpointing is false"):
        parse_recipe(argv)
