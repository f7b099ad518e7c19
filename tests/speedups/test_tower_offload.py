"""vision_tower_offload: the frozen tower's weights in CPU memory while the feature cache serves every page."""

from tests.helpers import loss_and_grads, peft_tiny_model_and_batch


def test_an_offloaded_tower_waits_in_cpu_memory_and_comes_back_for_a_page_the_cache_missed(capsys):
    """vision_tower_offload: the callback offloads the tower at the start of training only when the cache holds
    every page, brings it back at the end, and a tower call while it is offloaded (a miss) restores it first."""
    from docvlm.speedups.feature_store import FeatureCache
    from docvlm.speedups.frozen_tower import frozen_vision_without_grad
    from docvlm.speedups.model_parts import vision_tower
    from docvlm.speedups.tower_offload import TowerOffload, offload_tower_while_cached

    # the tiny recipe quantizes its tower; the 8B recipes keep theirs in half precision, as here
    half_tower = ("--bnb_4bit_skip_modules", "model.vision_model")
    model, batch = peft_tiny_model_and_batch(2, "recipes/tiny_docvqa.yaml", *half_tower)
    base = model.get_base_model()
    tower = vision_tower(base)
    cache = FeatureCache("memory", None, "tower", max_bytes=2**30)
    assert frozen_vision_without_grad(base, cache=cache)
    offload = TowerOffload(tower)
    callback = offload_tower_while_cached(offload, cache)

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
    from docvlm.speedups.model_parts import vision_tower
    from docvlm.speedups.tower_offload import TowerOffload

    model, _ = peft_tiny_model_and_batch(size=1)  # the tiny recipe quantizes its tower to 4 bits
    with pytest.raises(UserError, match="this one is quantized: keep it out of 4-bit with bnb_4bit_skip_modules"):
        TowerOffload(vision_tower(model.get_base_model()))
