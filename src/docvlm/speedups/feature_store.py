"""The store behind the vision feature cache (docvlm.speedups.feature_cache): a frozen, un-adapted vision tower gives
the same features for the same page in every epoch and every run, so each page's features are computed once and
reused.

A page is cached whole and unpadded: a batch pads its pages to its largest one, but the tower masks the padding,
so a page's features at its real patches do not depend on the batch. They are placed back into the batch's padded
grid when read; the connector masks the padded positions as it does without the cache. The key covers the tower's
weights, their dtype and the page's pixels as the processor made them (so its size and resizing settings), so a
change anywhere is a miss, never a stale hit. No library offers this (TRL, peft and transformers recompute the
tower every step), hence this module.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import torch

from docvlm.errors import UserError


def _digest_tensor(digest, tensor: torch.Tensor, name: str = "") -> None:
    """Add a tensor's name, dtype, shape and bytes to a hash."""
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())


def page_digest(pixels: torch.Tensor) -> str:
    """A digest of one page's pixels at its real size, as the processor made them (so its size and resizing)."""
    digest = hashlib.sha256()
    _digest_tensor(digest, pixels.float())
    return digest.hexdigest()


def page_entries(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None, patch_size: int):
    """(digest, patch rows, patch columns) of every real page of a processor batch, in the order the tower sees
    them: rows, then each row's pages, without the all-zero pages that pad a row (the model drops those before its
    tower), each cropped to its whole patches. Computed on the CPU where the batch is made (DataLoader workers), so
    that keys cost the training loop no GPU transfer and no hashing."""
    entries = []
    for row in range(pixel_values.shape[0]):
        for page in range(pixel_values.shape[1]):
            pixels = pixel_values[row, page]
            if not pixels.any():
                continue
            if pixel_attention_mask is None:
                height, width = pixels.shape[-2:]
            else:
                mask = pixel_attention_mask[row, page].bool()
                height, width = int(mask.any(dim=1).sum()), int(mask.any(dim=0).sum())
            rows, cols = height // patch_size, width // patch_size
            entries.append((page_digest(pixels[None, :, : rows * patch_size, : cols * patch_size]), rows, cols))
    return entries


PAGE_DIGESTS = "page_digests"  # the batch key that carries them from the collator to the cache
PAGE_FEATURES = "page_features"  # the batch key that carries features read by the collator from a disk cache


def entry_key(identity: str, digest: str) -> str:
    """The entry of a page (by its digest, see page_entries) for a tower (by its identity, see tower_identity)."""
    return hashlib.sha256(f"{identity}:{digest}".encode()).hexdigest()


def entry_path(folder: Path, key: str) -> Path:
    return folder / key[:2] / f"{key}.safetensors"


