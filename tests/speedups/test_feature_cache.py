"""The frozen-vision-feature cache (docvlm.speedups.feature_cache): the same loss and gradients as the tower
itself, a miss whenever the tower or the page changes, a bounded and reported disk cache, and no half-written entry
on a full disk."""

import errno
import re

import numpy as np
import pytest
import torch
from PIL import Image

from docvlm.errors import UserError
from docvlm.speedups.feature_store import FeatureCache, cached_features, tower_identity
from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch

# pages of four shapes: a batch pads them to its largest, which the cache must not depend on
SIZES = [(300, 400), (420, 260), (250, 500), (380, 380)]


def noisy_page(size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def mixed_batch(processor, seed=0):
    from docvlm.training.collator import DocVQACollator

    rows = [
        {"row": i, "image": noisy_page(size, seed + i), "question": f"What is field {i}?", "answers": [f"{i}{i}"]}
        for i, size in enumerate(SIZES)
    ]
    return DocVQACollator(processor, "Answer briefly.", 512, "first")(rows)


def load_tiny_model_and_processor():
    """The tiny recipe's LoRA model (fp32, CPU) and its processor."""
    from transformers import AutoProcessor

    from docvlm.fixtures import TINY_MODEL, resolve

    torch.manual_seed(0)
    model, _ = peft_tiny_model_and_batch(1)
    return model, AutoProcessor.from_pretrained(resolve(TINY_MODEL))


@pytest.fixture(scope="module")
def tiny_model_and_processor():
    return load_tiny_model_and_processor()


def patched(model, cache):
    from docvlm.speedups.frozen_tower import frozen_vision_without_grad
    from docvlm.speedups.model_parts import vision_tower

    tower = vision_tower(model.get_base_model())
    tower.__dict__.pop("forward", None)  # back to the class's forward, then patch afresh
    assert frozen_vision_without_grad(model.get_base_model(), cache=cache)
    return tower


def test_training_with_the_cache_gives_the_towers_loss_and_gradients(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = mixed_batch(processor)
    assert batch["pixel_values"].shape[-2:] != (224, 168)  # padded to the largest page
    tower = patched(model, None)
    plain = loss_and_grads(model, batch)
    cache = FeatureCache("memory", None, tower_identity(tower), 2**30)
    patched(model, cache)
    computed = loss_and_grads(model, batch)  # every page computed (in one tower call) and stored
    assert (cache.misses, cache.hits) == (4, 0)
    read = loss_and_grads(model, batch)  # every page read back
    assert (cache.misses, cache.hits) == (4, 4)
    assert_same(plain, computed)
    assert_same(plain, read)
    reordered = mixed_batch(processor)  # the same pages in another batch composition still hit
    for key in ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask"):
        reordered[key] = reordered[key][[2, 0]]
    loss_and_grads(model, reordered)
    assert (cache.misses, cache.hits) == (4, 6)
    patched(model, None)


def test_features_the_collator_reads_from_disk_give_the_towers_loss_and_gradients(tmp_path, tiny_model_and_processor):
    """A DataLoader worker reads a batch's features from a disk cache and lays them out as the tower would: the
    training process then reads no file, and the loss and LoRA gradients are the tower's."""
    import pickle
    from unittest import mock

    from docvlm.speedups.feature_store import PAGE_DIGESTS, PAGE_FEATURES

    model, processor = tiny_model_and_processor
    batch = mixed_batch(processor)
    tower = patched(model, None)
    plain = loss_and_grads(model, batch)
    cache = FeatureCache("disk", tmp_path, tower_identity(tower), 2**30)
    patched(model, cache)
    keys = pickle.loads(pickle.dumps(cache.page_keys(14)))  # as a worker started by spawn receives it
    assert PAGE_FEATURES not in keys(batch)  # nothing stored yet: the tower computes them in training
    loss_and_grads(model, batch)
    cache.flush()
    made = keys(batch)
    pages, features = batch["pixel_values"].shape[0], made[PAGE_FEATURES]
    rows, cols = (side // 14 for side in batch["pixel_values"].shape[-2:])
    assert features.shape[:2] == (pages, rows * cols) and len(made[PAGE_DIGESTS]) == pages
    hits = cache.hits
    cache.expect(made[PAGE_DIGESTS], features)
    with mock.patch.object(FeatureCache, "get", side_effect=AssertionError("read a file in the training loop")):
        read = loss_and_grads(model, batch)
    assert cache.hits == hits + pages and cache.take_features(pages, rows * cols) is None  # used once
    assert_same(plain, read)
    other = mixed_batch(processor, seed=7)  # pages the cache has never seen: the worker hands over no features
    assert PAGE_FEATURES not in keys(other) and len(keys(other)[PAGE_DIGESTS]) == pages
    patched(model, None)


def test_filling_before_training_stores_every_page_in_batches_with_a_progress_bar(tiny_model_and_processor, capsys):
    from contextlib import nullcontext

    from docvlm.speedups.feature_cache import fill_feature_cache

    model, processor = tiny_model_and_processor
    tower = patched(model, None)
    plain = loss_and_grads(model, mixed_batch(processor))
    cache = FeatureCache("memory", None, tower_identity(tower), 2**30)
    patched(model, cache)
    calls = []
    tower_forward = tower.forward
    tower.forward = lambda **kwargs: calls.append(kwargs["pixel_values"].shape[0]) or tower_forward(**kwargs)
    rows = [{"row": i, "image": noisy_page(size, i)} for i, size in enumerate(SIZES)]
    seconds = fill_feature_cache(model.get_base_model(), cache, rows, processor.image_processor, 3, 0, nullcontext())
    assert calls == [3, 1]  # the pages of 3 rows in one tower call, then the last row's
    assert (cache.misses, cache.hits, len(cache.memory)) == (4, 0, 4) and seconds == cache.fill_seconds > 0
    assert 0 < cache.fill_startup_seconds < seconds  # the wait for the first batch, part of the fill
    assert (
        0 <= cache.fill_page_wait_seconds < seconds - cache.fill_startup_seconds and cache.fill_disk_wait_seconds >= 0
    )
    assert "Vision feature cache: 100%" in capsys.readouterr().err  # the progress bar
    del tower.forward
    patched(model, cache)
    assert_same(plain, loss_and_grads(model, mixed_batch(processor)))  # batched fill, then every page read
    assert (cache.misses, cache.hits) == (4, 4)
    fill_feature_cache(model.get_base_model(), cache, rows, processor.image_processor, 4, 0, nullcontext())
    assert (cache.misses, cache.hits, cache.held) == (4, 4, 4)  # a second fill computes and reads nothing
    assert "4 found stored before training" in cache.summary() and "filled before training in" in cache.summary()
    patched(model, None)


def test_a_fill_says_how_long_it_waited_for_pages_and_for_the_disk(tmp_path, tiny_model_and_processor, monkeypatch):
    """A slow fill names what holds it back: pages decoded too slowly show as time waiting for pages (beyond the
    first batch's start-up), slow writes as time waiting for the disk; the rest is the tower's."""
    import time
    from contextlib import nullcontext

    import safetensors.torch

    from docvlm.speedups.feature_cache import PageBatches, fill_feature_cache

    model, processor = tiny_model_and_processor
    tower = patched(model, None)
    cache = FeatureCache("disk", tmp_path, tower_identity(tower), 2**30)
    patched(model, cache)
    decode, save = PageBatches.__call__, safetensors.torch.save_file
    monkeypatch.setattr(PageBatches, "__call__", lambda self, rows: time.sleep(0.3) or decode(self, rows))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *args: time.sleep(0.4) or save(*args))
    rows = [{"row": i, "image": noisy_page(size, i)} for i, size in enumerate(SIZES)]
    fill_feature_cache(model.get_base_model(), cache, rows, processor.image_processor, 1, 0, nullcontext())
    assert cache.fill_startup_seconds >= 0.3 and cache.fill_page_wait_seconds >= 3 * 0.3  # 3 batches after the first
    assert cache.fill_disk_wait_seconds >= 0.3  # 2 writer threads, 0.4 s an entry: the last ones are waited for
    summary = cache.summary()
    assert f"then {cache.fill_page_wait_seconds:.1f} s waiting for pages and " in summary
    assert f"{cache.fill_disk_wait_seconds:.1f} s for the disk" in summary
    patched(model, None)


def test_a_fill_counts_the_rows_it_went_through_apart_from_the_tower_pages_it_computed(tiny_model_and_processor):
    """With do_image_splitting (hires) a row's page reaches the tower as 5 pages, 4 crops and the whole page, each
    an entry of the cache; `make bench` projects a whole run's fill by the row, so the fill counts both."""
    import copy
    from contextlib import nullcontext

    from docvlm.speedups.feature_cache import fill_feature_cache

    model, processor = tiny_model_and_processor
    tower = patched(model, None)
    cache = FeatureCache("memory", None, tower_identity(tower), 2**30)
    patched(model, cache)
    splitting = copy.deepcopy(processor.image_processor)
    splitting.do_image_splitting = True
    rows = [{"row": i, "image": noisy_page(size, i)} for i, size in enumerate(SIZES[:2])]
    fill_feature_cache(model.get_base_model(), cache, rows, splitting, 2, 0, nullcontext())
    assert (cache.fill_rows, cache.fill_pages, len(cache.memory)) == (2, 10, 10)
    patched(model, None)


def test_a_page_asked_twice_in_a_fill_is_stored_and_counted_once(tmp_path, tiny_model_and_processor):
    """Several questions on one page put it in a batch twice, or in two batches: one entry on disk, counted
    once against the bound, and the later batch finds it stored (DocVQA asks several questions of most pages)."""
    from contextlib import nullcontext

    from docvlm.speedups.feature_cache import fill_feature_cache

    model, processor = tiny_model_and_processor
    tower = patched(model, None)
    cache = FeatureCache("disk", tmp_path, tower_identity(tower), 2**30)
    patched(model, cache)
    pages = [noisy_page(size, seed) for seed, size in enumerate(SIZES[:3])]
    rows = [{"row": i, "image": pages[n]} for i, n in enumerate([0, 1, 0, 2, 0])]  # batches of 3: [0 1 0] [2 0]
    fill_feature_cache(model.get_base_model(), cache, rows, processor.image_processor, 3, 0, nullcontext())
    on_disk = sorted(tmp_path.rglob("*.safetensors"))
    assert len(on_disk) == 3 and cache.stored_bytes == sum(p.stat().st_size for p in on_disk)
    assert cache.held == 1 and not list(tmp_path.rglob("*.partial"))
    # the repeat may come after the first copy is written and no longer tracked as being written
    key = on_disk[0].stem
    cache.put(key, torch.zeros(4, 4))
    cache.flush()
    assert cache.stored_bytes == sum(p.stat().st_size for p in on_disk)
    patched(model, None)


def test_a_changed_page_or_tower_is_a_miss_never_a_stale_hit(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    tower = patched(model, None)
    identity = tower_identity(tower)
    cache = FeatureCache("memory", None, identity, 2**30)
    batch = mixed_batch(processor)
    pixels, mask = batch["pixel_values"][:, 0], None

    def run():
        with torch.no_grad():
            return cached_features(tower.forward, cache, pixels, mask, patch_size=14).last_hidden_state

    first = run()
    assert (cache.misses, cache.hits) == (4, 0)
    torch.testing.assert_close(run(), first)
    assert cache.hits == 4
    pixels = mixed_batch(processor, seed=10)["pixel_values"][:, 0]  # other pages of the same sizes
    run()
    assert (cache.misses, cache.hits) == (8, 4)
    pixels = pixels.half().float()  # the same pages, resized or rounded differently by another processor setting
    run()
    assert cache.misses == 12
    with torch.no_grad():
        next(tower.parameters()).add_(1e-3)  # another tower (another checkpoint or revision)
    assert tower_identity(tower) != identity
    with torch.no_grad():
        next(tower.parameters()).sub_(1e-3)


def test_the_disk_cache_is_shared_by_later_runs_bounded_and_reported(tmp_path):
    features = torch.randn(16, 8)
    size = features.numel() * 4
    first = FeatureCache("disk", tmp_path, "tower-a" * 4, max_bytes=3 * size)
    for n in range(3):
        first.put(f"{n:02d}" + "k" * 62, features + n)
    assert first.holds("01" + "k" * 62)  # being written, or written
    first.flush()
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    assert first.stored_bytes == on_disk and 2 * size < on_disk < 3 * size  # the third is over the bound
    assert first.not_stored == 1
    assert "2 pages" not in first.summary() and "1 pages not stored" in first.summary()
    later = FeatureCache("disk", tmp_path, "tower-a" * 4, max_bytes=3 * size)
    assert later.stored_bytes == first.stored_bytes  # what is on disk counts against the bound
    torch.testing.assert_close(later.get("01" + "k" * 62), features + 1)
    assert later.get("02" + "k" * 62) is None and (later.hits, later.misses) == (1, 1)
    other_tower = FeatureCache("disk", tmp_path, "tower-b" * 4, max_bytes=3 * size)
    assert other_tower.get("01" + "k" * 62) is None  # another tower's folder
    assert f"{on_disk / 2**20:.1f} MiB in {tmp_path}" in later.summary()


def test_a_full_disk_stops_with_what_to_do_and_leaves_no_partial_entry(tmp_path, monkeypatch):
    import safetensors.torch

    def fill_the_disk(tensors, filename):
        with open(filename, "wb") as handle:
            handle.write(b"half an entry")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fill_the_disk)
    cache = FeatureCache("disk", tmp_path, "tower" * 4, max_bytes=2**30)
    cache.put("ab" * 32, torch.zeros(4, 4))  # written in the background: the error comes with the flush
    with pytest.raises(UserError, match=r"vision feature cache .* is full\. Free space there"):
        cache.flush()
    assert list(tmp_path.rglob("*")) == [p for p in tmp_path.rglob("*") if p.is_dir()]  # no file left behind
    assert cache.get("ab" * 32) is None


def test_an_entry_copied_without_waiting_is_written_and_read_only_once_its_copy_is_complete(tmp_path):
    """On CUDA a fill copies each tower call's features to CPU memory without waiting (FeatureCache.host_copy) and
    hands the cache a view of that copy with the event that completes it: neither the writer nor a read may touch
    the view before then. Here a gate stands in for the event, and the page's view is not contiguous (a page
    smaller than its batch's padded grid)."""
    import threading
    import time

    from safetensors.torch import load_file

    class CopyInFlight:  # torch.cuda.Event's synchronize(), released by the test instead of the GPU
        def __init__(self):
            self.done, self.waits = threading.Event(), 0

        def synchronize(self):
            self.waits += 1
            assert self.done.wait(10)

    cache = FeatureCache("disk", tmp_path, "tower" * 4, max_bytes=2**30)
    host = torch.zeros(2, 4, 6, 5)  # a batch's copy: 2 pages on a 4 x 6 patch grid, width 5
    page = torch.arange(3 * 4 * 5, dtype=torch.float32).view(3, 4, 5)  # the page's real 3 x 4 patches
    copy = CopyInFlight()
    cache.put("cd" * 32, host[1, :3, :4], copy)
    time.sleep(0.3)
    assert copy.waits == 1 and not list(tmp_path.rglob("*.safetensors*"))  # the writer waits for the copy
    host[1, :3, :4] = page  # the copy lands, then completes
    copy.done.set()
    assert torch.equal(cache.get("cd" * 32), page.view(12, 5)) and copy.waits >= 2  # read back laid out
    cache.flush()
    (entry,) = tmp_path.rglob("*.safetensors")
    assert torch.equal(load_file(entry)["features"], page.view(12, 5))
    assert cache.stored_bytes == entry.stat().st_size


def test_the_cache_is_refused_for_a_trained_tower_and_where_it_cannot_apply(tiny_model_and_processor, monkeypatch):
    from docvlm import speedups
    from docvlm.families import LLAVA
    from docvlm.modes import ZERO3
    from docvlm.recipe.parse import parse_recipe
    from docvlm.speedups.feature_cache import attach

    model, processor = tiny_model_and_processor
    tower = patched(model, FeatureCache("memory", None, "x", 2**30))
    next(tower.parameters()).requires_grad_(True)
    try:
        with pytest.raises(UserError, match="the feature cache is on, but the vision tower is trained"):
            model(**mixed_batch(processor))
        # attached to a trainer, it is refused before the fill, naming the recipe's setting (no trainer is touched)
        args = parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--vision_feature_cache", "memory"])[2]
        base = model.get_base_model()  # the loaded model, as the switches get it
        context = speedups.SwitchContext(args, model=base, cache=FeatureCache("memory", None, "x", 2**30))
        with pytest.raises(UserError, match="vision_feature_cache is memory, but the vision tower is trained"):
            attach(context)
    finally:
        next(tower.parameters()).requires_grad_(False)
        patched(model, None)
    base = ["--config", "recipes/tiny_docvqa.yaml", "--vision_feature_cache", "disk"]
    with pytest.raises(UserError, match="vision_feature_cache is disk but vision_tower_no_grad is false"):
        parse_recipe([*base, "--vision_tower_no_grad", "false"])
    _, model_args, training_args, _ = parse_recipe([*base, "--connector_lean_activations", "false"])
    with pytest.raises(UserError, match="vision_feature_cache is on in the recipe, but it does not apply to LLaVA"):
        speedups.refuse_what_does_not_apply(LLAVA, training_args)
    changes = speedups.settle(ZERO3, training_args, "cuda")  # the shipped recipes keep it on elsewhere
    assert training_args.vision_feature_cache == "off"
    assert f"vision_feature_cache: off ({ZERO3} splits the vision tower's weights across processes)" in changes


@pytest.mark.integration
def test_a_second_run_reads_what_the_first_computed_and_says_so(tmp_path, capsys):
    from docvlm.train import run
    from tests.helpers import quick

    folder = tmp_path / "features"
    for n in (1, 2):
        argv = quick(tmp_path / f"run{n}", "--max_steps", "2", "--save_strategy", "no", "--eval_after_training")
        run([*argv, "false", "--vision_feature_cache", "disk", "--vision_feature_cache_dir", str(folder)])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Vision feature cache")]
    # the first run computes every training page before its first step, then reads them; the second computes none
    counts = [re.match(r"Vision feature cache: (\d+) pages read, (\d+) computed", line).groups() for line in printed]
    (read, computed), (read_again, computed_again) = [tuple(map(int, pair)) for pair in counts]
    assert computed >= 8 and read == 8  # 2 steps of 4 pages, all read
    assert computed_again == 0 and read_again == 8 and str(folder) in printed[1]
    assert f"{computed} found stored before training" in printed[1]  # the fill found them all, and read none
    assert "filled before training in" in printed[0]


def padded_width(batch):
    return batch["pixel_values"].shape[-1]


def test_page_digests_made_with_the_batch_key_each_real_page_and_never_outlive_their_batch(tiny_model_and_processor):
    from unittest import mock

    from docvlm.speedups.feature_cache import hand_over
    from docvlm.speedups.feature_store import PAGE_DIGESTS, PAGE_FEATURES, page_digest, page_entries
    from docvlm.training.trainer import DocVLMTrainer

    def page_digests(pixel_values, pixel_attention_mask, patch_size):
        return [digest for digest, _, _ in page_entries(pixel_values, pixel_attention_mask, patch_size)]

    _, processor = tiny_model_and_processor
    batch = mixed_batch(processor)
    digests = page_digests(batch["pixel_values"], batch["pixel_attention_mask"], 14)
    assert len(set(digests)) == len(SIZES)  # one a page; the all-zero padding pages of a row are not pages
    first = batch["pixel_values"][0, 0]
    mask = batch["pixel_attention_mask"][0, 0].bool()
    rows, cols = int(mask.any(1).sum()) // 14, int(mask.any(0).sum()) // 14
    assert digests[0] == page_digest(first[None, :, : rows * 14, : cols * 14])  # the page cropped to whole patches
    padded = batch["pixel_values"].clone()
    assert page_digests(padded, None, 14)[0] != digests[0]  # without the mask the padding counts
    assert cols * 14 < padded_width(batch)
    padded[0, 0, :, :, cols * 14 :] = 0.5  # what lies beyond the real page is not part of it
    assert page_digests(padded, batch["pixel_attention_mask"], 14)[0] == digests[0]

    cache = FeatureCache("memory", None, "tower", 2**30)
    trainer = DocVLMTrainer.__new__(DocVLMTrainer)  # only its input hand-off is exercised
    trainer.input_hooks = [hand_over(cache)]  # as attaching the cache to a trainer adds it
    inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long), PAGE_DIGESTS: digests}
    with mock.patch("transformers.Trainer._prepare_inputs", lambda self, given: given):
        features = torch.ones(len(digests), 6, 3)
        handed = trainer._prepare_inputs({**inputs, PAGE_FEATURES: features})
        assert PAGE_DIGESTS not in handed and PAGE_FEATURES not in handed  # the model takes no such input
        assert cache.take_features(len(digests), 6) is features and cache.take_features(len(digests), 6) is None
        handed = trainer._prepare_inputs(dict(inputs))
        assert cache.take_digests(3) is None  # a tower call with another page count never uses them
        trainer._prepare_inputs(dict(inputs))
        trainer._prepare_inputs({"input_ids": inputs["input_ids"]})  # a batch without digests clears the last ones
        assert cache.take_digests(len(digests)) is None
        trainer._prepare_inputs(dict(inputs))
        assert cache.take_digests(len(digests)) == digests and cache.take_digests(len(digests)) is None


