"""The frozen vision tower without an autograd graph, a few pages at a time (docvlm.speedups.frozen_tower)."""

import torch

from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch


def test_frozen_vision_tower_builds_no_graph(tiny_model_path, tiny_dataset_path):
    """Gradient checkpointing marks every input-embedding output as requiring grad, the vision tower's too, so the
    frozen tower would be back-propagated for nothing; without its graph the loss and LoRA gradients are the same."""
    from docvlm.speedups.frozen_tower import frozen_vision_without_grad
    from docvlm.speedups.model_parts import vision_tower

    model, batch = peft_tiny_model_and_batch(size=2)
    model.enable_input_require_grads()  # what gradient_checkpointing_enable() and TRL do for adapters
    tower = vision_tower(model.get_base_model())
    assert tower is model.get_base_model().model.vision_model
    tracked = []
    tower.register_forward_hook(lambda _m, _i, out: tracked.append(out.last_hidden_state.requires_grad))
    with_graph = loss_and_grads(model, batch)
    assert tracked == [True]  # the problem: a graph through a tower nothing in it can learn from
    original_forward = tower.forward
    assert frozen_vision_without_grad(model.get_base_model())
    without_graph = loss_and_grads(model, batch)
    assert tracked == [True, False]
    assert_same(with_graph, without_graph)

    # A page at a time: the same outputs, so the same loss and gradients.
    pages_per_call = []

    def counting(**kwargs):
        pages_per_call.append(kwargs["pixel_values"].shape[0])
        return original_forward(**kwargs)

    tower.forward = counting
    assert frozen_vision_without_grad(model.get_base_model(), pages_per_chunk=1)
    one_by_one = loss_and_grads(model, batch)
    assert pages_per_call == [1, 1] and tracked == [True, False, False]
    assert_same(with_graph, one_by_one)

    next(tower.parameters()).requires_grad_(True)  # a recipe that trains part of the tower keeps its graph
    loss_and_grads(model, batch)
    assert tracked == [True, False, False, True] and pages_per_call == [1, 1, 2]
    assert not frozen_vision_without_grad(torch.nn.Linear(2, 2))


def test_the_frozen_tower_runs_its_layers_without_checkpointing_and_the_decoder_keeps_it():
    """Under gradient checkpointing the frozen tower, run without grad, has nothing to recompute; on transformers
    5.17 its layers were still checkpointed, and the reentrant form warned at each that gradients will be None."""
    from docvlm.speedups.frozen_tower import frozen_vision_without_grad
    from docvlm.speedups.model_parts import vision_tower

    model, batch = peft_tiny_model_and_batch(size=2)
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": True})
    model.enable_input_require_grads()
    base = model.get_base_model()
    tower_layer, decoder_layer = vision_tower(base).encoder.layers[0], base.model.text_model.layers[0]
    seen = []
    for layer in (tower_layer, decoder_layer):
        layer.register_forward_pre_hook(lambda module, _: seen.append((module, module.gradient_checkpointing)))
    assert frozen_vision_without_grad(base)
    loss_and_grads(model, batch)
    assert (tower_layer, False) in seen and (tower_layer, True) not in seen
    assert (decoder_layer, True) in seen  # checkpointing is paused in the tower only
    assert tower_layer.gradient_checkpointing is True  # and back on after the call
