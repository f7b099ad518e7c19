"""`packed_rows`: the rows of a batch packed into one sequence give the padded batch's loss and gradients and count
the same work; a run trains on packed batches with the padded run's losses; a family whose batches cannot be packed
refuses it."""

import pytest
import torch

from docvlm import speedups
from docvlm.errors import UserError
from docvlm.flops import batch_shapes
from docvlm.recipe.parse import parse_recipe
from docvlm.speedups.row_packing import PackedRows, pack_rows, without_cache_by_default
from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch, quick


@pytest.mark.integration
def test_a_packed_run_trains_on_packed_batches_with_the_padded_runs_losses(tmp_path):
    from docvlm.train import run

    losses = {}
    for packed in ("false", "true"):
        argv = quick(tmp_path / packed, "--max_steps", "3", "--eval_after_training", "false", "--packed_rows", packed)
        trainer, _ = run(argv)
        assert isinstance(trainer.data_collator, PackedRows) == (packed == "true")
        if packed == "true":
            assert trainer.model.config.use_cache is False  # a cache in training would span the packed rows
        losses[packed] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["true"]) == 3 and losses["true"] == pytest.approx(losses["false"], abs=1e-4)


def test_a_family_whose_batches_cannot_be_packed_refuses_it():
    from docvlm.families import family_of

    qwen = family_of("qwen2_vl")  # its positions are three-dimensional and its pages a list of patches
    assert not qwen.packs_rows and family_of("idefics2").packs_rows
    _, _, args, _ = parse_recipe(["--config", "recipes/qwen2_vl_docvqa_qlora.yaml", "--packed_rows", "true"])
    with pytest.raises(UserError, match="packed_rows is on in the recipe, but it does not apply to Qwen"):
        speedups.refuse_what_does_not_apply(qwen, args)


def test_packed_rows_give_the_padded_batchs_loss_and_gradients():
    model, batch = peft_tiny_model_and_batch(size=4)
    without_cache_by_default(model)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: there is padding to remove
    packed = pack_rows(batch)
    assert packed["input_ids"].shape == (1, int(lengths.sum())) and "attention_mask" not in packed
    assert packed["position_ids"][0, : int(lengths[0]) + 1].tolist() == [*range(int(lengths[0])), 0]
    assert packed["pixel_values"].shape[:2] == (1, batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1])
    assert_same(loss_and_grads(model, batch), loss_and_grads(model, packed))
    # the control: the same rows in one sequence without restarting positions attend across rows, and differ
    joined = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    assert not torch.allclose(model(**joined).loss, model(**packed).loss)


def test_packed_and_padded_batches_count_the_same_work():
    _, batch = peft_tiny_model_and_batch(size=3)
    padded, packed = batch_shapes(batch, 14), batch_shapes(pack_rows(batch), 14)
    torch.testing.assert_close(packed, padded)


def test_what_cannot_be_packed_is_refused():
    _, batch = peft_tiny_model_and_batch(size=2)
    with pytest.raises(RuntimeError, match="cannot pack the batch's image_grid_thw"):
        pack_rows({**batch, "image_grid_thw": torch.ones(2, 3)})
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    with pytest.raises(RuntimeError, match="right-padded"):
        pack_rows(left)
    collate = PackedRows(lambda rows: batch)
    assert collate([])["input_ids"].shape[0] == 1
