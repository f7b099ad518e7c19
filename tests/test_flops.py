"""What a step computes (docvlm.flops): the batch's real sizes, and the cards MFU is measured against."""

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
