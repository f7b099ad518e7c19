"""What a training step computes and what the card could do: model FLOPs from the batch's real sizes (counted
by each family's module), and the cards `docvlm plan` and `make bench` know, with their dense half-precision
peak, to turn a step time into achieved TFLOP/s and MFU (model FLOPs utilization)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float  # what torch can allocate on it
    peak_tflops: float  # dense bf16 (fp16 on a T4), from the vendor's data sheet
    bf16: bool = True
    device_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name()


CARDS = {
    "t4-16gb": Card("T4 16GB", 14.6, 65.0, bf16=False, device_names=("T4",)),
    "l4-24gb": Card("L4 24GB", 22.0, 121.0, device_names=("L4",)),
    "a100-40gb": Card("A100 40GB", 39.4, 312.0, device_names=("A100-SXM4-40GB", "A100-PCIE-40GB")),
    "a100-80gb": Card("A100 80GB", 79.1, 312.0, device_names=("A100-SXM4-80GB", "A100 80GB")),
    "h100-80gb": Card("H100 80GB", 79.1, 989.0, device_names=("H100",)),
    "h200-141gb": Card("H200 141GB", 139.8, 989.0, device_names=("H200",)),
}


def card_of(device_name: str) -> Card | None:
    """The card torch names `device_name` (e.g. "NVIDIA L4"), or None for one not listed."""
    for card in CARDS.values():
        if any(part in device_name for part in card.device_names):
            return card
    return None


def batch_shapes(inputs: dict, patch_size: int) -> torch.Tensor:
    """The real sizes a model call computes on, as one tensor on the batch's device (read later, so that counting
    never waits for the GPU): text tokens, causal attention pairs, pages, image patches and patch attention pairs.
    Padding tokens and the padded part of a page are not counted."""
    mask = inputs["attention_mask"]
    lengths = mask.sum(dim=1).double()
    sizes = [lengths.sum(), (lengths * (lengths + 1) / 2).sum()]
    pixel_mask = inputs.get("pixel_attention_mask")
    if pixel_mask is None:
        zero = lengths.new_zeros(())
        sizes += [zero, zero, zero]
    else:
        pixel_mask = pixel_mask.flatten(0, -3)  # every page, as (pages, height, width)
        rows = pixel_mask.any(dim=-1).sum(dim=-1) // patch_size
        cols = pixel_mask.any(dim=-2).sum(dim=-1) // patch_size
        patches = (rows * cols).double()
        sizes += [(patches > 0).sum().double(), patches.sum(), (patches * patches).sum()]
    return torch.stack(sizes)


SHAPE_KEYS = ("tokens", "causal_pairs", "pages", "patches", "patch_pairs")


def as_shapes(values) -> dict:
    return dict(zip(SHAPE_KEYS, (float(v) for v in values), strict=True))