class PageKeys:
    """What the collator adds to a training batch for the cache, in the DataLoader workers: each page's digest
    and, where a disk cache (`folder`, a tower's entries) holds every page of the batch, their features, read and
    laid out in the batch's padded patch grid as the tower's output is. The training loop then neither hashes
    pixels nor reads files: it copies one pinned tensor to the GPU without waiting for it."""

    def __init__(self, patch_size: int, folder: Path | None = None, identity: str | None = None):
        self.patch_size, self.folder, self.identity = patch_size, folder, identity

    def __call__(self, batch) -> dict:
        pixel_values = batch["pixel_values"]
        entries = page_entries(pixel_values, batch.get("pixel_attention_mask"), self.patch_size)
        keys = {PAGE_DIGESTS: [digest for digest, _, _ in entries]}
        features = self.read(entries, pixel_values.shape[-2:]) if self.folder is not None and entries else None
        if features is not None:
            keys[PAGE_FEATURES] = features
        return keys

    def read(self, entries, size) -> torch.Tensor | None:
        """The pages' features in a zero-padded (pages, patch rows x columns, width) tensor; None unless the
        cache holds every page (the tower then computes the missing ones in the training process)."""
        from safetensors.torch import load_file

        paths = [entry_path(self.folder, entry_key(self.identity, digest)) for digest, _, _ in entries]
        if not all(path.exists() for path in paths):
            return None
        found = [load_file(path)["features"] for path in paths]
        rows, cols = (side // self.patch_size for side in size)
        return padded_grid(found, [(h, w) for _, h, w in entries], rows, cols)


def padded_grid(features: list[torch.Tensor], extents: list[tuple[int, int]], rows: int, cols: int) -> torch.Tensor:
    """Pages' features, each stored at its real (h, w) patches, laid out as the tower outputs a batch: a
    (pages, rows x cols, width) tensor of the batch's padded patch grid, zeros where a page has no patch."""
    grid = features[0].new_zeros(len(features), rows, cols, features[0].shape[-1])
    for page, (found, (h, w)) in enumerate(zip(features, extents, strict=True)):
        grid[page, :h, :w] = found.view(h, w, -1)
    return grid.view(len(features), rows * cols, -1)


def tower_identity(tower: torch.nn.Module, stored_dtype: torch.dtype | None = None) -> str:
    """A digest of the tower's weights (all of them, with dtype and shape), and of the dtype the cache keeps their
    features in: two runs share cached features only when their towers compute the same function and they keep it
    at the same precision."""
    digest = hashlib.sha256()
    if stored_dtype is not None:
        digest.update(f"stored as {stored_dtype}".encode())
    for name, tensor in sorted(tower.state_dict().items()):
        _digest_tensor(digest, tensor, name)
    return digest.hexdigest()


ENTRY_HEADER_BYTES = 256  # at least a one-tensor safetensors file's header (its JSON, padded to 8 bytes)


class FeatureCache:
    """Page features by key, in memory or in a folder of safetensors files (one a page, written whole under a
    temporary name and renamed, so an interrupted write is never read)."""

    def __init__(
        self,
        mode: str,
        folder: str | os.PathLike | None,
        identity: str,
        max_bytes: int,
        full_disk_advice: str = "",
        stored_dtype: torch.dtype | None = None,
    ):
        """`full_disk_advice`: what to do when the disk fills up, in the recipe's words (said after the error).
        `stored_dtype`: the dtype features are kept in (None: the tower's), where the connector rounds them to it
        anyway; `identity` must name it (tower_identity)."""
        if mode not in ("memory", "disk"):
            raise ValueError(f"A feature cache is kept in memory or on disk, not {mode!r}.")
        self.mode, self.identity, self.max_bytes = mode, identity, max_bytes
        self.stored_dtype, self.full_disk_advice = stored_dtype, full_disk_advice
        self.memory: dict[str, torch.Tensor] = {}
        self.folder = Path(folder) / identity[:16] if mode == "disk" else None
        self.hits = self.misses = self.not_stored = self.held = 0  # held: found stored while filling
        # fill_feature_cache: the tower's pages it computed, and the rows (document pages) it went through; they
        # differ where a page is cut into crops (do_image_splitting: 5 tower pages a row) or asked twice
        self.filling, self.fill_seconds, self.fill_pages, self.fill_rows = False, None, 0, 0
        self.serving = False  # generation (docvlm.evaluation.generation) reads and stores pages through it
        self.fill_startup_seconds = None  # of fill_seconds: until the first batch was ready (workers starting)
        # of fill_seconds after the start-up: waiting for decoded pages, and for the last entries to reach the disk
        self.fill_page_wait_seconds = self.fill_disk_wait_seconds = 0.0
        self.stored_bytes = self._bytes_on_disk() if self.folder else 0
        # Disk entries are written by a background thread while the GPU goes on; `writing` holds them until they
        # are on disk, and flush() waits for them (and raises what a write raised, e.g. a full disk).
        self.writing: dict[str, tuple] = {}
        self._writer = None

    def key(self, pixels: torch.Tensor) -> str:
        return self.key_of(page_digest(pixels))

    def key_of(self, digest: str) -> str:
        return entry_key(self.identity, digest)

    def page_keys(self, patch_size: int) -> PageKeys:
        """The collator's part: digests, and for a disk cache the features of batches it holds whole."""
        return PageKeys(patch_size, self.folder, self.identity)

    def expect(self, digests: list[str] | None, features: torch.Tensor | None = None) -> None:
        """The digests (and, read from disk, the features) of the pages of the next tower call, made with the batch
        in a DataLoader worker."""
        self.next_digests, self.next_features = digests, features

    def take_digests(self, pages: int) -> list[str] | None:
        digests, self.next_digests = getattr(self, "next_digests", None), None
        return digests if digests is not None and len(digests) == pages else None

    def take_features(self, pages: int, cells: int) -> torch.Tensor | None:
        features, self.next_features = getattr(self, "next_features", None), None
        return features if features is not None and tuple(features.shape[:2]) == (pages, cells) else None

    def _path(self, key: str) -> Path:
        return entry_path(self.folder, key)

    def _bytes_on_disk(self) -> int:
        if not self.folder.exists():
            return 0
        return sum(p.stat().st_size for p in self.folder.rglob("*.safetensors"))

    def holds(self, key: str) -> bool:
        return key in self.memory or key in self.writing or (self.folder is not None and self._path(key).exists())

    def get(self, key: str) -> torch.Tensor | None:
        found = self.memory.get(key)
        if found is None and key in self.writing:
            found, _, _, copied = self.writing[key]
            found = _once_copied(found, copied)
        elif found is None and self.folder is not None and self._path(key).exists():
            from safetensors.torch import load_file

            found = load_file(self._path(key))["features"]
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def host_copy(self, features: torch.Tensor):
        """A tower call's features on their way to a disk cache: copied to (pinned) CPU memory without waiting, with
        the CUDA event after which the copy is complete, so the GPU goes on with the next pages while the writer
        threads wait for it (a page-by-page copy into new pageable memory stalls the GPU at every page).
        (features, None) where nothing is to wait for: a memory cache, which keeps its own
        pageable copies, or features already on the CPU."""
        features = self.stored(features)
        if self.folder is None or not features.is_cuda:
            return features, None
        host = features.detach().to("cpu", non_blocking=True)  # pinned, released once every entry is written
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(features.device))
        return host, copied

    def stored(self, features: torch.Tensor) -> torch.Tensor:
        """`features` as the cache keeps them: rounded to the stored dtype on their device (half the copy too)."""
        return features if self.stored_dtype is None else features.to(self.stored_dtype)

    def put(self, key: str, features: torch.Tensor, copied: torch.cuda.Event | None = None) -> None:
        """Store a page's (patches, width) features; `copied`: the event after which `features`, a (rows, columns,
        width) view of host_copy's tensor, hold their values (the write waits for it, then lays them out)."""
        if self.holds(key):
            return  # a page asked twice (several questions on it): stored, counted and written once
        if copied is None:  # never a view of the batch's tensor
            features = self.stored(features.detach()).to("cpu", copy=True).contiguous()
        size = features.numel() * features.element_size()
        if self.folder is not None:
            size += ENTRY_HEADER_BYTES  # counted before the write, corrected to the file's size after it
        if self.stored_bytes + size > self.max_bytes:
            self.not_stored += 1  # over the recipe's bound: recomputed next time, never evicting silently
            return
        self.stored_bytes += size
        if self.folder is None:
            self.memory[key] = features
            return
        self._raise_failed_writes()
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="docvlm-feature-cache")
        write = self._writer.submit(self._write, key, features, copied)
        self.writing[key] = (features, size, write, copied)

    def _raise_failed_writes(self, wait: bool = False) -> None:
        for key, (_, size, future, _) in list(self.writing.items()):
            if wait or future.done():
                del self.writing[key]
                self.stored_bytes += future.result() - size  # the size on disk, header included; raises errors

    def flush(self) -> None:
        """Wait until every entry is on disk; raises a write's error (a full disk: UserError)."""
        try:
            self._raise_failed_writes(wait=True)
        finally:
            self.writing.clear()

    def _write(self, key: str, features: torch.Tensor, copied=None) -> int:
        """Write one entry whole, once its copy is complete; returns its size on disk."""
        from safetensors.torch import save_file

        features = _once_copied(features, copied).contiguous()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            save_file({"features": features}, str(partial))
            os.replace(partial, path)
            return path.stat().st_size
        except OSError as error:
            partial.unlink(missing_ok=True)
            if error.errno == errno.ENOSPC:
                advice = f" {self.full_disk_advice}" if self.full_disk_advice else " Free space there."
                raise UserError(f"The disk holding the vision feature cache ({self.folder}) is full.{advice}") from None
            raise

    def summary(self, bound: str = "the cache's bound") -> str:
        """What the cache did, in a line; `bound`: the setting that bounds it, as the recipe names it."""
        self.flush()
        where = f"in {self.folder}" if self.folder else "in memory"
        line = f"Vision feature cache: {self.hits} pages read, {self.misses} computed, "
        if self.held:
            line += f"{self.held} found stored before training, "
        line += f"{self.stored_bytes / 2**20:.1f} MiB {where}"
        if self.fill_seconds is not None:
            line += (
                f"; filled before training in {self.fill_seconds:.1f} s ({self.fill_startup_seconds or 0:.1f} s to "
                f"the first pages, then {self.fill_page_wait_seconds:.1f} s waiting for pages and "
                f"{self.fill_disk_wait_seconds:.1f} s for the disk)"
            )
        if self.not_stored:
            line += f"; {self.not_stored} pages not stored (over {bound})"
        return line + "."


