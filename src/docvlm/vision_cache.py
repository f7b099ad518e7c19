"""Frozen-vision-feature cache: a frozen, un-adapted vision tower gives the same features for the same page in
every epoch and every run, so each page's features are computed once and reused (`vision_feature_cache`).

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


def tower_identity(tower: torch.nn.Module) -> str:
    """A digest of the tower's weights (all of them, with dtype and shape): two towers share cached features only
    when they compute the same function."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        _digest_tensor(digest, tensor, name)
    return digest.hexdigest()


class FeatureCache:
    """Page features by key, in memory or in a folder of safetensors files (one a page, written whole under a
    temporary name and renamed, so an interrupted write is never read)."""

    def __init__(self, mode: str, folder: str | os.PathLike | None, identity: str, max_bytes: int):
        if mode not in ("memory", "disk"):
            raise ValueError(f"vision_feature_cache must be off, memory or disk, got {mode!r}.")
        self.mode, self.identity, self.max_bytes = mode, identity, max_bytes
        self.memory: dict[str, torch.Tensor] = {}
        self.folder = Path(folder) / identity[:16] if mode == "disk" else None
        self.hits = self.misses = self.not_stored = 0
        self.stored_bytes = self._bytes_on_disk() if self.folder else 0

    def key(self, pixels: torch.Tensor) -> str:
        digest = hashlib.sha256(self.identity.encode())
        _digest_tensor(digest, pixels)
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def _bytes_on_disk(self) -> int:
        if not self.folder.exists():
            return 0
        return sum(p.stat().st_size for p in self.folder.rglob("*.safetensors"))

    def get(self, key: str) -> torch.Tensor | None:
        found = self.memory.get(key)
        if found is None and self.folder is not None and self._path(key).exists():
            from safetensors.torch import load_file

            found = load_file(self._path(key))["features"]
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, features: torch.Tensor) -> None:
        features = features.detach().to("cpu").contiguous()
        size = features.numel() * features.element_size()
        if self.stored_bytes + size > self.max_bytes:
            self.not_stored += 1  # over the recipe's bound: recomputed next time, never evicting silently
            return
        if self.folder is None:
            self.memory[key] = features
            self.stored_bytes += size
        else:
            self.stored_bytes += self._write(key, features)

    def _write(self, key: str, features: torch.Tensor) -> int:
        """Write one entry whole; returns its size on disk."""
        from safetensors.torch import save_file

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
                raise UserError(
                    f"The disk holding the vision feature cache ({self.folder}) is full. Free space there, set "
                    "vision_feature_cache_dir to a disk with room, lower vision_feature_cache_max_gb, or set "
                    "vision_feature_cache: memory."
                ) from None
            raise

    def summary(self) -> str:
        where = f"in {self.folder}" if self.folder else "in memory"
        line = f"Vision feature cache: {self.hits} pages read, {self.misses} computed, "
        line += f"{self.stored_bytes / 2**20:.1f} MiB {where}"
        if self.not_stored:
            line += f"; {self.not_stored} pages not stored (over vision_feature_cache_max_gb)"
        return line + "."


def real_extent(patch_mask: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of a page's real patches (its top-left rectangle of the padded patch grid)."""
    return int(patch_mask.any(dim=1).sum()), int(patch_mask.any(dim=0).sum())


def cached_features(
    original, cache: FeatureCache, pixel_values, patch_attention_mask=None, patch_size: int = 14, **kwargs
):
    """The tower's last hidden state for a batch of pages, each page read from the cache or computed alone at its
    real size and stored; padded positions are zeros (masked downstream, as the tower's own values there are)."""
    from transformers.modeling_outputs import BaseModelOutput

    pages, _, height, width = pixel_values.shape
    if patch_attention_mask is None:
        patch_attention_mask = torch.ones(
            pages, height // patch_size, width // patch_size, dtype=torch.bool, device=pixel_values.device
        )
    rows, cols = patch_attention_mask.shape[1:]
    outputs = []
    for page in range(pages):
        h, w = real_extent(patch_attention_mask[page])
        pixels = pixel_values[page : page + 1, :, : h * patch_size, : w * patch_size]
        key = cache.key(pixels)
        features = cache.get(key)
        if features is None:
            mask = torch.ones(1, h, w, dtype=torch.bool, device=pixel_values.device)
            features = original(pixel_values=pixels, patch_attention_mask=mask, **kwargs).last_hidden_state[0]
            cache.put(key, features)
        features = features.to(device=pixel_values.device)
        grid = features.new_zeros(rows, cols, features.shape[-1])
        grid[:h, :w] = features.view(h, w, -1)
        outputs.append(grid.view(rows * cols, -1))
    return BaseModelOutput(last_hidden_state=torch.stack(outputs))