def test_features_kept_in_half_precision_give_the_rounding_connectors_loss_and_gradients():
    """Where the connector rounds the tower's features to bf16 anyway (connector_in_compute_dtype), the cache keeps
    them in bf16: half the bytes, under another key, and the loss and gradients of the tower itself."""
    from docvlm.families.idefics2.connector import half_precision_connector_input

    model, processor = load_tiny_model_and_processor()  # its own: the connector's patch stays on the model
    assert half_precision_connector_input(model.get_base_model())
    batch = mixed_batch(processor)
    tower = patched(model, None)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with bf16:
        plain = loss_and_grads(model, batch)
    full = FeatureCache("memory", None, tower_identity(tower), 2**30)
    half = FeatureCache("memory", None, tower_identity(tower, torch.bfloat16), 2**30, stored_dtype=torch.bfloat16)
    assert half.identity != full.identity
    for cache in (full, half):
        patched(model, cache)
        with bf16:
            computed, read = loss_and_grads(model, batch), loss_and_grads(model, batch)
        assert (cache.misses, cache.hits) == (4, 4)
        assert_same(plain, computed)
        assert_same(plain, read)
    assert {t.dtype for t in full.memory.values()} == {torch.float32}
    assert {t.dtype for t in half.memory.values()} == {torch.bfloat16}
    assert half.stored_bytes * 2 == full.stored_bytes
    patched(model, None)


@pytest.mark.parametrize(("rounded", "stored"), [(True, torch.bfloat16), (False, None)])
def test_the_cache_keeps_features_in_the_dtype_the_connector_switch_rounds_them_to(rounded, stored, tmp_path):
    from docvlm import speedups
    from docvlm.families import IDEFICS2
    from docvlm.recipe.parse import parse_recipe
    from docvlm.speedups.model_parts import vision_tower

    model, _ = load_tiny_model_and_processor()
    base = model.get_base_model()
    recipe = ["--config", "recipes/tiny_docvqa.yaml", "--vision_feature_cache", "disk"]
    recipe += ["--vision_feature_cache_dir", str(tmp_path), "--connector_in_compute_dtype", str(rounded).lower()]
    args = parse_recipe(recipe)[2]
    args.bf16 = True  # as on a GPU, where the recipe's precision resolves to bf16
    run = speedups.apply(speedups.LOADED, speedups.SwitchContext(args, IDEFICS2, model=base))
    assert run.cache.stored_dtype == stored
    assert run.cache.identity == tower_identity(vision_tower(base), stored)  # each dtype has its own entries
