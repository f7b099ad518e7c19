"""`vision_feature_cache` (with `vision_feature_cache_dir` and `_max_gb`): each training page's frozen-tower features
computed once, before the first step, and read in every epoch (memory) and later run (disk), through the frozen tower's
forward (docvlm.speedups.frozen_tower). Attached in one call: the trainer's collator gives each batch's page keys, the
trainer hands them to the cache before each forward, and a callback fills the cache and says what it held."""

from __future__ import annotations

from typing import Literal

import torch

from docvlm.errors import UserError
from docvlm.modes import FSDP, ZERO3
from docvlm.speedups.base import LOADED, WITH_TRAINER, Setting, Switch
from docvlm.speedups.feature_store import PAGE_DIGESTS, PAGE_FEATURES, FeatureCache, PageKeys, PagesStored
from docvlm.speedups.frozen_tower import TRAINED_TOWER
from docvlm.speedups.model_parts import vision_tower


class PageBatches:
    """A DataLoader's collate function for filling the cache: rows to the processor's pixel values and pixel
    masks, exactly as training batches them, without the text (which the tower never sees)."""

    def __init__(self, image_processor, patch_size: int):
        self.image_processor, self.patch_size = image_processor, patch_size

    def __call__(self, rows: list[dict]) -> dict:
        from docvlm.pages import PageProblem, pages_of

        images = []
        for row in rows:
            try:
                images.append(pages_of(row, f"training row {row.get('row', '?')}"))
            except PageProblem:  # a page that no longer reads: training's collator skips its row, and says so
                continue
        if not images:
            return {}
        batch = self.image_processor(images=images, return_tensors="pt")
        batch = {key: batch[key] for key in ("pixel_values", "pixel_attention_mask") if key in batch}
        batch.update(PageKeys(self.patch_size)(batch))  # the digests, as training's collator makes them
        return batch


def fill_feature_cache(model, cache: FeatureCache, rows, image_processor, batch_size: int, workers: int, context):
    """Compute the features of every page of `rows` not in the cache yet, `batch_size` rows at a time, before
    training starts, with a progress bar (on the main process); `context`: the training's autocast, so the
    features are the ones a training step would compute. Returns the seconds it took, of which
    `cache.fill_startup_seconds` went to waiting for the first batch (the DataLoader's workers starting: paid once
    a fill, however many pages it has), `cache.fill_page_wait_seconds` to waiting for the later batches' pages, and
    `cache.fill_disk_wait_seconds` to the last writes: what is left is the tower's, so a slow fill says whether the
    CPU, the disk or the GPU holds it back."""
    import time

    from accelerate import PartialState
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    patch_size = model.config.vision_config.patch_size
    collate = PageBatches(image_processor, patch_size)
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    started, computed, cache.filling = time.perf_counter(), cache.misses, True
    cache.fill_startup_seconds, cache.fill_page_wait_seconds = None, 0.0
    try:
        with (
            torch.no_grad(),
            context,
            tqdm(
                total=len(rows), desc="Vision feature cache", unit="row", disable=not PartialState().is_main_process
            ) as bar,
        ):
            asked = started  # when the loop last asked the loader for a batch
            for batch in loader:
                if not batch:  # no page of these rows could be read
                    continue
                if cache.fill_startup_seconds is None:
                    cache.fill_startup_seconds = time.perf_counter() - started
                else:
                    cache.fill_page_wait_seconds += time.perf_counter() - asked
                cache.expect(batch.pop(PAGE_DIGESTS))
                inputs = {key: value.to(device) for key, value in batch.items()}
                try:
                    model.get_image_features(**inputs)
                except PagesStored:
                    pass
                bar.update(len(batch["pixel_values"]))
                asked = time.perf_counter()
        flushing = time.perf_counter()
        cache.flush()  # a full disk stops here, before training
        cache.fill_disk_wait_seconds = time.perf_counter() - flushing
    finally:
        cache.filling = False
    cache.fill_seconds, cache.fill_pages = time.perf_counter() - started, cache.misses - computed
    cache.fill_rows = len(rows)
    return cache.fill_seconds


def _check(args, model_args) -> None:
    if args.vision_feature_cache_max_gb <= 0:
        raise ValueError(f"vision_feature_cache_max_gb must be above 0, got {args.vision_feature_cache_max_gb}.")


def _make_cache(run) -> bool:
    """The cache, before the frozen tower's forward is patched to read from it."""
    from pathlib import Path

    from docvlm.runtime import cache_root
    from docvlm.speedups.feature_store import tower_identity

    tower = vision_tower(run.model)
    if tower is None:
        return False
    args = run.args
    folder = args.vision_feature_cache_dir or Path(cache_root()) / "vision-features"
    limit = int(args.vision_feature_cache_max_gb * 1e9)  # GB, as its name and `docvlm plan` say
    advice = (
        "Free space there, set vision_feature_cache_dir to a disk with room, lower vision_feature_cache_max_gb, or "
        "set vision_feature_cache: memory."
    )
    # kept in the half precision the connector rounds features to anyway, where a switch makes it do so: half the
    # memory, disk and reads, the same values
    stored = run.features_rounded_to
    run.cache = FeatureCache(args.vision_feature_cache, folder, tower_identity(tower, stored), limit, advice, stored)
    return True


