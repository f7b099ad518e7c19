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
    bandwidth_gb_s: float  # memory bandwidth, from the vendor's data sheet: what decoding a token waits on
    bf16: bool = True
    device_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name()


CARDS = {
    "t4-16gb": Card("T4 16GB", 14.6, 65.0, 320.0, bf16=False, device_names=("T4",)),
    "l4-24gb": Card("L4 24GB", 22.0, 121.0, 300.0, device_names=("L4",)),
    "a100-40gb": Card("A100 40GB", 39.4, 312.0, 1555.0, device_names=("A100-SXM4-40GB", "A100-PCIE-40GB")),
    "a100-80gb": Card("A100 80GB", 79.1, 312.0, 2039.0, device_names=("A100-SXM4-80GB", "A100 80GB")),
    "h100-80gb": Card("H100 80GB", 79.1, 989.0, 3350.0, device_names=("H100",)),
    "h200-141gb": Card("H200 141GB", 139.8, 989.0, 4800.0, device_names=("H200",)),
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
    Padding tokens and the padded part of a page are not counted; packed rows (no attention mask) are told apart by
    their positions. Pages come as a pixel mask (padded pages), as a grid of patches each (`image_grid_thw`) or as
    fixed-size images."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(dim=1).double()
    else:  # rows packed into one sequence without padding: each starts again at position 0
        starts = (inputs["position_ids"].flatten() == 0).long()
        lengths = torch.bincount(starts.cumsum(0) - 1).double()
    sizes = [lengths.sum(), (lengths * (lengths + 1) / 2).sum()]
    pixel_mask, grid, pixels = (
        inputs.get("pixel_attention_mask"),
        inputs.get("image_grid_thw"),
        inputs.get("pixel_values"),
    )
    if pixel_mask is not None:
        pixel_mask = pixel_mask.flatten(0, -3)  # every page, as (pages, height, width)
        rows = pixel_mask.any(dim=-1).sum(dim=-1) // patch_size
        cols = pixel_mask.any(dim=-2).sum(dim=-1) // patch_size
        patches = (rows * cols).double()
    elif grid is not None:
        patches = grid.prod(dim=-1).double()  # (time, height, width) in patches, a row per image
    elif pixels is not None and pixels.dim() >= 4:
        pages = pixels.shape[:-3].numel()
        patches = pixels.new_full((pages,), (pixels.shape[-2] // patch_size) * (pixels.shape[-1] // patch_size))
        patches = patches.double()
    else:
        zero = lengths.new_zeros(())
        return torch.stack([*sizes, zero, zero, zero])
    sizes += [(patches > 0).sum().double(), patches.sum(), (patches * patches).sum()]
    return torch.stack(sizes)


def largest_page_patches(inputs: dict, patch_size: int) -> int:
    """The patches of the batch's largest page as the tower takes it (padded pages at their padded size)."""
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        return int(grid.prod(dim=-1).max())
    pixels = inputs["pixel_values"]
    return (pixels.shape[-2] // patch_size) * (pixels.shape[-1] // patch_size)


def tower_sizes(vision) -> tuple[int, int, int]:
    """(width, MLP width, layers) of a vision tower's config, whatever names its family gives them."""
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # some towers name their width embed_dim
    inner = getattr(vision, "intermediate_size", None) or int(width * vision.mlp_ratio)
    return width, inner, getattr(vision, "num_hidden_layers", None) or vision.depth


def counted_training_flops(config, shapes: dict, tower_runs: bool = True) -> float:
    """Model FLOPs of one training micro-batch counted from the decoder's and the vision tower's sizes in `config`
    and the batch's real sizes (`batch_shapes`), for a family without its own count. The decoder runs forward and
    backward on frozen weights (a linear layer's backward is one matmul, the input gradient; an attention's is
    two); the tower forward only, and not where a feature cache replaced it. Left out, so that MFU is never
    overstated: the connector, LoRA's matmuls, a gated tower MLP's third matrix, recomputation by checkpointing."""
    text, vision = config.text_config, config.vision_config
    d, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv = text.num_key_value_heads * head_dim
    layers = text.num_hidden_layers
    linear = 2 * layers * (2 * d * heads * head_dim + 2 * d * kv + 3 * d * text.intermediate_size) * shapes["tokens"]
    attention = 4 * heads * head_dim * layers * shapes["causal_pairs"]
    flops = 2 * linear + 3 * attention
    if tower_runs and shapes["patches"]:
        dv, inner, depth = tower_sizes(vision)
        full = len(getattr(vision, "fullatt_block_indexes", None) or ()) or depth
        window = (getattr(vision, "window_size", 0) // vision.patch_size) ** 2  # a tower's windowed layers
        channels = 3 * getattr(vision, "temporal_patch_size", 1)  # patches a few frames deep
        flops += 2 * channels * vision.patch_size**2 * dv * shapes["patches"]  # the patch embedding
        flops += 2 * depth * (4 * dv * dv + 2 * dv * inner) * shapes["patches"]
        flops += 4 * dv * (full * shapes["patch_pairs"] + (depth - full) * window * shapes["patches"])
    return float(flops)


SHAPE_KEYS = ("tokens", "causal_pairs", "pages", "patches", "patch_pairs")


def as_shapes(values) -> dict:
    return dict(zip(SHAPE_KEYS, (float(v) for v in values), strict=True))
