"""The frozen vision tower without an autograd graph, a few pages at a time (docvlm.vision_tower)."""

import torch

from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch


def test_frozen_vision_tower_builds_no_graph(tiny_model_path, tiny_dataset_path):
    """Gradient checkpointing marks every input-embedding output as requiring grad, the vision tower's too, so the
    frozen tower would be back-propagated for nothing; without its graph the loss and LoRA gradients are the same."""
    from docvlm.vision_tower import frozen_vision_without_grad, vision_tower

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
    from docvlm.vision_tower import frozen_vision_without_grad, vision_tower

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


def test_an_offloaded_tower_waits_in_cpu_memory_and_comes_back_for_a_page_the_cache_missed(capsys):
    """vision_tower_offload: the callback offloads the tower at the start of training only when the cache holds
    every page, brings it back at the end, and a tower call while it is offloaded (a miss) restores it first."""
    from docvlm.vision_cache import FeatureCache
    from docvlm.vision_tower import TowerOffload, frozen_vision_without_grad, offload_tower_while_cached, vision_tower

    # the tiny recipe quantizes its tower; the 8B recipes keep theirs in half precision, as here
    half_tower = ("--bnb_4bit_skip_modules", "model.vision_model")
    model, batch = peft_tiny_model_and_batch(2, "recipes/tiny_docvqa.yaml", *half_tower)
    base = model.get_base_model()
    tower = vision_tower(base)
    cache = FeatureCache("memory", None, "tower", max_bytes=2**30)
    assert frozen_vision_without_grad(base, cache=cache)
    callback = offload_tower_while_cached(base, cache)
    offload = getattr(tower, TowerOffload.ATTRIBUTE)

    cache.not_stored = 3  # some pages over the cache's bound: the tower must stay to compute them
    callback.on_train_begin(None, None, None)
    assert not offload.offloaded
    assert "3 pages did not fit the feature cache" in capsys.readouterr().out

    cache.not_stored = 0
    callback.on_train_begin(None, None, None)
    weights = sum(t.numel() * t.element_size() for t in [*tower.parameters(), *tower.buffers()])
    assert offload.offloaded and f"({weights / 2**30:.2f} GiB) waits in CPU memory" in capsys.readouterr().out

    moves = []  # the tower's own moves, by the real offload and restore (a CPU's "home" is the CPU too)
    move = tower.to
    tower.to = lambda device, *a, **k: (moves.append(str(device)), move(device, *a, **k))[1]
    loss_and_grads(model, batch)  # an empty cache: every page misses, so the tower must compute
    assert moves == ["cpu"] and "pages to compute that the feature cache does not hold" in capsys.readouterr().out
    assert cache.misses == 2 and not offload.offloaded

    callback.on_train_begin(None, None, None)
    assert moves == ["cpu", "cpu"] and offload.offloaded
    loss_and_grads(model, batch)  # both pages cached now: the offloaded tower is not called
    assert offload.offloaded and cache.hits == 2
    callback.on_train_end(None, None, None)
    assert not offload.offloaded


def test_a_quantized_tower_is_not_offloaded():
    import pytest

    from docvlm.errors import UserError
    from docvlm.vision_tower import TowerOffload, vision_tower

    model, _ = peft_tiny_model_and_batch(size=1)  # the tiny recipe quantizes its tower to 4 bits
    with pytest.raises(UserError, match="this one is quantized: keep it out of 4-bit with bnb_4bit_skip_modules"):
        TowerOffload(vision_tower(model.get_base_model()))