def attach(run) -> bool:
    """The cache into training, in one call: the collator adds each batch's page keys (and features read from disk),
    the trainer hands them to the cache before each forward, every training page is filled in now, and a callback
    says at the end what the cache held."""
    from transformers import TrainerCallback

    cache, trainer = run.cache, run.trainer
    if any(p.requires_grad for p in vision_tower(run.model).parameters()):  # before the fill, not at its first page
        raise UserError(TRAINED_TOWER.format(setting=f"vision_feature_cache is {run.args.vision_feature_cache}"))
    patch_size = trainer.accelerator.unwrap_model(trainer.model).config.vision_config.patch_size
    trainer.data_collator = WithPageKeys(trainer.data_collator, cache.page_keys(patch_size))
    trainer.input_hooks.append(
        lambda batch: cache.expect(batch.pop(PAGE_DIGESTS, None), batch.pop(PAGE_FEATURES, None))
    )
    fill(trainer, cache, run.processor)

    class ReportCache(TrainerCallback):
        def __init__(self):
            self.cache = cache  # where `make bench` finds the fill's figures (cache_of)

        def on_train_end(self, args, state, control, **kwargs):
            if trainer.accelerator.is_main_process:
                print(cache.summary("vision_feature_cache_max_gb"))  # the main process's; each process counts its own

    run.callbacks.append(ReportCache())
    return True


def hand_over(cache):
    """The trainer's hook of each batch before its forward: the pages' digests and any features read from disk go
    to the cache (the model takes no such input), always replacing the last batch's (None where a batch has none),
    so that they never outlive their batch."""

    def hook(batch: dict) -> None:
        cache.expect(batch.pop(PAGE_DIGESTS, None), batch.pop(PAGE_FEATURES, None))

    return hook


class WithPageKeys:
    """A collator whose batches also carry their pages' keys in the cache: made in the DataLoader's workers."""

    def __init__(self, collate, page_keys):
        self.collate, self.page_keys = collate, page_keys

    def __call__(self, rows):
        batch = self.collate(rows)
        batch.update(self.page_keys(batch))
        return batch

    def __getattr__(self, name):  # the wrapped collator's attributes (never its own, while unpickling in a worker)
        if name in ("collate", "page_keys"):
            raise AttributeError(name)
        return getattr(self.collate, name)


def fill(trainer, cache, processor) -> None:
    """Every training page's frozen-tower features, computed in batches before the first step (each process its
    share of the rows; in a disk cache, the others' shares are read from it as training goes)."""
    args, accelerator = trainer.args, trainer.accelerator
    rows = trainer.train_dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    model = accelerator.unwrap_model(trainer.model)
    batch = args.per_device_train_batch_size
    fill_feature_cache(
        model, cache, rows, processor.image_processor, batch, args.dataloader_num_workers, accelerator.autocast()
    )
    accelerator.wait_for_everyone()


def cache_of(trainer):
    """The feature cache a trainer fills, or None (for `make bench`'s figures)."""
    return next((cb.cache for cb in trainer.callback_handler.callbacks if hasattr(cb, "cache")), None)


def _plan(terms) -> None:
    """No tower FLOPs a step (the cache gives every page's features), and the cache's size for the sampled pages."""
    import statistics

    terms.tower_runs = False
    if terms.config is None or not terms.patches:
        return
    # 4 bytes a value: the tower's last LayerNorm runs in fp32 under autocast, and the cache keeps its output as the
    # connector receives it; 2 where the connector rounds it to half precision
    width = terms.config.vision_config.hidden_size
    args = terms.args
    feature_bytes = terms.feature_value_bytes * width * statistics.fmean(terms.patches) * terms.rows
    limit, gib = args.vision_feature_cache_max_gb, 2**30
    size = f"{feature_bytes / gib:.1f} GiB" if feature_bytes >= gib else f"{feature_bytes / 2**20:.2f} MiB"
    terms.lines.append(
        f"  cache      {size} of vision features ({args.vision_feature_cache}; at most {limit:g} GB)"
        + ("  WARNING: over the bound, some pages are recomputed" if feature_bytes / 1e9 > limit else "")
    )


SPLIT_TOWER = "{mode} splits the vision tower's weights across processes"
SWITCH = Switch(
    settings=(
        Setting(
            "vision_feature_cache",
            Literal["off", "memory", "disk"],
            "off",
            "Compute each page's frozen vision features once, for every epoch (memory) and later run (disk). Same "
            "gradients. Kept in half precision where connector_in_compute_dtype rounds them anyway.",
        ),
        Setting(
            "vision_feature_cache_dir",
            str | None,
            None,
            "Folder of the disk cache (null: $DOCVLM_CACHE/vision-features, ~/.cache/docvlm/...).",
        ),
        Setting(
            "vision_feature_cache_max_gb",
            float,
            50.0,
            "Most the cache may hold, in GB; pages beyond it are recomputed each time, and counted.",
        ),
    ),
    is_on=lambda args: args.vision_feature_cache != "off",
    lacks="vision tower to cache",
    off="off",
    family_hook="feature_cache",
    check=_check,
    requires=("vision_tower_no_grad", "the cache replaces the frozen tower's gradient-free forward"),
    turned_off_in={ZERO3: SPLIT_TOWER, FSDP: SPLIT_TOWER},
    apply={LOADED: _make_cache, WITH_TRAINER: attach},
    in_evaluation=True,
    plan=_plan,
    after=("connector_in_compute_dtype",),  # keeps features in the dtype that switch rounds them to
)
