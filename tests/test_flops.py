"""What a step computes (docvlm.flops): the batch's real sizes, and the cards MFU is measured against."""

import pytest
import torch

from docvlm.flops import CARDS, as_shapes, batch_shapes, card_of


def test_batch_shapes_count_real_tokens_pages_and_patches_not_padding():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    pixel_mask = torch.zeros(2, 2, 56, 42, dtype=torch.bool)  # 2 rows, up to 2 pages each, patches of 14 pixels
    pixel_mask[0, 0, :56, :42] = True  # 4 x 3 patches
    pixel_mask[0, 1, :30, :42] = True  # 30 pixels: 2 whole patch rows (a partial patch is padding) x 3
    pixel_mask[1, 0, :28, :28] = True  # 2 x 2; the row's second page is padding
    shapes = as_shapes(batch_shapes({"attention_mask": attention_mask, "pixel_attention_mask": pixel_mask}, 14))
    assert shapes == {
        "tokens": 7,
        "causal_pairs": 3 * 4 / 2 + 4 * 5 / 2,
        "pages": 3,
        "patches": 12 + 6 + 4,
        "patch_pairs": 144 + 36 + 16,
    }
    text_only = as_shapes(batch_shapes({"attention_mask": attention_mask}, 14))
    assert text_only["pages"] == text_only["patches"] == 0 and text_only["tokens"] == 7


def test_batch_shapes_match_the_patches_idefics2_attends_to(tiny_model_path):
    """The patch count agrees with the patch mask Idefics2 itself builds from the pixel mask."""
    from transformers import AutoProcessor

    from tests.speedups.test_feature_cache import mixed_batch

    batch = mixed_batch(AutoProcessor.from_pretrained(tiny_model_path))
    mask = batch["pixel_attention_mask"].flatten(0, 1)
    grid = mask.unfold(1, 14, 14).unfold(2, 14, 14)
    idefics2_patches = (grid.sum(dim=(-1, -2)) == 14 * 14).sum().item()
    assert as_shapes(batch_shapes(batch, 14))["patches"] == idefics2_patches


def test_cards_are_found_by_the_name_torch_gives_them():
    assert card_of("NVIDIA H100 80GB HBM3") is CARDS["h100-80gb"]
    assert card_of("NVIDIA H200") is CARDS["h200-141gb"]
    assert card_of("NVIDIA A100-SXM4-40GB") is CARDS["a100-40gb"]
    assert card_of("Tesla T4") is CARDS["t4-16gb"] and not CARDS["t4-16gb"].bf16
    assert card_of("Some Future GPU") is None


def test_batch_shapes_read_qwen_grids_and_fixed_size_images():
    from docvlm.flops import as_shapes, batch_shapes

    mask = torch.ones(2, 10)
    grid = {"attention_mask": mask, "image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 2]])}
    assert as_shapes(batch_shapes(grid, 14)) == as_shapes([20, 110, 2, 28, 24**2 + 4**2])
    fixed = {"attention_mask": mask, "pixel_values": torch.zeros(2, 3, 336, 336)}
    assert as_shapes(batch_shapes(fixed, 14))["patches"] == 2 * 24 * 24


@pytest.mark.parametrize("fixture", ["docvlm:tiny-qwen2.5-vl", "docvlm:tiny-qwen3-vl", "docvlm:tiny-llava"])
def test_the_counted_decoder_flops_are_what_torch_counts(fixture):
    """The decoder and the tower of a tiny model, counted against torch's FLOP counter: the decoder exactly (its
    training cost is its forward's linear FLOPs twice and its attention's three times), the tower forward within
    what torch counts (a gated tower MLP's third matrix and the connector are left out) and at least most of it."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModel

    from docvlm.fixtures import resolve
    from docvlm.flops import counted_training_flops

    config = AutoConfig.from_pretrained(resolve(fixture))
    decoder = AutoModel.from_config(config.text_config, attn_implementation="eager")  # torch counts its matmuls
    length = 24
    with FlopCounterMode(display=False) as counter:
        decoder(inputs_embeds=torch.zeros(1, length, config.text_config.hidden_size))
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    linear = counts.pop("aten.mm", 0) + counts.pop("aten.addmm", 0)  # Qwen's q, k and v have biases
    attention = counts.pop("aten.bmm", 0) + counts.pop("aten.matmul", 0)
    assert not counts, counts
    text_only = dict(tokens=length, causal_pairs=length**2, pages=0, patches=0, patch_pairs=0)
    assert counted_training_flops(config, text_only) == 2 * linear + 3 * attention

    assert counted_training_flops(config, text_only, tower_runs=False) == 2 * linear + 3 * attention


def tower_call(fixture, tower, config):
    """One 112 x 112 page (8 x 8 patches of 14 px) through the tower, as the model calls it."""
    if fixture == "docvlm:tiny-llava":
        return lambda: tower(pixel_values=torch.zeros(1, 3, 112, 112))
    vision = config.vision_config
    grid = torch.tensor([[1, 8, 8]])
    pixels = torch.zeros(64, 3 * vision.temporal_patch_size * vision.patch_size**2)
    return lambda: tower(pixels, grid_thw=grid)


@pytest.mark.parametrize("fixture", ["docvlm:tiny-qwen2.5-vl", "docvlm:tiny-llava"])
def test_the_counted_tower_flops_are_most_of_what_torch_counts_and_never_more(fixture):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModel

    from docvlm.fixtures import resolve
    from docvlm.flops import counted_training_flops
    from docvlm.speedups.model_parts import vision_tower

    config = AutoConfig.from_pretrained(resolve(fixture))
    tower = vision_tower(AutoModel.from_config(config, attn_implementation="eager"))
    with FlopCounterMode(display=False) as counter:
        tower_call(fixture, tower, config)()
    torch_counts = sum(counter.get_flop_counts()["Global"].values())
    page = dict(tokens=0, causal_pairs=0, pages=1, patches=64, patch_pairs=64**2)
    counted = counted_training_flops(config, page, tower_runs=True) - counted_training_flops(config, page, False)
    assert 0.6 * torch_counts <= counted <= torch_counts