def _once_copied(features: torch.Tensor, copied) -> torch.Tensor:
    """A page as put() got it, readable: where `copied` is given, a (rows, columns, width) view of host_copy's
    tensor, waited for and laid out as (patches, width) like every other entry."""
    if copied is None:
        return features
    copied.synchronize()
    return features.reshape(-1, features.shape[-1])


def page_extents(patch_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Rows and columns of each page's real patches (its top-left rectangle of the padded patch grid), read from
    the GPU in one transfer."""
    rows = patch_mask.any(dim=2).sum(dim=1)
    cols = patch_mask.any(dim=1).sum(dim=1)
    return [tuple(extent) for extent in torch.stack([rows, cols], dim=1).tolist()]


class PagesStored(Exception):
    """Raised by the tower while the cache is being filled, once the batch's pages are stored: the rest of the
    model (connector, text model) has nothing to add to the cache, so it does not run."""


def _keys(cache: FeatureCache, pixel_values, extents, patch_size: int) -> list[str]:
    """The batch's keys: from the digests its collator computed, or else hashed here from the tower's input (one
    transfer for the batch; a page rounded to the tower's dtype has another key: a miss, never a wrong hit)."""
    digests = cache.take_digests(len(extents))
    if digests is not None:
        return [cache.key_of(digest) for digest in digests]
    pixels = pixel_values.detach().to("cpu")
    crops = [pixels[page : page + 1, :, : h * patch_size, : w * patch_size] for page, (h, w) in enumerate(extents)]
    return [cache.key(crop) for crop in crops]


def _compute_and_store(compute, cache, pixel_values, patch_mask, extents, keys, pages, patch_size, **kwargs):
    """Run the tower once on `pages` (indices into the batch), cropped to the largest of their extents, and store
    each page's features at its real size; returns them by page index."""
    rows = max(extents[page][0] for page in pages)
    cols = max(extents[page][1] for page in pages)
    pixels = pixel_values[pages, :, : rows * patch_size, : cols * patch_size]
    hidden = compute(pixel_values=pixels, patch_attention_mask=patch_mask[pages, :rows, :cols], **kwargs)
    hidden = hidden.last_hidden_state.view(len(pages), rows, cols, -1)
    host, copied = cache.host_copy(hidden)
    hidden = cache.stored(hidden)  # the batch gets what a later read of the cache gives
    computed = {}
    for index, page in enumerate(pages):
        h, w = extents[page]
        computed[page] = hidden[index, :h, :w].reshape(h * w, -1)
        cache.put(keys[page], host[index, :h, :w] if copied else computed[page], copied)
    return computed


def _batch_keys(cache: FeatureCache, pixel_values, patch_attention_mask, patch_size: int):
    """The tower call's patch mask (all patches where it has none), each page's extent and each page's key."""
    if patch_attention_mask is None:
        pages, _, height, width = pixel_values.shape
        grid = (pages, height // patch_size, width // patch_size)
        patch_attention_mask = torch.ones(grid, dtype=torch.bool, device=pixel_values.device)
    extents = page_extents(patch_attention_mask)
    return patch_attention_mask, extents, _keys(cache, pixel_values, extents, patch_size)


def cached_features(
    compute, cache: FeatureCache, pixel_values, patch_attention_mask=None, patch_size: int = 14, **kwargs
):
    """The tower's last hidden state for a batch of pages: as the collator read them from a disk cache, or else
    each page read from the cache, or, for the pages not in it, computed together in one call of `compute` (the
    tower) and stored; padded positions are zeros (masked downstream, as the tower's own values there are)."""
    from transformers.modeling_outputs import BaseModelOutput

    pages, _, height, width = pixel_values.shape
    given = cache.take_features(pages, (height // patch_size) * (width // patch_size))
    if given is not None:
        cache.take_digests(pages)  # they go with their batch
        cache.hits += pages
        return BaseModelOutput(last_hidden_state=given.to(pixel_values.device, non_blocking=True))
    patch_attention_mask, extents, keys = _batch_keys(cache, pixel_values, patch_attention_mask, patch_size)
    features = {page: cache.get(key) for page, key in enumerate(keys)}
    missing = [page for page, found in features.items() if found is None]
    if missing:
        args = (cache, pixel_values, patch_attention_mask, extents, keys, missing, patch_size)
        features.update(_compute_and_store(compute, *args, **kwargs))
    rows, cols = patch_attention_mask.shape[1:]
    found = [features[page].to(device=pixel_values.device) for page in range(len(extents))]
    return BaseModelOutput(last_hidden_state=padded_grid(found, extents, rows, cols))


def store_features(compute, cache: FeatureCache, pixel_values, patch_attention_mask=None, patch_size: int = 14, **kw):
    """Compute and store the features of the batch's pages that the cache does not hold yet (none is read back)."""
    patch_attention_mask, extents, keys = _batch_keys(cache, pixel_values, patch_attention_mask, patch_size)
    missing = [page for page, key in enumerate(keys) if not cache.holds(key)]
    cache.held += len(keys) - len(missing)
    cache.misses += len(missing)
    if missing:
        _compute_and_store(compute, cache, pixel_values, patch_attention_mask, extents, keys, missing, patch_size, **kw)
    raise PagesStored
